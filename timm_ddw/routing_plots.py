"""Figures of routing statistics: the paper's Fig. 4 (mean edge weights) and Fig. 5 (their
standard deviation) as one heatmap per stage, and per-class differences.

Figures are drawn on matplotlib's Agg canvas (no display, no pyplot state); matplotlib is an
optional dependency (``pip install 'timm-ddw[plots]'``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .routing import RoutingStats

__all__ = ['PLOTS_HINT', 'plot_class_differences', 'plot_stage_heatmaps', 'require_matplotlib', 'save_figure',
           'value_format']

PLOTS_HINT = "matplotlib is needed for the routing figures: pip install 'timm-ddw[plots]'"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(PLOTS_HINT) from e


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout='constrained')
    FigureCanvasAgg(fig)  # Agg canvas: no display, no global pyplot state
    return fig


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=fig.dpi)


def _node_ticks(ax, n: int, outer_x: bool = True, outer_y: bool = True, fontsize: float = 8) -> None:
    """Label a cropped heatmap: columns are sending nodes 0..n-2, rows receiving nodes 1..n-1."""
    step = 1 if n <= 17 else 2
    cols = [i for i in range(n - 1) if i % step == 0]
    rows = [j for j in range(1, n) if j % step == 0 or j == n - 1]
    xl = [f'{i}\nin' if i == 0 else str(i) for i in cols]
    yl = [f'out {j}' if j == n - 1 else str(j) for j in rows]
    ax.set_xticks(cols, xl if outer_x else [''] * len(cols), fontsize=fontsize)
    ax.set_yticks([j - 1 for j in rows], yl if outer_y else [''] * len(rows), fontsize=fontsize)


def value_format(vmax: float) -> str:
    """A format with two significant digits at the scale of ``vmax``: '{:.2f}' for 1, '{:.3f}' for 0.02."""
    if not math.isfinite(vmax) or vmax <= 0:
        return '{:.2f}'
    return f'{{:.{max(2, 1 - math.floor(math.log10(vmax)))}f}}'


def _heatmap(ax, data: np.ndarray, cmap, vmin: float, vmax: float, annotate: bool):
    """Draw ``data[j, i]`` without row 0 and column N-1, which never hold an edge (node 0 has no
    inputs, the output node no outputs)."""
    data = data[1:, :-1]
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, interpolation='nearest')
    if annotate:
        mid = (vmin + vmax) / 2
        fmt = value_format(max(abs(vmin), abs(vmax)))
        for (j, i), v in np.ndenumerate(data):
            if math.isfinite(v):
                dark = v > mid if vmin >= 0 else abs(v) > 0.6 * vmax
                ax.text(i, j, fmt.format(v), ha='center', va='center', fontsize=7, color='white' if dark else 'black')
    return im


_WHICH = dict(  # title (with {n} samples), colour bar label
    mean=('mean edge weight over {n} samples', 'mean of a_ij'),
    std=('standard deviation of each edge weight across {n} samples', 'std of a_ij'),
    closed_share=('share of {n} samples in which each edge is closed (a_ij = 0)', 'share closed'),
)


def plot_stage_heatmaps(stats: RoutingStats, which: str = 'mean'):
    """One heatmap per stage of ``which`` ('mean': paper Fig. 4, 'std': Fig. 5, 'closed_share').

    Returns a matplotlib Figure (Agg canvas) with one image axis per stage and a shared colour bar;
    rows are receiving nodes j, columns sending nodes i, grey cells have no edge.
    """
    require_matplotlib()
    import matplotlib

    if which not in _WHICH:
        raise ValueError(f'which={which!r} is not one of {tuple(_WHICH)}')
    names = stats.stage_names
    if not names:
        raise ValueError('no statistics yet: call update() or collect_routing() first')
    data = [stats.stage(n)[which] for n in names]
    biggest = max(d.shape[0] for d in data)
    if which == 'std':
        vmax = max([float(np.nanmax(d)) for d in data if np.isfinite(d).any()] + [1e-6])
        cmap = matplotlib.colormaps['Blues']
    else:
        vmax = 1.0
        cmap = matplotlib.colormaps['Blues' if which == 'mean' else 'Reds']
    cmap = cmap.with_extremes(bad='0.85')
    side = max(2.6, 0.26 * biggest)
    fig = _new_figure(side * len(names) + 1.2, side + 1.0)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    im = None
    for k, (ax, name, d) in enumerate(zip(axes, names, data, strict=True)):
        im = _heatmap(ax, d, cmap, 0.0, vmax, annotate=d.shape[0] <= 10)
        _node_ticks(ax, d.shape[0], outer_y=True)
        ax.set_title(f'{name} (N={d.shape[0]})', fontsize=10)
        ax.set_xlabel('from node i', fontsize=8)
        if k == 0:
            ax.set_ylabel('to node j', fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.85, label=_WHICH[which][1])
    model = stats.meta.get('model', 'model')
    fig.suptitle(f'{model}: ' + _WHICH[which][0].format(n=stats.num_samples), fontsize=11)
    return fig


def plot_class_differences(stats: RoutingStats, max_classes: int = 10):
    """Per-class mean minus overall mean, one row per class and one column per stage.

    With more than ``max_classes`` classes, the classes that deviate most (largest mean absolute
    difference over all edges) are shown, in class order. Returns a matplotlib Figure.
    """
    require_matplotlib()
    import matplotlib

    counts = stats.class_counts()
    if counts is None:
        raise ValueError('no per-class statistics: pass labels to update() / a labelled loader')
    names = stats.stage_names
    diffs = [stats.stage(n)['class_mean'] - stats.stage(n)['mean'][None] for n in names]
    present = np.nonzero(counts > 0)[0]
    score = np.array([np.nanmean(np.concatenate([np.abs(d[c]).ravel() for d in diffs])) for c in present])
    shown = sorted(present[np.argsort(-score, kind='stable')[:max_classes]].tolist())
    vmax = max([float(np.nanmax(np.abs(d[shown]))) for d in diffs if np.isfinite(d[shown]).any()] + [1e-6])
    cmap = matplotlib.colormaps['RdBu_r'].with_extremes(bad='0.85')
    biggest = max(d.shape[1] for d in diffs)
    side = max(1.9, 0.2 * biggest)
    fig = _new_figure(side * len(names) + 1.6, side * len(shown) + 1.0)
    axes = fig.subplots(len(shown), len(names), squeeze=False)
    im = None
    labels = stats.class_names or []
    for r, c in enumerate(shown):
        label = labels[c] if c < len(labels) else f'class {c}'
        for k, name in enumerate(names):
            ax = axes[r, k]
            d = diffs[k][c]
            im = _heatmap(ax, d, cmap, -vmax, vmax, annotate=False)
            _node_ticks(ax, d.shape[0], outer_x=r == len(shown) - 1, outer_y=k == 0, fontsize=6)
            if r == 0:
                ax.set_title(f'{name} (N={d.shape[0]})', fontsize=9)
            if k == 0:
                ax.set_ylabel(f'{label}\n(n={int(counts[c])})', fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label='class mean - overall mean of a_ij')
    model = stats.meta.get('model', 'model')
    extra = f' ({len(shown)} of {len(present)} classes)' if len(shown) < len(present) else ''
    fig.suptitle(f'{model}: per-class mean edge weight minus overall mean{extra}\n'
                 'rows: to node j, columns: from node i', fontsize=10)
    return fig
