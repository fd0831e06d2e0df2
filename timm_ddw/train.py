"""The main job: train and evaluate a DDW model on Fashion-MNIST or an image folder.

Built from timm's library pieces (``create_model``, ``create_loader``, ``create_optimizer_v2``,
``create_scheduler_v2``, timm's losses, ``ModelEmaV3``, ``CheckpointSaver``), so what works here
works in timm's train.py. :class:`TrainConfig` is the recipe, with timm's flag names;
:func:`train` runs it and writes a report folder: ``last.pth.tar`` after every epoch (timm's
checkpoint format), then the final weights as safetensors under ``model/``, the routing report
(``routing.json``, heatmaps) and ``metrics.json``.

A run is reproducible epoch by epoch: every epoch draws its data order and augmentation from
``seed + epoch``, so ``train(TrainConfig.from_checkpoint('.../last.pth.tar'))`` continues an
interrupted run to exactly the result of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.data import create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, accuracy, get_state_dict, random_seed, unwrap_model
from tqdm import tqdm

from .capture import capture_routing
from .data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ArrayImageDataset,
    image_folder_splits,
    load_fashion_mnist,
)
from .loading import check_ddw_name, create_ddw_model, load_weights, read_train_checkpoint
from .models._ddw import DDW_DEFAULTS
from .models._pretrained import DdwCheckpointError, load_checked
from .routing import RoutingStats
from .runtime import cpu_seconds, new_output_dir, remove_if_empty, resolve_device

__all__ = ['QUICK', 'SCHEDULERS', 'TrainConfig', 'TrainingInterrupted', 'evaluate', 'train']

SCHEDULERS = ('cosine', 'tanh', 'poly', 'step', 'multistep', 'constant', 'none')
CHECKPOINT = 'last.pth.tar'


@dataclass
class TrainConfig:
    """The recipe of one run; field names are timm train.py's flags (``--data-dir``, ``--model-kwargs``, ...).

    The defaults are the main job: ddw_resnet18 on Fashion-MNIST at 32 px for 3 epochs (README's
    quick start gives its measured time on an idle 2-core CPU).
    """
    # data
    data_dir: Optional[str] = None  # image folder with train/ and val/ class sub-folders; None: Fashion-MNIST
    val_split: Optional[str] = None  # name of data_dir's validation folder; None: val/ or validation/
    fashion_mnist_dir: str = str(FASHION_MNIST_DIR)
    train_subset: int = 0  # train on a fixed random subset of this many images (0: all)
    val_subset: int = 0
    img_size: int = 32
    in_chans: Optional[int] = None  # None: 1 for Fashion-MNIST, 3 for an image folder
    workers: int = 0
    # model
    model: str = 'ddw_resnet18'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # wiring, router_bias, ... (timm's --model-kwargs)
    num_classes: Optional[int] = None  # None: the data's number of classes
    pretrained: bool = False
    initial_checkpoint: Optional[str] = None
    grad_checkpointing: bool = False
    # optimisation
    epochs: int = 3
    batch_size: int = 128
    opt: str = 'momentum'
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    smoothing: float = 0.1
    sched: str = 'cosine'
    warmup_steps: int = 50
    max_steps: int = 0  # at most this many optimizer steps in total, spread over the epochs (0: no limit)
    seed: int = 0
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    # run
    device: str = 'auto'
    amp: bool = False
    amp_dtype: str = 'float16'
    channels_last: bool = False
    torchcompile: Optional[str] = None  # torch.compile backend for the training and evaluation forwards ('inductor')
    torchcompile_mode: Optional[str] = None
    threads: int = 0  # torch CPU threads (0: torch's default, one per core; 1 for bitwise-repeatable CPU runs)
    output: Optional[str] = None  # report folder; None: ./output/<time>-<model>-<dataset>
    resume: Optional[str] = None  # a last.pth.tar to continue from (see from_checkpoint)
    smoke_test: bool = False  # set by quick(): the output says the run tests the pipeline, not the model

    @classmethod
    def quick(cls, **overrides: Any) -> TrainConfig:
        """A smoke run of the whole pipeline in seconds (``timm-ddw train --quick``)."""
        return cls(**{**QUICK, 'smoke_test': True, **overrides})

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: Any) -> TrainConfig:
        """The recipe stored in a ``last.pth.tar`` of ``timm-ddw train``, set to resume from it.

        ``overrides`` change fields (e.g. more ``epochs``); the output defaults to the
        checkpoint's folder, where the run continues.
        """
        checkpoint = read_train_checkpoint(path)
        args = checkpoint.get('args')
        if 'history' not in checkpoint or not isinstance(args, argparse.Namespace):
            raise DdwCheckpointError(f'{path} was not written by timm-ddw train, so its recipe is unknown; start '
                                     'from its weights with initial_checkpoint (--initial-checkpoint) instead')
        names = {f.name for f in dataclasses.fields(cls)}
        recipe = {k: v for k, v in vars(args).items() if k in names}
        recipe.update(output=None, initial_checkpoint=None, pretrained=False)
        if 'model_kwargs' in overrides:
            overrides = dict(overrides, model_kwargs={**recipe.get('model_kwargs', {}), **overrides['model_kwargs']})
        recipe.update(overrides)
        return cls(**dict(recipe, resume=str(path)))


# --quick: a smoke run for CI, seconds on a CPU
QUICK = dict(epochs=1, batch_size=32, train_subset=256, val_subset=256, max_steps=8, warmup_steps=0)
# what changes a run's result (the rest is where and how fast it runs)
_RESULT_FIELDS = ('data_dir', 'val_split', 'train_subset', 'val_subset', 'img_size', 'in_chans', 'model',
                  'model_kwargs', 'num_classes', 'epochs', 'batch_size', 'opt', 'lr', 'momentum', 'weight_decay',
                  'smoothing', 'sched', 'warmup_steps', 'max_steps', 'seed', 'model_ema', 'model_ema_decay',
                  'model_ema_warmup', 'amp', 'amp_dtype')


class TrainingInterrupted(Exception):
    """``should_stop`` asked the run to stop; ``checkpoint`` (or None) is what it can resume from."""

    def __init__(self, epoch: int, epochs: int, checkpoint: Optional[Path], output: Path,
                 saved_epochs: int) -> None:
        self.epoch, self.epochs, self.checkpoint, self.output = epoch, epochs, checkpoint, output
        self.saved_epochs = saved_epochs
        where = f'{checkpoint} holds {saved_epochs} finished epoch(s)' if checkpoint else 'no epoch was finished'
        super().__init__(f'interrupted in epoch {epoch}/{epochs}; {where}')


class _Stop(Exception):
    """Raised between steps when ``should_stop()`` is true."""


def _check_config(c: TrainConfig) -> None:
    check_ddw_name(c.model)
    for name in ('epochs', 'batch_size', 'img_size'):
        if getattr(c, name) < 1:
            raise ValueError(f'{name}={getattr(c, name)}: must be >= 1')
    for name in ('train_subset', 'val_subset', 'workers', 'max_steps', 'warmup_steps', 'threads'):
        if getattr(c, name) < 0:
            raise ValueError(f'{name}={getattr(c, name)}: must be >= 0')
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise ValueError(f'lr={c.lr}: must be a positive number')
    if c.sched not in SCHEDULERS:
        raise ValueError(f'sched={c.sched!r} is not one of {", ".join(SCHEDULERS)}')
    if c.amp_dtype not in ('float16', 'bfloat16'):
        raise ValueError(f"amp_dtype={c.amp_dtype!r} is not 'float16' or 'bfloat16'")
    if not 0.0 <= c.model_ema_decay < 1.0:
        raise ValueError(f'model_ema_decay={c.model_ema_decay}: must be in [0, 1)')
    if c.torchcompile is not None and c.torchcompile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f'torchcompile={c.torchcompile!r} is not a torch.compile backend: '
                         f'{", ".join(torch._dynamo.list_backends())}')
    if c.resume and (c.pretrained or c.initial_checkpoint):
        raise ValueError('resume continues from its checkpoint\'s weights: drop pretrained / initial_checkpoint')


def _subset(dataset, size: int, seed: int):
    """A fixed random subset of ``size`` samples (all if size <= 0 or >= len)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    index = np.random.default_rng(seed).permutation(len(dataset))[:size]
    if isinstance(dataset, ArrayImageDataset):
        return ArrayImageDataset(dataset.images[index], dataset.labels[index], dataset.classes, mode=dataset.mode)
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


