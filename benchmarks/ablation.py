"""Does dynamic wiring help? The paper's ablations (its Tables 4 and 6, router-bias finding) on Fashion-MNIST.

Trains one backbone with one recipe and budget under each wiring (chain, static, dense, er, ba, ws,
dynamic) and dynamic with router bias +3, 0 and -3, for several seeds; every run's JSON goes to
``--out-dir`` as soon as it finishes (runs already there are skipped, so an interrupted
experiment resumes), then ``<out-dir>.md`` (table next to the paper's numbers) and
``<out-dir>_curves.png`` (learning curves) are written from all JSONs found.

Backbone (default): ``ddw_resnet18`` built by timm with ``in_chans=1, stem_width=16,
channels=(16, 32, 64, 128), layers=(3, 3, 3, 3)`` -- ResNet-18's BasicBlock, narrower and with
three blocks per stage so that each stage is a 4-node graph on which ER/BA/WS can differ from
the chain and from the complete graph (with ResNet-18's two blocks, every DAG of a 3-node stage
is the chain or the complete graph). Deeper stages were tried first: with weight-1 sums the
activations grow about 2x per node (each block's identity path carries the sum of all earlier
outputs), and with six blocks per stage static and dense training diverged at lr 0.1 and stalled
at lr 0.02. 28x28 images are zero-padded to 32x32.

Default budget (CPU, about an hour on 2 busy shared cores with ``--jobs 2``): 8,000 training
images (a fixed random subset), 4 epochs, batch 128, SGD lr 0.05 with one warm-up epoch, seeds 0-4
(45 runs, 44 min wall-clock with other agents' jobs on the same 2 cores); top-1
on all 10,000 test images after the last epoch (earlier points of the learning curve use the
first 2,000 test images). Full protocol on a GPU:
``--device cuda --train-size 60000 --epochs 30 --jobs 1``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from timm_ddw.data import FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, load_note, recorded_command, run_pending, t_975, write_json  # noqa: E402

DATA_DIR = str(FASHION_MNIST_DIR)
MEAN, STD = FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0]

# name -> (wiring, router_bias); 'dynamic' is the paper's default router bias +3
VARIANTS: Dict[str, Tuple[str, float]] = {
    'chain': ('chain', 3.0),
    'static': ('static', 3.0),
    'dense': ('dense', 3.0),
    'er': ('er', 3.0),
    'ba': ('ba', 3.0),
    'ws': ('ws', 3.0),
    'dynamic': ('dynamic', 3.0),
    'dynamic_bias0': ('dynamic', 0.0),
    'dynamic_bias-3': ('dynamic', -3.0),
}


def load_split(data_dir: str, split: str, size: Optional[int], img_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised N x 1 x img_size x img_size images and labels; ``size`` takes a fixed random subset."""
    x, y = load_fashion_mnist(data_dir, split)
    if size is not None and size < len(x):
        idx = np.random.default_rng(0).permutation(len(x))[:size] if split == 'train' else np.arange(size)
        x, y = x[idx], y[idx]
    xt = (torch.from_numpy(x.copy()).float().div_(255) - MEAN) / STD
    pad = img_size - xt.shape[-1]
    if pad < 0:
        raise ValueError(f'img_size={img_size} must be >= 28')
    xt = F.pad(xt, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-MEAN / STD)
    return xt.unsqueeze(1).contiguous(), torch.from_numpy(y.astype(np.int64))


def model_kwargs(args: argparse.Namespace, variant: str, seed: int) -> Dict[str, Any]:
    wiring, bias = VARIANTS[variant]
    kw = dict(in_chans=1, num_classes=10, wiring=wiring, router_bias=bias, wiring_seed=seed)
    if args.model.startswith('ddw_resnet'):
        kw.update(stem_width=args.stem_width, channels=tuple(args.channels), layers=tuple(args.layers))
    return kw


