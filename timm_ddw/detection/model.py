"""A timm model (DDW or static) as the backbone of torchvision's Faster R-CNN with FPN.

torchvision's own ``resnet_fpn_backbone`` wraps torchvision ResNets only; here the body is timm's
``features_only`` model (the DDW model's graph stages inside it), so every ``ddw_*`` model and its
timm twin go through one code path, and the detector is torchvision's unchanged ``FasterRCNN``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d
from timm.models import split_model_name_tag
from timm.utils.model import freeze
from torchvision.models.detection import FasterRCNN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from ..models import TWINS
from ..models._ddw import DDW_DEFAULTS

__all__ = ['FPN_STRIDES', 'NUM_STAGES', 'TimmFpnBackbone', 'create_detector', 'create_fpn_backbone',
           'stage_of_parameters']

FPN_STRIDES = (4, 8, 16, 32)  # FPN's C2..C5, as torchvision's resnet_fpn_backbone returns them
NUM_STAGES = 1 + len(FPN_STRIDES)  # the stem and one stage per stride: trainable_stages counts these


class TimmFpnBackbone(nn.Module):
    """timm ``features_only`` body + torchvision FPN: what torchvision's detectors expect of a backbone.

    Like torchvision's ``BackboneWithFPN`` (``body``, ``fpn``, ``out_channels``), but the body is
    called as a whole: timm's feature extractors (``FeatureListNet``, ``EfficientNetFeatures``)
    are not plain module sequences that torchvision's IntermediateLayerGetter could cut.
    """

    def __init__(self, body: nn.Module, out_channels: int, extra_blocks: Optional[ExtraFPNBlock] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        # keys '0'..'3' are the feature map names torchvision's RoI pooling defaults to
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _feature_levels(model_name: str, model_kwargs: Dict[str, Any]) -> Any:
    """The feature_info of the model's full feature extractor, read from a copy on the meta device."""
    try:
        probe = timm.create_model(model_name, features_only=True, device='meta', **model_kwargs)
    except Exception as e:
        raise ValueError(f'{model_name} cannot be a detection backbone: timm cannot build it with '
                         f'features_only=True ({type(e).__name__}: {e})') from e
    return probe.feature_info


def _subtree_end(order: List[str], name: str) -> int:
    """Position (in named_modules order) of the last module inside ``name``; -1 when absent."""
    candidates = (name, name.replace('.', '_'))  # flatten_sequential feature models rename 'a.b' to 'a_b'
    ends = [i for i, n in enumerate(order) if any(n == c or n.startswith(c + '.') for c in candidates)]
    return max(ends, default=-1)


def stage_of_parameters(body: nn.Module, boundaries: Sequence[Optional[str]]) -> Dict[str, int]:
    """Parameter name -> stage index: 0 for the stem, k for the stage computing ``boundaries[k]``.

    ``boundaries`` names the module whose output ends each stage (from timm's feature_info; the
    stem's may be None). timm registers modules in execution order, so a stage is everything after
    the previous boundary's subtree up to the end of its own, wherever the feature extractor nests it.
    """
    order = [n for n, _ in body.named_modules()]
    ends = [-1 if b is None else _subtree_end(order, b) for b in boundaries]
    missing = [b for b, e in zip(boundaries, ends) if b is not None and e < 0]
    if missing:
        raise ValueError(f'{type(body).__name__} has no modules named {missing} (from its feature_info)')
    stages = {}
    for i, (name, module) in enumerate(body.named_modules()):
        stage = next((k for k, end in enumerate(ends) if i <= end), len(ends) - 1)
        for p, _ in module.named_parameters(recurse=False):
            stages[f'{name}.{p}' if name else p] = stage
    return stages


def _freeze_stages(body: nn.Module, stages: Dict[str, int], num_frozen: int) -> None:
    """Freeze the first ``num_frozen`` stages as timm's ``freeze`` does: weights, and BN statistics."""
    frozen = {n for n, s in stages.items() if s < num_frozen}
    if not frozen:
        return
    # the largest modules whose parameters are all frozen: parents are listed before their children
    names: List[str] = []
    for name, module in body.named_modules():
        own = [f'{name}.{p}' if name else p for p, _ in module.named_parameters()]
        if name and own and all(p in frozen for p in own) and not any(name.startswith(n + '.') for n in names):
            names.append(name)
    freeze(body, names)


def _check_trainable_stages(trainable_stages: Optional[int], pretrained: bool) -> int:
    if trainable_stages is None:  # torchvision's default: freeze the stem and first stage of pretrained backbones
        return 3 if pretrained else NUM_STAGES
    if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int) \
            or not 0 <= trainable_stages <= NUM_STAGES:
        raise ValueError(f'trainable_stages={trainable_stages!r} must be an int in [0, {NUM_STAGES}] '
                         '(the stem and the stride 4, 8, 16, 32 stages)')
    return trainable_stages