def _datasets(c: TrainConfig, in_chans: Optional[int]) -> Tuple[Any, Any, int, Tuple[float, ...],
                                                                 Tuple[float, ...], str, List[str]]:
    """Train/val datasets, in_chans, mean, std, a name and the class names."""
    if c.data_dir:
        in_chans = in_chans or 3
        train_ds, val_ds, classes = image_folder_splits(c.data_dir, c.val_split, mode='L' if in_chans == 1 else 'RGB')
        return train_ds, val_ds, in_chans, (), (), Path(c.data_dir).name, classes
    if in_chans not in (None, 1):
        raise ValueError(f'in_chans={in_chans}: Fashion-MNIST images have 1 channel')
    tr = ArrayImageDataset(*load_fashion_mnist(c.fashion_mnist_dir, 'train'), FASHION_MNIST_CLASSES)
    va = ArrayImageDataset(*load_fashion_mnist(c.fashion_mnist_dir, 'val'), FASHION_MNIST_CLASSES)
    return tr, va, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 'fashion-mnist', list(FASHION_MNIST_CLASSES)


def _requested(c: TrainConfig, key: str) -> Optional[int]:
    """``num_classes`` / ``in_chans`` as a flag or in model_kwargs (they must agree)."""
    flag, kwarg = getattr(c, key), c.model_kwargs.get(key)
    if flag is not None and kwarg is not None and flag != kwarg:
        raise ValueError(f'{key}={flag} contradicts model_kwargs {key}={kwarg}')
    return flag if flag is not None else kwarg


