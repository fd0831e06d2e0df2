"""How should a graph stage sum its inputs? The evidence behind ``aggregation='bounded'``.

timm's blocks keep their own shortcuts, so with Eq. 3's literal weighted sum (``aggregation='sum'``)
every node adds all earlier outputs, each of which already carries its own input: the scale about
doubles per node. Candidates, each measured on all nine models and in training:

- ``sum``: Eq. 3 as written, ``sum_i a_ij x_i``;
- ``bounded``: ``sum_i a_ij x_i / max(1, sum_i a_ij)`` (Eq. 3 while the weights sum to at most 1);
- ``mean``: ``sum_i a_ij x_i / sum_i a_ij`` (always a convex combination; not a library option,
  patched in here: a node with one input edge then ignores its weight).

``scale``: for each model at init (random weights, batch 2, 128 and 224 px), the worst graph
stage's output RMS against its timm twin holding the same block weights, in train and eval mode,
both for the whole model (the same image in) and stage by stage (the twin's stage input fed to both
stages); whether float16 autocast stays finite; the smallest edge weight at init; and how many
router rows (an edge's weights and bias) and thresholds get exactly zero gradient from one float32
backward. ``train``: a narrow ResNet with a 12-block stage trained on Fashion-MNIST at the chain's
learning rate under each candidate, a few seeds.

    python benchmarks/aggregation.py scale            # ~10 min on 2 cores
    python benchmarks/aggregation.py train --seeds 0 1 2
    python benchmarks/aggregation.py report           # benchmarks/results/aggregation.md

Results go to ``benchmarks/results/aggregation/`` (one JSON per model or run, skipped when present).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import timm  # noqa: E402
from ablation import augment, evaluate, load_split  # noqa: E402

import timm_ddw  # noqa: E402
import timm_ddw.graph as graph  # noqa: E402
from timm_ddw.data import FASHION_MNIST_DIR  # noqa: E402
from timm_ddw.models import TWINS  # noqa: E402

CANDIDATES = ('sum', 'bounded', 'mean')
OUT = Path(__file__).parent / 'results' / 'aggregation'


@contextmanager
def candidate(name: str) -> Iterator[Dict[str, Any]]:
    """Model kwargs for one candidate; 'mean' patches the library's weight bound while active."""
    if name != 'mean':
        yield dict(aggregation=name)
        return
    saved = graph.bound_weights
    graph.bound_weights = lambda w: w / w.sum(1, keepdim=True)
    try:
        yield dict(aggregation='bounded')
    finally:
        graph.bound_weights = saved