def create_fpn_backbone(
        model_name: str,
        *,
        pretrained: bool = False,
        trainable_stages: Optional[int] = None,
        freeze_bn: Optional[bool] = None,
        fpn_channels: int = 256,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        **model_kwargs: Any,
) -> TimmFpnBackbone:
    """A timm model's stride 4/8/16/32 features under torchvision's FPN, for any torchvision detector.

    ``model_kwargs`` go to ``timm.create_model`` (``wiring=`` and the other DDW arguments included).
    ``trainable_stages`` (0..5: the stem and four stages, counted from the last) and ``freeze_bn``
    default as torchvision's detectors do: a pretrained backbone keeps 3 stages trainable and
    frozen BN (statistics and affine, timm's ``freeze_batch_norm_2d``), a random one trains
    everything with live BN -- frozen BN of a random init would fix timm's zero-initialised last
    BN of each residual block at 0. Routers and thresholds of the trainable stages stay trainable;
    frozen stages are frozen whole.
    """
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise ValueError(f'unknown model {model_name!r}: not a timm model (DDW models: {", ".join(sorted(TWINS))})')
    ddw_args = sorted(k for k in model_kwargs if k in DDW_DEFAULTS)
    if ddw_args and split_model_name_tag(model_name)[0] not in TWINS:
        raise ValueError(f'{ddw_args} apply to ddw_* models only; {model_name} is a static timm model')
    if isinstance(fpn_channels, bool) or not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise ValueError(f'fpn_channels={fpn_channels!r} must be a positive int')
    trainable_stages = _check_trainable_stages(trainable_stages, pretrained)
    if 'features_only' in model_kwargs or 'out_indices' in model_kwargs:
        raise ValueError('features_only and out_indices are set by the detection backbone (strides 4, 8, 16, 32)')

    info = _feature_levels(model_name, model_kwargs)
    reductions = info.reduction()
    if any(s not in reductions for s in FPN_STRIDES):
        raise ValueError(f'{model_name} has no feature maps at strides {FPN_STRIDES} '
                         f'(its feature_info has {reductions})')
    # the deepest feature of each stride, and of the stem (strides below 4) when timm lists one
    out_indices = [len(reductions) - 1 - reductions[::-1].index(s) for s in FPN_STRIDES]
    stem = [i for i, r in enumerate(reductions) if r < FPN_STRIDES[0]]
    names = info.module_name()
    boundaries = [names[stem[-1]] if stem else None] + [names[i] for i in out_indices]

    body = timm.create_model(
        model_name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), **model_kwargs)
    _freeze_stages(body, stage_of_parameters(body, boundaries), NUM_STAGES - trainable_stages)
    if freeze_bn is None:
        freeze_bn = pretrained
    if freeze_bn:
        body = freeze_batch_norm_2d(body)
    return TimmFpnBackbone(body, fpn_channels, extra_blocks)


def _image_stats(body: nn.Module) -> Dict[str, List[float]]:
    """The backbone's own normalisation (timm's data config) for torchvision's detector transform."""
    cfg = timm.data.resolve_model_data_config(body)
    mean, std = list(cfg['mean']), list(cfg['std'])
    in_chans = next(m for m in body.modules() if isinstance(m, nn.Conv2d)).in_channels
    if in_chans != len(mean):  # e.g. in_chans=1 on an RGB config: one grey channel
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return dict(image_mean=mean, image_std=std)


def create_detector(
        model_name: str,
        num_classes: Optional[int],
        *,
        pretrained_backbone: bool = False,
        trainable_stages: Optional[int] = None,
        fpn_channels: int = 256,
        freeze_bn: Optional[bool] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **detector_kwargs: Any,
) -> FasterRCNN:
    """torchvision's Faster R-CNN with FPN on a ``ddw_*`` model or its timm twin (the static baseline).

    ``num_classes`` counts the background, as in torchvision. ``pretrained_backbone`` loads the
    backbone's default pretrained tag (for DDW models the chain-equivalent ``*_chaininit`` start).
    DDW arguments (``wiring=``, ``router_bias=``, ...) given here go to the backbone, as does
    ``backbone_kwargs`` (any other ``timm.create_model`` argument); the remaining keyword arguments
    go to ``FasterRCNN`` (``min_size``, ``rpn_anchor_generator``, ...). The detector's transform
    normalises with the backbone's own mean and std unless ``image_mean``/``image_std`` are given.
    See :func:`create_fpn_backbone` for ``trainable_stages`` and ``freeze_bn``.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f'num_classes={num_classes!r} must be an int >= 2: it counts the background (torchvision)')
    model_kwargs = dict(backbone_kwargs or {})
    model_kwargs.update({k: detector_kwargs.pop(k) for k in DDW_DEFAULTS if k in detector_kwargs})
    backbone = create_fpn_backbone(
        model_name, pretrained=pretrained_backbone, trainable_stages=trainable_stages, freeze_bn=freeze_bn,
        fpn_channels=fpn_channels, **model_kwargs)
    for key, value in _image_stats(backbone.body).items():
        detector_kwargs.setdefault(key, value)
    return FasterRCNN(backbone, num_classes=num_classes, **detector_kwargs)
