"""Baseline wirings for the paper's ablations: the complete graph and RandWire's random DAGs.

* ``'dense'``: every edge ``i -> j`` (i < j) with weight 1, no routers (the complete graph).
* ``'er'``, ``'ba'``, ``'ws'``: fixed random graphs from NetworkX's Erdos-Renyi (P=0.2),
  Barabasi-Albert (M=5) and Watts-Strogatz (K=4, P=0.75) generators, the settings of the
  paper's Table 4 (after RandWire, Xie et al. 2019), every edge weighted 1.

A random undirected graph on the stage's nodes ``0..n`` becomes a DAG by orienting each edge
``u - v`` from ``min(u, v)`` to ``max(u, v)`` (node order is execution order). It is then
repaired so that every node is reachable from the input node 0 and reaches the output node n:

1. a node ``j >= 1`` with no predecessor gets the edge ``j-1 -> j``;
2. then a node ``i < n`` with no successor gets the edge ``i -> i+1``.

(RandWire instead adds extra input/output nodes joined to such nodes; here node 0 is the stage's
first, downsampling block and node n its output, so edges to neighbours play that role.) After
step 1 every node other than 0 has an earlier predecessor, so walking predecessors always ends
at node 0; after step 2 every node other than n has a later successor, so walking successors
always ends at n. Step 2 never removes a predecessor, so both properties hold together.

Small stages: M and K are capped to what the node count allows (BA needs ``M < nodes``, WS needs
``K < nodes``), and a stage of one block (2 nodes) has a single possible DAG, ``0 -> 1``.
Each stage draws its own graph from ``graph.stage_seed(wiring_seed, stage_index)``, so stages with
equal node counts get different graphs (as in RandWire), and ``model_args`` (which hold
``wiring_seed``) rebuild the same graphs.
networkx is imported only when a random graph is built (extra ``timm-ddw[graphs]``).
"""
from __future__ import annotations

from typing import Iterable, List, Tuple

from .graph import Graph, complete_graph, register_wiring

__all__ = ['ER_P', 'BA_M', 'WS_K', 'WS_P', 'dag_from_edges', 'er_graph', 'ba_graph', 'ws_graph']

ER_P = 0.2
BA_M = 5
WS_K = 4
WS_P = 0.75


def _networkx():
    try:
        import networkx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'er', 'ba' and 'ws' wirings build their graphs with networkx, which is not installed: "
            "pip install timm-ddw[graphs]") from e
    return networkx


def dag_from_edges(num_nodes: int, edges: Iterable[Tuple[int, int]]) -> Graph:
    """Orient undirected edges by node order and repair reachability (see the module docstring)."""
    preds: List[set] = [set() for _ in range(num_nodes)]
    for u, v in edges:
        if u != v:
            preds[max(u, v)].add(min(u, v))
    for j in range(1, num_nodes):
        if not preds[j]:
            preds[j].add(j - 1)
    has_succ = [False] * num_nodes
    for j in range(num_nodes):
        for i in preds[j]:
            has_succ[i] = True
    for i in range(num_nodes - 1):
        if not has_succ[i]:
            preds[i + 1].add(i)
    return [sorted(p) for p in preds]


def _check_nodes(num_nodes: int) -> None:
    if not isinstance(num_nodes, int) or num_nodes < 2:
        raise ValueError(f'num_nodes={num_nodes!r} must be an int >= 2 (a stage of at least one block)')


def er_graph(num_nodes: int, seed: int = 0) -> Graph:
    """Erdos-Renyi G(N, P=0.2), oriented and repaired."""
    _check_nodes(num_nodes)
    if num_nodes == 2:
        return [[], [0]]
    g = _networkx().erdos_renyi_graph(num_nodes, ER_P, seed=seed)
    return dag_from_edges(num_nodes, g.edges())


def ba_graph(num_nodes: int, seed: int = 0) -> Graph:
    """Barabasi-Albert with M = min(5, N - 1) edges per new node, oriented and repaired."""
    _check_nodes(num_nodes)
    if num_nodes == 2:
        return [[], [0]]
    g = _networkx().barabasi_albert_graph(num_nodes, min(BA_M, num_nodes - 1), seed=seed)
    return dag_from_edges(num_nodes, g.edges())


def ws_graph(num_nodes: int, seed: int = 0) -> Graph:
    """Watts-Strogatz with K = min(4, N - 1) neighbours and rewiring P=0.75, oriented and repaired."""
    _check_nodes(num_nodes)
    if num_nodes == 2:
        return [[], [0]]
    g = _networkx().watts_strogatz_graph(num_nodes, min(WS_K, num_nodes - 1), WS_P, seed=seed)
    return dag_from_edges(num_nodes, g.edges())


register_wiring('dense', 'fixed', complete_graph)
register_wiring('er', 'fixed', er_graph)
register_wiring('ba', 'fixed', ba_graph)
register_wiring('ws', 'fixed', ws_graph)
