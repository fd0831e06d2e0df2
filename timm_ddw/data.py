"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read offline with numpy."""
from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ['FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES', 'FASHION_MNIST_MEAN', 'FASHION_MNIST_STD', 'MISSING_DATA',
           'ArrayImageDataset', 'fashion_mnist', 'load_fashion_mnist', 'read_idx']

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
    'or pass --fashion-mnist-dir DIR, or train on your own images with --data DIR '
    '(an image folder with train/ and val/ subfolders, one subfolder per class).')

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
