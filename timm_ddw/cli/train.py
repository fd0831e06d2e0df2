"""``timm-ddw train``: flags -> :class:`TrainConfig` -> :func:`timm_ddw.train.train`, Ctrl-C -> a resumable stop."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Dict

from ..graph import GATES, WIRINGS
from ..models._ddw import DDW_DEFAULTS
from ..train import QUICK, SCHEDULERS, TrainConfig, TrainingInterrupted, train
from ._common import HelpFormatter, KeyValue, add_flag

__all__ = ['add_parser', 'config_from_args']

D = TrainConfig()
SHORTCUTS = ('wiring', 'router_bias', 'threshold_init', 'gate', 'node_budget')  # flags that fill model_kwargs


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        'train', help='train and evaluate a DDW model on Fashion-MNIST or an image folder',
        description='Train and evaluate a DDW model with timm\'s library pieces, then write a report folder '
                    '(last.pth.tar after every epoch, model/model.safetensors, routing.json and heatmaps, '
                    'metrics.json). Flags are timm train.py\'s. The defaults take about 4 minutes on an idle 2-core '
                    'CPU. '
                    'Ctrl-C stops after the current step and says how to --resume.',
        formatter_class=HelpFormatter)
    g = p.add_argument_group('data')
    add_flag(g, '--data-dir', '--data', dest='data_dir', default=None, metavar='DIR',
             help='image folder with train/ and val/ (or validation/) sub-folders, one sub-folder per class in '
                  'each (default: Fashion-MNIST)')
    add_flag(g, '--val-split', default=None, metavar='NAME',
             help='name of the validation folder in --data-dir (default: val/ or validation/)')
    add_flag(g, '--fashion-mnist-dir', default=D.fashion_mnist_dir, metavar='DIR',
             help='folder with the Fashion-MNIST IDX .gz files')
    add_flag(g, '--train-subset', type=int, default=D.train_subset, metavar='N',
             help='train on a fixed random subset of N images (0: all)')
    add_flag(g, '--val-subset', type=int, default=D.val_subset, metavar='N',
             help='evaluate on a fixed random subset of N images (0: all)')
    add_flag(g, '--img-size', type=int, default=D.img_size, metavar='PX', help='input image size')
    add_flag(g, '--in-chans', type=int, default=None, metavar='N',
             help='input channels (default: 1 for Fashion-MNIST, 3 for --data-dir)')
    add_flag(g, '-j', '--workers', type=int, default=D.workers, metavar='N', help='data loader worker processes')

    g = p.add_argument_group('model')
    add_flag(g, '--model', default=D.model, help='a ddw_* model')
    add_flag(g, '--model-kwargs', nargs='*', action=KeyValue, default=None, metavar='KEY=VALUE',
             help='model constructor arguments, e.g. wiring=static router_bias=0 wiring_seed=1')
    add_flag(g, '--wiring', choices=sorted(WIRINGS), default=DDW_DEFAULTS['wiring'],
             help='shortcut for --model-kwargs wiring=...')
    add_flag(g, '--router-bias', type=float, default=DDW_DEFAULTS['router_bias'],
             help='shortcut for --model-kwargs router_bias=...')
    add_flag(g, '--threshold-init', type=float, default=DDW_DEFAULTS['threshold_init'],
             help='shortcut for --model-kwargs threshold_init=...')
    add_flag(g, '--gate', choices=GATES, default=DDW_DEFAULTS['gate'], help='shortcut for --model-kwargs gate=...')
    add_flag(g, '--node-budget', type=float, default=DDW_DEFAULTS['node_budget'], metavar='SHARE',
             help='share of block nodes each image should run (e.g. 0.6); the model removes the rest per image '
                  '(shortcut for --model-kwargs node_budget=...; default: none, nothing removed)')
    add_flag(g, '--num-classes', type=int, default=None, metavar='N',
             help="classifier size (default: the data's classes)")
    add_flag(g, '--pretrained', action='store_true', default=False,
             help="start from timm's pretrained weights of the model (the twin's ImageNet weights, chain-wired)")
    add_flag(g, '--initial-checkpoint', default=None, metavar='FILE',
             help='start from these weights (.safetensors or a torch checkpoint; EMA weights preferred)')
    add_flag(g, '--resume', default=None, metavar='FILE',
             help="continue a run from its last.pth.tar, with its recipe (flags given here override it) and in "
                  "its folder")
    add_flag(g, '--grad-checkpointing', action='store_true', default=False,
             help='recompute block activations in backward to save memory')

    g = p.add_argument_group('optimisation')
    add_flag(g, '--epochs', type=int, default=D.epochs, metavar='N', help='training epochs')
    add_flag(g, '-b', '--batch-size', type=int, default=D.batch_size, metavar='N', help='images per step')
    add_flag(g, '--opt', default=D.opt, help="timm optimizer name ('momentum': SGD with momentum, as in the paper)")
    add_flag(g, '--lr', type=float, default=D.lr, help='peak learning rate')
    add_flag(g, '--momentum', type=float, default=D.momentum, help='optimizer momentum')
    add_flag(g, '--weight-decay', type=float, default=D.weight_decay, help='weight decay (not on routers and '
             'thresholds)')
    add_flag(g, '--smoothing', type=float, default=D.smoothing, help='label smoothing')
    add_flag(g, '--sched', choices=SCHEDULERS, default=D.sched, help="timm's learning rate schedule, per step")
    add_flag(g, '--warmup-steps', type=int, default=D.warmup_steps, metavar='N', help='linear warm-up steps')
    add_flag(g, '--max-steps', type=int, default=D.max_steps, metavar='N',
             help='at most N optimizer steps in total, spread evenly over the epochs (0: no limit)')
    add_flag(g, '--seed', type=int, default=D.seed, help='seed of the weights, data order and augmentation')
    add_flag(g, '--model-ema', action='store_true', default=False,
             help="keep an exponential moving average of the weights (timm's ModelEmaV3); the report, routing and "
                  "exported weights are then the EMA model's")
    add_flag(g, '--model-ema-decay', type=float, default=D.model_ema_decay, help='EMA decay per step')
    add_flag(g, '--model-ema-warmup', action='store_true', default=False,
             help='warm the EMA decay up from 0 (useful for short runs)')

    g = p.add_argument_group('run')
    add_flag(g, '--device', default=D.device, help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    add_flag(g, '--amp', action='store_true', default=False,
             help='mixed precision (float16 with loss scaling on CUDA, bfloat16 on CPU)')
    add_flag(g, '--amp-dtype', choices=('float16', 'bfloat16'), default=D.amp_dtype, help='autocast dtype on CUDA')
    add_flag(g, '--channels-last', action='store_true', default=False, help='channels-last memory layout')
    add_flag(g, '--torchcompile', nargs='?', const='inductor', default=D.torchcompile, metavar='BACKEND',
             help="torch.compile the model's forward with this backend, as timm's train.py (--torchcompile alone: "
                  'inductor; minutes of compiling on a CPU before the first step)')
    add_flag(g, '--torchcompile-mode', default=D.torchcompile_mode, metavar='MODE',
             help="torch.compile mode ('default', 'reduce-overhead', 'max-autotune', ...)")
    add_flag(g, '--threads', type=int, default=D.threads, metavar='N',
             help="torch CPU threads (default 0: torch's default, one per core). A run repeats bit for bit at the "
                  'same count; different counts differ in the last bits (--threads 1 was the default before)')
    add_flag(g, '--output', default=None, metavar='DIR',
             help='report folder; one that already holds files is kept and DIR-1, DIR-2, ... is used instead; '
                  '(default: ./output/<time>-<model>-<dataset>)')
    g.add_argument('--quick', action='store_true',
                   help=f'smoke run of the pipeline in seconds: {", ".join(f"{k}={v}" for k, v in QUICK.items())} '
                        'unless given')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe the flags ask for: only flags given on the command line are in ``args``."""
    given: Dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ('command', 'run', 'quick', 'no_progress')}
    kwargs = dict(given.pop('model_kwargs', {}))
    for key in SHORTCUTS:
        if key in given:
            value = given.pop(key)
            if key in kwargs and kwargs[key] != value:
                raise ValueError(f'--{key.replace("_", "-")} {value} contradicts --model-kwargs {key}={kwargs[key]}')
            kwargs[key] = value
    if kwargs:
        given['model_kwargs'] = kwargs
    if 'resume' in given:
        if args.quick:
            raise ValueError('--quick starts a new run; --resume continues one with its own recipe')
        return TrainConfig.from_checkpoint(given.pop('resume'), **given)
    return TrainConfig.quick(**given) if args.quick else TrainConfig(**given)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    stop = []

    def on_sigint(signum: int, frame: Any) -> None:
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        train(config, should_stop=lambda: bool(stop), progress=not args.no_progress)
    except TrainingInterrupted as e:
        if e.checkpoint is not None:
            print(f'timm-ddw train: interrupted in epoch {e.epoch}/{e.epochs}; saved {e.checkpoint} '
                  f'({e.saved_epochs} finished epochs); resume with: timm-ddw train --resume {e.checkpoint}',
                  file=sys.stderr)
        else:
            print(f'timm-ddw train: interrupted in epoch {e.epoch}/{e.epochs} before any epoch finished; '
                  'nothing was saved', file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
