"""``timm-ddw train``: train and evaluate a DDW model on Fashion-MNIST or an image folder.

Built from timm's library pieces (``create_model``, ``create_loader``, ``create_optimizer_v2``,
``create_scheduler_v2``, timm's losses), so what works here works in timm's train.py. The run
ends with a report folder: ``metrics.json`` (per-epoch train loss, val top-1, throughput),
``routing.json`` (per-stage mean adjacency and share of closed edges over the val set) and the
final weights as safetensors under ``model/``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy, random_seed
from tqdm import tqdm

from .capture import capture_routing, graph_stages
from .data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ArrayImageDataset,
    load_fashion_mnist,
)
from .graph import WIRINGS
from .models._ddw import DDW_DEFAULTS
from .routing import RoutingStats

__all__ = ['evaluate', 'register_cli', 'train']

# the main job's defaults: about 10 minutes on 2 CPU cores (see README, "Training")
DEFAULTS = dict(
    model='ddw_resnet18', img_size=32, epochs=3, batch_size=128, train_subset=0, val_subset=0,
    lr=0.1, momentum=0.9, weight_decay=5e-4, smoothing=0.1, warmup_steps=50, workers=0, max_steps=0,
    threads=1)
# --quick: a smoke run for CI, seconds on a CPU
QUICK = dict(epochs=1, batch_size=32, train_subset=256, val_subset=256, max_steps=8, warmup_steps=0)


def _subset(dataset, size: int, seed: int):
    """A fixed random subset of ``size`` samples (all if size <= 0 or >= len)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    index = np.random.default_rng(seed).permutation(len(dataset))[:size]
    if isinstance(dataset, ArrayImageDataset):
        return ArrayImageDataset(dataset.images[index], dataset.labels[index], dataset.classes)
    return _IndexedSubset(dataset, index)


class _IndexedSubset(torch.utils.data.Dataset):
    """Subset whose ``transform`` is the parent's, so ``create_loader`` can set it."""

    def __init__(self, dataset, index: np.ndarray) -> None:
        self.dataset, self.index = dataset, index

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        return self.dataset[int(self.index[i])]


def _datasets(args) -> Tuple[Any, Any, int, int, Tuple[float, ...], Tuple[float, ...], str, List[str]]:
    """Train/val datasets, num_classes, in_chans, mean, std, a name, class names."""
    if args.data:
        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f'--data {root}: not a directory (expected train/ and val/ image folders)')
        mode = 'L' if args.in_chans == 1 else 'RGB'
        try:
            train_ds = create_dataset('', root=str(root), split='train', is_training=True, input_img_mode=mode)
            val_ds = create_dataset('', root=str(root), split=args.val_split, is_training=False, input_img_mode=mode)
        except RuntimeError as e:
            raise FileNotFoundError(f'--data {root}: {e}') from e
        classes = list(train_ds.reader.class_to_idx)
        if list(val_ds.reader.class_to_idx) != classes:
            raise ValueError(f'--data {root}: train and {args.val_split} splits have different classes')
        in_chans = args.in_chans or 3
        return train_ds, val_ds, len(classes), in_chans, (), (), root.name, classes
    tr = ArrayImageDataset(*load_fashion_mnist(args.fashion_mnist_dir, 'train'), FASHION_MNIST_CLASSES)
    va = ArrayImageDataset(*load_fashion_mnist(args.fashion_mnist_dir, 'val'), FASHION_MNIST_CLASSES)
    if args.in_chans not in (None, 1):
        raise ValueError(f'--in-chans {args.in_chans}: Fashion-MNIST images have 1 channel')
    return tr, va, 10, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 'fashion-mnist', list(FASHION_MNIST_CLASSES)


