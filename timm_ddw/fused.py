"""Node input sums as one opaque operator, so that compilers do not generate a kernel per node.

Under ``torch.compile`` a complete-graph stage's plain sums are fused per node: every node has its
own in-degree, so inductor writes, schedules and compiles one kernel per node (ResNet-101: 60
kernels against the twin's 28, and fusion candidates that grow with the square of the node count;
see benchmarks/README.md, "Where the compile time goes"). ``torch.ops.timm_ddw.weighted_sum`` is a
custom operator: compilers call it like a convolution, with no code generation for it. Its CPU
kernel (``csrc/weighted_sum.cpp``, built with torch's C++ extension tools on first use) reads
each input once; where it cannot be built, or for layouts it does not take, the same sums run as
ATen operations. The backward is written in plain operations, which compilers trace.

Opt-in (``timm_ddw.fused.set_enabled(True)`` or ``TIMM_DDW_FUSED_SUM=1``): it cuts ResNet-101's
compile time by a third (training) to a half (inference), but steady throughput is about 5% lower
(ResNet-101: the sums cost what inductor's do, the per-node edge-table operators and the routing
inductor no longer fuses into each sum cost the rest; benchmarks/README.md, "Compiled sums as one
operator"). Compiled code guards on the switch.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .buffer import accumulate

__all__ = ['column', 'enabled', 'kernel_available', 'put_row', 'set_enabled', 'use_for', 'weighted_sum']

_SOURCE = Path(__file__).resolve().parent / 'csrc' / 'weighted_sum.cpp'
_kernel_state: Optional[bool] = None
_enabled = os.environ.get('TIMM_DDW_FUSED_SUM', '0') == '1'
# torch releases before these: no layout tag, and no export flag (torch.export then gets the operators)
_FLEXIBLE = (torch.Tag.flexible_layout,) if hasattr(torch.Tag, 'flexible_layout') else ()
_is_exporting = getattr(torch.compiler, 'is_exporting', lambda: False)


def enabled() -> bool:
    """Whether compiled stages sum through the custom operator (``TIMM_DDW_FUSED_SUM=1``; default off)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Switch the operators on or off; a compiled model recompiles on its next call after a change."""
    global _enabled
    _enabled = bool(flag)


def use_for(x: torch.Tensor) -> bool:
    """``torch.compile`` for the CPU with the operators enabled. On GPUs inductor's generated sums
    stay (``benchmarks/gpu_check.py`` times them); exported programs stay plain ATen, so that they
    load without timm_ddw and convert to ONNX."""
    return torch.compiler.is_compiling() and not _is_exporting() and x.device.type == 'cpu' \
        and enabled()


def _build_flags() -> List[str]:
    """The vector width torch itself dispatches to on this CPU (inductor's kernels use the same)."""
    simd = {'AVX2': ['-mavx2', '-mfma', '-mf16c', '-DCPU_CAPABILITY_AVX2'],
            'AVX512': ['-mavx2', '-mfma', '-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq',
                       '-DCPU_CAPABILITY_AVX512']}
    return ['-O3', '-fopenmp'] + simd.get(torch.backends.cpu.get_cpu_capability(), [])


def kernel_available() -> bool:
    """Build (once per machine, cached by torch's extension tools) and load the C++ kernel. False
    with ``TIMM_DDW_NO_EXTENSION=1``, and with one warning where no compiler or headers are at hand."""
    global _kernel_state
    if _kernel_state is None:
        _kernel_state = False
        if os.environ.get('TIMM_DDW_NO_EXTENSION', '0') != '1':
            try:
                from torch.utils.cpp_extension import load
                load(name='timm_ddw_kernels', sources=[str(_SOURCE)], extra_cflags=_build_flags(),
                     extra_ldflags=['-fopenmp'], is_python_module=False, verbose=False)
                _kernel_state = True
            except Exception as e:  # no compiler, no headers, read-only cache: ATen does the sums
                warnings.warn(f'timm_ddw: C++ weighted-sum kernel unavailable ({type(e).__name__}); '
                              'using ATen operations', stacklevel=2)
    return _kernel_state


def _kernel_takes(xs: Sequence[torch.Tensor], w: torch.Tensor) -> bool:
    x0 = xs[0]
    return x0.device.type == 'cpu' and x0.dim() > 0 and w.device.type == 'cpu' and w.dim() == 2 \
        and x0.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) \
        and (x0.is_contiguous() or x0.is_contiguous(memory_format=torch.channels_last)) \
        and all(x.dtype == x0.dtype and x.shape == x0.shape and x.stride() == x0.stride() for x in xs) \
        and w.shape[1] >= len(xs) and kernel_available()