def _model_args(c: TrainConfig, num_data_classes: int, in_chans: int) -> Dict[str, Any]:
    """Every constructor argument of the model, the DDW ones included."""
    num_classes = _requested(c, 'num_classes')
    if num_classes is None:
        num_classes = num_data_classes
    elif isinstance(num_classes, int) and num_classes < num_data_classes:
        raise ValueError(f'num_classes={num_classes}: the data has {num_data_classes} classes')
    return {**DDW_DEFAULTS, **c.model_kwargs, 'num_classes': num_classes, 'in_chans': in_chans}


def _to_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast=nullcontext, routing: bool = False,
             progress: bool = False, desc: str = 'val', class_names: Sequence[str] = (),
             channels_last: bool = False, should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
    """Top-1/top-5/loss over ``loader``; with ``routing`` also its RoutingStats (per class too)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    n, loss_sum, top1_sum, top5_sum = 0, 0.0, 0.0, 0.0
    stats = RoutingStats.for_model(model, class_names=list(class_names) or None) if routing else None
    ctx = capture_routing(model) if routing else nullcontext({})
    start = time.perf_counter()
    with ctx as captured:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
            if should_stop is not None and should_stop():
                raise _Stop
            x, y = _to_input(x.to(device), channels_last), y.to(device)
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


class _CheckpointState:
    """CheckpointSaver's ``task`` hook: the entries of timm's format (``state_dict``,
    ``state_dict_ema``) plus what an exact resume needs: the scheduler, the history so far and the
    model's constructor arguments and class names (read by ``timm-ddw export``)."""

    def __init__(self, model: nn.Module, model_ema: Optional[ModelEmaV3], scheduler, history: List[Dict[str, Any]],
                 model_args: Dict[str, Any], label_names: Optional[List[str]] = None) -> None:
        self.model, self.model_ema, self.scheduler = model, model_ema, scheduler
        self.history, self.model_args, self.label_names = history, model_args, label_names

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=unwrap_model) -> Dict[str, Any]:
        if ema:
            return {} if self.model_ema is None else {'state_dict_ema': get_state_dict(self.model_ema, unwrap_fn)}
        state = dict(state_dict=get_state_dict(self.model, unwrap_fn), history=list(self.history),
                     model_args=dict(self.model_args))
        if self.label_names:
            state['label_names'] = list(self.label_names)
        if self.scheduler is not None:
            state['scheduler'] = self.scheduler.state_dict()
        return state


