"""The work of ``timm-ddw routing`` as one function: a DDW model with its weights, a data set,
routing statistics over it, and the report folder.

Preprocessing is timm's: ``resolve_input_data_config`` for the model (a ``config.json`` next to
the checkpoint carries the one the weights were trained with) and its eval transform.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from .data import FASHION_MNIST_DIR, DataError, fashion_mnist, image_folder
from .loading import load_model
from .routing import RoutingStats, collect_routing
from .runtime import new_output_dir, remove_if_empty, resolve_device

__all__ = ['routing_report']

PathLike = Union[str, os.PathLike]


def _positive(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f'{name}={value}: must be a positive integer')


def _dataset(data: str, split: str, transform, in_chans: int, fashion_mnist_dir: PathLike):
    if in_chans not in (1, 3):
        raise ValueError(f'the model takes {in_chans} input channels; images can be fed as 1 (L) or 3 (RGB)')
    mode = 'L' if in_chans == 1 else 'RGB'
    if data == 'fashion-mnist':
        ds = fashion_mnist(split, root=fashion_mnist_dir, transform=transform, mode=mode)
        return ds, list(ds.classes), f'fashion-mnist ({split})'
    ds, classes = image_folder(data, mode, transform)
    return ds, classes, str(data)


def routing_report(
        model: str,
        output: PathLike,
        data: str = 'fashion-mnist',
        checkpoint: Optional[PathLike] = None,
        pretrained: bool = False,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        use_ema: bool = False,
        split: str = 'test',
        limit: Optional[int] = None,
        batch_size: int = 64,
        img_size: Optional[int] = None,
        workers: int = 2,
        device: str = 'cpu',
        amp: bool = False,
        plots: Optional[bool] = None,
        progress: bool = True,
        fashion_mnist_dir: PathLike = FASHION_MNIST_DIR,
) -> Tuple[RoutingStats, Dict[str, Path]]:
    """Routing statistics of ``model`` over ``data`` ('fashion-mnist' or an image folder with one
    sub-folder per class), written to ``output`` (or ``output-1``, ... if it holds files).

    Weights come from ``checkpoint`` or timm's ``pretrained`` ones. Returns the statistics and
    the paths written (see :meth:`RoutingStats.save`).
    """
    import timm
    from timm.data import create_transform, resolve_input_data_config

    from . import __version__

    _positive(batch_size=batch_size, limit=limit, img_size=img_size)
    if workers < 0:
        raise ValueError(f'workers={workers}: must be >= 0')
    if checkpoint is None and not pretrained:
        raise ValueError('give a checkpoint file or pretrained=True: the routing of random weights says nothing')
    if data != 'fashion-mnist' and not Path(data).is_dir():
        raise DataError(f"data {str(data)!r} is neither 'fashion-mnist' nor an existing folder of images")
    dev = resolve_device(device)
    net, info = load_model(model, checkpoint=checkpoint, pretrained=pretrained, model_kwargs=model_kwargs,
                           use_ema=use_ema)
    try:
        data_config = resolve_input_data_config(net, args={'img_size': img_size} if img_size else {})
    except ValueError as e:
        raise ValueError(f'img_size={img_size}: {e}') from None
    dataset, classes, data_name = _dataset(data, split, create_transform(**data_config), data_config['input_size'][0],
                                           fashion_mnist_dir)
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    out = new_output_dir(output)
    try:
        stats = collect_routing(net, loader, device=dev, progress=progress, num_classes=len(classes) or None,
                                amp=amp)
        stats.class_names = classes or None
        stats.meta.update(info)
        stats.meta.update(
            data=data_name, num_samples=stats.num_samples, input_size=list(data_config['input_size']),
            mean=list(data_config['mean']), std=list(data_config['std']), crop_pct=data_config['crop_pct'],
            interpolation=data_config['interpolation'], timm_version=timm.__version__, timm_ddw_version=__version__)
        return stats, stats.save(out, plots=plots)
    finally:
        remove_if_empty(out)
