"""Where a job runs and writes: its device and its output folder.

Jobs never write into a folder that already holds results: like timm's train.py (``get_outdir``
with ``inc=True``) they take the next free ``DIR-1``, ``DIR-2``, ... instead, and they check
that the folder is writable before they start working.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Union

import torch

__all__ = ['cpu_seconds', 'new_output_dir', 'remove_if_empty', 'resolve_device']

PathLike = Union[str, os.PathLike]


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    """``'auto'`` (cuda when available), ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...; ValueError if unusable here."""
    if isinstance(name, torch.device):
        device = name
    elif name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"device {name!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available here (use 'cpu' or 'auto')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f'device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    elif device.type not in ('cpu', 'mps', 'xpu'):
        raise ValueError(f"device {name!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return device


def new_output_dir(path: PathLike, reuse: bool = False) -> Path:
    """Create (or take, when missing or empty) the output folder ``path`` and check it is writable.

    A folder that already holds files is never written into: the next free ``path-1``,
    ``path-2``, ... is used, as timm's ``get_outdir(..., inc=True)`` does; ``reuse=True`` takes
    it anyway (a resumed run continuing in its own folder). Raises OSError subclasses with a
    message that names the folder.
    """
    from timm.utils import get_outdir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f'{path} is a file, not a folder')
    try:
        if path.is_dir() and any(path.iterdir()) and not reuse:
            out = Path(get_outdir(str(path), inc=True))
        else:
            path.mkdir(parents=True, exist_ok=True)
            out = path
    except OSError as e:
        raise PermissionError(f'cannot create the output folder {path}: {e.strerror or e}') from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise PermissionError(f'cannot write into the output folder {out}: {e.strerror or e}') from None
    return out


def remove_if_empty(path: PathLike) -> bool:
    """Remove a folder a job created but never wrote into; True if removed."""
    try:
        Path(path).rmdir()  # only succeeds when empty
    except OSError:
        return False
    return True


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers), all threads."""
    try:
        import resource
    except ImportError:  # not on Windows
        return time.process_time()
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
