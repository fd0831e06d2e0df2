"""``timm-ddw hub-configs``: regenerate or check hub_configs/ (:mod:`timm_ddw.hub`)."""
from __future__ import annotations

import argparse
from typing import Any

from ..hub import check_hub_configs, write_hub_configs
from ._common import HelpFormatter

__all__ = ['add_parser']


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        'hub-configs', help='regenerate hub_configs/<model>/{config.json,README.md}',
        description='Write the config.json and model card template of each of the nine models, generated from the '
                    'code, or check that the committed ones are up to date.', formatter_class=HelpFormatter)
    p.add_argument('out_dir', nargs='?', default='hub_configs', help='folder of the files')
    p.add_argument('--check', action='store_true', help='exit 1 if the files differ from freshly generated ones')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.check:
        stale = check_hub_configs(args.out_dir)
        if stale:
            print(f"out of date under {args.out_dir}: {', '.join(stale)}; run `timm-ddw hub-configs {args.out_dir}`")
            return 1
        print(f'{args.out_dir} is up to date')
        return 0
    paths = write_hub_configs(args.out_dir)
    print(f'wrote {len(paths)} files under {args.out_dir}')
    return 0