def _export(model: nn.Module, out_dir: Path, model_args: Dict[str, Any], metrics: Dict[str, Any],
            recipe: Dict[str, Any], data_config: Dict[str, Any], label_names: Optional[List[str]] = None) -> str:
    """Final weights in the Hub export format, with the data config they were trained with."""
    from .hub import export_folder
    keys = ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')
    export_folder(model, out_dir, model_args=model_args, metrics=metrics, recipe=recipe,
                  data_config={k: data_config[k] for k in keys if k in data_config}, label_names=label_names)
    return 'timm_ddw.hub.export_folder'


def _output_dir(c: TrainConfig, model: str, data_name: str) -> Tuple[Path, str]:
    """The report folder and a note on how it was chosen."""
    if c.output:
        wanted = Path(c.output)
    elif c.resume:
        # continue in the checkpoint's own folder, unless that run already wrote its report
        folder = Path(c.resume).parent
        if not (folder / 'metrics.json').exists():
            return new_output_dir(folder, reuse=True), ' (continuing in the checkpoint\'s folder)'
        wanted = folder
    else:
        wanted = Path('output') / f'{datetime.now().strftime("%Y%m%d-%H%M%S")}-{model}-{data_name}'
    out = new_output_dir(wanted)
    return out, f' ({wanted} already holds files)' if out != wanted else ''


def train(config: TrainConfig, should_stop: Optional[Callable[[], bool]] = None,
          progress: bool = True) -> Dict[str, Any]:
    """Run ``config``; returns the metrics it writes to ``metrics.json``.

    ``should_stop`` is polled between steps (``timm-ddw train`` sets it on Ctrl-C): the current
    epoch is abandoned and :class:`TrainingInterrupted` names the checkpoint to resume from.
    """
    threads = torch.get_num_threads()
    try:
        return _train(config, should_stop or (lambda: False), progress)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting


