"""Opt-in read-out of the per-sample adjacency matrices of every graph stage."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
import torch.nn as nn

from .graph import AGGREGATIONS, GraphStage, bound_weights

__all__ = ['applied_weights', 'capture_routing', 'graph_stages', 'set_skip_closed']


def graph_stages(model: nn.Module) -> Dict[str, GraphStage]:
    """The model's graph stages by module name (as in ``model.named_modules()``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GraphStage)}


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[Dict[str, List[torch.Tensor]]]:
    """Record each stage's B x N x N adjacency matrix (``M[b, j, i] = a_ij``) per forward.

    Yields a mapping from stage name to a list with one detached float32 tensor per forward
    run inside the block. The matrices live only in that mapping: nothing enters the state
    dict or the module buffers, and stages cost nothing extra outside the block. Blocks nest:
    each records every forward run inside it.

    ``M[b, j, i]`` is the gated edge weight a_ij of Eq. 5. With ``aggregation='bounded'`` (the
    default) node j sums its inputs with ``a_ij / max(1, sum_i a_ij)``: see :func:`applied_weights`.
    """
    stages = graph_stages(model)
    if not stages:
        raise ValueError(f'{type(model).__name__} has no DDW graph stages to capture')
    captured: Dict[str, List[torch.Tensor]] = {name: [] for name in stages}
    for name, stage in stages.items():
        stage._captures.append(captured[name])
    try:
        yield captured
    finally:  # this block's lists only: an enclosing block keeps recording
        for name, stage in stages.items():
            stage._captures = [c for c in stage._captures if c is not captured[name]]


def set_skip_closed(model: nn.Module, enable: bool = True) -> nn.Module:
    """In eval mode, skip the blocks of nodes removed for the whole batch (per sample at batch 1).

    A node is removed for a sample when all its input edges are closed; its output edges are
    then closed too, so skipping its block leaves the outputs exactly as the dense forward.
    Skipping needs data-dependent control flow: leave it off for torch.compile and export.
    """
    stages = graph_stages(model)
    if not stages:
        raise ValueError(f'{type(model).__name__} has no DDW graph stages')
    for stage in stages.values():
        stage.skip_closed = enable
    return model


def applied_weights(adjacency: torch.Tensor, aggregation: str = 'bounded') -> torch.Tensor:
    """The weights node j's input is actually summed with, from captured ``M[b, j, i] = a_ij``:
    ``a_ij / max(1, sum_i a_ij)`` per row for ``aggregation='bounded'``, ``a_ij`` for ``'sum'``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
    return bound_weights(adjacency) if aggregation == 'bounded' else adjacency
