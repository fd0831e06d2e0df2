"""Does dynamic wiring help more as stages get deeper? The ablation at two depths (Fashion-MNIST).

The paper's strongest claim is about depth: DDW's gain grows from ResNet-18 (+1.02) to ResNet-101
(+1.61) "as the complete graph includes more nodes". This trains the narrow ResNet of
``benchmarks/ablation.py`` (BasicBlock, stem 16, widths 16/32/64/128, 32 px) at two depths, the
same widths, recipe and budget for every variant:

- ``shallow``: stages of 2/2/2/2 blocks (3-node graphs, as ResNet-18);
- ``long``: 2/2/12/2 blocks, a 13-node third stage (like ResNet-101's 23-block third stage).

Variants (model arguments; everything else is the library default, ``aggregation='bounded'``):
chain, static, dynamic (router bias +3) in the default protocol, 5 seeds; dense, ws, dynamic with
router bias 0 and dynamic with the paper's literal Eq. 3 sum in ``--extended``, 3 seeds; er and ba
with ``--random-graphs``, 3 seeds. Random graphs are drawn per stage from the run's seed.

Every run's JSON goes to ``benchmarks/results/depth/<depth>_<variant>_seed<seed>.json`` when it
finishes, and a rerun skips the runs already there. The weights of the dynamic long-stage runs
are kept in ``benchmarks/results/depth/models/`` (not committed); ``--analyse`` then writes the
routing report of the seed-0 model and times ``set_skip_closed`` at batch 1 against the dense
forward and the twin. ``benchmarks/results/depth.md`` is rewritten from all JSONs after each run.

    python benchmarks/depth.py                      # default protocol (CPU, 2 runs at a time)
    python benchmarks/depth.py --extended           # the other variants
    python benchmarks/depth.py --analyse            # routing report and skip-closed timing
    python benchmarks/depth.py --full --device cuda # all 60,000 images, more epochs (a GPU)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import recorded_command, run_pending, write_json  # noqa: E402
from ablation import DATA_DIR, _compare, _stats, add_recipe_args, load_split, train_run  # noqa: E402

HERE = Path(__file__).resolve().parent
DEPTHS: Dict[str, Tuple[int, ...]] = {'shallow': (2, 2, 2, 2), 'long': (2, 2, 12, 2)}
VARIANTS: Dict[str, Dict[str, Any]] = {
    'chain': dict(wiring='chain'),
    'static': dict(wiring='static'),
    'dynamic': dict(wiring='dynamic', router_bias=3.0),
    'dense': dict(wiring='dense'),
    'ws': dict(wiring='ws'),
    'dynamic_bias0': dict(wiring='dynamic', router_bias=0.0),
    'dynamic_sum': dict(wiring='dynamic', aggregation='sum'),
    'er': dict(wiring='er'),
    'ba': dict(wiring='ba'),
}
CORE, EXTENDED, RANDOM = ('chain', 'static', 'dynamic'), ('dense', 'ws', 'dynamic_bias0', 'dynamic_sum'), ('er', 'ba')
PROTOCOLS: Dict[str, Dict[str, Any]] = {
    # CPU, 2 runs at a time on 2 cores, one thread each: all 60,000 training images, 8 epochs. Measured
    # throughput per run (img/s, shallow / long): chain 1780 / 1100, static 1390 / 680, dynamic 1380 / 650,
    # so the default protocol takes about 2.1 h of wall time, --extended about 1.7 h
    'default': dict(variants=CORE, seeds=[0, 1, 2, 3, 4], train_size=60000, epochs=8, jobs=2, threads=1),
    'extended': dict(variants=EXTENDED, seeds=[0, 1, 2], train_size=60000, epochs=8, jobs=2, threads=1),
    'random': dict(variants=RANDOM, seeds=[0, 1, 2], train_size=60000, epochs=8, jobs=2, threads=1),
    # a GPU: every training image, more epochs
    'full': dict(variants=CORE + EXTENDED, seeds=[0, 1, 2, 3, 4], train_size=60000, epochs=30, jobs=1, threads=8),
}
COMPARISONS = [  # (a, b): is a better than b?
    ('dynamic', 'chain'), ('dynamic', 'static'), ('dynamic', 'dense'), ('dynamic', 'ws'),
    ('dynamic', 'dynamic_bias0'), ('dynamic', 'dynamic_sum'), ('dynamic', 'er'), ('dynamic', 'ba'),
    ('static', 'chain'),
]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
T80 = {1: 1.38, 2: 1.06, 3: 0.98, 4: 0.94, 5: 0.92, 6: 0.91, 7: 0.90, 8: 0.89, 9: 0.88, 10: 0.88}  # one-sided 20%


def run_name(depth: str, variant: str, seed: int) -> str:
    return f'{depth}_{variant}_seed{seed}'


def weights_path(args: argparse.Namespace, depth: str, variant: str, seed: int) -> Path:
    return Path(args.out_dir) / 'models' / f'{run_name(depth, variant, seed)}.safetensors'


def model_kwargs(args: argparse.Namespace, depth: str, variant: str, seed: int) -> Dict[str, Any]:
    return dict(in_chans=1, num_classes=10, stem_width=args.stem_width, channels=tuple(args.channels),
                layers=DEPTHS[depth], wiring_seed=seed, **VARIANTS[variant])


def _worker(args: argparse.Namespace, depth: str, variant: str, seed: int) -> str:
    record, model = train_run(args, model_kwargs(args, depth, variant, seed), seed)
    record = dict(variant=variant, depth=depth, protocol=args.protocol, **record)
    if depth == 'long' and variant == 'dynamic':
        from safetensors.torch import save_file
        path = weights_path(args, depth, variant, seed)
        path.parent.mkdir(exist_ok=True)
        save_file(model.state_dict(), str(path))
    return str(write_json(Path(args.out_dir) / f'{run_name(depth, variant, seed)}.json', record))


# ---------------------------------------------------------------------------------------- analysis

def trained_model(args: argparse.Namespace, depth: str, variant: str, seed: int) -> torch.nn.Module:
    import timm
    from safetensors.torch import load_file

    import timm_ddw  # noqa: F401
    model = timm.create_model('ddw_resnet18', **model_kwargs(args, depth, variant, seed))
    model.load_state_dict(load_file(str(weights_path(args, depth, variant, seed))))
    return model.eval()


def batch1_latency(models: Dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> Dict[str, Dict[str, float]]:
    """Median and spread of per-image latency (ms) at batch 1, the models interleaved round by round."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for xi in x[:5]:
                m(xi[None])
        for r in range(rounds):
            for name in list(models)[r % len(models):] + list(models)[:r % len(models)]:
                t0 = time.perf_counter()
                for xi in x:
                    models[name](xi[None])
                times[name].append((time.perf_counter() - t0) * 1000 / len(x))
    return {k: dict(median_ms=statistics.median(v), min_ms=min(v), max_ms=max(v)) for k, v in times.items()}