def count_macs(model: torch.nn.Module, img_size: int) -> int:
    """Multiply-adds of one 1 x 1 x img_size x img_size eval forward (convs and matmuls, as the paper counts)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 1, img_size, img_size))
    return fc.get_total_flops() // 2


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random crop after ``pad`` px of padding, per sample."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = F.pad(x, (pad, pad, pad, pad), value=-MEAN / STD)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, 1, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, 1, h, w)
    return xp.gather(3, cols)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, bs: int = 1000) -> float:
    from timm.utils import accuracy
    model.eval()
    correct = 0.0
    for i in range(0, len(x), bs):
        xb, yb = x[i:i + bs].to(device), y[i:i + bs].to(device)
        correct += accuracy(model(xb), yb, topk=(1,))[0].item() * len(xb) / 100
    return 100.0 * correct / len(x)


def add_recipe_args(p: argparse.ArgumentParser, train_size: Optional[int], epochs: Optional[int],
                    epochs_help: Optional[str] = None) -> None:
    """The flags of :func:`train_run`'s recipe, shared by the experiments built on it."""
    p.add_argument('--train-size', type=int, default=train_size)
    p.add_argument('--epochs', type=int, default=epochs, help=epochs_help)
    p.add_argument('--max-steps', type=int, default=0, help='cap on steps per epoch (0: whole subset)')
    p.add_argument('--test-size', type=int, default=10000)
    p.add_argument('--curve-test-size', type=int, default=2000)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--warmup-epochs', type=int, default=1)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--device', default='cpu')


def run_one(args: argparse.Namespace, variant: str, seed: int) -> Dict[str, Any]:
    """Train one (variant, seed) and return its record."""
    return dict(variant=variant, **train_run(args, model_kwargs(args, variant, seed), seed)[0])


