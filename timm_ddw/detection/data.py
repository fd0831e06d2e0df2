"""Fashion-MNIST detection: a detection task that needs no download beyond Debian's Fashion-MNIST.

Each image is a black ``canvas_size`` square with one to four Fashion-MNIST items, each rescaled to
a random side in ``item_sizes`` and pasted at a random position. An item's box is the tight box of
its non-zero pixels; its label is its Fashion-MNIST class + 1 (torchvision's detectors keep 0 for
the background). Items never share a pixel of their boxes (a position is redrawn up to
``max_tries`` times, then the item is left out), so every box holds exactly one item's pixels and
nothing else. Image ``i`` depends only on ``(seed, i)`` and the split: the same seed gives the same
images in any order, on any machine. Training images take their items from Fashion-MNIST's
training split, test images from its test split.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist

__all__ = ['FashionMnistDetection', 'detection_collate']

Target = Dict[str, torch.Tensor]


def detection_collate(batch: Sequence[Tuple[torch.Tensor, Target]]) -> Tuple[List[torch.Tensor], List[Target]]:
    """Images and targets as lists: torchvision's detectors take images of any size."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _tight_box(item: np.ndarray) -> Tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the non-zero pixels, x2/y2 exclusive: pixel edges, torchvision's convention."""
    rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _disjoint(box: Tuple[int, int, int, int], others: List[Tuple[int, int, int, int]]) -> bool:
    return all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in others)


class FashionMnistDetection(torch.utils.data.Dataset):
    """``num_images`` synthetic detection images; each item is ``(image 1 x H x W float in [0, 1], target)``.

    ``target`` has torchvision's keys: ``boxes`` (N x 4 float, x1 y1 x2 y2), ``labels`` (N int64,
    1..10), ``image_id``, ``area`` (box areas) and ``iscrowd`` (zeros).
    """

    classes = ('__background__',) + FASHION_MNIST_CLASSES

    def __init__(
            self,
            num_images: int,
            split: str = 'train',
            seed: int = 0,
            canvas_size: int = 128,
            items_per_image: Tuple[int, int] = (1, 4),
            item_sizes: Tuple[int, int] = (28, 64),
            max_tries: int = 50,
            root: str | os.PathLike = FASHION_MNIST_DIR,
    ) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f'num_images={num_images!r} must be a positive int')
        lo, hi = item_sizes
        if not 1 <= lo <= hi <= canvas_size:
            raise ValueError(f'item_sizes={item_sizes!r} must satisfy 1 <= min <= max <= canvas_size={canvas_size}')
        if not 1 <= items_per_image[0] <= items_per_image[1]:
            raise ValueError(f'items_per_image={items_per_image!r} must satisfy 1 <= min <= max')
        self.items, self.item_labels = load_fashion_mnist(root, split)
        self.num_images, self.split, self.seed = num_images, split, seed
        self.canvas_size, self.items_per_image, self.item_sizes = canvas_size, items_per_image, item_sizes
        self.max_tries = max_tries

    def __len__(self) -> int:
        return self.num_images

    def compose(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[Dict[str, Any]]]:
        """Canvas (H x W uint8), boxes (N x 4 int), labels (N) and where each item went (for tests)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f'index {index} out of range for {self.num_images} images')
        rng = np.random.default_rng([self.seed, index])
        size = self.canvas_size
        canvas = np.zeros((size, size), dtype=np.uint8)
        boxes: List[Tuple[int, int, int, int]] = []
        labels: List[int] = []
        placed: List[Dict[str, Any]] = []
        for _ in range(int(rng.integers(self.items_per_image[0], self.items_per_image[1] + 1))):
            k = int(rng.integers(len(self.items)))
            side = int(rng.integers(self.item_sizes[0], self.item_sizes[1] + 1))
            item = np.asarray(Image.fromarray(self.items[k]).resize((side, side), Image.BILINEAR))
            if not item.any():
                continue
            x1, y1, x2, y2 = _tight_box(item)
            for _ in range(self.max_tries):
                x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                box = (x + x1, y + y1, x + x2, y + y2)
                if _disjoint(box, boxes):
                    # outside its tight box the item is zero, so only the box region changes
                    canvas[box[1]:box[3], box[0]:box[2]] = item[y1:y2, x1:x2]
                    boxes.append(box)
                    labels.append(int(self.item_labels[k]) + 1)
                    placed.append(dict(index=k, side=side, x=x, y=y))
                    break
        return (canvas, np.asarray(boxes, dtype=np.int64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                placed)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Target]:
        canvas, boxes, labels, _ = self.compose(index)
        image = torch.from_numpy(canvas).float().div_(255).unsqueeze(0)
        box_t = torch.from_numpy(boxes).float()
        area = (box_t[:, 2] - box_t[:, 0]) * (box_t[:, 3] - box_t[:, 1])
        target = dict(boxes=box_t, labels=torch.from_numpy(labels), image_id=torch.tensor(index),
                      area=area, iscrowd=torch.zeros(len(labels), dtype=torch.int64))
        return image, target
