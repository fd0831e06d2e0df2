"""DDW backbones for object detection with torchvision's Faster R-CNN and FPN (the paper's Table 2).

Importing this package also registers ``fasterrcnn_<model>_fpn`` builders with torchvision
(see :mod:`.torchvision_models`), so torchvision's reference detection scripts can train them.
"""
from .coco import COCO_METRICS, coco_ground_truth, evaluate_coco
from .data import FashionMnistDetection, detection_collate
from .model import FPN_STRIDES, NUM_STAGES, TimmFpnBackbone, create_detector, create_fpn_backbone
from .routing import backbone_inputs, collect_detector_routing
from .torchvision_models import TORCHVISION_NAMES

__all__ = ['COCO_METRICS', 'FPN_STRIDES', 'NUM_STAGES', 'TORCHVISION_NAMES', 'FashionMnistDetection',
           'TimmFpnBackbone', 'backbone_inputs', 'coco_ground_truth', 'collect_detector_routing', 'create_detector',
           'create_fpn_backbone', 'detection_collate', 'evaluate_coco']
