"""How much blocked GEMMs could save in training: the math of one stage's sums, no autograd.

The feature buffer (timm_ddw/buffer.py) reads every source once per edge in each of four places
per training step: the forward sum, the input recomputed for the block's backward, the edge
gradients' dot products and the sources' gradient sums. Blocked GEMMs (timm_ddw/blocked.py does
this for inference) would instead treat k nodes at a time: one GEMM per sample adds k outputs into
all later inputs, recomputes k inputs, or takes k consumers' gradients into every dot product and
every earlier source's gradient. This script times both on random feature maps of one
complete-graph stage, side by side in one process, to bound what a blocked training path could buy
before anyone writes its backward:

- ``per-node``: the buffer's own operations (``accumulate`` and ``edge dots``), in backward order;
- ``blocked``: ``BlockedSums`` in forward; in backward the sources copied into one slab once,
  then per block of k consumers: their gradients copied into k slots, one GEMM for the dot
  products, one for the k recomputed inputs and one adding into all earlier sources' gradient
  accumulators (a slab of n maps). The edges inside each open block are folded with the block
  (no per-node GEMV): a lower bound on the blocked design's time.

The extra memory is what the blocked backward keeps alive at once (source slab, gradient slab,
k gradient slots and k recomputed inputs) in MiB, against one extra map for the per-node path.

    python benchmarks/blocked_training.py --batch-size 16 --img-size 14 --channels 1024 --blocks 23
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from timm_ddw.blocked import BlockedSums
from timm_ddw.buffer import accumulate, edge_dots

Results = Optional[Dict[str, Dict[int, torch.Tensor]]]


def _keep(out: Results, kind: str, key: int, value: torch.Tensor) -> None:
    """For the test: what each path computed (``out[kind][key]``); timed runs pass None."""
    if out is not None:
        out.setdefault(kind, {})[key] = value


def per_node(xs: List[torch.Tensor], grads: List[torch.Tensor], w: torch.Tensor, out: Results = None) -> None:
    """Forward sums, then in backward order: dots of node j, node j-1's gradient sum and input.

    ``xs``: the n block outputs; ``grads[j]``: the gradient of node j's input (j = 1..n, node n is
    the output node); ``w[:, i, j]`` = a_ij (zero unless i < j). ``out``: see ``_keep``.
    """
    n = len(xs)
    for j in range(1, n + 1):
        accumulate(xs[:j], w[:, :j, j])
    for j in range(n, 0, -1):
        _keep(out, 'dots', j, edge_dots(grads[j], xs[:j]))
        i = j - 1
        _keep(out, 'dx', i, accumulate([grads[c] for c in range(j, n + 1)], w[:, i, j:]))
        if i > 0:
            _keep(out, 'inputs', i, accumulate(xs[:i], w[:, :i, i]))


class _ReusedSums(BlockedSums):
    """BlockedSums whose buffer outlives the forward (kept in ``ws`` between steps)."""

    def __init__(self, num_blocks: int, block_size: int, ws: Dict[str, torch.Tensor]):
        super().__init__(num_blocks, block_size)
        self.ws = ws

    def _setup(self, x: torch.Tensor) -> None:
        super()._setup(x)  # the memory layout; its fresh buffer is never touched, so costs no page faults
        rows = _buffer(self.ws, 'sums', x, self.n + self.k)
        self.inputs, self.block = rows[:self.n], rows[self.n:]


def _buffer(ws: Optional[Dict[str, torch.Tensor]], name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` x B x D: fresh, or kept in ``ws`` from an earlier step."""
    if ws is not None and name in ws:
        return ws[name]
    t = like.new_empty(rows, like.shape[0], like[0].numel())
    if ws is not None:
        ws[name] = t
    return t