def _rms(t: torch.Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item()


def _pair(name: str, kw: Dict[str, Any]):
    torch.manual_seed(0)
    ddw = timm.create_model(name, num_classes=10, **kw)
    twin = timm.create_model(TWINS[name], num_classes=10)
    sd = ddw.state_dict()
    twin.load_state_dict({k: sd[k] for k in twin.state_dict()})
    for s in timm_ddw.graph_stages(ddw).values():
        s.sum_block_size = 0  # 'mean' is patched into the per-node sums only
    return ddw, twin


def stage_ratios(ddw, twin, x: torch.Tensor, train: bool) -> Dict[str, Dict[str, float]]:
    """Per stage: DDW / twin output RMS, for the whole model and for the stage fed the twin's input."""
    stages = list(timm_ddw.graph_stages(ddw))
    seen: Dict[Any, Any] = {}
    for tag, model in (('ddw', ddw), ('twin', twin)):
        model.train(train)
        hooks = [model.get_submodule(s).register_forward_hook(
            lambda m, i, o, k=(tag, s): seen.__setitem__(k, (i[0].detach(), _rms(o)))) for s in stages]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
    out = {}
    for s in stages:
        with torch.no_grad():
            local = _rms(ddw.get_submodule(s)(seen[('twin', s)][0]))
        out[s] = dict(model=seen[('ddw', s)][1] / seen[('twin', s)][1], stage=local / seen[('twin', s)][1])
    return out


def router_health(ddw, x: torch.Tensor) -> Dict[str, Any]:
    """Smallest edge weight at init, and router rows / thresholds with exactly zero gradient."""
    ddw.train()
    ddw.zero_grad(set_to_none=True)
    with timm_ddw.capture_routing(ddw) as cap:
        out = ddw(x)
    F.cross_entropy(out, torch.arange(len(x)) % 10).backward()
    min_w, zero_rows, rows, zero_tau, taus = 1.0, 0, 0, 0, 0
    for name, st in timm_ddw.graph_stages(ddw).items():
        adj = cap[name][0]
        mask = torch.tensor([[i in st.preds[j] for i in range(st.num_nodes)] for j in range(st.num_nodes)])
        min_w = min(min_w, adj[:, mask].min().item())
        if st.router_weight is not None:
            g = torch.cat([st.router_weight.grad, st.router_bias.grad[:, None]], 1)
            zero_rows += int((g == 0).all(1).sum())
            rows += g.shape[0]
            zero_tau += int((st.tau.grad == 0).sum())
            taus += st.tau.numel()
    return dict(min_edge_weight=min_w, zero_grad_router_rows=zero_rows, router_rows=rows,
                zero_grad_thresholds=zero_tau, thresholds=taus, finite_loss=bool(torch.isfinite(out).all()))


def fp16_finite(ddw, x: torch.Tensor) -> Dict[str, bool]:
    res = {}
    for dtype in (torch.float16, torch.bfloat16):
        for train in (True, False):
            ddw.train(train)
            ddw.zero_grad(set_to_none=True)
            with torch.autocast('cpu', dtype=dtype):
                out = ddw(x)
            out.float().logsumexp(1).sum().backward()
            grads = all(torch.isfinite(p.grad).all() for p in ddw.parameters() if p.grad is not None)
            key = f"{str(dtype).split('.')[1]}_{'train' if train else 'eval'}"
            res[key] = bool(torch.isfinite(out).all()) and grads
    return res


def run_scale(args: argparse.Namespace) -> None:
    for name in args.models:
        path = OUT / f'scale_{name}.json'
        if path.exists():
            continue
        rec: Dict[str, Any] = dict(model=name, twin=TWINS[name])
        for cand in CANDIDATES:
            with candidate(cand) as kw:
                ddw, twin = _pair(name, kw)
                entry: Dict[str, Any] = {}
                for px in args.sizes:
                    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(px))
                    for train in (True, False):
                        entry[f"{px}_{'train' if train else 'eval'}"] = stage_ratios(ddw, twin, x, train)
                x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
                entry['routers'] = router_health(ddw, x)
                entry['autocast_224'] = fp16_finite(ddw, torch.randn(2, 3, 224, 224)) if args.autocast else None
                rec[cand] = entry
                print(name, cand, json.dumps(entry['routers']), flush=True)
        path.write_text(json.dumps(rec, indent=1))


