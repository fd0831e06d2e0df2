"""The data sets the commands read: Fashion-MNIST from Debian's ``dataset-fashion-mnist``
package (read offline with numpy) and image folders with one sub-folder per class.

Image folders are checked before anything trains on them: a missing validation split or
images outside class sub-folders would otherwise give a model that scores 100% on nothing.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ['FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES', 'FASHION_MNIST_MEAN', 'FASHION_MNIST_STD', 'MISSING_DATA',
           'TRAIN_SPLITS', 'VAL_SPLITS', 'ArrayImageDataset', 'DataError', 'fashion_mnist', 'image_folder',
           'image_folder_splits', 'load_fashion_mnist', 'read_idx']

FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'val': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),  # the same 10,000 images
}
MISSING_DATA = (
    'Fashion-MNIST not found in {dir} (missing {file}). Install it with\n'
    '    sudo apt-get install -y dataset-fashion-mnist\n'
    'or pass --fashion-mnist-dir DIR, or train on your own images with --data-dir DIR '
    '(an image folder with train/ and val/ subfolders, one subfolder per class).')
TRAIN_SPLITS = ('train', 'training')
VAL_SPLITS = ('val', 'validation', 'valid')


class DataError(ValueError):
    """A data set that cannot be used as asked; nothing was trained or computed on it."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw) as a uint8 array; images are N x H x W, labels N."""
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f'{path} is not a uint8 IDX file (magic {data[:4].hex()})')
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise ValueError(f'{path}: header says {shape}, file holds {array.size} values')
    return array.reshape(shape)


def load_fashion_mnist(
        root: str | os.PathLike = FASHION_MNIST_DIR, split: str = 'train') -> Tuple[np.ndarray, np.ndarray]:
    """Images (N x 28 x 28 uint8) and labels (N) of Fashion-MNIST's ``split`` ('train', or 'val'/'test')."""
    if split not in _FILES:
        raise ValueError(f"split={split!r} is not one of {tuple(_FILES)}")
    paths = [Path(root) / name for name in _FILES[split]]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(MISSING_DATA.format(dir=root, file=p.name))
    images, labels = (read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise ValueError(f'{root}: {len(images)} images but {len(labels)} labels in split {split!r}')
    return images, labels


class ArrayImageDataset(torch.utils.data.Dataset):
    """uint8 grayscale images in memory, served as PIL images so timm's transforms apply.

    ``create_loader`` sets ``transform``, as it does for timm's own ImageDataset.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str] = (), mode: str = 'L',
                 transform=None) -> None:
        self.images, self.labels = images, labels.astype(np.int64)
        self.classes = list(classes)
        self.mode = mode  # 'RGB' for 3-channel models
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index], mode='L')
        if self.mode != 'L':
            img = img.convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


def fashion_mnist(split: str = 'val', root: str | os.PathLike = FASHION_MNIST_DIR, transform=None,
                  mode: str = 'L') -> ArrayImageDataset:
    """Fashion-MNIST's ``split`` as a dataset of PIL images (``mode`` 'L' or 'RGB') for timm transforms."""
    images, labels = load_fashion_mnist(root, split)
    return ArrayImageDataset(images, labels, FASHION_MNIST_CLASSES, mode=mode, transform=transform)


def image_folder(root: str | os.PathLike, mode: str = 'RGB', transform=None,
                 class_to_idx: Optional[Dict[str, int]] = None) -> Tuple[Any, List[str]]:
    """timm's ImageDataset over ``root`` (one sub-folder per class) and its class names.

    Raises DataError for a folder without images or with images outside class sub-folders;
    with ``class_to_idx`` (the training split's) also for classes the mapping lacks.
    """
    from timm.data import ImageDataset

    root = Path(root)
    if not root.is_dir():
        raise DataError(f'{root} is not a folder')
    try:
        ds = ImageDataset(str(root), input_img_mode=mode, transform=transform)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise DataError(f'{root}: {e}') from None
    found = ds.reader.class_to_idx
    if '' in found:
        loose = next(Path(f).name for f, t in ds.reader.samples if t == found[''])
        raise DataError(f'{root} holds images outside class sub-folders (e.g. {loose}); put each class\'s '
                        'images in a sub-folder named after it')
    if class_to_idx is not None:
        extra = sorted(set(found) - set(class_to_idx))
        if extra:
            raise DataError(f'{root} has classes the training split lacks: {", ".join(extra)}')
        ds = ImageDataset(str(root), input_img_mode=mode, transform=transform, class_map=dict(class_to_idx))
        found = class_to_idx
    return ds, [c for c, _ in sorted(found.items(), key=lambda kv: kv[1])]


def _split_dir(root: Path, names: Sequence[str]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_dir()), None)


def image_folder_splits(root: str | os.PathLike, val_split: Optional[str] = None,
                        mode: str = 'RGB') -> Tuple[Any, Any, List[str]]:
    """Train and validation ImageDatasets of ``root`` and the class names, checked for training.

    ``root`` must hold ``train/`` and ``val/`` (or ``validation/``, or ``val_split``), each with
    one sub-folder per class and at least two classes; the training images are never used for
    validation. Raises DataError naming what is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'{root} is not a folder (expected train/ and val/ image folders inside)')
    train_dir = _split_dir(root, TRAIN_SPLITS)
    if train_dir is None:
        raise DataError(f'{root} has no train/ folder (expected train/ and val/, one sub-folder per class in each)')
    val_dir = _split_dir(root, (val_split,) if val_split else VAL_SPLITS)
    if val_dir is None:
        wanted = f'{val_split}/' if val_split else 'val/ (or validation/)'
        raise DataError(f'{root} has no {wanted} folder to validate on; the training images are never used '
                        'for validation')
    train_ds, classes = image_folder(train_dir, mode)
    if len(classes) < 2:
        raise DataError(f'{train_dir} has {len(classes)} class sub-folder ({", ".join(classes)}); training '
                        'needs at least 2 classes')
    val_ds, _ = image_folder(val_dir, mode, class_to_idx=train_ds.reader.class_to_idx)
    return train_ds, val_ds, classes