def train_run(args: argparse.Namespace, kw: Dict[str, Any], seed: int) -> Tuple[Dict[str, Any], torch.nn.Module]:
    """Train ``args.model`` built with ``kw`` on the Fashion-MNIST budget of ``args``; the record and the model."""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    import timm_ddw  # noqa: F401  (registers the models and wirings)
    from timm_ddw import DDW_DEFAULTS

    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    device = args.device
    xtr, ytr = load_split(args.data_dir, 'train', args.train_size, args.img_size)
    xte, yte = load_split(args.data_dir, 'test', args.test_size, args.img_size)
    model = timm.create_model(args.model, **kw)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, args.img_size)
    graphs = {n: m.preds for n, m in model.named_modules() if hasattr(m, 'preds')}
    model.to(device)
    opt = create_optimizer_v2(model, opt='sgd', lr=args.lr, weight_decay=args.weight_decay, momentum=0.9)
    steps = len(xtr) // args.batch_size
    if args.max_steps:
        steps = min(steps, args.max_steps)
    sched, _ = create_scheduler_v2(
        opt, sched='cosine', num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_lr=args.lr / 10,
        step_on_epochs=False, updates_per_epoch=steps)
    gen = torch.Generator().manual_seed(seed)
    curve: List[Dict[str, float]] = []
    train_time = 0.0
    t_all = time.perf_counter()
    tag = f"[{kw.get('wiring')} {'x'.join(map(str, kw.get('layers', ())))} seed {seed}]"
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr), generator=gen)
        loss_sum, seen = 0.0, 0
        for step in range(steps):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = augment(xtr[idx], gen).to(device)
            yb = ytr[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_update(epoch * steps + step + 1)
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        last = epoch == args.epochs - 1
        n_eval = len(xte) if last else min(len(xte), args.curve_test_size)
        top1 = evaluate(model, xte[:n_eval], yte[:n_eval], device)
        train_loss = loss_sum / max(seen, 1)
        if not math.isfinite(train_loss):
            print(f'{tag} non-finite loss at epoch {epoch}', file=sys.stderr)
        curve.append(dict(epoch=epoch + 1, train_loss=train_loss, test_top1=top1, test_images=n_eval,
                          train_time_s=train_time))
        print(f'{tag} epoch {epoch + 1}/{args.epochs} loss {train_loss:.4f} top1 {top1:.2f} ({train_time:.0f}s)',
              flush=True)
    ddw = {k: kw.get(k, v) for k, v in DDW_DEFAULTS.items()}
    record = dict(
        wiring=ddw['wiring'], router_bias=ddw['router_bias'], aggregation=ddw['aggregation'], seed=seed,
        model=args.model, model_args={k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
        layers=list(kw.get('layers', [])), channels=list(kw.get('channels', [])), train_images=len(xtr),
        epochs=args.epochs, params=params, macs=macs, top1=curve[-1]['test_top1'], train_time_s=train_time,
        total_time_s=time.perf_counter() - t_all, curve=curve, graphs=graphs,
        budget=dict(train_size=len(xtr), test_size=len(xte), epochs=args.epochs, steps_per_epoch=steps,
                    batch_size=args.batch_size, img_size=args.img_size, lr=args.lr,
                    weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs),
        env=environment(device, args.threads, args.jobs),
        finished=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    )
    return record, model


def _worker(args: argparse.Namespace, variant: str, seed: int) -> str:
    return str(write_json(Path(args.out_dir) / f'{variant}_seed{seed}.json', run_one(args, variant, seed)))


# ---------------------------------------------------------------------------------------- report

def _stats(vals: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(vals, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float('nan')


def _compare(a: List[float], b: List[float]) -> Tuple[float, float, str, float]:
    """Difference of means, Welch's t, whether it exceeds the seed-to-seed spread, and the half-width
    of its 95% interval (Student's t with the smaller sample's dof, a conservative choice)."""
    ma, sa = _stats(a)
    mb, sb = _stats(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2:
        return diff, float('nan'), 'too few seeds', float('nan')
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    t = diff / se if se > 0 else float('inf') * np.sign(diff)
    # two-sided 5% critical value of Student's t with the smaller sample's dof (conservative)
    c = t_975(min(len(a), len(b)) - 1)
    if abs(t) > c:
        verdict = 'exceeds the seed spread'
    elif abs(diff) > max(sa, sb):
        verdict = 'larger than one std, not significant'
    else:
        verdict = 'within the seed spread'
    return diff, t, verdict, c * se


PAIRS = [
    # (a, b, paper's claim about a vs b, paper's numbers, paper's gap in points)
    ('dynamic', 'chain', 'Table 6: dynamic > chain', 'ResNet-18 71.32 vs 70.30 (+1.02)', 1.02),
    ('dynamic', 'static', 'Table 6: dynamic > static', 'ResNet-18 71.32 vs 70.51 (+0.81)', 0.81),
    ('static', 'chain', 'Table 6: static > chain', 'ResNet-18 70.51 vs 70.30 (+0.21)', 0.21),
    ('dynamic', 'er', 'Table 4: DDW > ER(P=0.2)', '73.52 vs 71.34 (+2.18)', 2.18),
    ('dynamic', 'ba', 'Table 4: DDW > BA(M=5)', '73.52 vs 71.16 (+2.36)', 2.36),
    ('dynamic', 'ws', 'Table 4: DDW > WS(K=4,P=0.75)', '73.52 vs 72.26 (+1.26)', 1.26),
    ('dynamic', 'dense', '(not in the paper) dynamic > complete graph, weight 1', '-', None),
    ('dynamic', 'dynamic_bias0', 'router bias +3 > 0', 'ResNet-50: +3 best (78.28), no number for 0', None),
    ('dynamic', 'dynamic_bias-3', 'router bias +3 > -3', 'ResNet-50: +3 best (78.28), no number for -3', None),
]


def _fixed_args(rec: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in rec['model_args'].items() if k not in ('wiring', 'router_bias', 'wiring_seed')}


def _added_in(path: Path) -> str:
    """The commit that first added ``path`` (which graph stage made its runs)."""
    import subprocess
    res = subprocess.run(['git', 'log', '--diff-filter=A', '--format=%h', '--', str(path)], cwd=path.parent,
                         capture_output=True, text=True, check=False)
    return (res.stdout.split() or ['unknown'])[-1]


def write_report(out_dir: Path, paper: Dict[str, Any], command: str) -> Tuple[Path, Optional[Path]]:
    recs = [json.loads(p.read_text()) for p in sorted(out_dir.glob('*.json'))]
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in recs:
        by.setdefault(r['variant'], []).append(r)
    for v in by.values():
        v.sort(key=lambda r: r['seed'])
    md_path = out_dir.parent / f'{out_dir.name}.md'
    png_path = out_dir.parent / f'{out_dir.name}_curves.png'
    t6 = paper['table6_ablation_static_vs_dynamic']['rows']['resnet18']
    t4 = paper['table4_vs_randwire_small_regime']['rows']
    paper_col = {
        'chain': f'{t6[0]} (T6, R-18)', 'static': f'{t6[1]} (T6, R-18)',
        'dynamic': f"{t6[2]} (T6, R-18); {t4['DDW'][0]} (T4)",
        'er': f"{t4['ER(P=0.2)'][0]} (T4)", 'ba': f"{t4['BA(M=5)'][0]} (T4)", 'ws': f"{t4['WS(K=4,P=0.75)'][0]} (T4)",
        'dense': '-', 'dynamic_bias0': 'worse than +3 (R-50, no number)',
        'dynamic_bias-3': 'worse than +3 (R-50, no number)',
    }
    lines = ['# Ablations: does dynamic wiring help? (Fashion-MNIST)', '']
    if any('aggregation' not in r for r in recs):
        lines += ["**Made with Eq. 3's literal sum** (`aggregation='sum'` today; the runs predate the switch and "
                  f"its `bounded` default, commit {_added_in(out_dir)}), on 3-block stages. They are not results of "
                  'the current default; see [depth.md](depth.md) for the ablation with it.', '']
    lines += ['Generated by `benchmarks/ablation.py`; every run\'s JSON (curves, graphs, budget, environment) is in',
              f'[`{out_dir.name}/`]({out_dir.name}/). Command:', '', '```', command, '```', '']
    if recs:
        r0 = recs[0]
        b = r0['budget']
        lines += [
            f"Backbone: `{r0['model']}` with `{_fixed_args(r0)}`, "
            f"the same for every variant; only `wiring`/`router_bias` change. `wiring_seed` = the run's seed "
            f"(so er/ba/ws draw a different graph per seed, as RandWire averages over graph instances).",
            f"Budget per run: {b['train_size']} training images (fixed random subset of 60,000), {b['epochs']} "
            f"epochs x {b['steps_per_epoch']} steps of batch {b['batch_size']}, {b['img_size']}x{b['img_size']} px "
            f"(28x28 zero-padded), random flip + 2 px shift, SGD momentum 0.9 lr {b['lr']} (cosine, "
            f"{b['warmup_epochs']} warm-up epoch), weight decay {b['weight_decay']}; top-1 on {b['test_size']} "
            f"test images after the last epoch. Device: {r0['env']['device']}, {r0['env']['threads']} thread(s) per "
            f"run, {r0['env']['jobs']} run(s) in parallel on a {r0['env']['host_cpus']}-core machine "
            f"({load_note([r['env'] for r in recs])}), so times are indicative only. Sum of run times: "
            f"{sum(r['total_time_s'] for r in recs) / 60:.0f} min for {len(recs)} runs.",
            'MACs: one 1x1x32x32 forward counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions and '
            'matrix products, /2); element-wise sums of the graph aggregation are not counted, as in the paper.', '']
    lines += ['| variant | wiring | router bias | seeds | params | MACs (M) | top-1 % mean | std | '
              'train time (s, mean) | paper ImageNet top-1 |',
              '|---|---|---|---|---|---|---|---|---|---|']
    for name in VARIANTS:
        rs = by.get(name)
        if not rs:
            lines.append(f'| {name} | {VARIANTS[name][0]} | {VARIANTS[name][1]:+g} | 0 | | | not run | | | '
                         f'{paper_col[name]} |')
            continue
        m, s = _stats([r['top1'] for r in rs])
        tt = np.mean([r['train_time_s'] for r in rs])
        lines.append(f"| {name} | {rs[0]['wiring']} | {rs[0]['router_bias']:+g} | {len(rs)} | "
                     f"{rs[0]['params']:,} | {rs[0]['macs'] / 1e6:.2f} | {m:.2f} | {s:.2f} | {tt:.0f} | "
                     f"{paper_col[name]} |")
    lines += ['', 'Per-seed top-1: ' + '; '.join(
        f"{n}: " + ', '.join(f"{r['top1']:.2f}" for r in by[n]) for n in VARIANTS if n in by), '',
        f'Learning curves: [`{png_path.name}`]({png_path.name}); epochs before the last are evaluated on the first '
        f"{recs[0]['curve'][0].get('test_images', '?') if recs else '?'} test images, the last on all of them.", '',
        '## Comparisons', '',
        '"Exceeds the seed spread": Welch\'s t beyond the two-sided 5% critical value for the seed count; '
        '"larger than one std": the difference exceeds the larger std but not that bound. "Epoch 1": '
        'difference of the mean top-1 after the first epoch (the curve\'s first point): how fast each trains '
        'early.', '',
        '| comparison | paper\'s claim | paper (ImageNet) | here: difference (points) | 95% interval | Welch t | '
        'verdict | epoch 1 |',
        '|---|---|---|---|---|---|---|---|']
    verdicts: Dict[Tuple[str, str], Tuple[float, str]] = {}
    early: Dict[Tuple[str, str], float] = {}
    excluded = []
    for a, bname, claim, pnum, gap in PAIRS:
        if a in by and bname in by:
            d, t, v, hw = _compare([r['top1'] for r in by[a]], [r['top1'] for r in by[bname]])
            e1 = _stats([r['curve'][0]['test_top1'] for r in by[a]])[0] - \
                _stats([r['curve'][0]['test_top1'] for r in by[bname]])[0]
            verdicts[(a, bname)] = (d, v)
            early[(a, bname)] = e1
            if gap is not None and d + hw < gap:
                excluded.append(f'{a} vs {bname} (paper {gap:+.2f}, here at most {d + hw:+.2f})')
            lines.append(f'| {a} vs {bname} | {claim} | {pnum} | {d:+.2f} | {d - hw:+.2f} .. {d + hw:+.2f} | '
                         f'{t:.2f} | {v} | {e1:+.1f} |')
        else:
            lines.append(f'| {a} vs {bname} | {claim} | {pnum} | not run | | | | |')
    lines.append('')
    graph_lines = []
    for name in ('er', 'ba', 'ws'):
        for r in by.get(name, []):
            distinct = sorted({json.dumps(g) for g in r['graphs'].values()}, key=len)
            graph_lines.append(f"- {name}, seed {r['seed']}: " + '; '.join(f'`{g}`' for g in distinct))
    if graph_lines:
        lines += ['Random graphs drawn (predecessor lists `preds[j]` of each distinct stage graph; '
                  'chain = `[[], [0], [1], [2]]`, complete = `[[], [0], [0, 1], [0, 1, 2]]`):', ''] + graph_lines + ['']
    lines += ['## Reading', '']
    for name in ('er', 'ba', 'ws'):
        seeds = [r['seed'] for r in by.get(name, [])
                 if all(g == [[j - 1] if j else [] for j in range(len(g))] for g in r['graphs'].values())]
        if seeds:
            lines.append(f'- {name} drew the plain chain in every stage for seed(s) {seeds}: on 4-node stages the '
                         'random generators have few distinct DAGs to offer, so er/ba/ws are close to chain/dense.')
    agree = [f'{a} vs {b} ({d:+.2f})' for (a, b), (d, v) in verdicts.items()
             if v == 'exceeds the seed spread' and d > 0]
    against = [f'{a} vs {b} ({d:+.2f})' for (a, b), (d, v) in verdicts.items()
               if v == 'exceeds the seed spread' and d < 0]
    unclear = [f'{a} vs {b} ({d:+.2f})' for (a, b), (d, v) in verdicts.items() if v != 'exceeds the seed spread']
    lines += [
        f"- Differences beyond the seed spread in the paper's direction: {', '.join(agree) or 'none'}.",
        f"- Differences beyond the seed spread against the paper's direction: {', '.join(against) or 'none'}.",
        f"- Differences within (or not clearly beyond) the seed spread: {', '.join(unclear) or 'none'}.",
        "- Comparisons whose 95% interval excludes a gap as large as the paper's (a gain of the paper's "
        f"size did not appear at this scale): {', '.join(excluded) or 'none'}.",
        '- Early training (top-1 after epoch 1, dynamic with bias +3 minus the other): ' + (', '.join(
            f'vs {b}: {e:+.1f} points' for (a, b), e in early.items() if b.startswith('dynamic_bias')) or 'not run')
        + ". The paper's router-bias finding is that +3 trains fastest early and ends best.",
        '- What this does not say: the paper\'s numbers are ImageNet top-1 with 100+ epochs on large backbones '
        '(ResNet-18..101, MobileNetV2, RandWire small regime with 32-node stages); this is a narrow ResNet with '
        '4-node stages on 28x28 grey images, a short budget and few seeds. Agreement here is weak support, '
        'disagreement is weak evidence against; a difference within the spread means this budget cannot '
        'resolve it, not that the variants are equal. Table 4\'s RandWire baselines are separately designed '
        'networks of about the same FLOPs; here ER/BA/WS are wirings of the same blocks, so MACs are equal '
        'and only the graph differs.',
        '- The budget is short: the training loss of every variant is still falling at the last epoch (see the curves; '
        'the cosine schedule ends there), so these '
        'are early-training accuracies, not converged ones; points of top-1 on Fashion-MNIST and on ImageNet '
        'are not on the same scale. With six blocks per stage, weight-1 sums (static, dense) diverged at lr 0.1 '
        'and stalled at lr 0.02 in trial runs, which is why the stages have three blocks and lr is 0.05.', '']
    md_path.write_text('\n'.join(lines))
    png = _plot(by, png_path)
    return md_path, png


def _plot(by: Dict[str, List[Dict[str, Any]]], png_path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed (pip install timm-ddw[plots]): no learning-curve PNG', file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in [v for v in VARIANTS if v in by]:
        rs = by[name]
        n = min(len(r['curve']) for r in rs)
        ep = np.arange(1, n + 1)
        for ax, key in zip(axes, ('test_top1', 'train_loss'), strict=True):
            vals = np.array([[c[key] for c in r['curve'][:n]] for r in rs])
            m = vals.mean(0)
            ls = '-' if name.startswith('dynamic') else '--'
            ax.plot(ep, m, ls, marker='o', ms=3, label=f'{name} (n={len(rs)})')
            if len(rs) > 1:
                s = vals.std(0, ddof=1)
                ax.fill_between(ep, m - s, m + s, alpha=0.12)
    axes[0].set(xlabel='epoch', ylabel='test top-1 (%)', title='Fashion-MNIST test top-1 (mean +- std over seeds)')
    axes[1].set(xlabel='epoch', ylabel='train loss', title='training loss (mean over seeds)', yscale='log')
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    p.add_argument('--model', default='ddw_resnet18')
    p.add_argument('--layers', nargs=4, type=int, default=[3, 3, 3, 3], help='blocks per stage (ResNet models)')
    p.add_argument('--channels', nargs=4, type=int, default=[16, 32, 64, 128], help='stage widths (ResNet models)')
    p.add_argument('--stem-width', type=int, default=16)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--train-size', type=int, default=8000, help='training images (fixed random subset of 60,000)')
    p.add_argument('--test-size', type=int, default=10000, help='test images for the final top-1')
    p.add_argument('--curve-test-size', type=int, default=2000,
                   help='first test images evaluated after each earlier epoch (learning curve)')
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--max-steps', type=int, default=0, help='cap on steps per epoch (0: whole subset)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--warmup-epochs', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1, help='torch threads per run')
    p.add_argument('--jobs', type=int, default=2, help='runs in parallel (processes)')
    p.add_argument('--data-dir', default=DATA_DIR)
    p.add_argument('--out-dir', default=str(Path(__file__).parent / 'results' / 'ablation'))
    p.add_argument('--paper', default=str(Path(__file__).parent / 'paper_tables.json'))
    p.add_argument('--report-only', action='store_true', help='only rewrite the table and plot from the JSONs')
    p.add_argument('--smoke', action='store_true',
                   help='tiny check: 2 wirings (chain, dynamic), seed 0, 256 images, 2 steps, 1 epoch, 500 test images')
    args = p.parse_args(argv)
    if args.smoke:
        args.variants, args.seeds, args.train_size, args.test_size = ['chain', 'dynamic'], [0], 256, 500
        args.epochs, args.max_steps, args.jobs, args.warmup_epochs = 1, 2, 1, 0
        args.layers = [2, 2, 2, 2]
    for name in ('train_size', 'test_size', 'epochs', 'batch_size', 'jobs', 'threads'):
        if getattr(args, name) < 1:
            raise SystemExit(f'--{name.replace("_", "-")} must be >= 1')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = recorded_command(out_dir.parent / f'{out_dir.name}.md', 'ablation.py', argv, args.report_only)
    paper = json.loads(Path(args.paper).read_text())
    if not args.report_only:
        run_pending([(v, s) for s in args.seeds for v in args.variants],
                    lambda r: (out_dir / f'{r[0]}_seed{r[1]}.json').exists(), _worker, args, args.jobs,
                    lambda: write_report(out_dir, paper, command))
    md, png = write_report(out_dir, paper, command)
    print('wrote', md, png or '(no PNG)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
