"""Routing analysis of a detector's DDW backbone: which paths do detection images take?"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from ..routing import RoutingStats, collect_routing

__all__ = ['backbone_inputs', 'collect_detector_routing']


def backbone_inputs(detector: nn.Module, loader: Iterable[Any], device: str | torch.device = 'cpu') \
        -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """What the backbone sees, batch by batch: the images after the detector's own transform
    (normalised, resized, padded into one tensor), with each image's dominant label (its largest box;
    0 for an image without boxes) for per-class routing means."""
    for images, targets in loader:
        image_list, _ = detector.transform([image.to(device) for image in images])
        labels = []
        for t in targets:
            boxes = t['boxes']
            if len(boxes):
                area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                labels.append(int(t['labels'][area.argmax()]))
            else:
                labels.append(0)
        yield image_list.tensors, torch.tensor(labels, dtype=torch.int64)


def collect_detector_routing(
        detector: nn.Module,
        loader: Iterable[Any],
        device: str | torch.device = 'cpu',
        max_batches: Optional[int] = None,
        progress: bool = True,
) -> RoutingStats:
    """:func:`timm_ddw.routing.collect_routing` over a detection loader ((images, targets) batches)."""
    predictor = getattr(getattr(detector, 'roi_heads', None), 'box_predictor', None)
    num_classes = getattr(getattr(predictor, 'cls_score', None), 'out_features', None)
    was_training = detector.training
    detector.to(device).eval()  # the transform resizes as in inference
    try:
        return collect_routing(detector.backbone.body, backbone_inputs(detector, loader, device), device=device,
                               max_batches=max_batches, progress=progress, num_classes=num_classes)
    finally:
        detector.train(was_training)
