"""``fasterrcnn_<model>_fpn`` builders in torchvision's model registry, for its reference scripts.

torchvision's ``references/detection/train.py`` builds ``torchvision.models.get_model(args.model,
weights=..., weights_backbone=..., num_classes=..., trainable_backbone_layers=..., ...)``. For each
DDW model this registers ``fasterrcnn_<ddw model>_fpn`` and, for its static baseline through the
same code, ``fasterrcnn_timm_<twin>_fpn`` (timm's twin; torchvision's own ``fasterrcnn_resnet50_fpn``
uses torchvision's ResNet). ``weights_backbone``: None (random), ``'DEFAULT'`` (the backbone's
default pretrained tag: ``*_chaininit`` for DDW models) or another timm pretrained tag of the model.
``python -m timm_ddw.detection train.py ...`` runs a script with these registered.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from torchvision.models import list_models
from torchvision.models._api import register_model
from torchvision.models.detection import FasterRCNN

from ..models import TWINS
from .model import create_detector

__all__ = ['TORCHVISION_NAMES']

COCO_NUM_CLASSES = 91  # torchvision's COCO category ids, background included


def _builder(model_name: str) -> Callable[..., FasterRCNN]:
    def build(*, weights: Any = None, weights_backbone: Any = None, num_classes: Optional[int] = None,
              trainable_backbone_layers: Optional[int] = None, **kwargs: Any) -> FasterRCNN:
        if weights is not None:
            raise ValueError(f'no trained detector weights exist for {model_name}; '
                             "start from the backbone's with weights_backbone='DEFAULT'")
        name = model_name
        if weights_backbone is not None and str(weights_backbone) != 'DEFAULT':
            name = f'{model_name}.{weights_backbone}'  # a timm pretrained tag
        return create_detector(
            name, COCO_NUM_CLASSES if num_classes is None else num_classes,
            pretrained_backbone=weights_backbone is not None, trainable_stages=trainable_backbone_layers, **kwargs)

    build.__name__ = build.__qualname__ = f'fasterrcnn_{model_name}_fpn'
    build.__doc__ = f"Faster R-CNN with FPN on timm's {model_name} (timm_ddw.detection.create_detector)."
    return build


def _names() -> Dict[str, str]:
    names = {}
    for ddw, twin in TWINS.items():
        names[f'fasterrcnn_{ddw}_fpn'] = ddw
        names[f'fasterrcnn_timm_{twin}_fpn'] = twin
    return names


# torchvision name -> timm model
TORCHVISION_NAMES: Dict[str, str] = _names()

_registered = set(list_models())
for _name, _model in TORCHVISION_NAMES.items():
    if _name not in _registered:  # importing twice (e.g. a reload) must not fail
        register_model(_name)(_builder(_model))
