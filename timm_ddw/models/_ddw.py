"""What every DDW model shares: turning a timm twin into a DDW model, and its config."""
from __future__ import annotations

from typing import Any, Dict, List, Set, Type

import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, get_pretrained_cfg
from timm.models._builder import pretrained_cfg_for_features

from ..graph import GraphStage, _check_args
from ._pretrained import chaininit_source, ddw_filter_fn, pretrained_errors

__all__ = ['DDW_DEFAULTS', 'DdwMixin', 'NodeCheckpointing', 'create_ddw', 'ddw_features_class', 'twin_cfg',
           'wire_stages']

_FEATURE_KEYS = ('out_indices', 'feature_cls', 'feature_cfg', 'output_fmt', 'flatten_sequential')

# constructor arguments of the graph stages; every DDW model accepts them
DDW_DEFAULTS: Dict[str, Any] = dict(
    wiring='dynamic', router_bias=3.0, threshold_init=0.0, gate='ste', wiring_seed=0, aggregation='bounded',
    node_budget=None, removal='router')

_DATA_KEYS = (
    'num_classes', 'input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'pool_size',
    'crop_pct', 'test_crop_pct', 'crop_mode', 'interpolation', 'mean', 'std', 'first_conv', 'classifier',
    'license')


def twin_cfg(twin: str, **overrides: Any) -> Dict[str, Any]:
    """A DDW model's pretrained_cfg: its timm twin's data config and licence, with the twin's
    default ImageNet weights as the source of the chain-equivalent warm start (see _pretrained.py)."""
    cfg = get_pretrained_cfg(twin).to_dict()
    out = {k: cfg[k] for k in _DATA_KEYS if cfg.get(k) is not None}
    out.update(chaininit_source(cfg))
    out.update(overrides)
    return out


class NodeCheckpointing:
    """``set_grad_checkpointing`` for a module holding graph stages: node by node inside each stage.

    timm's own flag would checkpoint whole stages (``checkpoint_seq``, or a feature wrapper's
    per-module checkpoints), which in a graph stage keeps every node output and recomputes the
    whole stage: no memory saved.
    """

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self, 'grad_checkpointing'):
            self.grad_checkpointing = False
        for m in self.modules():
            if isinstance(m, GraphStage):
                m.grad_checkpointing = enable


def ddw_features_class(base: type) -> type:
    """``base`` (a timm feature wrapper class) with node checkpointing, made once per base and
    kept in this module so that pickled models find it."""
    if issubclass(base, NodeCheckpointing):
        return base
    name = f'Ddw{base.__name__}'
    if name not in globals():
        globals()[name] = type(name, (NodeCheckpointing, base), {'__module__': __name__, '__qualname__': name})
    return globals()[name]


class DdwMixin(NodeCheckpointing):
    """Overrides of timm's model API that must see through graph stages.

    A DDW model is its timm twin's own class with these overrides mixed in; ``stage_prefix``
    is a regex matching a stage's module name (its group gives the stage index).
    ``twin_features_class``: the twin's ``features_only`` builds a class of its own (not a timm
    feature wrapper around the model) unless ``feature_cls`` or ``feature_cfg`` is given.
    """
    stage_prefix: str = ''
    twin_features_class: bool = False

    @classmethod
    def stage_names(cls, model: nn.Module) -> List[str]:
        raise NotImplementedError

    @classmethod
    def from_twin(cls, model: nn.Module, **ddw_args: Any) -> nn.Module:
        """Turn a timm twin into this DDW class: wire its stages, keep its class's API."""
        if type(model) not in cls.__mro__:
            raise TypeError(f'{cls.__name__} wraps {cls.__mro__[2].__name__}, got {type(model).__name__}')
        wire_stages(model, cls.stage_names(model), **ddw_args)
        model.__class__ = cls
        return model

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        matcher = dict(super().group_matcher(coarse))
        if not coarse:
            blocks = matcher['blocks']
            blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
            # routers and thresholds group with their stage, after its blocks
            matcher['blocks'] = [(self.stage_prefix + r'\.(?:router_weight|router_bias|tau)$', (99999,))] + blocks
        return matcher

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        base = super().no_weight_decay() if hasattr(super(), 'no_weight_decay') else set()
        routing = ('router_weight', 'router_bias', 'tau')
        return set(base) | {n for n, _ in self.named_parameters() if n.rpartition('.')[2] in routing}


def wire_stages(model: nn.Module, names: List[str], **ddw_args: Any) -> nn.Module:
    """Replace each named stage that ``model`` has by a graph stage holding the same blocks."""
    for index, name in enumerate(names):
        parent_name, _, attr = name.rpartition('.')
        parent = model.get_submodule(parent_name)
        if attr not in parent._modules:
            continue  # cut off by a feature extractor's out_indices
        stage = GraphStage(parent._modules[attr], stage_index=index, **ddw_args)
        if isinstance(parent, nn.Sequential):
            parent[int(attr)] = stage
        else:
            setattr(parent, attr, stage)
    return model


def create_ddw(
        cls: Type[DdwMixin],
        variant: str,
        twin: str,
        pretrained: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """Build timm's ``twin`` with timm's own builder and wire its stages; ``build_model_with_cfg``
    then loads pretrained weights and wraps feature extractors as for any timm model.

    ``features_only`` wraps the DDW model in the feature class timm would use for the twin
    (``feature_cls``: list, dict, hook, fx, getter), so feature models keep the twin's
    feature_info and state-dict keys. Where the twin builds a features class of its own
    (EfficientNetFeatures), that class is built and its stages are wired.
    """
    ddw_args = {k: kwargs.pop(k, v) for k, v in DDW_DEFAULTS.items()}
    _check_args(**ddw_args)
    features_only = kwargs.pop('features_only', False)
    feature_args = {k: kwargs.pop(k) for k in _FEATURE_KEYS if k in kwargs}
    own_features = features_only and cls.twin_features_class and not {'feature_cls', 'feature_cfg'} & set(feature_args)

    def build(**model_kwargs: Any) -> nn.Module:
        if own_features:
            model = timm.create_model(twin, features_only=True, **feature_args, **model_kwargs)
            return wire_stages(model, cls.stage_names(model), **ddw_args)
        return cls.from_twin(timm.create_model(twin, **model_kwargs), **ddw_args)

    if features_only and not own_features:
        feature_cfg = dict(feature_args.pop('feature_cfg', None) or {})
        feature_cfg.update({k: feature_args.pop(k) for k in ('output_fmt', 'flatten_sequential') if k in feature_args})
        kwargs.update(features_only=True, feature_cfg=feature_cfg, **feature_args)
    with pretrained_errors(variant, pretrained, kwargs):
        model = build_model_with_cfg(
            build, variant, pretrained, pretrained_strict=not own_features, pretrained_filter_fn=ddw_filter_fn,
            **kwargs)
    if own_features:
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    if features_only:
        model.__class__ = ddw_features_class(type(model))
    return model
