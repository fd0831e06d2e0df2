"""Routing statistics of DDW models: what the learned wiring looks like over a data set.

The paper (section 4.5, Figs. 4 and 5) reads the mean and the standard deviation of every edge
weight a_ij over the ImageNet validation set. :class:`RoutingStats` accumulates those (and the
share of samples in which an edge is closed or a node removed, and per-class means) in a single
pass whose memory does not grow with the number of samples; :func:`collect_routing` runs it over a
data loader. The figures are drawn by :mod:`timm_ddw.routing_plots`; ``timm-ddw routing`` (and
:func:`timm_ddw.routing_report.routing_report`) does all of it from a checkpoint and a data set.

Every matrix follows :func:`timm_ddw.capture_routing`: ``M[j, i]`` is the statistic of edge i -> j
(rows: a node's inputs, columns: its outputs).
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .capture import capture_routing, graph_stages
from .routing_plots import PLOTS_HINT, plot_class_differences, plot_stage_heatmaps, require_matplotlib, save_figure

__all__ = ['REPORT_FILES', 'RoutingStats', 'SCHEMA_VERSION', 'collect_routing', 'plot_class_differences',
           'plot_stage_heatmaps']

SCHEMA_VERSION = 1
# every file RoutingStats.save may write, figures included
REPORT_FILES = ('routing.json', 'routing.npz', 'summary.txt', 'routing_mean.png', 'routing_std.png',
                'routing_closed.png', 'routing_class_diff.png')

Captured = Mapping[str, Union[torch.Tensor, Sequence[torch.Tensor]]]


class _StageAcc:
    """Running sums of one stage, all float64 / int64 and of size N x N (x classes)."""

    def __init__(self, edges: torch.Tensor, num_classes: int):
        n = edges.shape[0]
        self.edges = edges.bool().cpu()
        self.count = 0
        self.mean = torch.zeros(n, n, dtype=torch.float64)
        self.m2 = torch.zeros(n, n, dtype=torch.float64)
        self.closed = torch.zeros(n, n, dtype=torch.int64)
        self.removed = torch.zeros(n, dtype=torch.int64)
        self.class_sum = torch.zeros(num_classes, n, n, dtype=torch.float64)
        self.class_count = torch.zeros(num_classes, dtype=torch.int64)

    @property
    def num_nodes(self) -> int:
        return self.edges.shape[0]

    def grow_classes(self, num_classes: int) -> None:
        extra = num_classes - self.class_count.shape[0]
        if extra > 0:
            n = self.num_nodes
            self.class_sum = torch.cat([self.class_sum, torch.zeros(extra, n, n, dtype=torch.float64)])
            self.class_count = torch.cat([self.class_count, torch.zeros(extra, dtype=torch.int64)])

    def update(self, x: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        b = x.shape[0]
        if b == 0:
            return
        # Chan et al.'s merge of two Welford states: exact in float64 for any batch split
        batch_mean = x.mean(0)
        batch_m2 = (x - batch_mean).square().sum(0)
        total = self.count + b
        delta = batch_mean - self.mean
        self.mean += delta * (b / total)
        self.m2 += batch_m2 + delta.square() * (self.count * b / total)
        self.count = total

        is_open = (x != 0) & self.edges
        self.closed += (~is_open & self.edges).sum(0)
        has_in, has_out = self.edges.any(1), self.edges.any(0)
        no_input = ~is_open.any(2) & has_in     # node j: every existing input edge closed
        no_output = ~is_open.any(1) & has_out   # node i: every existing output edge closed
        self.removed += (no_input | no_output).sum(0)

        if labels is not None:
            self.class_sum.index_add_(0, labels, x)
            self.class_count += torch.bincount(labels, minlength=self.class_count.shape[0])

    def arrays(self) -> Dict[str, np.ndarray]:
        """Finished statistics; NaN where there is no edge (or no sample)."""
        edges = self.edges.numpy()
        nan = np.full(edges.shape, np.nan)
        count = self.count
        if count:
            mean = np.where(edges, self.mean.numpy(), np.nan)
            std = np.where(edges, np.sqrt(np.maximum(self.m2.numpy() / count, 0.0)), np.nan)
            closed = np.where(edges, self.closed.numpy() / count, np.nan)
            removed = self.removed.numpy() / count
        else:
            mean, std, closed = nan, nan.copy(), nan.copy()
            removed = np.full(edges.shape[0], np.nan)
        cc = self.class_count.numpy()
        with np.errstate(invalid='ignore', divide='ignore'):
            class_mean = self.class_sum.numpy() / cc[:, None, None]
        class_mean = np.where(edges[None] & (cc[:, None, None] > 0), class_mean, np.nan)
        return dict(
            edges=edges, mean=mean, std=std, closed_share=closed, node_removed_share=removed,
            class_mean=class_mean, class_count=cc)


def _complete_edges(num_nodes: int) -> torch.Tensor:
    return torch.ones(num_nodes, num_nodes, dtype=torch.bool).tril(-1)


def _as_batch(name: str, value: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        parts = [value]
    else:
        parts = list(value)
        if not parts:
            raise ValueError(f'stage {name!r}: no captured matrices (was a forward run inside capture_routing?)')
    for p in parts:
        if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[1] != p.shape[2]:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f'stage {name!r}: expected B x N x N tensors, got {shape}')
    return torch.cat([p.detach().to('cpu', torch.float64) for p in parts])


def _edge_list(edges: np.ndarray) -> List[Tuple[int, int]]:
    """(i, j) for every edge i -> j, ordered by target j then source i."""
    return [(int(i), int(j)) for j, i in zip(*np.nonzero(edges), strict=True)]


def _dumps(obj: Any, indent: str = '') -> str:
    """JSON with one line per matrix row (lists of numbers stay on one line)."""
    inner = indent + ' '
    if isinstance(obj, dict):
        if not obj:
            return '{}'
        items = [f'{inner}{json.dumps(str(k))}: {_dumps(v, inner)}' for k, v in obj.items()]
        return '{\n' + ',\n'.join(items) + '\n' + indent + '}'
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return '[\n' + ',\n'.join(inner + _dumps(v, inner) for v in obj) + '\n' + indent + ']'
    return json.dumps(obj, allow_nan=False)


def _json_matrix(a: np.ndarray) -> Any:
    return [_json_matrix(r) for r in a] if a.ndim > 1 else [None if not math.isfinite(v) else float(v) for v in a]


class RoutingStats:
    """Streaming per-stage, per-edge statistics of a DDW model's adjacency matrices.

    Feed it the mapping from :func:`timm_ddw.capture_routing` with :meth:`update`, batch by batch.
    ``edges`` maps a stage name to its N x N boolean edge mask (``M[j, i]``: edge i -> j exists);
    a stage without a mask is taken as the complete DAG. Use :meth:`for_model` to read the masks
    from the model, so that wirings with fewer edges (e.g. ``'chain'``) are judged correctly.
    """

    def __init__(
            self,
            edges: Optional[Mapping[str, Union[torch.Tensor, np.ndarray]]] = None,
            num_classes: Optional[int] = None,
            class_names: Optional[Sequence[str]] = None,
            meta: Optional[Dict[str, Any]] = None,
    ):
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f'num_classes={num_classes!r} must be a positive int or None')
        self._masks = {k: torch.as_tensor(np.asarray(v)).bool() for k, v in (edges or {}).items()}
        self._stages: Dict[str, _StageAcc] = {}
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.meta: Dict[str, Any] = dict(meta or {})

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> RoutingStats:
        """Statistics with the edge masks (and wiring names) of ``model``'s graph stages."""
        stages = graph_stages(model)
        if not stages:
            raise ValueError(f'{type(model).__name__} has no DDW graph stages')
        masks = {}
        for name, stage in stages.items():
            n = len(stage.preds)
            mask = torch.zeros(n, n, dtype=torch.bool)
            for j, src in enumerate(stage.preds):
                mask[j, src] = True
            masks[name] = mask
        stats = cls(edges=masks, **kwargs)
        stats.meta.setdefault('wiring', {name: getattr(stage, 'wiring', None) for name, stage in stages.items()})
        arch = getattr(model, 'pretrained_cfg', {}).get('architecture')
        if arch:
            stats.meta.setdefault('model', arch)
        return stats

    # ------------------------------------------------------------------ accumulation
    def update(self, captured: Captured, labels: Optional[torch.Tensor] = None) -> None:
        """Add one batch: ``{stage: B x N x N tensor or list of them}`` (lists are concatenated)."""
        if not captured:
            raise ValueError('captured is empty: expected {stage name: B x N x N tensor(s)}')
        batches = {name: _as_batch(name, value) for name, value in captured.items()}
        if self._stages and set(batches) != set(self._stages):
            raise ValueError(f'stages {sorted(batches)} differ from the earlier updates {sorted(self._stages)}')
        sizes = {name: x.shape[0] for name, x in batches.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f'every stage must hold the same samples, got batch sizes {sizes}')
        batch = next(iter(sizes.values()))
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1).to('cpu', torch.int64)
            if labels.shape[0] != batch:
                raise ValueError(f'labels has {labels.shape[0]} entries for {batch} captured samples')
            if batch and labels.min() < 0:
                raise ValueError('labels must be non-negative class indices')
            top = int(labels.max()) + 1 if batch else 0
            if self.num_classes is not None and top > self.num_classes:
                raise ValueError(f'label {top - 1} is out of range for num_classes={self.num_classes}')
        for name, x in batches.items():
            acc = self._stages.get(name)
            if acc is None:
                mask = self._masks.get(name, _complete_edges(x.shape[1]))
                if mask.shape != x.shape[1:]:
                    raise ValueError(f'stage {name!r}: edge mask {tuple(mask.shape)} does not fit {tuple(x.shape)}')
                acc = self._stages[name] = _StageAcc(mask, self.num_classes or 0)
            elif x.shape[1] != acc.num_nodes:
                raise ValueError(f'stage {name!r}: {x.shape[1]} nodes, earlier updates had {acc.num_nodes}')
            if labels is not None:
                acc.grow_classes(max(self.num_classes or 0, top))
            acc.update(x, labels)

    # ------------------------------------------------------------------ results
    @property
    def stage_names(self) -> List[str]:
        return list(self._stages)

    @property
    def num_samples(self) -> int:
        return next(iter(self._stages.values())).count if self._stages else 0

    @property
    def has_classes(self) -> bool:
        return any(int(a.class_count.sum()) > 0 for a in self._stages.values())

    def stage(self, name: str) -> Dict[str, np.ndarray]:
        """Arrays of one stage: edges, mean, std, closed_share, node_removed_share, class_mean, class_count.

        ``std`` is the population standard deviation (ddof=0); non-edges are NaN.
        """
        if name not in self._stages:
            raise KeyError(f'no stage {name!r}; stages: {self.stage_names}')
        return self._stages[name].arrays()

    def stage_summary(self, name: str) -> Dict[str, Any]:
        """Scalars of one stage: means over its edges / nodes, strongest and most variable edge."""
        s = self.stage(name)
        edges = s['edges']
        out: Dict[str, Any] = dict(num_nodes=int(edges.shape[0]), num_edges=int(edges.sum()))
        if not self.num_samples or not edges.any():
            return dict(out, mean_edge_weight=None, closed_share=None, nodes_removed_share=None,
                        strongest_edge=None, most_variable_edge=None)
        j, i = np.unravel_index(np.nanargmax(s['mean']), edges.shape)
        vj, vi = np.unravel_index(np.nanargmax(s['std']), edges.shape)
        return dict(
            out,
            mean_edge_weight=float(np.nanmean(s['mean'])),
            closed_share=float(np.nanmean(s['closed_share'])),
            nodes_removed_share=float(s['node_removed_share'].mean()),
            strongest_edge={'from': int(i), 'to': int(j), 'mean': float(s['mean'][j, i])},
            most_variable_edge={'from': int(vi), 'to': int(vj), 'std': float(s['std'][vj, vi])},
        )

    def text_summary(self) -> str:
        """A few lines per stage for the console."""
        head = f"{self.meta.get('model', 'model')}: routing over {self.num_samples} samples"
        lines = [head]
        for name in self.stage_names:
            s = self.stage_summary(name)
            if s['mean_edge_weight'] is None:
                lines.append(f"  {name}: N={s['num_nodes']} nodes, {s['num_edges']} edges, no samples")
                continue
            st, mv = s['strongest_edge'], s['most_variable_edge']
            lines.append(
                f"  {name}: N={s['num_nodes']} nodes, {s['num_edges']} edges | mean a={s['mean_edge_weight']:.3f}"
                f" | closed {100 * s['closed_share']:.1f}% | nodes removed {100 * s['nodes_removed_share']:.1f}%"
                f" | strongest {st['from']}->{st['to']} ({st['mean']:.3f})"
                f" | most variable {mv['from']}->{mv['to']} (std {mv['std']:.3f})")
            removed = self.stage(name)['node_removed_share']
            if np.nan_to_num(removed).any():  # node removal (node budgets): how often, node by node
                lines.append('    removed per node: ' + ', '.join(
                    f'node {j} {100 * v:.0f}%' for j, v in enumerate(removed) if v > 0))
        return '\n'.join(lines)

    def class_counts(self) -> Optional[np.ndarray]:
        if not self.has_classes:
            return None
        return next(iter(self._stages.values())).class_count.numpy()

    def to_json(self) -> Dict[str, Any]:
        """The routing.json document (schema in README, "Routing analysis")."""
        counts = self.class_counts()
        stages = []
        for name in self.stage_names:
            s = self.stage(name)
            summary = self.stage_summary(name)
            stages.append(dict(
                name=name,
                num_nodes=summary.pop('num_nodes'),
                num_edges=summary.pop('num_edges'),
                summary=summary,
                edges=[list(e) for e in _edge_list(s['edges'])],
                mean=_json_matrix(s['mean']),
                std=_json_matrix(s['std']),
                closed_share=_json_matrix(s['closed_share']),
                node_removed_share=_json_matrix(s['node_removed_share']),
            ))
        return dict(
            schema='timm-ddw/routing',
            schema_version=SCHEMA_VERSION,
            num_samples=self.num_samples,
            num_classes=None if counts is None else int(counts.shape[0]),
            class_names=self.class_names if counts is not None else None,
            class_count=None if counts is None else [int(c) for c in counts],
            meta=self.meta,
            stages=stages,
        )

    def compare(self, other: RoutingStats) -> Dict[str, Dict[str, float]]:
        """Largest absolute differences per common stage (mean, std, closed share): for comparing runs."""
        out = {}
        for name in self.stage_names:
            if name not in other.stage_names:
                continue
            a, b = self.stage(name), other.stage(name)
            if a['edges'].shape != b['edges'].shape:
                continue
            out[name] = {k: float(np.nanmax(np.abs(a[k] - b[k]), initial=0.0))
                         for k in ('mean', 'std', 'closed_share', 'node_removed_share')}
        return out

    # ------------------------------------------------------------------ files
    def save(self, out_dir: Union[str, Path], plots: Optional[bool] = None, overwrite: bool = False
             ) -> Dict[str, Path]:
        """Write routing.json, routing.npz, summary.txt and (with matplotlib) the PNG figures.

        plots: None draws the figures when matplotlib is installed (warning otherwise), True
        requires it, False skips them. A folder that already holds a report is refused
        (FileExistsError) unless ``overwrite``, which first removes every file of the old report,
        so no figure of other data is left next to the new statistics. Returns {'json', 'npz',
        'summary', 'mean_png', ...: path}.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        old = [out / name for name in REPORT_FILES if (out / name).exists()]
        if old and not overwrite:
            raise FileExistsError(f'{out} already holds a routing report ({", ".join(p.name for p in old)}); '
                                  'nothing was written')
        for path in old:
            path.unlink()
        paths = dict(json=out / 'routing.json', npz=out / 'routing.npz', summary=out / 'summary.txt')
        with paths['json'].open('w') as f:
            f.write(_dumps(self.to_json()) + '\n')
        arrays: Dict[str, np.ndarray] = {'stage_names': np.array(self.stage_names)}
        for name, acc in self._stages.items():
            s = acc.arrays()
            for key in ('edges', 'mean', 'std', 'closed_share', 'node_removed_share', 'class_mean', 'class_count'):
                arrays[f'{name}/{key}'] = s[key]
            arrays[f'{name}/_count'] = np.array(acc.count)
            arrays[f'{name}/_mean'] = acc.mean.numpy()
            arrays[f'{name}/_m2'] = acc.m2.numpy()
            arrays[f'{name}/_closed'] = acc.closed.numpy()
            arrays[f'{name}/_removed'] = acc.removed.numpy()
            arrays[f'{name}/_class_sum'] = acc.class_sum.numpy()
        np.savez_compressed(paths['npz'], **arrays)
        paths['summary'].write_text(self.text_summary() + '\n')
        if plots is False:
            return paths
        try:
            require_matplotlib()
        except ImportError:
            if plots:
                raise
            warnings.warn(f'{PLOTS_HINT}; skipping the PNG figures', stacklevel=2)
            return paths
        figures = dict(mean_png=('mean', 'routing_mean.png'), std_png=('std', 'routing_std.png'),
                       closed_png=('closed_share', 'routing_closed.png'))
        for key, (which, file) in figures.items():
            save_figure(plot_stage_heatmaps(self, which), out / file)
            paths[key] = out / file
        if self.has_classes:
            save_figure(plot_class_differences(self), out / 'routing_class_diff.png')
            paths['class_diff_png'] = out / 'routing_class_diff.png'
        return paths

    @classmethod
    def load(cls, path: Union[str, Path]) -> RoutingStats:
        """Read what :meth:`save` wrote (a directory, routing.json or routing.npz); updates may continue."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        npz, js = folder / 'routing.npz', folder / 'routing.json'
        if not npz.is_file() or not js.is_file():
            raise FileNotFoundError(f'{folder} must hold routing.json and routing.npz written by RoutingStats.save')
        doc = json.loads(js.read_text())
        if doc.get('schema') != 'timm-ddw/routing' or doc.get('schema_version', 0) > SCHEMA_VERSION:
            raise ValueError(f"{js}: schema {doc.get('schema')!r} v{doc.get('schema_version')} is not "
                             f"timm-ddw/routing v<={SCHEMA_VERSION}")
        stats = cls(num_classes=doc.get('num_classes'), class_names=doc.get('class_names'), meta=doc.get('meta'))
        with np.load(npz) as z:
            for name in [str(n) for n in z['stage_names']]:
                edges = torch.from_numpy(z[f'{name}/edges'])
                class_sum = torch.from_numpy(z[f'{name}/_class_sum'])
                acc = _StageAcc(edges, class_sum.shape[0])
                acc.count = int(z[f'{name}/_count'])
                acc.mean = torch.from_numpy(z[f'{name}/_mean']).clone()
                acc.m2 = torch.from_numpy(z[f'{name}/_m2']).clone()
                acc.closed = torch.from_numpy(z[f'{name}/_closed']).clone()
                acc.removed = torch.from_numpy(z[f'{name}/_removed']).clone()
                acc.class_sum = class_sum.clone()
                acc.class_count = torch.from_numpy(z[f'{name}/class_count']).clone()
                stats._stages[name] = acc
                stats._masks[name] = acc.edges
        return stats