def _train(c: TrainConfig, should_stop: Callable[[], bool], progress: bool) -> Dict[str, Any]:
    t_start, cpu_start = time.perf_counter(), cpu_seconds()
    _check_config(c)
    device = resolve_device(c.device)
    if c.threads:
        torch.set_num_threads(c.threads)
    resumed = read_train_checkpoint(c.resume) if c.resume else None

    train_ds, val_ds, in_chans, mean, std, data_name, classes = _datasets(c, _requested(c, 'in_chans'))
    train_ds = _subset(train_ds, c.train_subset, c.seed)
    val_ds = _subset(val_ds, c.val_subset, c.seed + 1)
    model_args = _model_args(c, len(classes), in_chans)

    random_seed(c.seed)
    model = create_ddw_model(c.model, pretrained=c.pretrained, **model_args)
    if c.initial_checkpoint:
        load_weights(model, c.initial_checkpoint, use_ema=True)
    if c.grad_checkpointing:
        model.set_grad_checkpointing()
    model.to(device)
    if c.channels_last:
        model.to(memory_format=torch.channels_last)

    data_config = resolve_data_config(dict(input_size=(in_chans, c.img_size, c.img_size), crop_pct=1.0,
                                           interpolation='bilinear', **(dict(mean=mean, std=std) if mean else {})),
                                      model=model)
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  interpolation=data_config['interpolation'], num_workers=c.workers, device=device,
                  use_prefetcher=True, pin_memory=device.type == 'cuda')
    # mild augmentation: small images, few epochs
    loader_train = create_loader(train_ds, batch_size=c.batch_size, is_training=True, scale=(0.7, 1.0),
                                 ratio=(0.85, 1.18), hflip=0.5, color_jitter=None, **common)
    loader_val = create_loader(val_ds, batch_size=c.batch_size * 2, is_training=False,
                               crop_pct=data_config['crop_pct'], **common)

    try:
        optimizer = create_optimizer_v2(model, opt=c.opt, lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum)
    except (ValueError, AssertionError) as e:
        raise ValueError(f'opt={c.opt!r}: {e}') from None
    steps_per_epoch = len(loader_train)
    if c.max_steps:
        steps_per_epoch = min(steps_per_epoch, math.ceil(c.max_steps / c.epochs))
    if steps_per_epoch < 1:
        raise ValueError(f'batch_size={c.batch_size} is larger than the training set ({len(train_ds)} images)')
    total_steps = steps_per_epoch * c.epochs
    warmup_steps = min(c.warmup_steps, total_steps // 2)
    scheduler, _ = create_scheduler_v2(optimizer, sched=c.sched, num_epochs=c.epochs, warmup_lr=c.lr * 0.01,
                                       warmup_epochs=0, min_lr=c.lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    loss_fn = (LabelSmoothingCrossEntropy(c.smoothing) if c.smoothing > 0 else nn.CrossEntropyLoss()).to(device)
    model_ema = ModelEmaV3(model, decay=c.model_ema_decay, use_warmup=c.model_ema_warmup) if c.model_ema else None
    # as timm's train.py --torchcompile: the model's forward is compiled; weights, EMA, checkpoints and
    # the routing capture (forward hooks) keep working on the eager module, which shares its parameters
    compiled = torch.compile(model, backend=c.torchcompile, mode=c.torchcompile_mode) if c.torchcompile else model

    amp_dtype = torch.bfloat16 if (c.amp_dtype == 'bfloat16' or device.type != 'cuda') else torch.float16
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)) if c.amp else nullcontext
    loss_scaler = NativeScaler(device=device.type) if c.amp and amp_dtype == torch.float16 else None

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if resumed is not None:
        start_epoch, history = _resume(c.resume, resumed, model, model_ema, optimizer, loss_scaler, scheduler)
        if start_epoch > c.epochs:
            raise ValueError(f'{c.resume} holds {start_epoch} finished epochs, more than epochs={c.epochs}')

    out, note = _output_dir(c, c.model, data_name)
    recipe = dataclasses.asdict(c)
    # the class names, when they name every output (num_classes may exceed the data's classes)
    label_names = list(classes) if len(classes) == model_args['num_classes'] else None
    checkpoint_state = _CheckpointState(model, model_ema, scheduler, history, model_args, label_names)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(**recipe), amp_scaler=loss_scaler,
                            checkpoint_dir=str(out), recovery_dir=str(out), decreasing=False, max_history=1,
                            task=checkpoint_state)
    if resumed is not None and Path(c.resume).parent.resolve() == out.resolve():
        saver.load_state_dict_from_checkpoint(c.resume)  # keeps model_best/checkpoint-N tracking
    checkpoint = Path(c.resume) if c.resume else None
    saved_epochs = start_epoch

    print(f'timm-ddw train: {c.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on '
          f'{data_name}: {len(train_ds)} train / {len(val_ds)} val images at {c.img_size}px, '
          f'{c.epochs} epochs x {steps_per_epoch} steps, batch {c.batch_size}, device {device}, '
          f'{torch.get_num_threads()} threads -> {out}{note}', flush=True)
    if resumed is not None:
        print(f'resuming from {c.resume} after epoch {start_epoch}/{c.epochs}{_changes(c, resumed)}', flush=True)
    if c.smoke_test:
        print(f'quick run: a smoke test of the pipeline ({total_steps} steps on {len(train_ds)} images), not of '
              'the model: its accuracy and routing say little; drop --quick for the real job', flush=True)

    final_eval: Dict[str, Any] = {}
    step = start_epoch * steps_per_epoch
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, c.epochs):
            random_seed(c.seed + epoch)  # the epoch's data order and augmentation, also after a resume
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            step, loss_sum, seen = _train_one_epoch(
                c, model, compiled, loader_train, steps_per_epoch, step, optimizer, scheduler, warmup_steps, loss_fn,
                model_ema, loss_scaler, autocast, should_stop, desc=f'epoch {epoch + 1}/{c.epochs}', progress=progress,
                steps_left=total_steps - step if epoch == start_epoch else 0)
            train_time, train_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            last = epoch == c.epochs - 1
            capture = last and model_ema is None
            ev = evaluate(model if capture else compiled, loader_val, device, autocast, routing=capture,
                          progress=progress, class_names=classes, channels_last=c.channels_last,
                          should_stop=should_stop)
            record = dict(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1), train_img_per_s=seen / train_time,
                          train_time_s=train_time, train_cpu_s=train_cpu, steps=step,
                          lr=optimizer.param_groups[0]['lr'], val_top1=ev['top1'], val_top5=ev['top5'],
                          val_loss=ev['loss'], val_img_per_s=ev['img_per_s'])
            ema_note = ''
            if model_ema is not None:
                ev = evaluate(model_ema.module, loader_val, device, autocast, routing=last, progress=progress,
                              desc='val ema', class_names=classes, channels_last=c.channels_last,
                              should_stop=should_stop)
                record.update(val_top1_ema=ev['top1'], val_top5_ema=ev['top5'], val_loss_ema=ev['loss'])
                ema_note = f' | EMA top-1 {ev["top1"]:.2f}%'
            if last:
                final_eval = ev
            history.append(record)
            saver.save_checkpoint(epoch, metric=ev['top1'])
            checkpoint, saved_epochs = out / CHECKPOINT, epoch + 1
            print(f'epoch {epoch + 1}/{c.epochs}: train loss {record["train_loss"]:.4f} '
                  f'({record["train_img_per_s"]:.0f} img/s, {train_time:.0f}s) | val top-1 {record["val_top1"]:.2f}% '
                  f'top-5 {record["val_top5"]:.2f}% loss {record["val_loss"]:.4f} ({record["val_img_per_s"]:.0f} '
                  f'img/s){ema_note}', flush=True)
        if not final_eval:  # resumed after the last epoch: only the report is left to write
            final_eval = evaluate(model_ema.module if model_ema is not None else model, loader_val, device,
                                  autocast, routing=True, progress=progress, class_names=classes,
                                  channels_last=c.channels_last, should_stop=should_stop)
    except _Stop:
        remove_if_empty(out)
        raise TrainingInterrupted(epoch + 1, c.epochs, checkpoint, out, saved_epochs) from None
    except BaseException:
        remove_if_empty(out)
        raise

    routing = final_eval.pop('routing')
    metrics = dict(
        model=c.model, model_args=model_args, dataset=data_name, classes=classes, num_classes=model_args['num_classes'],
        in_chans=in_chans, img_size=c.img_size, train_images=len(train_ds), val_images=len(val_ds),
        epochs=c.epochs, steps=step, batch_size=c.batch_size, device=str(device), threads=torch.get_num_threads(),
        amp=c.amp, model_ema=c.model_ema, smoke_test=c.smoke_test, resumed_from=c.resume,
        val_top1=final_eval['top1'], val_top5=final_eval['top5'], val_loss=final_eval['loss'], history=history,
        versions=dict(torch=torch.__version__, timm=timm.__version__), recipe=recipe)
    # the weights first: they are what the run is for, the report is read off them
    final_model = model_ema.module if model_ema is not None else model
    metrics['exported_with'] = _export(
        unwrap_model(final_model).cpu(), out / 'model', model_args,
        {k: metrics[k] for k in ('dataset', 'val_top1', 'val_top5', 'epochs', 'img_size')}, recipe, data_config,
        label_names)
    routing.meta.update(model=c.model, dataset=data_name, split='val')
    routing_files = routing.save(out)  # routing.json/.npz, summary.txt, heatmaps with matplotlib
    del loader_train, loader_val  # joins the loader workers so their CPU time is counted
    metrics['total_time_s'] = time.perf_counter() - t_start
    metrics['cpu_time_s'] = cpu_seconds() - cpu_start  # wall time on an idle machine ~ cpu_time_s / cores
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    print(f'val top-1 {final_eval["top1"]:.2f}% after {c.epochs} epochs, {metrics["total_time_s"]:.0f}s total '
          f'({metrics["cpu_time_s"]:.0f} CPU-s).')
    print(routing.text_summary())
    if c.smoke_test:
        print('(quick run: a smoke test of the pipeline, not of the model)')
    print(f'report: {out}/ (metrics.json, {", ".join(sorted(p.name for p in routing_files.values()))}, model/, '
          f'{CHECKPOINT})')
    return metrics


