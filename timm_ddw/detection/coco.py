"""COCO-style box AP of a torchvision detector on a data set, computed by pycocotools' COCOeval."""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ['COCO_METRICS', 'coco_ground_truth', 'evaluate_coco']

# the first six of COCOeval.stats, in percent as the paper's Table 2 gives them
COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("COCO AP needs pycocotools: pip install 'timm-ddw[detection]'") from e
    return COCO, COCOeval


def coco_ground_truth(dataset: Any, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A COCO annotation document of a torchvision-style data set ((image, target) with boxes and labels)."""
    images, annotations = [], []
    labels = set()
    for i in range(len(dataset)):
        image, target = dataset[i]
        image_id = int(target.get('image_id', i))
        images.append(dict(id=image_id, height=int(image.shape[-2]), width=int(image.shape[-1])))
        for box, label in zip(target['boxes'].tolist(), target['labels'].tolist()):
            x1, y1, x2, y2 = box
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=int(label),
                                    bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), iscrowd=0))
            labels.add(int(label))
    names = list(class_names or getattr(dataset, 'classes', None) or [])
    categories = [dict(id=c, name=names[c] if c < len(names) else str(c)) for c in sorted(labels)]
    return dict(images=images, annotations=annotations, categories=categories)


@torch.no_grad()
def evaluate_coco(
        detector: nn.Module,
        dataset: Any,
        batch_size: int = 16,
        device: str | torch.device = 'cpu',
) -> Dict[str, Any]:
    """Box AP, AP50, AP75, APs, APm, APl (percent; None where no object has that size) and the summary text."""
    COCO, COCOeval = _pycocotools()
    gt = COCO()
    gt.dataset = coco_ground_truth(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    was_training = detector.training
    detector.eval()
    results: List[Dict[str, Any]] = []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            outputs = detector([image.to(device) for image, _ in batch])
            for (_, target), out in zip(batch, outputs):
                for box, label, score in zip(out['boxes'].tolist(), out['labels'].tolist(), out['scores'].tolist()):
                    x1, y1, x2, y2 = box
                    results.append(dict(image_id=int(target['image_id']), category_id=int(label),
                                        bbox=[x1, y1, x2 - x1, y2 - y1], score=float(score)))
    finally:
        detector.train(was_training)
    if not results:  # COCO.loadRes cannot take an empty list; nothing detected is AP 0
        return dict(dict.fromkeys(COCO_METRICS, 0.0), detections=0, summary='no detections')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluator = COCOeval(gt, gt.loadRes(results), 'bbox')
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {k: (100.0 * float(v) if v >= 0 else None) for k, v in zip(COCO_METRICS, evaluator.stats)}
    return dict(stats, detections=len(results), summary=out.getvalue().strip())