def analyse(args: argparse.Namespace) -> Dict[str, Any]:
    """Routing report of the trained dynamic long-stage model (seed 0) and its skip-closed speed."""
    import copy

    import timm

    import timm_ddw
    from timm_ddw.routing import collect_routing
    torch.set_num_threads(args.threads)
    model = trained_model(args, 'long', 'dynamic', 0)
    xte, yte = load_split(args.data_dir, 'test', args.test_size, args.img_size)
    loader = [(xte[i:i + 500], yte[i:i + 500]) for i in range(0, len(xte), 500)]
    stats = collect_routing(model, loader, progress=False)
    out = Path(args.out_dir).parent / 'depth_routing'
    stats.save(out, overwrite=True)
    summary = {name: stats.stage_summary(name) for name in stats.stage_names}
    removed, nodes = 0.0, 0
    with torch.no_grad(), timm_ddw.capture_routing(model) as cap:
        for xb, _ in loader:
            model(xb)
    for mats in cap.values():
        adj = torch.cat(mats)
        n = adj.shape[1] - 1
        removed += float((adj[:, 1:n, :].sum(-1) == 0).float().sum())
        nodes += (n - 1) * adj.shape[0]
    skip = timm_ddw.set_skip_closed(copy.deepcopy(model))
    twin = timm.create_model('resnet18', **{k: v for k, v in model_kwargs(args, 'long', 'chain', 0).items()
                                            if k not in ('wiring', 'wiring_seed')}).eval()
    x = xte[:args.latency_images]
    with torch.no_grad():
        torch.testing.assert_close(skip(x), model(x), rtol=1e-5, atol=1e-6)  # the live path sums by GEMM
    latency = batch1_latency({'dense': model, 'skip_closed': skip, 'twin': twin}, x, args.latency_rounds)
    result = dict(model=run_name('long', 'dynamic', 0), test_images=len(xte), routing_dir=out.name,
                  removed_node_share=removed / max(nodes, 1), latency=latency, latency_images=len(x),
                  latency_rounds=args.latency_rounds, threads=torch.get_num_threads(), summary=summary,
                  finished=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    write_json(Path(args.out_dir).parent / 'depth_analysis.json', result)
    return result


# ---------------------------------------------------------------------------------------- report

def _ci(a: List[float], b: List[float]) -> Tuple[float, float]:
    d, _, _, hw = _compare(a, b)
    return d, hw


def diff_of_diffs(groups: Dict[Tuple[str, str], List[float]], a: str, b: str) -> Optional[Tuple[float, float]]:
    """(a - b) at long minus (a - b) at shallow, and the half-width of its 95% interval (independent runs;
    Student's t with the smallest group's degrees of freedom, conservative)."""
    keys = [('long', a), ('long', b), ('shallow', a), ('shallow', b)]
    if any(len(groups.get(k, [])) < 2 for k in keys):
        return None
    means = [np.mean(groups[k]) for k in keys]
    se = math.sqrt(sum(np.var(groups[k], ddof=1) / len(groups[k]) for k in keys))
    dof = min(len(groups[k]) for k in keys) - 1
    return (means[0] - means[1]) - (means[2] - means[3]), T95.get(dof, 2.0) * se


def detectable(std: float, n: int) -> float:
    """Smallest difference of two means of n seeds each that a two-sided 5% test finds with 80% power."""
    dof = 2 * n - 2
    return (T95.get(dof, 2.0) + T80.get(dof, 0.85)) * std * math.sqrt(2 / n)


def reading(groups: Dict[Tuple[str, str], List[float]], epochs: str) -> List[str]:
    """What exceeds the seed spread and what does not, from the numbers alone, then the caveats
    (``epochs``: the training epochs of the runs, as the report states them)."""
    beyond, within = [], []
    for depth in DEPTHS:
        for a, b in COMPARISONS:
            ga, gb = groups.get((depth, a), []), groups.get((depth, b), [])
            if min(len(ga), len(gb)) > 1:
                d, _, verdict, hw = _compare(ga, gb)
                (beyond if verdict == 'exceeds the seed spread' else within).append(
                    f'{a} vs {b} at {depth} ({d:+.2f}, interval {d - hw:+.2f} .. {d + hw:+.2f})')
    out = [f"- Beyond the seed spread (95% interval excludes 0): {'; '.join(beyond) or 'none'}.",
           f"- Within the spread: {'; '.join(within) or 'none'}."]
    for a, b in (('dynamic', 'chain'), ('dynamic', 'static')):
        dd = diff_of_diffs(groups, a, b)
        if dd is not None:
            grows = 'the interval excludes 0' if abs(dd[0]) > dd[1] else 'the interval includes 0'
            out.append(f'- Depth: {a} - {b} changes by {dd[0]:+.2f} points from the shallow to the long stage '
                       f'(95% interval {dd[0] - dd[1]:+.2f} .. {dd[0] + dd[1]:+.2f}; {grows}). The paper\'s growth '
                       'from ResNet-18 to ResNet-101 is +0.59 over the static network.')
    out += [
        '- What this does and does not say: every variant here trains the same narrow ResNet on 28x28 grey '
        f'Fashion-MNIST images for {epochs} epochs, near the accuracy ceiling of this small network (about 91-92%); '
        'the paper trains ResNet-18/101 on ImageNet for 100 epochs. A difference within the spread means this '
        'budget cannot resolve it, not that the variants are equal; points of top-1 here and on ImageNet are '
        f'not on one scale. The long stage has {max(DEPTHS["long"]) + 1} nodes (the paper\'s ResNet-101 stage has '
        '24, its RandWire comparison 32).']
    return out


def write_report(out_dir: Path, command: str) -> Path:
    recs = [json.loads(p.read_text()) for p in sorted(out_dir.glob('*.json'))]
    groups: Dict[Tuple[str, str], List[float]] = {}
    by: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in recs:
        by.setdefault((r['depth'], r['variant']), []).append(r)
        groups.setdefault((r['depth'], r['variant']), []).append(r['top1'])
    lines = ['# Does dynamic wiring help more as stages get deeper? (Fashion-MNIST)', '',
             'Generated by `benchmarks/depth.py`; every run\'s JSON (learning curve, graphs, budget, environment, '
             f'source commit) is in [`{out_dir.name}/`]({out_dir.name}/). Commands:', '', '```', command, '```', '']
    if recs:
        r0 = recs[0]
        b = r0['budget']
        protocols = sorted({r.get('protocol', '?') for r in recs})
        lines += [
            f"Backbone: `ddw_resnet18` with `stem_width={r0['model_args']['stem_width']}, "
            f"channels={r0['channels']}`, 1 input channel, 28x28 images zero-padded to {b['img_size']} px; "
            f"depths {', '.join(f'{k} = {list(v)}' for k, v in DEPTHS.items())} blocks per stage. Budget per run "
            f"(protocol(s) {', '.join(protocols)}): "
            + ('all 60,000 training images' if b['train_size'] >= 60000 else
               f"{b['train_size']:,} training images (a fixed random subset of 60,000)")
            + f", {b['epochs']} epochs of batch {b['batch_size']}, random flip + 2 px shift, SGD momentum 0.9, "
            f"lr {b['lr']} (cosine, {b['warmup_epochs']} warm-up epoch), weight decay {b['weight_decay']}, no weight "
            f"decay on routers and thresholds; top-1 on all {b['test_size']:,} test images after the last epoch. "
            f"{r0['env']['jobs']} runs at a time, {r0['env']['threads']} thread each, on a "
            f"{r0['env']['host_cpus']}-core CPU machine: training times are indicative. Aggregation: the library "
            "default (`bounded`) unless the variant says `sum`.", '']
    for depth in DEPTHS:
        rows = [(v, by[(depth, v)]) for v in VARIANTS if (depth, v) in by]
        if not rows:
            continue
        lines += [f'## {depth}: stages of {list(DEPTHS[depth])} blocks', '',
                  '| variant | model arguments | seeds | params | MACs (M) | top-1 % mean | std | per seed | '
                  'train time (s, mean) |', '|---|---|---|---|---|---|---|---|---|']
        for v, rs in rows:
            m, s = _stats([r['top1'] for r in rs])
            lines.append(f"| {v} | `{VARIANTS[v]}` | {len(rs)} | {rs[0]['params']:,} | {rs[0]['macs'] / 1e6:.2f} | "
                         f"{m:.2f} | {s:.2f} | {', '.join(format(r['top1'], '.2f') for r in rs)} | "
                         f"{np.mean([r['train_time_s'] for r in rs]):.0f} |")
        lines += ['', '| comparison | difference (points) | 95% interval | verdict |', '|---|---|---|---|']
        for a, bname in COMPARISONS:
            if (depth, a) in groups and (depth, bname) in groups:
                d, t, verdict, hw = _compare(groups[(depth, a)], groups[(depth, bname)])
                lines.append(f'| {a} vs {bname} | {d:+.2f} | {d - hw:+.2f} .. {d + hw:+.2f} | {verdict} |')
        stds = [np.std(g, ddof=1) for (dp, _), g in groups.items() if dp == depth and len(g) > 1]
        if stds:
            pooled = float(np.sqrt(np.mean(np.square(stds))))
            lines += ['', f'Power: seed-to-seed std at this depth (pooled over variants) {pooled:.2f} points; the '
                      f'smallest difference two variants must differ by to be found with 80% power at the 5% level is '
                      f'{detectable(pooled, 3):.2f} points with 3 seeds each and {detectable(pooled, 5):.2f} with 5.']
        lines.append('')
    lines += ['## Depth: is dynamic\'s margin larger with the longer stage?', '',
              '(a - b) with the long third stage minus (a - b) with the shallow one; positive means the margin '
              'grows with depth, as the paper reports for ResNet-18 -> ResNet-101 (+1.02 -> +1.61 over the static '
              'network, a growth of +0.59).', '',
              '| margin | shallow | long | difference of differences | 95% interval |', '|---|---|---|---|---|']
    for a, bname in COMPARISONS:
        dd = diff_of_diffs(groups, a, bname)
        if dd is None:
            continue
        sh = _ci(groups[('shallow', a)], groups[('shallow', bname)])
        lo = _ci(groups[('long', a)], groups[('long', bname)])
        lines.append(f'| {a} - {bname} | {sh[0]:+.2f} +- {sh[1]:.2f} | {lo[0]:+.2f} +- {lo[1]:.2f} | {dd[0]:+.2f} | '
                     f'{dd[0] - dd[1]:+.2f} .. {dd[0] + dd[1]:+.2f} |')
    epochs = ' or '.join(str(e) for e in sorted({r['budget']['epochs'] for r in recs})) or '?'
    lines += ['', '## Reading', ''] + reading(groups, epochs) + ['']
    analysis = out_dir.parent / 'depth_analysis.json'
    if analysis.exists():
        an = json.loads(analysis.read_text())
        lat = an['latency']
        lines += ['', '## The trained dynamic long-stage model: routing and removed nodes', '',
                  f"`{an['model']}` over the {an['test_images']:,} test images: routing report in "
                  f"[`{an['routing_dir']}/`]({an['routing_dir']}/) (mean and std of every edge weight per stage, "
                  "the paper's Fig. 4/5, share of samples in which each edge is closed, removed-node shares, "
                  f"per-class means). Share of (sample, block node) pairs removed: {an['removed_node_share']:.4f}.", '',
                  f"Batch-1 inference, {an['latency_images']} test images, median of {an['latency_rounds']} "
                  f"interleaved rounds, {an['threads']} thread(s):", '',
                  '| forward | ms per image (median) | min-max | speed vs dense |', '|---|---|---|---|']
        for k, v in lat.items():
            lines.append(f"| {k} | {v['median_ms']:.3f} | {v['min_ms']:.3f}-{v['max_ms']:.3f} | "
                         f"{lat['dense']['median_ms'] / v['median_ms']:.3f}x |")
    path = out_dir.parent / 'depth.md'
    path.write_text('\n'.join(lines) + '\n')
    return path


# ---------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument('--extended', dest='protocol', action='store_const', const='extended',
                   help='dense, ws, dynamic with router bias 0 and with the literal sum, 3 seeds')
    g.add_argument('--random-graphs', dest='protocol', action='store_const', const='random', help='er and ba, 3 seeds')
    g.add_argument('--full', dest='protocol', action='store_const', const='full', help='the GPU protocol')
    p.add_argument('--analyse', action='store_true', help='routing report and skip-closed timing of a trained model')
    p.add_argument('--report-only', action='store_true')
    p.add_argument('--depths', nargs='+', default=list(DEPTHS), choices=list(DEPTHS))
    p.add_argument('--variants', nargs='+', choices=list(VARIANTS), help='default: the protocol\'s')
    p.add_argument('--seeds', nargs='+', type=int, help='default: the protocol\'s')
    add_recipe_args(p, train_size=None, epochs=None)
    p.add_argument('--stem-width', type=int, default=16)
    p.add_argument('--channels', nargs=4, type=int, default=[16, 32, 64, 128])
    p.add_argument('--jobs', type=int)
    p.add_argument('--threads', type=int)
    p.add_argument('--latency-images', type=int, default=200)
    p.add_argument('--latency-rounds', type=int, default=7)
    p.add_argument('--data-dir', default=DATA_DIR)
    p.add_argument('--out-dir', default=str(HERE / 'results' / 'depth'))
    args = p.parse_args(argv)
    args.protocol = args.protocol or 'default'
    for key, value in PROTOCOLS[args.protocol].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.model = 'ddw_resnet18'
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = recorded_command(out_dir.parent / 'depth.md', 'depth.py', argv, args.report_only)
    if args.analyse:
        print(json.dumps(analyse(args)['latency'], indent=1))
    elif not args.report_only:
        runs = [(d, v, s) for s in args.seeds for d in args.depths for v in args.variants]
        run_pending(runs, lambda r: (out_dir / f'{run_name(*r)}.json').exists(), _worker, args, args.jobs,
                    lambda: write_report(out_dir, command))
    print('wrote', write_report(out_dir, command))
    return 0


if __name__ == '__main__':
    sys.exit(main())