def _train_one_epoch(c: TrainConfig, model: nn.Module, forward: nn.Module, loader, steps: int, step: int, optimizer,
                     scheduler, warmup_steps: int, loss_fn: nn.Module, model_ema: Optional[ModelEmaV3], loss_scaler,
                     autocast, should_stop: Callable[[], bool], desc: str, progress: bool,
                     steps_left: int = 0) -> Tuple[int, float, int]:
    """``steps`` optimizer steps from update ``step`` on; returns the new step count, the summed loss
    and the images seen. ``forward`` is ``model`` or its compiled version. With ``steps_left``, the
    run's expected training time is printed once it has been measured (steps 3 to 20: the first
    steps allocate, and compiling happens in the first)."""
    model.train()
    t0, loss_sum, seen = time.perf_counter(), 0.0, 0
    t_pace = t0
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        if should_stop():
            raise _Stop
        if step < warmup_steps:  # linear warmup over steps, then timm's schedule
            for g in optimizer.param_groups:
                g['lr'] = c.lr * (step + 1) / warmup_steps
        with autocast():
            loss = loss_fn(forward(_to_input(x, c.channels_last)), y)
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, parameters=model.parameters())
        else:
            loss.backward()
            optimizer.step()
        step += 1
        if model_ema is not None:
            model_ema.update(model, step=step)
        if step >= warmup_steps and scheduler is not None:
            scheduler.step_update(num_updates=step)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'training loss is {loss.item()} at step {step}; lower lr')
        loss_sum += loss.item() * y.shape[0]
        seen += y.shape[0]
        bar.update(1)
        if steps_left and i + 1 == _PACE_FROM:
            t_pace = time.perf_counter()
        elif steps_left and i + 1 == _PACE_TO:
            per_step, left = (time.perf_counter() - t_pace) / (_PACE_TO - _PACE_FROM), steps_left - _PACE_TO
            tqdm.write(f'expected: about {_minutes(per_step * left)} of training for the {left} steps left '
                       f'({per_step:.2f} s/step over steps {_PACE_FROM + 1}-{_PACE_TO}), plus evaluation')
        bar.set_postfix(loss=f'{loss_sum / seen:.3f}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}',
                        img_s=f'{seen / (time.perf_counter() - t0):.0f}')
    bar.close()
    return step, loss_sum, seen


