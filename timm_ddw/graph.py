"""The DDW graph stage: a stage's timm blocks wired as a DAG with per-sample edge weights.

Nodes are the stage's blocks b_0..b_{n-1} plus an output node n. Node j >= 1 computes
``x_j = b_j(sum_i a_ij * x_i)`` over its predecessors i; the output node only aggregates.
How edges are weighted is a *wiring* (see :data:`WIRINGS`), so new wirings never touch models.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module
from timm.models import checkpoint

from . import fused
from .blocked import BlockedSums, _memory_order
from .buffer import FeatureBuffer, global_pool, recompute_input

__all__ = ['GraphStage', 'Wiring', 'WIRINGS', 'GATES', 'AGGREGATIONS', 'REMOVALS', 'register_wiring',
           'weighted_sum', 'gate_edges', 'bound_weights']

GATES = ('ste', 'psi')
AGGREGATIONS = ('bounded', 'sum')
REMOVALS = ('router', 'random')
EDGE_KINDS = ('router', 'learned', 'fixed')

Graph = List[List[int]]  # preds[j] for j = 0..n (preds[0] is empty)


@dataclass(frozen=True)
class Wiring:
    """How a stage's edges exist and are weighted.

    edges: 'router' (per-sample weights from each node's router), 'learned' (one learnable
    weight per edge, shared by all samples) or 'fixed' (weight 1 on every edge of the graph).
    graph: ``graph(num_nodes, seed)`` returns the predecessors of every node, in node order.
    """
    name: str
    edges: str
    graph: Callable[[int, int], Graph]


def complete_graph(num_nodes: int, seed: int = 0) -> Graph:
    return [list(range(j)) for j in range(num_nodes)]


def chain_graph(num_nodes: int, seed: int = 0) -> Graph:
    return [[j - 1] if j else [] for j in range(num_nodes)]


def stage_seed(wiring_seed: int, stage_index: int) -> int:
    """The seed of one stage's random graph: every stage draws its own (as RandWire does), so
    stages of equal size get different graphs, all reproducible from ``wiring_seed``."""
    return wiring_seed * 1000 + stage_index


WIRINGS: Dict[str, Wiring] = {}
# devices on which forwards without autograd use the blocked sums (timm_ddw.blocked, eager) or fold
# them (GraphStage._forward_folded, compiled); measured on CPU
BLOCKED_SUM_DEVICES = {'cpu'}


def register_wiring(name: str, edges: str, graph: Callable[[int, int], Graph]) -> Wiring:
    """Make ``wiring=name`` available to every DDW model."""
    if edges not in EDGE_KINDS:
        raise ValueError(f"edges={edges!r} is not one of {EDGE_KINDS}")
    if edges != 'fixed' and graph is not complete_graph:
        raise ValueError('router and learned edge weights are only defined on the complete graph')
    WIRINGS[name] = Wiring(name, edges, graph)
    return WIRINGS[name]


register_wiring('dynamic', 'router', complete_graph)
register_wiring('static', 'learned', complete_graph)
register_wiring('chain', 'fixed', chain_graph)


def gate_edges(alpha: torch.Tensor, tau: torch.Tensor, gate: str, training: bool) -> torch.Tensor:
    """Eq. 5: keep ``alpha`` where ``alpha >= tau``, else 0.

    'ste' uses Eq. 5's value in both modes and the derivative of the paper's
    ``psi = alpha * sigmoid(alpha - tau)`` in training, so open edges carry the same value in
    train and eval and thresholds still learn. 'psi' is the paper's literal training rule.
    """
    hard = alpha * (alpha >= tau).to(alpha.dtype)
    if not training:
        return hard
    psi = alpha * torch.sigmoid(alpha - tau)
    if gate == 'psi':
        return psi
    return hard.detach() + (psi - psi.detach())


def bound_weights(w: torch.Tensor) -> torch.Tensor:
    """Node input weights (``... x in-degree``) divided by ``max(1, their sum)`` (``aggregation='bounded'``).

    Eq. 3 literally, while a node's input weights sum to at most 1; above that, a convex
    combination of its sources, so the input's scale no longer grows with the number of nodes
    (timm's blocks keep their own shortcuts: with the literal sum it doubles at every node).
    """
    return w / w.sum(-1, keepdim=True).clamp(min=1.0)


@register_notrace_function
def weighted_sum(xs: List[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """``sum_k w[:, k] * xs[k]`` with per-sample weights ``w`` of shape (B, len(xs)); compiled for
    the CPU with ``fused.set_enabled(True)``, one opaque operator (see fused.py)."""
    if not torch.jit.is_scripting():  # a statement of its own: TorchScript drops the block unread
        if fused.use_for(xs[0]):
            return fused.weighted_sum(xs, w)
    w = w.to(xs[0].dtype)
    shape = [w.shape[0]] + [1] * (xs[0].dim() - 1)
    out = xs[0] * w[:, 0].reshape(shape)
    for k in range(1, len(xs)):  # in place: no backward needs the partial sums
        out.addcmul_(xs[k], w[:, k].reshape(shape))
    return out


def weighted_sum_loop(xs: List[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Reference for benchmarks: one multiply and one add per edge, a new tensor each."""
    w = w.to(xs[0].dtype)
    shape = [w.shape[0]] + [1] * (xs[0].dim() - 1)
    out = xs[0] * w[:, 0].reshape(shape)
    for k in range(1, len(xs)):
        out = out + xs[k] * w[:, k].reshape(shape)
    return out


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call when it already is (the live path counts its operations)."""
    return t if t.dtype == dtype else t.to(dtype)


def _out_channels(block: nn.Module) -> int:
    """Channels a timm block emits: the width of its last normalisation layer."""
    widths = [m.num_features if isinstance(m, nn.modules.batchnorm._NormBase) else m.num_channels
              for m in block.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))]
    if not widths:
        raise ValueError(f'cannot infer the output channels of {type(block).__name__}: pass channels=')
    return widths[-1]


def _check_args(wiring: str, router_bias: float, threshold_init: float, gate: str, wiring_seed: int,
                aggregation: str, node_budget: Optional[float] = None, removal: str = 'router') -> None:
    if not isinstance(wiring, str) or wiring not in WIRINGS:
        raise ValueError(f"wiring={wiring!r} is not one of {sorted(WIRINGS)}")
    if not isinstance(gate, str) or gate not in GATES:
        raise ValueError(f"gate={gate!r} is not one of {GATES}")
    if not isinstance(aggregation, str) or aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
    if isinstance(router_bias, bool) or not isinstance(router_bias, (int, float)) or not math.isfinite(router_bias):
        raise ValueError(f'router_bias={router_bias!r} must be a finite number (the paper uses +3)')
    if isinstance(threshold_init, bool) or not isinstance(threshold_init, (int, float)) \
            or not 0.0 <= threshold_init < 1.0:
        raise ValueError(f'threshold_init={threshold_init!r} must be a number in [0, 1)')
    if isinstance(wiring_seed, bool) or not isinstance(wiring_seed, int) or wiring_seed < 0:
        raise ValueError(f'wiring_seed={wiring_seed!r} must be a non-negative int')
    if node_budget is not None:
        if isinstance(node_budget, bool) or not isinstance(node_budget, (int, float)) or not 0.0 < node_budget <= 1.0:
            raise ValueError(f'node_budget={node_budget!r} must be None (off) or a share of block nodes in (0, 1]')
        if WIRINGS[wiring].edges == 'fixed':
            raise ValueError(f"node_budget needs routed edges (wiring='dynamic' or 'static'), not wiring={wiring!r}")
    if not isinstance(removal, str) or removal not in REMOVALS:
        raise ValueError(f"removal={removal!r} is not one of {REMOVALS}")
    if removal == 'random' and node_budget is None:
        raise ValueError("removal='random' removes nodes at the rate 1 - node_budget: give node_budget")


@register_notrace_module  # a leaf for timm's FX feature extraction: stages keep their flags and capture
class GraphStage(nn.Module):
    """A stage of timm blocks wired as a DAG; the blocks keep their names and weights.

    Parameters (for router/learned wirings) are packed per stage: ``router_weight`` (E x C,
    dynamic only) and ``router_bias`` (E) hold every node's router, node i owning rows
    ``offsets[i]:offsets[i+1]`` (its output edges, in target order); ``tau`` (n) holds the
    threshold of each receiving node 1..n.
    """
    preds: List[List[int]]
    pos: List[List[int]]
    offsets: List[int]
    _table_index: List[List[int]]
    _captures: List[List[torch.Tensor]]

    def __init__(
            self,
            blocks: nn.Module,
            wiring: str = 'dynamic',
            router_bias: float = 3.0,
            threshold_init: float = 0.0,
            gate: str = 'ste',
            wiring_seed: int = 0,
            aggregation: str = 'bounded',
            node_budget: Optional[float] = None,
            removal: str = 'router',
            channels: Optional[int] = None,
            stage_index: int = 0,
    ):
        super().__init__()
        _check_args(wiring, router_bias, threshold_init, gate, wiring_seed, aggregation, node_budget, removal)
        named = list(blocks.named_children())
        if not named:
            raise ValueError('a graph stage needs at least one block')
        for name, block in named:
            self.add_module(name, block)
        n = len(named)
        spec = WIRINGS[wiring]
        self.wiring = wiring
        self.edges = spec.edges
        self.gate = gate
        self.bounded = aggregation == 'bounded'
        self.num_blocks = n
        self.num_nodes = n + 1  # the blocks and the output node
        self.grad_checkpointing = False
        # eval-mode removal through _forward_live; on by default for models with a node budget
        self.skip_closed = node_budget is not None
        self.use_buffer = True
        self.recompute_inputs = True
        # forwards without autograd fold node outputs into later inputs in blocks of this many
        # nodes (eager: timm_ddw.blocked, compiled: _forward_folded) when the stage has more than
        # twice as many blocks; 0: never
        self.sum_block_size = 6
        # the live path runs a node on the whole batch (no gather/scatter) when at least this share is live
        self.dense_above = 0.9
        self.node_budget = None if node_budget is None else float(node_budget)
        self.removal = removal
        # the budget controller's step: threshold shift per training step and unit of usage error
        self.budget_rate = 0.01
        self._captures: List[List[torch.Tensor]] = []  # one list per active capture_routing block

        preds = [list(p) for p in spec.graph(n + 1, stage_seed(wiring_seed, stage_index))]
        self._check_graph(preds, n)
        self.preds: List[List[int]] = preds
        self.complete = preds == complete_graph(n + 1)
        succs: List[List[int]] = [[j for j in range(n + 1) if i in preds[j]] for i in range(n + 1)]
        # position of edge i->j inside node i's router output, per (j, k-th predecessor)
        self.pos: List[List[int]] = [[succs[i].index(j) for i in preds[j]] for j in range(n + 1)]
        self.offsets: List[int] = [0]
        for i in range(n):
            self.offsets.append(self.offsets[-1] + len(succs[i]))
        # compiled complete graphs (_router_table): row of node i's edge to node t+1, or the closed row
        self._table_index: List[List[int]] = [[self.offsets[i] + t - i if t >= i else self.offsets[-1]
                                               for t in range(n)] for i in range(n)]

        # absent parameters are registered as None so that TorchScript prunes their branches
        self.register_parameter('router_weight', None)
        self.register_parameter('router_bias', None)
        self.register_parameter('tau', None)
        self.register_buffer('budget_shift', None)
        if self.edges != 'fixed':
            ref = next(blocks.parameters(), None)  # the routers follow the blocks' device and dtype
            dd = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
            num_edges = self.offsets[-1]
            self.router_bias = nn.Parameter(torch.full((num_edges,), float(router_bias), **dd))
            self.tau = nn.Parameter(torch.full((n,), float(threshold_init), **dd))
            if self.node_budget is not None and removal == 'router':
                # added to the thresholds of nodes 1..n-1 by the budget controller (budget.py); a buffer,
                # so checkpoints, --resume and DDP's buffer broadcast carry it
                self.budget_shift = torch.zeros(n, **dd)
            if self.edges == 'router':
                chs = channels or _out_channels(named[-1][1])
                bound = 1.0 / math.sqrt(chs)
                self.router_weight = nn.Parameter(torch.empty(num_edges, chs, **dd).uniform_(-bound, bound))

    @staticmethod
    def _check_graph(preds: Graph, n: int) -> None:
        if len(preds) != n + 1 or preds[0]:
            raise ValueError(f'a wiring graph must list predecessors for {n + 1} nodes, node 0 having none')
        for j in range(1, n + 1):
            if not preds[j] or any(not 0 <= i < j for i in preds[j]):
                raise ValueError(f'node {j} needs predecessors among nodes 0..{j - 1}, got {preds[j]}')

    @property
    def aggregation(self) -> str:
        return 'bounded' if self.bounded else 'sum'

    def extra_repr(self) -> str:
        budget = '' if self.node_budget is None else f', node_budget={self.node_budget}, removal={self.removal!r}'
        return f'wiring={self.wiring!r}, gate={self.gate!r}, aggregation={self.aggregation!r}, ' \
               f'nodes={self.num_blocks + 1}{budget}'

    def _thresholds(self) -> torch.Tensor:
        """tau_j of nodes 1..n, moved by the budget controller's shift when a budget is set."""
        tau, shift = self.tau, self.budget_shift
        assert tau is not None
        return tau if shift is None else tau + shift

    def _live(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """Per sample, whether node j runs: some input edge is open (Eq. 5's removal), and with
        ``removal='random'`` also a coin with probability ``node_budget`` (the random-removal baseline)."""
        live = w.ne(0).any(1)
        if self.removal == 'random' and j < self.num_blocks and self.node_budget is not None:
            live = live & (torch.rand(w.shape[0], device=w.device) < self.node_budget)
        return live

    def _edge_weights(self, pooled: torch.Tensor, i: int, live: Optional[torch.Tensor]) -> torch.Tensor:
        """Gated weights (B x out-degree) of node i's output edges, from its pooled output (B x C);
        zero for the samples where node i is not ``live`` (removed: all its input edges closed)."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        bias, tau, weight = self.router_bias, self.tau, self.router_weight
        assert bias is not None and tau is not None
        if weight is not None:
            z = F.linear(pooled, weight[lo:hi], bias[lo:hi])
        else:
            z = bias[lo:hi].unsqueeze(0).expand(pooled.shape[0], hi - lo)
        alpha = torch.sigmoid(z)
        # complete graph: node i's targets are i+1..n, whose thresholds are tau[i:n]
        w = gate_edges(alpha, self._thresholds()[i:], self.gate, self.training)
        return w if live is None else w * live.unsqueeze(1).to(w.dtype)

    def _fixed_sum(self, sources: List[torch.Tensor]) -> torch.Tensor:
        """A node's input under a fixed wiring: the sum of its sources (their mean if bounded)."""
        out = sources[0]
        for t in sources[1:]:
            out = out + t
        if self.bounded and len(sources) > 1:
            out = out.mul_(1.0 / len(sources))  # a new tensor: the first add made it
        return out

    def _in_edges(self, weights: List[torch.Tensor], j: int) -> torch.Tensor:
        """Gated weights a_ij (B x in-degree) of node j's input edges, in ``preds[j]`` order."""
        pos = self.pos[j]
        return torch.stack([weights[i][:, pos[k]] for k, i in enumerate(self.preds[j])], dim=1)

    def _applied(self, w: torch.Tensor) -> torch.Tensor:
        """The weights node j's input is summed with (Eq. 3's, bounded unless ``aggregation='sum'``)."""
        return bound_weights(w) if self.bounded else w

    @torch.jit.unused
    def _bound_scale(self, w: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample ``1 / max(1, sum_i a_ij)`` for the blocked sums, which fold sources in with a_ij."""
        return 1.0 / w.sum(1).clamp(min=1.0) if self.bounded else None

    @torch.jit.unused
    def _use_buffer(self, routed: bool) -> bool:
        """The feature buffer pays off in eager training; compilers fuse the plain sums themselves."""
        return routed and self.use_buffer and torch.is_grad_enabled() \
            and not torch.compiler.is_compiling()

    @torch.jit.unused
    def _use_live(self, routed: bool, x: torch.Tensor) -> bool:
        """Removal saves time only in eager eval mode with ``skip_closed`` (``set_skip_closed``); traced,
        exported and compiled models keep the dense forward, which has no data-dependent control flow."""
        return routed and self.skip_closed and not self.training and not isinstance(x, torch.fx.Proxy) \
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()

    @torch.jit.unused
    def _folds_sums(self, routed: bool, x: torch.Tensor) -> bool:
        """Forwards without autograd fold the sums in blocks of ``sum_block_size`` nodes; in stages of
        up to 2k blocks at most one block would fold anything, and the folding costs more. Only on
        ``BLOCKED_SUM_DEVICES`` (CPU): benchmarks/gpu_check.py times the eager fold on a GPU."""
        return routed and 0 < 2 * self.sum_block_size < self.num_blocks and not torch.is_grad_enabled() \
            and x.device.type in BLOCKED_SUM_DEVICES

    @torch.jit.unused
    def _use_blocked(self, routed: bool, x: torch.Tensor) -> bool:
        """The eager fold: batched GEMMs into one buffer (blocked.py)."""
        return not isinstance(x, torch.fx.Proxy) and not torch.compiler.is_compiling() \
            and not torch.jit.is_tracing() and self._folds_sums(routed, x)

    @torch.jit.unused
    def _use_compiled(self, routed: bool, x: torch.Tensor) -> bool:
        """Compiled for the CPU with the opt-in operators (fused.py), complete graphs with routers run
        every node through the same code: one kernel per kind of node instead of one per node."""
        return routed and self.edges == 'router' and self.complete and not self._captures \
            and not self.grad_checkpointing and fused.use_for(x)

    @torch.jit.unused
    def _use_folded(self, routed: bool, x: torch.Tensor) -> bool:
        """The compiled counterpart of the blocked sums: in-place GEMMs into one buffer compile to
        copies of the buffer (2.7x slower), the same folding in pure functions compiles to one kernel
        per block; with autograd its backward costs more than it saves (benchmarks/README.md)."""
        return torch.compiler.is_compiling() and self.complete and not self._captures \
            and self._folds_sums(routed, x)

    @torch.jit.unused
    def _folded_input(self, feats: List[torch.Tensor], folded: List[torch.Tensor], w: torch.Tensor,
                      lo: int) -> torch.Tensor:
        """Node j's input (``j = w.shape[1]``): its folded partial sums (summed with the unbounded
        a_ij, so they take the bound's factor) and the terms of sources lo..j-1, in one weighted sum."""
        coeffs = torch.cat([w.new_ones(w.shape[0], len(folded)), w[:, lo:]], 1)
        scale = self._bound_scale(w)
        return weighted_sum(folded + feats[lo:], coeffs if scale is None else coeffs * scale[:, None])

    @torch.jit.unused
    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Complete graph, no autograd, compiled: whenever k = ``sum_block_size`` node outputs are in,
        their terms go into every later node's input at once, which inductor fuses into one kernel that
        reads the k maps once and writes one partial sum per later node; a node then reads its partial
        sums and the outputs since the last fold instead of every earlier output (ResNet-101's 23-block
        stage: about 170 maps read and written against about 300)."""
        n, k = self.num_blocks, self.sum_block_size
        feats: List[torch.Tensor] = []
        weights: List[torch.Tensor] = []
        folded: List[List[torch.Tensor]] = [[] for _ in range(n + 1)]  # partial sums per target node
        lo = 0  # first source not yet folded
        live: Optional[torch.Tensor] = None
        for j, block in enumerate(self.children()):
            inp = x
            if j > 0:
                w = self._in_edges(weights, j)
                live = self._live(w, j)
                inp = self._folded_input(feats, folded[j], w, lo)
            out = block(inp)
            feats.append(out)
            weights.append(self._edge_weights(global_pool(out), j, live))
            if j - lo + 1 == k and j + 1 < n:
                # out of place, not weighted_sum's in-place chain: only then does inductor fuse the sums of
                # every t into one kernel (R101 inference 1.069 against 1.003 of the per-node sums)
                shape = [out.shape[0]] + [1] * (out.dim() - 1)
                for t in range(j + 1, n + 1):  # weights[i][:, t - i - 1] is a_it
                    terms = [feats[i] * weights[i][:, t - i - 1].reshape(shape).to(out.dtype) for i in range(lo, j + 1)]
                    folded[t].append(sum(terms[1:], terms[0]))
                lo = j + 1
        return self._folded_input(feats, folded[n], self._in_edges(weights, n), lo)

    @torch.jit.unused
    def _router_table(self) -> torch.Tensor:
        """Every node's router as one n x (C + 1) x n matrix on the pooled output and a constant 1
        (the bias), node i's columns i..n-1 holding its edges to nodes i+1..n; the other columns give
        a logit of -1e4, so their edges are closed (sigmoid 0) without a mask."""
        weight, bias = self.router_weight, self.router_bias
        assert weight is not None and bias is not None
        rows = torch.cat([weight, bias.unsqueeze(1)], 1)
        closed = torch.cat([rows.new_zeros(1, weight.shape[1]), rows.new_full((1, 1), -1e4)], 1)
        index = torch.tensor(self._table_index, device=rows.device)
        return torch.cat([rows, closed])[index].transpose(1, 2)

    @torch.jit.unused
    def _forward_compiled(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_blocks
        table = self._router_table()
        thresholds = self._thresholds()
        feats: List[torch.Tensor] = []
        lives: List[torch.Tensor] = []
        edges = x.new_zeros(0)  # B x n x n: edges[:, i, t] = a_{i, t+1}
        live: Optional[torch.Tensor] = None
        for j, block in enumerate(self.children()):
            if j == 0:
                out = block(x)
            else:
                w = fused.column(edges, j - 1)  # node j's input edges, zero from nodes j..n-1
                live = self._live(w, j)
                lives.append(live)
                out = block(fused.weighted_sum(feats, self._applied(w)))
            feats.append(out)
            pooled = F.pad(global_pool(out), (0, 1), value=1.0)
            w = gate_edges(torch.sigmoid(pooled @ table[j]), thresholds, self.gate, self.training)
            if live is not None:
                w = w * live.unsqueeze(1).to(w.dtype)
            if j == 0:
                edges = w.new_zeros(w.shape[0], n, n)
            edges = fused.put_row(edges, w, j)
        if self.training and torch.is_grad_enabled():
            self._update_budget(lives)
        return fused.weighted_sum(feats, self._applied(fused.column(edges, n - 1)))

    @torch.jit.unused
    def _forward_blocked(self, x: torch.Tensor) -> torch.Tensor:
        sums = BlockedSums(self.num_blocks, self.sum_block_size)
        weights: List[torch.Tensor] = []
        for j, block in enumerate(self.children()):
            inp, live = x, None
            if j > 0:
                w = self._in_edges(weights, j)
                live = self._live(w, j)
                inp = sums.input(j, w, self._bound_scale(w))
            out = block(inp)
            weights.append(self._edge_weights(global_pool(out), j, live))
            sums.put(j, out, weights)
        if self._captures:
            self._record(weights, x.shape[0], x)
        w = self._in_edges(weights, self.num_blocks)
        return sums.input(self.num_blocks, w, self._bound_scale(w))

    @torch.jit.unused
    def _live_route(self, out: torch.Tensor, i: int, thr: torch.Tensor) -> torch.Tensor:
        """Eval-mode gated weights (B x out-degree) of node i's output edges, Eq. 4-5 in as few
        operations as they take: at batch 1 these, not the blocks, are most of DDW's cost."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        bias, weight = self.router_bias, self.router_weight
        assert bias is not None
        pooled = out.mean((2, 3)) if out.dtype == torch.float32 else global_pool(out)
        if weight is not None:
            alpha = torch.sigmoid(F.linear(pooled, weight[lo:hi], bias[lo:hi]))
        else:
            alpha = torch.sigmoid(bias[lo:hi]).expand(out.shape[0], hi - lo)
        return alpha.masked_fill(alpha < thr[i:], 0.0)

    @torch.jit.unused
    def _forward_live(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode removal that saves time at any batch size: each node's block runs only on the
        samples for which the node is live (gathered, run, scattered back), on the whole batch when
        at least ``dense_above`` of it is live, and not at all when none is (batch 1: skip or run,
        :meth:`_forward_single`).

        Node outputs go into one slab (B x nodes x features, zeroed where a node did not run: its
        output edges are closed, but 0 * garbage may be NaN) and the gated weights into one B x N x N
        matrix, so a node's inputs are one slice and its sum one batched GEMV: per node a constant
        number of operations, where the per-node path spends two per edge. Values equal the dense
        forward up to float summation order.
        """
        if x.shape[0] == 1:
            return self._forward_single(x)
        n, batch = self.num_blocks, x.shape[0]
        blocks = list(self.children())
        thr = self._thresholds()
        x0 = blocks[0](x)
        order = _memory_order(x0)
        inverse = [order.index(d) for d in range(x0.dim())]
        shape = [x0.shape[d] for d in order][1:]
        slab = x0.new_empty(batch, n, x0[0].numel())  # rows a node does not write are zeroed below
        slab[:, 0] = x0.permute(order).reshape(batch, -1)
        w0 = self._live_route(x0, 0, thr)
        adj = w0.new_zeros(batch, n + 1, n + 1)  # adj[b, j, i] = a_ij, as capture_routing records it
        adj[:, 1:, 0] = w0
        for j in range(1, n):
            w = adj[:, j, :j]
            live = self._live(w, j)
            count = int(live.count_nonzero())
            if count == 0:  # removed for the whole batch: output edges stay zero
                slab[:, j].zero_()
                continue
            idx = None if count >= self.dense_above * batch else live.nonzero().squeeze(1)
            wa = self._applied(w if idx is None else w.index_select(0, idx))
            src = slab[:, :j] if idx is None else slab[:, :j].index_select(0, idx)
            with torch.autocast(x.device.type, enabled=False):
                flat = torch.bmm(_as(wa, slab.dtype).unsqueeze(1), src).squeeze(1)
            out = blocks[j](flat.view([flat.shape[0]] + shape).permute(inverse))
            flat_out = out.permute(order).reshape(out.shape[0], -1)
            a = self._live_route(out, j, thr)
            if idx is None:
                slab[:, j] = flat_out
                adj[:, j + 1:, j] = a if count == batch else a.masked_fill(~live.unsqueeze(1), 0.0)
            else:
                slab[:, j].zero_()
                slab[idx, j] = _as(flat_out, slab.dtype)
                adj[idx, j + 1:, j] = _as(a, adj.dtype)
        if self._captures:
            for captured in self._captures:
                captured.append(adj.detach().float())
        wa = self._applied(adj[:, n, :n])
        with torch.autocast(x.device.type, enabled=False):
            flat = torch.bmm(_as(wa, slab.dtype).unsqueeze(1), slab).squeeze(1)
        return flat.view([batch] + shape).permute(inverse)

    @torch.jit.unused
    def _forward_single(self, x: torch.Tensor) -> torch.Tensor:
        """The live path at batch 1. Each node's router takes two tensor operations (the pooled sum
        and one matrix-vector product) and one read; sigmoid, Eq. 5's threshold, the bounded weights
        and every removal decision are Python arithmetic. A removed node costs nothing; a live one
        its block, those three operations and one multiply-add per open input edge."""
        n = self.num_blocks
        blocks = list(self.children())
        bias, weight = self.router_bias, self.router_weight
        assert bias is not None
        thr = self._thresholds().tolist()
        b = bias.tolist()
        rows = [[0.0] * j for j in range(n + 1)]  # rows[j][i] = a_ij
        outs: List[Optional[torch.Tensor]] = []
        y = x
        for j in range(n + 1):
            if j == 0:
                out = blocks[0](x)
            else:
                w = rows[j]
                live = any(v != 0.0 for v in w)
                if self.removal == 'random' and j < n and self.node_budget is not None:
                    live = bool(torch.rand(1, device=x.device) < self.node_budget) and live
                if j < n and not live:
                    outs.append(None)
                    continue
                total = sum(w)
                scale = 1.0 / total if self.bounded and total > 1.0 else 1.0
                inp: Optional[torch.Tensor] = None
                for i, v in enumerate(w):
                    src = outs[i]
                    if v == 0.0 or src is None:
                        continue
                    inp = src * (v * scale) if inp is None else inp.add_(src, alpha=v * scale)
                if j == n:
                    y = inp if inp is not None else torch.zeros_like(outs[0])
                    break
                out = blocks[j](inp)
            outs.append(out)
            lo, hi = self.offsets[j], self.offsets[j + 1]
            if weight is not None:
                pooled = out.sum((2, 3), dtype=torch.float32)
                z = torch.mv(weight[lo:hi].float(), pooled[0]).tolist()
                z = [v / (out.shape[2] * out.shape[3]) + c for v, c in zip(z, b[lo:hi])]
            else:
                z = b[lo:hi]
            for t, v in enumerate(z):
                alpha = 1.0 / (1.0 + math.exp(-v)) if v > -700 else 0.0
                rows[j + 1 + t][j] = alpha if alpha >= thr[j + t] else 0.0
        if self._captures:
            adj = torch.zeros(1, n + 1, n + 1, device=x.device)
            for j in range(1, n + 1):
                adj[0, j, :j] = torch.tensor(rows[j])
            for captured in self._captures:
                captured.append(adj)
        return y

    @torch.jit.unused
    def _update_budget(self, lives: List[torch.Tensor]) -> None:
        """The loss-free budget controller: after each training forward, move every block node's
        threshold by ``budget_rate * (share of samples it ran on - node_budget)``, so each node runs
        on about ``node_budget`` of the samples and its router decides on which. The shares are
        averaged over DDP ranks first, so every rank makes the same move (DDP also broadcasts the
        buffer before each forward). No gradient: a GradScaler's loss scale cannot change it.
        """
        shift, budget = self.budget_shift, self.node_budget
        if shift is None or budget is None or not lives:
            return
        with torch.no_grad():
            usage = torch.stack([lv.float().mean() for lv in lives])
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(usage)
                usage = usage / torch.distributed.get_world_size()
            step = (usage - budget).mul_(self.budget_rate).to(shift.dtype)
            shift[:len(lives)].add_(step)

    def _run_node(self, block: nn.Module, w: Optional[torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
        """A node as one checkpointed unit: its input is summed again when the block is recomputed,
        so checkpointing keeps only the node outputs, as it keeps only block outputs in the twin."""
        return block(self._fixed_sum(list(sources)) if w is None else weighted_sum(list(sources), w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.router_bias is not None
        if not torch.jit.is_scripting() and self._use_live(routed, x):
            return self._forward_live(x)
        if not torch.jit.is_scripting() and self._use_blocked(routed, x):
            return self._forward_blocked(x)
        if not torch.jit.is_scripting() and self._use_compiled(routed, x):
            return self._forward_compiled(x)
        if not torch.jit.is_scripting() and self._use_folded(routed, x):
            return self._forward_folded(x)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        feats: List[torch.Tensor] = []  # node outputs (with the buffer: their aliases, the buffer's sources)
        weights: List[torch.Tensor] = []
        lives: List[torch.Tensor] = []  # for the budget controller
        buf = None
        if not torch.jit.is_scripting() and not ckpt and self._use_buffer(routed):
            buf = FeatureBuffer(self.preds)
        live: Optional[torch.Tensor] = None
        for j, block in enumerate(self.children()):
            src = self.preds[j]
            w: Optional[torch.Tensor] = None
            if j > 0 and routed:
                w = self._in_edges(weights, j)
                live = self._live(w, j)  # node j is removed for samples whose input edges are all closed
                if j < self.num_blocks:
                    lives.append(live)
                w = self._applied(w)
            if j == 0:
                out = checkpoint(block, x) if not torch.jit.is_scripting() and ckpt else block(x)
            elif not torch.jit.is_scripting() and ckpt:
                out = checkpoint(self._run_node, block, w, *[feats[i] for i in src])
            elif not routed:
                out = block(self._fixed_sum([feats[i] for i in src]))
            elif not torch.jit.is_scripting() and buf is not None:
                assert w is not None
                sources = [feats[i] for i in src]
                inp = buf.aggregate(j, w, sources)
                if self.recompute_inputs:
                    with recompute_input(inp, w, sources):
                        out = block(inp)
                else:
                    out = block(inp)
            else:
                assert w is not None
                out = block(weighted_sum([feats[i] for i in src], w))
            if not routed:
                feats.append(out)
            elif not torch.jit.is_scripting() and buf is not None:
                pooled, alias = buf.put(j, out)  # the alias orders the buffer's backward
                feats.append(alias)
                weights.append(self._edge_weights(pooled, j, live))
            else:
                feats.append(out)
                weights.append(self._edge_weights(global_pool(out), j, live))
        if not torch.jit.is_scripting() and self._captures:
            self._record(weights, x.shape[0], feats[0])
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            self._update_budget(lives)

        n = self.num_blocks
        if not routed:
            return self._fixed_sum([feats[i] for i in self.preds[n]])
        src = self.preds[n]
        w = self._applied(self._in_edges(weights, n))
        if not torch.jit.is_scripting() and buf is not None:
            return buf.aggregate(n, w, [feats[i] for i in src])
        return weighted_sum([feats[i] for i in src], w)

    @torch.jit.unused
    def _record(self, weights: List[torch.Tensor], batch: int, ref: torch.Tensor) -> None:
        adj = self.adjacency(weights, batch, ref.device)
        for captured in self._captures:
            captured.append(adj)

    @torch.jit.unused
    def adjacency(self, weights: List[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """B x N x N matrix with ``M[b, j, i] = a_ij`` (rows: a node's inputs)."""
        n = self.num_blocks + 1
        with torch.no_grad():
            adj = torch.zeros(batch, n, n, device=device, dtype=torch.float32)
            for j in range(1, n):
                for k, i in enumerate(self.preds[j]):
                    adj[:, j, i] = 1.0 if self.edges == 'fixed' else weights[i][:, self.pos[j][k]].float()
        return adj
