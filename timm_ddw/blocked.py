"""Node inputs of a complete-graph stage without autograd, folded in blocks by batched GEMMs.

Summing each node's input on its own reads every earlier output once per later node: the
O(n^2) passes over feature maps dominate DDW's inference cost (ResNet-101's 23-block stage reads
300 maps per forward, three memory passes each with ``addcmul_``). Here each node output is
copied into one of k block slots; when the k slots are full, one batched GEMM per sample adds
the block into the inputs of every later node at once (``inputs[later] += W @ block``). A GEMM
with k sources and m targets moves k + 2m maps for k * m edges, so an edge costs a fraction of a
pass; only the edges inside the open block are summed node by node (one GEMV each). Inputs and
slots share one allocation, and block outputs are freed as soon as they are copied, where the
per-node sums keep every output alive. A node's input row is never written after the node ran:
hooks that keep a block's input keep what the block saw.

Values equal the per-node sums up to float summation order. Used for eager forwards without
autograd (``torch.no_grad``/``inference_mode``); training keeps the feature buffer.
"""
from typing import List, Optional

import torch

__all__ = ['BlockedSums']


def _memory_order(t: torch.Tensor) -> List[int]:
    """Dims of ``t`` from outermost to innermost in memory, the batch dim first."""
    return [0] + sorted(range(1, t.dim()), key=lambda d: -t.stride(d))


class BlockedSums:
    """Inputs ``sum_i w_ij x_i`` of nodes 1..n of one forward, for the complete graph on 0..n.

    ``put(i, x_i, weights)`` after node i ran (``weights[s]`` holds node s's output-edge weights,
    B x (n - s), targets s+1..n in order); ``input(j, w)`` with node j's in-edge weights
    (B x j, sources 0..j-1) before it runs. Inputs keep the memory layout of node 0's output.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.n = num_blocks
        self.k = max(1, min(block_size, num_blocks))
        self.start = 0  # first node of the open block
        self.inputs: Optional[torch.Tensor] = None  # n x B x D: node j's input in row j - 1
        self.block: Optional[torch.Tensor] = None  # k x B x D: outputs of nodes start..start+k-1
        self.inverse: List[int] = []  # node layout -> flat row: view(shape), then permute(inverse)
        self.shape: List[int] = []

    def _setup(self, x: torch.Tensor) -> None:
        order = _memory_order(x)
        self.inverse = [order.index(d) for d in range(x.dim())]
        self.shape = [x.shape[d] for d in order]
        buf = x.new_empty(self.n + self.k, x.shape[0], x[0].numel())
        self.inputs, self.block = buf[:self.n], buf[self.n:]

    def _node_view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(self.shape).permute(self.inverse)

    def put(self, i: int, x: Optional[torch.Tensor], weights: List[torch.Tensor]) -> None:
        """Node i's output (None: the node was skipped and its output edges are closed)."""
        if self.block is None:
            assert x is not None, 'node 0 always runs'
            self._setup(x)
        inputs, block = self.inputs, self.block
        assert inputs is not None and block is not None
        lo = self.start
        if x is None:
            block[i - lo].zero_()  # its weights are 0, but 0 * garbage may be NaN
        else:
            self._node_view(block[i - lo]).copy_(x)
        if i - lo + 1 < self.k or i + 1 >= self.n:
            return
        # the block is full: add it into the inputs of nodes i+1..n in one GEMM per sample
        w = torch.stack([weights[s][:, i - s:self.n - s] for s in range(lo, i + 1)], 2)  # B x m x k
        with torch.autocast(block.device.type, enabled=False):
            inputs[i:].transpose(0, 1).baddbmm_(
                w.to(block.dtype), block.transpose(0, 1), beta=0.0 if lo == 0 else 1.0)
        self.start = i + 1

    def input(self, j: int, w: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Node j's input ``scale * sum_i w_ij x_i`` (``scale``: one factor per sample, or None);
        the output node's is a tensor of its own, not a view of the buffer."""
        inputs, block = self.inputs, self.block
        assert inputs is not None and block is not None
        lo = self.start
        row = inputs[j - 1]
        if scale is not None:
            if lo > 0:  # the folded blocks were added with the unscaled weights
                row.mul_(scale.to(row.dtype)[:, None])
            w = w * scale[:, None]
        if j > lo:  # the edges from the open block, one GEMV per sample
            with torch.autocast(block.device.type, enabled=False):
                row.unsqueeze(1).baddbmm_(w[:, None, lo:j].to(block.dtype), block[:j - lo].transpose(0, 1),
                                          beta=0.0 if lo == 0 else 1.0)
        out = self._node_view(row)
        return out.clone() if j == self.n else out
