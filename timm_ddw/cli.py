"""``timm-ddw`` console command: one subcommand per feature module.

Each module in ``_MODULES`` exposes ``register_cli(subparsers)``, which adds its subcommands
with ``set_defaults(func=...)``; ``func(args)`` returns the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

_MODULES = ('timm_ddw.train', 'timm_ddw.routing', 'timm_ddw.hub')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-ddw', description='Differentiable Dynamic Wirings for timm models.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
