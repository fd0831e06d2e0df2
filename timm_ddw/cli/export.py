"""``timm-ddw export``: a train.py checkpoint -> a Hub-ready folder (:func:`timm_ddw.hub.export_checkpoint`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..hub import EXPORT_FILES, export_checkpoint
from ._common import HelpFormatter, KeyValue

__all__ = ['add_parser']


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        'export', help='write a Hub-ready folder (safetensors, config.json, card) from a train.py checkpoint',
        description='Write model.safetensors, config.json (timm\'s format) and a model card README.md into a folder. '
                    'Other files in the folder are left alone; existing export files are only replaced with '
                    '--overwrite.', formatter_class=HelpFormatter)
    p.add_argument('checkpoint', help='train.py checkpoint (.pth.tar/.pth/.safetensors); EMA weights preferred')
    p.add_argument('out_dir', help='folder to write')
    p.add_argument('--model', default=None, help="ddw_* model name (default: the checkpoint's arch)")
    p.add_argument('--model-kwargs', nargs='*', default=None, action=KeyValue, metavar='KEY=VALUE',
                   help="constructor arguments, e.g. wiring=static (default: the checkpoint's model_args)")
    p.add_argument('--no-ema', action='store_true', help='export the raw weights even if EMA weights exist')
    p.add_argument('--metrics', default=None, help='JSON object (or file) for the card, e.g. \'{"top1": 77.1}\'')
    p.add_argument('--recipe', default=None, help='train.py YAML recipe to quote in the card')
    p.add_argument('--repo-id', default=None, help='ORG/NAME the card refers to')
    p.add_argument('--tag', default=None, help='pretrained tag to record in config.json')
    p.add_argument('--license', default=None, help="licence (default: the source weights' licence)")
    p.add_argument('--label-names', nargs='+', default=None, metavar='NAME',
                   help='class names in classifier order, for config.json (timm and transformers show them), or '
                        'one file: a name per line, or a JSON list (default: the names `timm-ddw train` stored in '
                        'the checkpoint, or the config.json next to a .safetensors file)'),
    p.add_argument('--overwrite', action='store_true', help='replace export files already in the folder')
    p.set_defaults(run=run)


def _json_object(text: Optional[str], flag: str) -> Dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except json.JSONDecodeError as e:
        raise ValueError(f'{flag}: not a JSON object or a JSON file ({e})') from None
    if not isinstance(value, dict):
        raise ValueError(f'{flag} must be a JSON object, got {value!r}')
    return value


def _label_names(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``--label-names``: the names given, or those in the one file given (a JSON list, or one per line)."""
    if not values:
        return None
    if len(values) != 1 or not Path(values[0]).is_file():
        return list(values)
    text = Path(values[0]).read_text()
    if text.lstrip().startswith('['):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f'--label-names {values[0]}: not a JSON list ({e})') from None
        if not isinstance(names, list):
            raise ValueError(f'--label-names {values[0]}: expected a JSON list of names')
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    try:
        out = export_checkpoint(
            args.checkpoint, args.out_dir, model_name=args.model, model_args=args.model_kwargs, use_ema=not args.no_ema,
            overwrite=args.overwrite, metrics=_json_object(args.metrics, '--metrics'), recipe=args.recipe,
            repo_id=args.repo_id, tag=args.tag, license=args.license, label_names=_label_names(args.label_names))
    except FileExistsError as e:
        raise FileExistsError(f'{e} (--overwrite replaces them)') from None
    print(f'wrote {out}/: ' + ', '.join(EXPORT_FILES))
    return 0
