"""``timm-ddw`` console command: one module per subcommand.

Each module parses its flags and calls library functions with plain arguments (``train``:
:class:`timm_ddw.train.TrainConfig`; ``routing``: :func:`timm_ddw.routing_report.routing_report`;
``export``/``push``/``hub-configs``: :mod:`timm_ddw.hub`). Bad input ends in one ``error:`` line
and exit status 2, never a traceback; Ctrl-C in exit status 130.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from ..models._pretrained import DdwCheckpointError
from ._common import Parser

__all__ = ['build_parser', 'main']

COMMANDS = ('train', 'routing', 'export', 'push', 'hub_configs')
# what a user can cause and fix: a missing or unwritable file, a bad value, weights that do not fit,
# a learning rate that makes the loss diverge
USER_ERRORS = (OSError, ValueError, DdwCheckpointError, FloatingPointError)


def build_parser() -> Parser:
    parser = Parser(prog='timm-ddw', description='Differentiable Dynamic Wirings for timm models.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name in COMMANDS:
        importlib.import_module(f'{__name__}.{name}').add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f'timm-ddw {args.command}: interrupted', file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f'timm-ddw {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
