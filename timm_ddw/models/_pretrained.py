"""Pretrained weights for DDW models: the chain-equivalent warm start and checked loading.

No DDW-trained ImageNet weights exist yet, so each model's pretrained tag points at its timm
twin's ImageNet weights on the Hub (``<twin tag>_chaininit``). timm's ``load_pretrained``
downloads them and hands them to :func:`ddw_filter_fn`, which adds routers and thresholds
that keep only the chain edges j-1 -> j open:

- ``router_weight = 0``, so every edge weight is the sigmoid of its bias for every sample;
- chain edges get bias ``CHAIN_BIAS`` (sigmoid = 1.0 exactly in float32), so the model computes
  exactly what the twin computes, bit for bit;
- every other edge gets bias ``CLOSED_BIAS`` (alpha ~ 0.12), below its node's threshold
  ``CHAIN_TAU = 0.5``: closed in the forward pass, yet the 'ste' and 'psi' gates pass psi's
  derivative, so closed edges get gradients from the first step and fine-tuning can open them.

Every checkpoint is checked against the model before anything is loaded: another model, another
wiring or other shapes raise :class:`DdwCheckpointError` naming the keys, never half-load.
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
import torch.nn as nn

from ..capture import graph_stages
from ..graph import chain_graph

__all__ = [
    'CHAININIT_SUFFIX', 'CHAIN_BIAS', 'CLOSED_BIAS', 'CHAIN_TAU', 'DdwCheckpointError', 'chaininit_name',
    'chaininit_source', 'chain_init_state_dict', 'check_state_dict', 'ddw_filter_fn', 'load_checked',
    'pretrained_errors', 'ROUTING_KEYS']

CHAININIT_SUFFIX = '_chaininit'
CHAIN_BIAS = 20.0  # float32 sigmoid(20) == 1.0: the chain edges pass their input unchanged
CLOSED_BIAS = -2.0  # sigmoid(-2) ~ 0.119, well below CHAIN_TAU, yet not saturated: gradients flow
CHAIN_TAU = 0.5
ROUTING_KEYS = ('router_weight', 'router_bias', 'tau')


class DdwCheckpointError(RuntimeError):
    """A checkpoint that does not fit a DDW model; nothing was loaded."""


def chaininit_name(name: str, twin: str) -> str:
    """``<name>.<twin's default tag>_chaininit``: the pretrained tag built on the twin's weights."""
    from timm.models import get_pretrained_cfg
    tag = get_pretrained_cfg(twin).tag
    return f'{name}.{tag}{CHAININIT_SUFFIX}' if tag else name


def chaininit_source(twin_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """pretrained_cfg entries that make the twin's default Hub weights the warm-start source."""
    hub_id = twin_cfg.get('hf_hub_id')
    if not hub_id:
        return {}
    return dict(
        hf_hub_id=hub_id,
        origin_url=twin_cfg.get('origin_url'),
        description=(
            f'Static ImageNet weights of timm/{hub_id.split("/")[-1]} with chain-equivalent wiring '
            '(only edges j-1 -> j open), for fine-tuning DDW; not DDW-trained weights.'),
    )


def _is_routing_key(key: str) -> bool:
    return key.rpartition('.')[2] in ROUTING_KEYS


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('architecture') or type(model).__name__
    stages = list(graph_stages(model).values())
    if stages:
        name += f" (wiring={stages[0].wiring!r}, gate={stages[0].gate!r})"
    return name


def _source(cfg: Mapping[str, Any]) -> str:
    for key in ('file', 'hf_hub_id', 'url'):
        if cfg.get(key):
            return f"{key}={cfg[key]!r}"
    return 'the given state dict'


