"""Export a DDW model for deployment: ``torch.export`` programs and ONNX files.

A graph stage's eval forward is plain tensor code (routers, the Eq. 5 gate as a mask, weighted
sums), so both exporters trace it without special handling. These helpers only fix the settings
that matter for DDW models: eval mode, and a dynamic batch dimension, because the edge weights
are per sample.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn as nn

__all__ = ['export_program', 'export_onnx']


def _example(model: nn.Module, input_size: Sequence[int], batch_size: int) -> torch.Tensor:
    if len(input_size) != 3 or any(int(s) <= 0 for s in input_size):
        raise ValueError(f'input_size={tuple(input_size)!r} must be (channels, height, width) with positive sizes')
    if batch_size < 2:
        # torch.export specialises a dynamic dimension that is 1 in the example input
        raise ValueError(f'batch_size={batch_size!r} must be >= 2 for a dynamic batch dimension')
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device('cpu')
    dtype = ref.dtype if ref is not None else torch.float32
    return torch.randn(batch_size, *[int(s) for s in input_size], device=device, dtype=dtype)


@contextlib.contextmanager
def _dense(model: nn.Module):
    """Export the dense eval forward: skipping closed nodes decides per batch which blocks run,
    which a traced graph cannot hold; the dense forward gives the same outputs."""
    stages = [m for m in model.modules() if getattr(m, 'skip_closed', False)]
    for m in stages:
        m.skip_closed = False
    try:
        yield
    finally:
        for m in stages:
            m.skip_closed = True


def _dynamic_batch() -> tuple:
    return ({0: torch.export.Dim('batch', min=1, max=4096)},)


def export_program(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 2,
) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode with a dynamic batch dimension (dense forward)."""
    model.eval()
    x = _example(model, input_size, batch_size)
    with _dense(model):
        return torch.export.export(model, (x,), dynamic_shapes=_dynamic_batch())


def export_onnx(
        model: Union[nn.Module, torch.export.ExportedProgram],
        path: Union[str, Path],
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 2,
        optimize: bool = True,
) -> Path:
    """Write the model (eval mode, dynamic batch) to an ONNX file with torch's dynamo exporter.

    ``model`` may also be a program from :func:`export_program` (then ``input_size`` and
    ``batch_size`` are unused), which saves tracing twice. Input is named ``input``, output
    ``output``; run the file with e.g. ``onnxruntime.InferenceSession``.
    """
    program = model if isinstance(model, torch.export.ExportedProgram) \
        else export_program(model, input_size, batch_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        program, (), str(path), dynamo=True, optimize=optimize, verbose=False,
        input_names=['input'], output_names=['output'], external_data=False)
    return path

