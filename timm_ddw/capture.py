"""Opt-in read-out of the per-sample adjacency matrices of every graph stage."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
import torch.nn as nn

from .graph import GraphStage

__all__ = ['capture_routing', 'graph_stages', 'set_skip_closed']


def graph_stages(model: nn.Module) -> Dict[str, GraphStage]:
    """The model's graph stages by module name (as in ``model.named_modules()``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GraphStage)}


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[Dict[str, List[torch.Tensor]]]:
    """Record each stage's B x N x N adjacency matrix (``M[b, j, i] = a_ij``) per forward.

    Yields a mapping from stage name to a list with one detached float32 tensor per forward
    run inside the block. The matrices live only in that mapping: nothing enters the state
    dict or the module buffers, and stages cost nothing extra outside the block.
    """
    stages = graph_stages(model)
    if not stages:
        raise ValueError(f'{type(model).__name__} has no DDW graph stages to capture')
    captured: Dict[str, List[torch.Tensor]] = {name: [] for name in stages}
    for name, stage in stages.items():
        stage._capture = captured[name]
    try:
        yield captured
    finally:
        for stage in stages.values():
            stage._capture = None


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