def _device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: CUDA is not available here (use --device cpu or auto)')
    return device


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, routing: bool = False,
             progress: bool = False, desc: str = 'val', class_names: Sequence[str] = ()) -> Dict[str, Any]:
    """Top-1/top-5/loss over ``loader``; with ``routing`` also its RoutingStats (per class too)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    n, loss_sum, top1_sum, top5_sum = 0, 0.0, 0.0, 0.0
    stats = RoutingStats.for_model(model, class_names=list(class_names) or None) if routing else None
    ctx = capture_routing(model) if routing else nullcontext({})
    start = time.perf_counter()
    with ctx as captured:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[1])
            acc1, acc5 = accuracy(logits, y, topk=(1, k))
            b = y.shape[0]
            n += b
            loss_sum += loss_fn(logits, y).item()
            top1_sum += acc1.item() * b / 100
            top5_sum += acc5.item() * b / 100
            if stats is not None:
                stats.update(captured, labels=y.cpu())
                for mats in captured.values():
                    mats.clear()
    elapsed = time.perf_counter() - start
    out: Dict[str, Any] = dict(top1=100 * top1_sum / n, top5=100 * top5_sum / n, loss=loss_sum / n,
                               samples=n, img_per_s=n / elapsed)
    if stats is not None:
        out['routing'] = stats
    return out


def _export(model: nn.Module, out_dir: Path, model_args: Dict[str, Any], metrics: Dict[str, Any],
            recipe: Dict[str, Any], data_config: Dict[str, Any]) -> str:
    """Final weights in the Hub export format, with the data config they were trained with."""
    from .hub import export_folder
    keys = ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')
    export_folder(model, out_dir, model_args=model_args, metrics=metrics, recipe=recipe,
                  data_config={k: data_config[k] for k in keys if k in data_config})
    return 'timm_ddw.hub.export_folder'


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers), all threads."""
    try:
        import resource
    except ImportError:  # not on Windows
        return time.process_time()
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the job described by ``args`` (see ``register_cli``); returns the metrics it writes."""
    threads = torch.get_num_threads()
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting


def _train(args: argparse.Namespace) -> Dict[str, Any]:
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == DEFAULTS.get(k, None):
                setattr(args, k, v)
    if args.epochs < 1:
        raise ValueError(f'--epochs {args.epochs}: must be >= 1')
    if args.batch_size < 1:
        raise ValueError(f'--batch-size {args.batch_size}: must be >= 1')
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    random_seed(args.seed)

    train_ds, val_ds, num_classes, in_chans, mean, std, data_name, classes = _datasets(args)
    train_ds = _subset(train_ds, args.train_subset, args.seed)
    val_ds = _subset(val_ds, args.val_subset, args.seed + 1)

    model_args = dict(DDW_DEFAULTS, wiring=args.wiring, router_bias=args.router_bias,
                      threshold_init=args.threshold_init, gate=args.gate)
    model = timm.create_model(args.model, num_classes=num_classes, in_chans=in_chans, **model_args)
    if not graph_stages(model):
        raise ValueError(f'--model {args.model}: not a DDW model (choose one of {timm.list_models("ddw_*")})')
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    model.to(device)

    data_config = resolve_data_config(dict(input_size=(in_chans, args.img_size, args.img_size), crop_pct=1.0,
                                           interpolation='bilinear', **(dict(mean=mean, std=std) if mean else {})),
                                      model=model)
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  interpolation=data_config['interpolation'], num_workers=args.workers, device=device,
                  use_prefetcher=True, pin_memory=device.type == 'cuda')
    # mild augmentation: small images, few epochs
    loader_train = create_loader(train_ds, batch_size=args.batch_size, is_training=True, scale=(0.7, 1.0),
                                 ratio=(0.85, 1.18), hflip=0.5, color_jitter=None, **common)
    loader_val = create_loader(val_ds, batch_size=args.batch_size * 2, is_training=False,
                               crop_pct=data_config['crop_pct'], **common)

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    steps_per_epoch = len(loader_train)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, math.ceil(args.max_steps / args.epochs))
    if steps_per_epoch < 1:
        raise ValueError(f'--batch-size {args.batch_size} is larger than the training set ({len(train_ds)} images)')
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = min(args.warmup_steps, total_steps // 2)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=args.epochs, warmup_lr=args.lr * 0.01,
                                       warmup_epochs=0, min_lr=args.lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
    loss_fn = loss_fn.to(device)

    use_amp = args.amp
    amp_dtype = torch.bfloat16 if (args.amp_dtype == 'bfloat16' or device.type != 'cuda') else torch.float16
    if use_amp:
        def autocast():
            return torch.autocast(device_type=device.type, dtype=amp_dtype)
    else:
        autocast = nullcontext
    scaler = torch.amp.GradScaler(device.type) if use_amp and amp_dtype == torch.float16 else None

    out_dir = Path(args.output) if args.output else Path('output') / (
        f'{datetime.now().strftime("%Y%m%d-%H%M%S")}-{args.model}-{data_name}')
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = {k: v for k, v in vars(args).items() if k != 'func'}
    print(f'timm-ddw train: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on '
          f'{data_name}: {len(train_ds)} train / {len(val_ds)} val images at {args.img_size}px, '
          f'{args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch_size}, device {device}, '
          f'{torch.get_num_threads()} threads -> {out_dir}', flush=True)

    history: List[Dict[str, Any]] = []
    step = 0
    final_eval: Dict[str, Any] = {}
    for epoch in range(args.epochs):
        model.train()
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        loss_sum, seen = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f'epoch {epoch + 1}/{args.epochs}', disable=not args.progress,
                   dynamic_ncols=True)
        for i, (x, y) in enumerate(loader_train):
            if i >= steps_per_epoch:
                break
            if step < warmup_steps:  # linear warmup over steps, then timm's cosine schedule
                for g in optimizer.param_groups:
                    g['lr'] = args.lr * (step + 1) / warmup_steps
            with autocast():
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            if step >= warmup_steps:
                scheduler.step_update(num_updates=step)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'training loss is {loss.item()} at step {step}; lower --lr')
            loss_sum += loss.item() * y.shape[0]
            seen += y.shape[0]
            bar.update(1)
            bar.set_postfix(loss=f'{loss_sum / seen:.3f}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}',
                            img_s=f'{seen / (time.perf_counter() - t0):.0f}')
        bar.close()
        train_time, train_cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        last = epoch == args.epochs - 1
        ev = evaluate(model, loader_val, device, autocast, routing=last, progress=args.progress,
                      class_names=classes)
        if last:
            final_eval = ev
        record = dict(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1), train_img_per_s=seen / train_time,
                      train_time_s=train_time, train_cpu_s=train_cpu, steps=step,
                      lr=optimizer.param_groups[0]['lr'], val_top1=ev['top1'], val_top5=ev['top5'],
                      val_loss=ev['loss'], val_img_per_s=ev['img_per_s'])
        history.append(record)
        print(f'epoch {epoch + 1}/{args.epochs}: train loss {record["train_loss"]:.4f} '
              f'({record["train_img_per_s"]:.0f} img/s, {train_time:.0f}s) | val top-1 {ev["top1"]:.2f}% '
              f'top-5 {ev["top5"]:.2f}% loss {ev["loss"]:.4f} ({ev["img_per_s"]:.0f} img/s)', flush=True)

    routing = final_eval.pop('routing')
    total_time = time.perf_counter() - t_start
    metrics = dict(
        model=args.model, model_args=model_args, dataset=data_name, classes=classes, num_classes=num_classes,
        in_chans=in_chans, img_size=args.img_size, train_images=len(train_ds), val_images=len(val_ds),
        epochs=args.epochs, steps=step, batch_size=args.batch_size, device=str(device),
        threads=torch.get_num_threads(), amp=bool(use_amp), val_top1=final_eval['top1'],
        val_top5=final_eval['top5'], val_loss=final_eval['loss'], history=history, total_time_s=total_time,
        versions=dict(torch=torch.__version__, timm=timm.__version__), recipe=recipe)
    routing.meta.update(model=args.model, dataset=data_name, split='val')
    routing_files = routing.save(out_dir)  # routing.json/.npz, summary.txt, heatmaps with matplotlib
    exporter = _export(model.cpu(), out_dir / 'model', {**model_args, 'num_classes': num_classes,
                                                        'in_chans': in_chans},
                       {k: metrics[k] for k in ('dataset', 'val_top1', 'val_top5', 'epochs', 'img_size')},
                       recipe, data_config)
    metrics['exported_with'] = exporter
    del loader_train, loader_val  # joins the loader workers so their CPU time is counted
    metrics['total_time_s'] = time.perf_counter() - t_start
    metrics['cpu_time_s'] = _cpu_seconds() - cpu_start  # wall time on an idle machine ~ cpu_time_s / cores
    (out_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    print(f'val top-1 {final_eval["top1"]:.2f}% after {args.epochs} epochs, {metrics["total_time_s"]:.0f}s total '
          f'({metrics["cpu_time_s"]:.0f} CPU-s).')
    print(routing.text_summary())
    print(f'report: {out_dir}/ (metrics.json, {", ".join(sorted(p.name for p in routing_files.values()))}, model/)')
    return metrics


def _run(args: argparse.Namespace) -> int:
    try:
        train(args)
    except (FileNotFoundError, ValueError) as e:
        print(f'timm-ddw train: error: {e}', file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers) -> None:
    d = DEFAULTS
    p = subparsers.add_parser(
        'train', help='train and evaluate a DDW model on Fashion-MNIST or an image folder',
        description='Train and evaluate a DDW model with timm\'s library pieces, then write a report folder '
                    '(metrics.json, routing.json, model/model.safetensors). The defaults take about 10 minutes '
                    'on 2 CPU cores.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data', default=None, metavar='DIR',
                   help='image folder with train/ and val/ (or validation/) subfolders; default: Fashion-MNIST')
    g.add_argument('--val-split', default='validation', help='name of the --data validation split (timm searches '
                   'val/validation/valid/test for "validation")')
    g.add_argument('--fashion-mnist-dir', default=str(FASHION_MNIST_DIR), metavar='DIR',
                   help='folder with the Fashion-MNIST IDX .gz files')
    g.add_argument('--train-subset', type=int, default=d['train_subset'], metavar='N',
                   help='train on a fixed random subset of N images (0: all)')
    g.add_argument('--val-subset', type=int, default=d['val_subset'], metavar='N',
                   help='evaluate on a fixed random subset of N images (0: all)')
    g.add_argument('--img-size', type=int, default=d['img_size'], metavar='PX')
    g.add_argument('--in-chans', type=int, default=None, help='input channels (Fashion-MNIST: 1; --data: 3)')
    g.add_argument('--workers', type=int, default=d['workers'], help='data loader worker processes')
    g = p.add_argument_group('model')
    g.add_argument('--model', default=d['model'], help='a ddw_* model')
    g.add_argument('--wiring', default=DDW_DEFAULTS['wiring'], choices=sorted(WIRINGS))
    g.add_argument('--router-bias', type=float, default=DDW_DEFAULTS['router_bias'])
    g.add_argument('--threshold-init', type=float, default=DDW_DEFAULTS['threshold_init'])
    g.add_argument('--gate', default=DDW_DEFAULTS['gate'], choices=('ste', 'psi'))
    g.add_argument('--grad-checkpointing', action='store_true')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=d['epochs'])
    g.add_argument('--batch-size', '-b', type=int, default=d['batch_size'])
    g.add_argument('--opt', default='momentum', help="timm optimizer name ('momentum': SGD, as in the paper)")
    g.add_argument('--lr', type=float, default=d['lr'])
    g.add_argument('--momentum', type=float, default=d['momentum'])
    g.add_argument('--weight-decay', type=float, default=d['weight_decay'])
    g.add_argument('--smoothing', type=float, default=d['smoothing'], help='label smoothing')
    g.add_argument('--warmup-steps', type=int, default=d['warmup_steps'])
    g.add_argument('--max-steps', type=int, default=d['max_steps'], metavar='N',
                   help='at most N optimizer steps in total, spread evenly over the epochs (0: no limit)')
    g.add_argument('--seed', type=int, default=0)
    g = p.add_argument_group('run')
    g.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument('--amp', action='store_true', help='mixed precision (float16 + loss scaling on CUDA, '
                   'bfloat16 on CPU)')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    g.add_argument('--threads', type=int, default=d['threads'],
                   help='torch CPU threads (0: torch default). One thread by default: the measured budget, and on a '
                        'busy 2-core machine two threads ran 11x slower per image than one')
    g.add_argument('--output', default=None, metavar='DIR',
                   help='report folder (default: ./output/<time>-<model>-<dataset>)')
    g.add_argument('--quick', action='store_true',
                   help=f'smoke run: {", ".join(f"{k}={v}" for k, v in QUICK.items())} unless given')
    g.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')
    p.set_defaults(func=_run)