# flexible_layout: inductor hands over its own layout (channels_last around its convolutions)
# instead of converting every input and output to the eager strides (an out= variant was tried: the
# buffer inductor allocates for it keeps the eager strides, so every sum took the slow path)
@torch.library.custom_op('timm_ddw::weighted_sum', mutates_args=(), tags=_FLEXIBLE)
def weighted_sum(xs: List[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """``sum_k w[:, k] * xs[k]`` in ``xs[0]``'s dtype and layout (``empty_like``, as the fake says);
    ``w`` is B x K with K >= len(xs) (columns past len(xs) are ignored: compiled stages pass every
    node the same width)."""
    if _kernel_takes(xs, w):
        return torch.ops.timm_ddw_kernels.weighted_sum(xs, w)
    return torch.empty_like(xs[0]).copy_(accumulate(list(xs), w[:, :len(xs)]))


@weighted_sum.register_fake
def _(xs: List[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(xs[0])


def _setup_context(ctx, inputs, output) -> None:
    xs, w = inputs
    ctx.save_for_backward(w, *xs)


def _backward(ctx, grad: torch.Tensor):
    w, *xs = ctx.saved_tensors
    shape = [w.shape[0]] + [1] * (grad.dim() - 1)
    grad_xs = [grad * w[:, k].to(grad.dtype).reshape(shape) if ctx.needs_input_grad[0] else None
               for k in range(len(xs))]
    grad_w = None
    if ctx.needs_input_grad[1]:
        dims = list(range(1, grad.dim()))
        dots = [(grad * x).sum(dims, dtype=w.dtype) for x in xs]
        grad_w = torch.nn.functional.pad(torch.stack(dots, 1), (0, w.shape[1] - len(xs)))
    return grad_xs, grad_w


weighted_sum.register_autograd(_backward, setup_context=_setup_context)


# The edge weights of a compiled stage live in one B x n x n table (sources x targets), written a
# row per node and read a column per node by index arguments: traced, a row or column at a constant
# position is code of its own per node; as operators every node calls the same code.

@torch.library.custom_op('timm_ddw::put_row', mutates_args=())
def put_row(table: torch.Tensor, row: torch.Tensor, index: int) -> torch.Tensor:
    """A copy of ``table`` (B x n x n) with ``table[:, index] = row`` (B x n)."""
    out = table.clone()
    out[:, index] = row
    return out


@put_row.register_fake
def _(table: torch.Tensor, row: torch.Tensor, index: int) -> torch.Tensor:
    return torch.empty_like(table)


@torch.library.custom_op('timm_ddw::put_row_backward', mutates_args=())
def put_row_backward(grad: torch.Tensor, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_table = grad.clone()
    grad_table[:, index] = 0
    return grad_table, grad[:, index].clone()


@put_row_backward.register_fake
def _(grad: torch.Tensor, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(grad), grad.new_empty(grad.shape[0], grad.shape[2])


def _put_row_context(ctx, inputs, output) -> None:
    ctx.index = inputs[2]


def _put_row_grad(ctx, grad: torch.Tensor):
    grad_table, grad_row = put_row_backward(grad, ctx.index)
    return grad_table, grad_row, None


put_row.register_autograd(_put_row_grad, setup_context=_put_row_context)


@torch.library.custom_op('timm_ddw::column', mutates_args=())
def column(table: torch.Tensor, index: int) -> torch.Tensor:
    """``table[:, :, index]`` (B x n) as a tensor of its own."""
    return table[:, :, index].clone()


@column.register_fake
def _(table: torch.Tensor, index: int) -> torch.Tensor:
    return table.new_empty(table.shape[0], table.shape[1])


@torch.library.custom_op('timm_ddw::column_backward', mutates_args=())
def column_backward(grad: torch.Tensor, width: int, index: int) -> torch.Tensor:
    out = grad.new_zeros(grad.shape[0], grad.shape[1], width)
    out[:, :, index] = grad
    return out


@column_backward.register_fake
def _(grad: torch.Tensor, width: int, index: int) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], grad.shape[1], width)


def _column_context(ctx, inputs, output) -> None:
    ctx.width, ctx.index = inputs[0].shape[2], inputs[1]


def _column_grad(ctx, grad: torch.Tensor):
    return column_backward(grad, ctx.width, ctx.index), None


column.register_autograd(_column_grad, setup_context=_column_context)
