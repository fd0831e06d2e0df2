"""Building DDW models from names, keyword arguments and weight files, with errors a user can act on.

The commands (and Python users) go through these functions so that a wrong model name, a bad
constructor argument, a corrupt file or weights of another model end in one clear message
(ValueError, FileNotFoundError or :class:`DdwCheckpointError`) instead of a traceback from deep
inside timm or torch.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .models import TWINS
from .models._pretrained import DdwCheckpointError, load_checked

__all__ = ['check_ddw_name', 'create_ddw_model', 'load_model', 'load_weights', 'read_checkpoint',
           'read_train_checkpoint']

PathLike = Union[str, os.PathLike]
_POSITIVE_INTS = dict(num_classes=0, in_chans=1)  # smallest value each may take


def check_ddw_name(name: str) -> None:
    """ValueError unless ``name`` is a registered ``ddw_*`` model."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f'{name!r} is not a timm model; DDW models: {", ".join(sorted(TWINS))}')
    if name not in TWINS:
        raise ValueError(f'{name!r} is not a DDW model; choose one of {", ".join(sorted(TWINS))}')


def create_ddw_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` for a ``ddw_*`` model; ValueError for anything else."""
    import timm

    check_ddw_name(name)
    for key, low in _POSITIVE_INTS.items():
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f'{key}={value!r} must be an integer >= {low}')
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError) as e:  # a constructor argument timm or the graph stages refuse
        raise ValueError(f'{name}: {e}') from None


def _unreadable(path: Path) -> DdwCheckpointError:
    """Say what is wrong with a file torch cannot load, without suggesting unsafe loading."""
    if zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # a damaged archive: the answer below
            unsafe = []
        if unsafe:
            return DdwCheckpointError(
                f'{path} is a PyTorch checkpoint that also pickles {", ".join(unsafe)}, which is not loaded '
                'without running its code; save its state_dict (or use safetensors) and load that')
    return DdwCheckpointError(f'{path} is not a PyTorch checkpoint or a safetensors file (or it is truncated)')


def _meta(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """``arch``, constructor arguments, epoch and class names (``label_names``, as ``timm-ddw
    train`` stores them) kept next to the weights in a train.py checkpoint."""
    args = checkpoint.get('args')
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    kwargs = dict(args.get('model_kwargs') or {}) if isinstance(args, dict) else {}
    if isinstance(checkpoint.get('model_args'), dict):
        kwargs.update(checkpoint['model_args'])
    names = checkpoint.get('label_names')
    return dict(arch=checkpoint.get('arch'), model_args=kwargs, epoch=checkpoint.get('epoch'),
                label_names=list(names) if isinstance(names, (list, tuple)) else None)


def read_train_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Everything in a torch checkpoint (a dict, as timm's CheckpointSaver writes it), read without
    running pickled code."""
    from timm.models._helpers import _torch_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such file')
    try:
        checkpoint = _torch_load(str(path), map_location='cpu', weights_only=True)
    except Exception:  # torch raises many types for a file that is not a checkpoint
        raise _unreadable(path) from None
    if not isinstance(checkpoint, dict):
        raise DdwCheckpointError(f'{path} is not a training checkpoint (it holds a {type(checkpoint).__name__})')
    return checkpoint


def read_checkpoint(path: PathLike, use_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The state dict in ``path`` (.safetensors, or a torch checkpoint as timm's train.py saves
    it, EMA weights preferred with ``use_ema``) and the checkpoint's ``arch``/``model_args``/``epoch``.
    """
    from timm.models import clean_state_dict

    path = Path(path)
    if path.suffix == '.safetensors' and path.is_file():
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), {}
        except Exception as e:  # SafetensorError or OSError: a damaged file
            raise DdwCheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt?): '
                                     f'{e}') from None
    checkpoint = read_train_checkpoint(path)
    meta = _meta(checkpoint)
    for key in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise DdwCheckpointError(f'{path} holds no weights (no tensors under state_dict or at its top level)')
    return clean_state_dict(checkpoint), meta


def load_weights(model: nn.Module, path: PathLike, use_ema: bool = True) -> Dict[str, Any]:
    """Load ``path`` into ``model`` strictly (nothing is loaded if any key or shape differs); returns its meta."""
    state_dict, meta = read_checkpoint(path, use_ema=use_ema)
    load_checked(model, state_dict, source=str(path))
    return meta


def load_model(
        name: str,
        checkpoint: Optional[PathLike] = None,
        pretrained: bool = False,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        use_ema: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """A DDW model with its weights (a file, or timm's pretrained ones) and what was loaded.

    A ``config.json`` next to ``checkpoint`` (timm's Hub format, as ``timm-ddw train`` and
    ``export`` write it) gives the constructor arguments and the data config; ``model_kwargs``
    override them.
    """
    from timm.models import get_pretrained_cfg

    kwargs: Dict[str, Any] = {}
    info: Dict[str, Any] = dict(model=name)
    pretrained_cfg = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f'{checkpoint}: no such file')
        info['checkpoint'] = str(checkpoint)
        config = checkpoint.parent / 'config.json'
        if config.is_file():
            from timm.models._hub import load_model_config_from_path
            try:
                pretrained_cfg, arch, kwargs = load_model_config_from_path(checkpoint.parent)
            except (KeyError, ValueError) as e:
                raise ValueError(f'{config}: not a timm model config ({e!r})') from None
            if arch != name:
                raise ValueError(f"model {name!r} differs from {config}'s architecture {arch!r}")
            kwargs = dict(kwargs)
            info['config'] = str(config)
    elif pretrained:
        cfg = get_pretrained_cfg(name) if name in TWINS else None
        if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
            raise ValueError(f'timm has no pretrained weights for {name!r}; give a checkpoint file')
        info['pretrained'] = True
    kwargs.update(model_kwargs or {})
    info['model_kwargs'] = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))}
    if pretrained_cfg is not None:
        kwargs['pretrained_cfg'] = pretrained_cfg
    model = create_ddw_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    kwargs.pop('pretrained_cfg', None)
    if checkpoint is not None:
        state_dict, _ = read_checkpoint(checkpoint, use_ema=use_ema)
        try:
            load_checked(model, state_dict, source=str(checkpoint))
        except DdwCheckpointError as e:
            raise DdwCheckpointError(
                f'{e}\nThe model was built with {kwargs or "default kwargs"}: pass the kwargs it was trained with '
                '(e.g. num_classes=10 in_chans=1), or keep the config.json saved with the weights next to them.'
            ) from None
    return model, info