_PACE_FROM, _PACE_TO = 2, 20  # the steps that time the pace of a run


def _minutes(seconds: float) -> str:
    return f'{seconds:.0f} s' if seconds < 90 else f'{seconds / 60:.0f} min'


def _resume(path: str, checkpoint: Dict[str, Any], model: nn.Module, model_ema: Optional[ModelEmaV3], optimizer,
            loss_scaler, scheduler) -> Tuple[int, List[Dict[str, Any]]]:
    """Restore a ``last.pth.tar`` with timm's ``resume_checkpoint``; returns the next epoch and the history."""
    from timm.models import clean_state_dict, resume_checkpoint

    for key in ('state_dict', 'optimizer', 'epoch', 'history'):
        if key not in checkpoint:
            raise DdwCheckpointError(f'{path} is not a timm-ddw train checkpoint (no {key!r}); start from its weights '
                                     'with initial_checkpoint (--initial-checkpoint) instead')
    load_checked(model, clean_state_dict(checkpoint['state_dict']), source=path)  # a clear error on any mismatch
    start_epoch = resume_checkpoint(model, path, optimizer=optimizer, loss_scaler=loss_scaler, log_info=False)
    if model_ema is not None:
        if 'state_dict_ema' not in checkpoint:
            raise DdwCheckpointError(f'{path} has no EMA weights (state_dict_ema): its run had model_ema off')
        load_checked(model_ema.module, clean_state_dict(checkpoint['state_dict_ema']), source=f'{path} (EMA)')
    if scheduler is not None and checkpoint.get('scheduler'):
        scheduler.load_state_dict(checkpoint['scheduler'])
    return int(start_epoch), list(checkpoint['history'])


def _changes(c: TrainConfig, checkpoint: Dict[str, Any]) -> str:
    """Recipe fields that differ from the checkpoint's run: the result will differ from it too."""
    old = vars(checkpoint.get('args') or argparse.Namespace())
    diff = [f'{k} {old[k]!r} -> {getattr(c, k)!r}' for k in _RESULT_FIELDS if k in old and old[k] != getattr(c, k)]
    return f'; changed: {", ".join(diff)}' if diff else ''

