"""``timm-ddw routing``: flags -> :func:`timm_ddw.routing_report.routing_report`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data import FASHION_MNIST_DIR
from ..routing_report import routing_report
from ._common import HelpFormatter, KeyValue

__all__ = ['add_parser']


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        'routing', help='routing statistics and heatmaps of a DDW model over a data set',
        description='Run a DDW model over images and write per-stage edge statistics (routing.json, routing.npz, '
                    'summary.txt) and heatmaps (PNG, needs matplotlib) to --output. Preprocessing is timm\'s data '
                    'config and eval transform for the model.', formatter_class=HelpFormatter)
    p.add_argument('--model', required=True, help='a ddw_* model, e.g. ddw_resnet18')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', metavar='FILE',
                     help='weights: .safetensors or a torch checkpoint (state_dict / state_dict_ema keys as timm '
                          'saves them); a config.json next to it (timm hub format) sets the model kwargs')
    src.add_argument('--pretrained', action='store_true', help="timm's pretrained weights for --model")
    p.add_argument('--data-dir', '--data', dest='data', default='fashion-mnist', metavar='DIR|fashion-mnist',
                   help='an image folder (one sub-folder per class) or fashion-mnist (the installed IDX files)')
    p.add_argument('--output', '--out', dest='output', required=True, metavar='DIR',
                   help='report folder; one that already holds files is kept and DIR-1, DIR-2, ... is used instead')
    p.add_argument('--model-kwargs', nargs='*', default=None, action=KeyValue, metavar='KEY=VALUE',
                   help='model constructor kwargs, e.g. num_classes=10 in_chans=1 wiring=static '
                        '(override config.json)')
    p.add_argument('--use-ema', action='store_true', help="use the checkpoint's state_dict_ema when present")
    p.add_argument('--split', default='test', choices=('train', 'test'), help='fashion-mnist split')
    p.add_argument('--fashion-mnist-dir', default=str(FASHION_MNIST_DIR), metavar='DIR',
                   help='folder with the Fashion-MNIST IDX .gz files')
    p.add_argument('--limit', type=int, default=None, metavar='N', help='use only the first N samples (default: all)')
    p.add_argument('-b', '--batch-size', type=int, default=64, metavar='N', help='images per forward')
    p.add_argument('--img-size', type=int, default=None, metavar='PX',
                   help="input size (default: the model's data config)")
    p.add_argument('-j', '--workers', type=int, default=2, metavar='N', help='data loader worker processes')
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda', 'cuda:1', or 'auto'")
    p.add_argument('--amp', action='store_true', help='mixed precision (float16 on CUDA, bfloat16 on CPU)')
    p.add_argument('--no-plots', action='store_true', help='write no PNG figures')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    stats, paths = routing_report(
        args.model, args.output, data=args.data, checkpoint=args.checkpoint, pretrained=args.pretrained,
        model_kwargs=args.model_kwargs, use_ema=args.use_ema, split=args.split, limit=args.limit,
        batch_size=args.batch_size, img_size=args.img_size, workers=args.workers, device=args.device, amp=args.amp,
        plots=False if args.no_plots else None, progress=not args.no_progress,
        fashion_mnist_dir=args.fashion_mnist_dir)
    print(stats.text_summary())
    folder = next(iter(paths.values())).parent
    note = '' if folder == Path(args.output) else f' ({args.output} already holds files)'
    print(f'wrote {folder}/{note}: ' + ', '.join(p.name for p in paths.values()))
    return 0