def run_train(args: argparse.Namespace) -> None:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    torch.set_num_threads(args.threads)
    xtr, ytr = load_split(args.data_dir, 'train', args.steps * args.batch_size, 32)
    xte, yte = load_split(args.data_dir, 'test', args.test_size, 32)
    for seed in args.seeds:
        for variant in args.variants:
            wiring, cand = variant.split('-') if '-' in variant else (variant, 'bounded')
            path = OUT / f'train_{variant}_seed{seed}.json'
            if path.exists():
                continue
            with candidate(cand) as kw:
                torch.manual_seed(seed)
                model = timm.create_model(
                    'ddw_resnet18', in_chans=1, num_classes=10, stem_width=16, channels=(16, 32, 64, 128),
                    layers=tuple(args.layers), wiring=wiring, **kw)
                opt = create_optimizer_v2(model, opt='sgd', lr=args.lr, weight_decay=5e-4, momentum=0.9)
                sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=1, warmup_epochs=0,
                                               step_on_epochs=False, updates_per_epoch=args.steps)
                gen = torch.Generator().manual_seed(seed)
                perm = torch.randperm(len(xtr), generator=gen)
                curve: List[float] = []
                t0 = time.perf_counter()
                model.train()
                for step in range(args.steps):
                    idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
                    loss = F.cross_entropy(model(augment(xtr[idx], gen)), ytr[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step_update(step + 1)
                    curve.append(loss.item())
                    if not math.isfinite(curve[-1]):
                        break
                train_time = time.perf_counter() - t0
                top1 = evaluate(model, xte, yte, 'cpu') if math.isfinite(curve[-1]) else float('nan')
                rec = dict(variant=variant, wiring=wiring, aggregation=cand, seed=seed, layers=args.layers,
                           lr=args.lr, steps=args.steps, batch_size=args.batch_size, test_images=len(xte),
                           top1=top1, final_loss=float(np.mean(curve[-20:])), diverged=not math.isfinite(curve[-1]),
                           train_time_s=train_time, loss_curve=curve)
            path.write_text(json.dumps(rec))
            print(f'{variant} seed {seed}: top1 {top1:.2f} loss {rec["final_loss"]:.3f} ({train_time:.0f}s)',
                  flush=True)


def _worst(entry: Dict[str, Dict[str, float]], key: str) -> tuple:
    """The stage ratio farthest from 1 (in either direction)."""
    s, r = max(((s, v[key]) for s, v in entry.items()), key=lambda sv: abs(math.log(sv[1])))
    return r, s


def write_report(args: argparse.Namespace) -> Path:
    lines = ['# Aggregation: what a graph stage sums (evidence for `aggregation=\'bounded\'`)', '',
             'Generated by `benchmarks/aggregation.py` (see its docstring for the candidates and commands).', '']
    scale = [json.loads(p.read_text()) for p in sorted(OUT.glob('scale_*.json'))]
    if scale:
        sizes = sorted({int(k.split('_')[0]) for k in scale[0]['sum'] if k[0].isdigit()})
        lines += ['## Scale at init', '',
                  'Worst graph stage (the ratio farthest from 1): DDW output RMS / twin output RMS, same block '
                  'weights, random init, batch 2. "model": the same image into both models; "stage": the twin\'s '
                  f'stage input fed to both stages. Sizes {sizes} px; the table gives the worst over sizes.', '',
                  '| model | candidate | train (model) | eval (model) | train (stage) | eval (stage) | '
                  'min edge weight | zero-grad router rows | zero-grad thresholds | autocast f16/bf16 finite |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for rec in scale:
            for cand in CANDIDATES:
                e = rec[cand]
                cells = []
                for key in ('model', 'stage'):
                    for mode in ('train', 'eval'):
                        worst = max((_worst(e[f'{px}_{mode}'], key) + (px,) for px in sizes),
                                    key=lambda t: abs(math.log(t[0])))
                        cells.append(f'{worst[0]:.3g} ({worst[1]}, {worst[2]})')
                r = e['routers']
                ac = e.get('autocast_224')
                ac_txt = 'not run' if not ac else ('all' if all(ac.values()) else
                                                   'NOT: ' + ', '.join(k for k, v in ac.items() if not v))
                lines.append(f"| {rec['model']} | {cand} | " + ' | '.join(cells) +
                             f" | {r['min_edge_weight']:.3f} | {r['zero_grad_router_rows']}/{r['router_rows']} | "
                             f"{r['zero_grad_thresholds']}/{r['thresholds']} | {ac_txt} |")
        lines.append('')
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob('train_*.json'))]
    if runs:
        r0 = runs[0]
        lines += ['## Training at the chain\'s learning rate', '',
                  f"Narrow ResNet (`ddw_resnet18`, BasicBlock, widths 16-128, layers {r0['layers']}: a "
                  f"{max(r0['layers'])}-block stage), Fashion-MNIST 32 px, {r0['steps']} steps of batch "
                  f"{r0['batch_size']} (SGD momentum 0.9, lr {r0['lr']} cosine, no warm-up, weight decay 5e-4), "
                  f"top-1 on the first {r0['test_images']} test images. Mean +- std over seeds.", '',
                  '| variant | seeds | diverged | loss (last 20 steps) | top-1 % | train time (s) |',
                  '|---|---|---|---|---|---|']
        by: Dict[str, List[Dict[str, Any]]] = {}
        for r in runs:
            by.setdefault(r['variant'], []).append(r)
        for v, rs in by.items():
            ok = [r for r in rs if not r['diverged']]
            loss = np.array([r['final_loss'] for r in ok])
            top = np.array([r['top1'] for r in ok])

            def ms(a: np.ndarray) -> str:
                return f'{a.mean():.3f} +- {a.std(ddof=1):.3f}' if len(a) > 1 else (f'{a[0]:.3f}' if len(a) else '-')
            lines.append(f"| {v} | {len(rs)} | {len(rs) - len(ok)} | {ms(loss)} | {ms(top)} | "
                         f"{np.mean([r['train_time_s'] for r in rs]):.0f} |")
        lines.append('')
    path = OUT.parent / 'aggregation.md'
    path.write_text('\n'.join(lines))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('what', choices=('scale', 'train', 'report'))
    p.add_argument('--models', nargs='+', default=list(TWINS))
    p.add_argument('--sizes', nargs='+', type=int, default=[128, 224])
    p.add_argument('--no-autocast', dest='autocast', action='store_false')
    p.add_argument('--variants', nargs='+',
                   default=['chain', 'dynamic-sum', 'dynamic-bounded', 'dynamic-mean', 'dense-sum', 'dense-bounded'])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--layers', nargs=4, type=int, default=[2, 2, 12, 2])
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--test-size', type=int, default=2000)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--data-dir', default=str(FASHION_MNIST_DIR))
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.what == 'scale':
        run_scale(args)
    elif args.what == 'train':
        run_train(args)
    print('wrote', write_report(args))
    return 0


if __name__ == '__main__':
    sys.exit(main())