def blocked(xs: List[torch.Tensor], grads: List[torch.Tensor], w: torch.Tensor, k: int,
            ws: Optional[Dict[str, torch.Tensor]] = None, out: Results = None) -> None:
    """The same sums as ``per_node``, k consumers at a time. ``ws``: a dict that keeps the buffers
    between calls (no fresh pages); None: fresh each call."""
    n = len(xs)
    sums = BlockedSums(n, k) if ws is None else _ReusedSums(n, k, ws)  # forward, as in inference
    weights = [w[:, s, s + 1:] for s in range(n)]
    for j in range(n):
        if j:
            sums.input(j, w[:, :j, j])
        sums.put(j, xs[j], weights)
    sums.input(n, w[:, :n, n])
    del sums
    flat = _buffer(ws, 'sources', xs[0], n)  # the sources, B x D each
    for i, x in enumerate(xs):
        flat[i].copy_(x.reshape(x.shape[0], -1))
    src = flat.transpose(0, 1)  # B x n x D
    dx = _buffer(ws, 'grads', xs[0], n).transpose(0, 1)  # gradient accumulators of all sources
    slots = _buffer(ws, 'slots', xs[0], k)
    wt = w.to(xs[0].dtype)
    hi = n + 1
    while hi > 1:  # consumers lo..hi-1, last first
        lo = max(1, hi - k)
        g = slots[:hi - lo]
        for c in range(lo, hi):
            g[c - lo].copy_(grads[c].reshape(g.shape[1], -1))
        g = g.transpose(0, 1)  # B x m x D
        dots = torch.bmm(g, src[:, :hi - 1].transpose(1, 2))  # every edge into lo..hi-1 (B x m x sources)
        dx[:, :hi - 1].baddbmm_(wt[:, :hi - 1, lo:hi], g, beta=0.0 if hi == n + 1 else 1.0)  # first: overwrite
        top = min(hi, n)  # the output node (n) has no block to recompute an input for
        inputs = None
        if lo < top:  # a_ij = 0 for i >= j, so the block's own edges come out right
            inputs = torch.bmm(wt[:, :top - 1, lo:top].transpose(1, 2), src[:, :top - 1])
        if out is not None:  # timed runs skip the bookkeeping
            for c in range(lo, hi):
                _keep(out, 'dots', c, dots[:, c - lo, :c])
                if inputs is not None and c < top:
                    _keep(out, 'inputs', c, inputs[:, c - lo].view_as(xs[0]))
        hi = lo
    if out is not None:
        for i in range(n):
            _keep(out, 'dx', i, dx[:, i].view_as(xs[0]))


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--channels', type=int, default=1024)
    p.add_argument('--img-size', type=int, default=8, help='feature map side')
    p.add_argument('--blocks', type=int, default=23, help='blocks in the stage (nodes: blocks + 1)')
    p.add_argument('--block-size', type=int, default=6)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, n = args.batch_size, args.blocks
    shape = (b, args.channels, args.img_size, args.img_size)
    xs = [torch.randn(shape) for _ in range(n)]
    grads = [None] + [torch.randn(shape) for _ in range(n)]  # gradients of nodes 1..n's inputs
    w = torch.rand(b, n + 1, n + 1).triu(1)  # w[:, i, j] = a_ij for i < j
    ws: Dict[str, torch.Tensor] = {}
    fns = {'per-node': lambda: per_node(xs, grads, w),
           'blocked': lambda: blocked(xs, grads, w, args.block_size),
           'blocked, reused': lambda: blocked(xs, grads, w, args.block_size, ws)}
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    ratios = {name: [a / c for a, c in zip(times['per-node'], t)] for name, t in times.items() if name != 'per-node'}
    mib = xs[0].numel() * xs[0].element_size() / 2 ** 20
    k = args.block_size
    doc = {'args': vars(args), 'map_mib': mib, 'edges': n * (n + 1) // 2, 'torch': torch.__version__,
           'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
           'malloc_env': {k: v for k, v in os.environ.items() if k.startswith('MALLOC_')},
           'seconds': {name: statistics.median(t) for name, t in times.items()},
           'speedup_median': {name: statistics.median(r) for name, r in ratios.items()},
           'speedup_min_max': {name: [min(r), max(r)] for name, r in ratios.items()},
           # alive at once: per-node one recomputed input; blocked the source and gradient slabs,
           # k gradient slots and k recomputed inputs (reused: held between steps as well)
           'extra_mib': {'per-node': mib, 'blocked': (2 * n + 2 * k) * mib, 'blocked, reused': (3 * n + 3 * k) * mib}}
    print(f"stage of {n} blocks + output node, maps {list(shape)} ({mib:.1f} MiB), {doc['edges']} edges, "
          f"{args.threads} threads, {args.rounds} interleaved rounds")
    for name, t in times.items():
        line = f'  {name:16s} {statistics.median(t) * 1e3:8.1f} ms  (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f})'
        if name in ratios:
            lo, hi = doc['speedup_min_max'][name]
            line += f"; per-node / this {doc['speedup_median'][name]:.2f}x ({lo:.2f}-{hi:.2f})"
        print(line + f"; extra memory {doc['extra_mib'][name]:.0f} MiB")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == '__main__':
    main()