# ---------------------------------------------------------------------- collection
@torch.no_grad()
def collect_routing(
        model: nn.Module,
        loader: Iterable[Any],
        device: Union[str, torch.device] = 'cpu',
        max_batches: Optional[int] = None,
        progress: bool = True,
        num_classes: Optional[int] = None,
        amp: bool = False,
) -> RoutingStats:
    """Run ``model`` (in eval mode) over ``loader`` and accumulate its routing.

    A batch is an image tensor or a tuple/list whose first item is the images and whose second,
    when present, holds integer class labels (used for per-class means). ``amp`` runs the
    forward under autocast (float16 on CUDA, bfloat16 on CPU), as training with ``--amp`` does.
    """
    from contextlib import nullcontext

    from tqdm import tqdm

    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f'max_batches={max_batches!r} must be a positive int or None')
    stats = RoutingStats.for_model(model, num_classes=num_classes)
    was_training = model.training
    device = torch.device(device)
    model.to(device).eval()
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if amp else nullcontext
    try:
        total = len(loader) if hasattr(loader, '__len__') else None
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    try:
        with capture_routing(model) as captured:
            bar = tqdm(loader, total=total, disable=not progress, unit='batch', desc='routing', file=sys.stderr)
            for step, batch in enumerate(bar):
                if max_batches is not None and step >= max_batches:
                    break
                labels = None
                if isinstance(batch, (tuple, list)):
                    images = batch[0]
                    if len(batch) > 1 and isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point():
                        labels = batch[1]
                else:
                    images = batch
                if not isinstance(images, torch.Tensor):
                    raise TypeError(f'loader batches must be image tensors or (images, labels), got {type(images)}')
                with autocast():
                    model(images.to(device))
                stats.update(captured, labels)
                for v in captured.values():
                    v.clear()
            bar.close()
    finally:
        model.train(was_training)
    return stats