def chain_init_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Add chain-equivalent routers and thresholds to a timm twin's state dict.

    In eval mode (and in training mode with the 'ste' gate) the result makes ``model`` compute
    exactly what its twin computes; see the module docstring for the values.
    """
    out = dict(state_dict)
    for name, stage in graph_stages(model).items():
        n = stage.num_blocks
        if stage.router_bias is None:
            if [list(p) for p in stage.preds] != chain_graph(n + 1):
                raise DdwCheckpointError(
                    f'{_describe(model)}: stage {name!r} has fixed edges that are not the chain j-1 -> j, '
                    "so static weights cannot be loaded equivalently; use wiring='dynamic', 'static' or 'chain'")
            continue
        bias = torch.full(tuple(stage.router_bias.shape), CLOSED_BIAS)
        for j in range(1, n + 1):
            for k, i in enumerate(stage.preds[j]):
                if i == j - 1:
                    bias[stage.offsets[i] + stage.pos[j][k]] = CHAIN_BIAS
        out[f'{name}.router_bias'] = bias
        out[f'{name}.tau'] = torch.full(tuple(stage.tau.shape), CHAIN_TAU)
        if stage.router_weight is not None:
            out[f'{name}.router_weight'] = torch.zeros(tuple(stage.router_weight.shape))
    return out


def _guess_wiring(keys: List[str]) -> str:
    leaves = {k.rpartition('.')[2] for k in keys}
    if 'router_weight' in leaves:
        return "wiring='dynamic'"
    if 'router_bias' in leaves:
        return "wiring='static'"
    return "wiring='chain' or the static timm twin"


def check_state_dict(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        pretrained_cfg: Optional[Mapping[str, Any]] = None,
        source: Optional[str] = None,
) -> None:
    """Raise :class:`DdwCheckpointError` unless ``state_dict`` fits ``model`` key for key and shape.

    Differences timm's ``load_pretrained`` adapts on purpose are allowed: the classifier when the
    model's ``num_classes`` differs from the checkpoint's, the first conv when ``in_chans`` does,
    and keys a features_only model does not have. ``source`` names the state dict in the error
    (default: the weight source in ``pretrained_cfg``).
    """
    cfg = pretrained_cfg if pretrained_cfg is not None else (getattr(model, 'pretrained_cfg', None) or {})
    own = model.state_dict()
    adapted = set()
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    if cfg.get('num_classes') is not None and getattr(model, 'num_classes', None) != cfg['num_classes']:
        adapted |= {f'{c}.{p}' for c in classifiers for p in ('weight', 'bias')}
    convs = cfg.get('first_conv') or ()
    convs = (convs,) if isinstance(convs, str) else tuple(convs)
    in_chans = getattr(model, 'in_chans', None)
    if in_chans is not None and (cfg.get('input_size') or (3,))[0] != in_chans:
        adapted |= {f'{c}.weight' for c in convs}

    from ._ddw import DdwMixin  # here: _ddw imports this module
    # a features_only model is the twin's feature extractor, which drops the head (and the stages
    # that out_indices cut off): timm loads it non-strictly, so only its own keys must all be there
    features = not isinstance(model, DdwMixin)
    missing = [k for k in own if k not in state_dict and k not in adapted]
    unexpected = [] if features else [k for k in state_dict if k not in own and k not in adapted]
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items()
        if k in own and k not in adapted and hasattr(v, 'shape') and tuple(v.shape) != tuple(own[k].shape)]
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, items: List[str]) -> str:
        shown = ', '.join(items[:12]) + (f', ... ({len(items) - 12} more)' if len(items) > 12 else '')
        return f'\n  {title} ({len(items)}): {shown}' if items else ''

    hint = ''
    if any(_is_routing_key(k) for k in missing + unexpected):
        hint = (f'\nThe checkpoint looks like a model with {_guess_wiring(list(state_dict))}; '
                'create the model with the wiring it was trained with (a published config.json carries it).')
    raise DdwCheckpointError(
        f'{source or "Checkpoint from " + _source(cfg)} does not fit {_describe(model)}; nothing was loaded.'
        + listing('missing keys', missing) + listing('unexpected keys', unexpected)
        + listing('shape mismatches', mismatched) + hint)


def ddw_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """timm ``pretrained_filter_fn`` of every DDW model.

    Applies the twin's own filter (RegNet's converts pycls/torchvision checkpoints), adds the
    chain-equivalent routers when a ``*_chaininit`` tag loads a static network's weights, and
    checks the result against the model so that a wrong checkpoint fails before loading.
    """
    from timm.models.regnet import RegNet
    from timm.models.regnet import _filter_fn as regnet_filter_fn

    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if isinstance(model, RegNet) or (cfg.get('architecture') or '').startswith('ddw_regnet'):  # features_only too
        state_dict = regnet_filter_fn(state_dict)
    routed = any(s.router_bias is not None for s in graph_stages(model).values())
    if routed and (cfg.get('tag') or '').endswith(CHAININIT_SUFFIX) \
            and not any(_is_routing_key(k) for k in state_dict):
        # a static network's weights. Fixed wirings have no routing parameters: their checkpoints
        # and the twin's weights share every key, and load as they are
        state_dict = chain_init_state_dict(state_dict, model)
    _fix_num_classes(state_dict, cfg)
    check_state_dict(state_dict, model, cfg)
    return state_dict


def _fix_num_classes(state_dict: Mapping[str, Any], cfg: Dict[str, Any]) -> None:
    # pretrained_cfg describes the checkpoint: a fine-tuned checkpoint loaded with file= keeps its
    # registry cfg's num_classes, and timm would then drop its matching classifier silently
    classifier = cfg.get('classifier')
    if not isinstance(classifier, str) or f'{classifier}.weight' not in state_dict:
        return
    rows = state_dict[f'{classifier}.weight'].shape[0]
    if cfg.get('num_classes') != rows:
        cfg['num_classes'] = rows


def load_checked(model: nn.Module, state_dict: Mapping[str, Any], source: Optional[str] = None) -> None:
    """Load a DDW state dict strictly, with :func:`check_state_dict`'s error on any mismatch.

    ``source`` (e.g. the file read) names the weights in the error; the model's pretrained_cfg
    describes its default weights, not these.
    """
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg.pop('num_classes', None)  # no adaptation here: the classifier must match
    cfg.pop('input_size', None)
    check_state_dict(state_dict, model, cfg, source=f'Checkpoint {source}' if source else 'The given state dict')
    model.load_state_dict(state_dict, strict=True)


def _raised_in(e: BaseException, fn: Any) -> bool:
    return any(frame.f_code is fn.__code__ for frame, _ in traceback.walk_tb(e.__traceback__))


@contextmanager
def pretrained_errors(variant: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Iterator[None]:
    """Name the model and the weight source in errors from downloading or reading its weights.

    Only errors raised inside timm's ``load_pretrained`` are reworded; construction errors and
    :class:`DdwCheckpointError` pass unchanged.
    """
    from timm.models import load_pretrained, resolve_pretrained_cfg
    try:
        yield
    except DdwCheckpointError:
        raise
    except Exception as e:
        if not pretrained or not _raised_in(e, load_pretrained):
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        detail = str(e) or 'file not found'
        raise DdwCheckpointError(
            f'{variant}: could not load pretrained weights from {_source(cfg.to_dict())}: '
            f'{type(e).__name__}: {detail}') from e
