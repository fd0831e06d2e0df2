"""Node removal that pays: DDW under a compute budget against the twin, a static network of the same
executed compute, and the same model with its nodes removed at random (Fashion-MNIST, CPU).

The model carries the budget (``node_budget=b``, see README "Node removal and compute budgets"): in
training a controller moves each block node's threshold until the node runs on about a share ``b``
of the images; in eval mode ``set_skip_closed`` runs each block only on the images for which its
node is live. Variants per network and budget ``b`` (all with the same recipe):

- ``budget``: ``wiring='dynamic', node_budget=b`` (routers decide what is removed);
- ``random``: the same with ``removal='random'`` (each block node runs on a random share ``b``);
- ``static``: ``wiring='chain'`` with fewer blocks per stage, chosen so that its MACs come closest
  to what the budget asks the DDW model to execute;
- ``off`` (dynamic, no budget) and ``chain`` (the twin): for ``long`` these are the depth
  ablation's runs (``benchmarks/results/depth/long_{dynamic,chain}_seed*.json``: same network,
  recipe and code path), which the report reads when this folder has none of its own.

Networks: ``long`` is the depth ablation's narrow ResNet with stages of [2, 2, 12, 2] blocks
(8 epochs); ``resnet18`` is the main job's ddw_resnet18 at its own widths (3 epochs, same
trainer). Each run's JSON goes to ``benchmarks/results/budget/<network>_<variant>_seed<s>.json`` when it
finishes (reruns skip it), with top-1, the share of block nodes executed, the executed MACs per
image, the number of distinct removal patterns and the removal share per class over the 10,000
test images; the budget runs' weights go to ``models/`` (not committed). ``--timing`` times eager
CPU inference (fp32, interleaved rounds in one process) of the trained seed-0 models against the
twin at batch 1 and 64. ``budget.md`` and ``budget_pareto.png`` are rewritten after each run.

    python benchmarks/budget.py --networks long --budgets 0.6        # 9 runs (2 at a time)
    python benchmarks/budget.py --timing                             # on a quiet machine
    python benchmarks/budget.py --analyse                            # routing reports of the seed-0 models
    python benchmarks/budget.py --report-only
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
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

from timm_ddw.data import FASHION_MNIST_CLASSES  # noqa: E402

HERE = Path(__file__).resolve().parent
NETWORKS: Dict[str, Dict[str, Any]] = {
    'long': dict(layers=(2, 2, 12, 2), stem_width=16, channels=(16, 32, 64, 128), epochs=8),
    'resnet18': dict(layers=(2, 2, 2, 2), stem_width=64, channels=(64, 128, 256, 512), epochs=3),
}
VARIANTS = ('budget', 'random', 'static', 'off', 'chain')
DEPTH_RUNS = {'off': 'dynamic', 'chain': 'chain'}  # the depth ablation's names for the long network's runs


def run_name(network: str, variant: str, budget: Optional[float], seed: int) -> str:
    tag = variant if budget is None or variant in DEPTH_RUNS else f'{variant}{budget:g}'
    return f'{network}_{tag}_seed{seed}'


def base_kwargs(network: str) -> Dict[str, Any]:
    net = NETWORKS[network]
    return dict(in_chans=1, num_classes=10, stem_width=net['stem_width'], channels=tuple(net['channels']),
                layers=tuple(net['layers']))


def block_macs(model: torch.nn.Module, img_size: int) -> Tuple[int, List[int]]:
    """MACs of one image's dense forward, and of each removable block (block nodes 1..n-1 of every
    stage, in stage order): the convolutions and matmuls, as the paper counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    import timm_ddw
    shapes: List[Tuple[torch.nn.Module, torch.Size]] = []
    hooks = []
    for stage in timm_ddw.graph_stages(model).values():
        for j, block in enumerate(stage.children()):
            if 0 < j < stage.num_blocks:
                hooks.append(block.register_forward_hook(lambda m, i, o: shapes.append((m, i[0].shape))))
    skip = {s: s.skip_closed for s in timm_ddw.graph_stages(model).values()}
    timm_ddw.set_skip_closed(model.eval(), False)  # the dense forward: every block runs
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, 1, img_size, img_size))
        for stage, flag in skip.items():
            stage.skip_closed = flag
        for h in hooks:
            h.remove()
        per_block = []
        for block, shape in shapes:
            with FlopCounterMode(display=False) as bc:
                block(torch.zeros(shape))
            per_block.append(bc.get_total_flops() // 2)
    return fc.get_total_flops() // 2, per_block


def matched_layers(network: str, budget: float, img_size: int) -> Tuple[Tuple[int, ...], int, int]:
    """Blocks per stage of the chain whose MACs come closest to the budget's executed MACs
    (ties: the stage depths closest to ``1 + budget * (n - 1)``); with its MACs and the target."""
    import timm
    from ablation import count_macs

    import timm_ddw  # noqa: F401
    full = NETWORKS[network]['layers']
    model = timm.create_model('ddw_resnet18', **base_kwargs(network), node_budget=budget)
    total, per_block = block_macs(model, img_size)
    target = round(total - (1 - budget) * sum(per_block))
    best = None
    for layers in itertools.product(*[range(1, n + 1) for n in full]):
        kw = dict(base_kwargs(network), layers=layers, wiring='chain')
        macs = count_macs(timm.create_model('ddw_resnet18', **kw), img_size)
        spread = sum((a - 1 - budget * (n - 1)) ** 2 for a, n in zip(layers, full))
        key = (abs(macs - target), spread)
        if best is None or key < best[0]:
            best = (key, layers, macs)
    assert best is not None
    return best[1], best[2], target


def model_kwargs(network: str, variant: str, budget: Optional[float], seed: int, img_size: int) -> Dict[str, Any]:
    kw = dict(base_kwargs(network), wiring_seed=seed)
    if variant == 'budget':
        kw.update(wiring='dynamic', node_budget=budget)
    elif variant == 'random':
        kw.update(wiring='dynamic', node_budget=budget, removal='random')
    elif variant == 'static':
        kw.update(wiring='chain', layers=matched_layers(network, budget, img_size)[0])
    elif variant == 'off':
        kw.update(wiring='dynamic')
    else:
        kw.update(wiring='chain')
    return kw


@torch.no_grad()
def removal_stats(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, img_size: int, seed: int,
                  batch_size: int = 500) -> Dict[str, Any]:
    """Over the test set, through the live path (``set_skip_closed``): top-1, the share of block
    nodes executed, executed MACs per image, distinct removal patterns, removal share per class."""
    import timm_ddw
    total, per_block = block_macs(model, img_size)
    fixed = total - sum(per_block)
    timm_ddw.set_skip_closed(model.eval())
    torch.manual_seed(seed)  # the random-removal baseline draws its coins here
    lives, correct = [], 0
    with timm_ddw.capture_routing(model) as cap:
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    for name, stage in timm_ddw.graph_stages(model).items():
        adj = torch.cat(cap[name])
        for j in range(1, stage.num_blocks):  # ran: some input edge open (removed sources close theirs) and,
            ran = adj[:, j, :j].ne(0).any(1)  # with random removal, not closed by its coin (its output edges)
            lives.append(ran & adj[:, j + 1:, j].ne(0).any(1) if stage.removal == 'random' else ran)
    timm_ddw.set_skip_closed(model, False)
    if not lives:  # a chain: every block runs
        return dict(top1_live=100.0 * correct / len(x), executed_share=1.0, executed_block_share=1.0,
                    executed_macs=total, dense_macs=total, patterns=1, removal_per_class=None, node_shares=[])
    live = torch.stack(lives, 1)
    blocks = sum(len(s.preds) - 1 for s in timm_ddw.graph_stages(model).values())
    macs = fixed + live.double() @ torch.tensor(per_block, dtype=torch.float64)
    per_class = [float(1 - live[y == c].float().mean()) for c in range(int(y.max()) + 1)]
    return dict(
        top1_live=100.0 * correct / len(x), executed_share=float(live.float().mean()),
        executed_block_share=float((blocks - (~live).sum(1).double()).mean() / blocks),
        executed_macs=float(macs.mean()), dense_macs=total, patterns=len({tuple(r) for r in live.int().tolist()}),
        removal_per_class=per_class, node_shares=[round(float(v), 4) for v in live.float().mean(0)])


def weights_path(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out_dir) / 'models' / f'{name}.safetensors'


def _worker(args: argparse.Namespace, network: str, variant: str, budget: Optional[float], seed: int) -> str:
    from safetensors.torch import save_file
    run_args = argparse.Namespace(**vars(args))
    run_args.epochs = args.epochs or NETWORKS[network]['epochs']
    kw = model_kwargs(network, variant, budget, seed, args.img_size)
    record, model = train_run(run_args, kw, seed)
    xte, yte = load_split(args.data_dir, 'test', args.test_size, args.img_size)
    name = run_name(network, variant, budget, seed)
    if variant in ('budget', 'random', 'static'):
        path = weights_path(args, name)
        path.parent.mkdir(exist_ok=True)
        save_file(model.state_dict(), str(path))
    record = dict(network=network, variant=variant, node_budget=budget, **record,
                  **removal_stats(model, xte, yte, args.img_size, seed))
    return str(write_json(Path(args.out_dir) / f'{name}.json', record))


# ---------------------------------------------------------------------------------------- timing

def _latency(models: Dict[str, torch.nn.Module], batches: List[torch.Tensor], rounds: int) -> Dict[str, List[float]]:
    """ms per image of each model over ``batches``, the models interleaved and rotated round by round."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    names = list(models)
    with torch.inference_mode():
        for m in models.values():
            for xb in batches[:3]:
                m(xb)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                for xb in batches:
                    models[name](xb)
                times[name].append((time.perf_counter() - t0) * 1000 / sum(len(b) for b in batches))
    return times


def timing(args: argparse.Namespace) -> Dict[str, Any]:
    """Eager CPU inference of the trained seed-0 models against the twin, at batch 1 and 64."""
    import timm
    from safetensors.torch import load_file

    import timm_ddw
    torch.set_num_threads(args.timing_threads)
    out: Dict[str, Any] = dict(threads=args.timing_threads, rounds=args.timing_rounds, load_before=os.getloadavg(),
                               started=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), networks={})
    xte, _ = load_split(args.data_dir, 'test', 10000, args.img_size)
    for network in args.networks:
        models: Dict[str, torch.nn.Module] = {
            'twin': timm.create_model('resnet18', **base_kwargs(network)).eval(),
            'off': timm.create_model('ddw_resnet18', **model_kwargs(network, 'off', None, 0, args.img_size)).eval()}
        for b in args.budgets:
            for variant in ('budget', 'random', 'static'):
                path = weights_path(args, run_name(network, variant, b, 0))
                if not path.exists():
                    continue
                model = timm.create_model('ddw_resnet18', **model_kwargs(network, variant, b, 0, args.img_size))
                model.load_state_dict(load_file(str(path)))
                if variant != 'static':
                    timm_ddw.set_skip_closed(model)
                models[f'{variant}{b:g}'] = model.eval()
        if len(models) == 2:
            continue
        res = {}
        for batch, images in ((1, args.timing_images_b1), (64, args.timing_images_b64)):
            batches = [xte[i:i + batch] for i in range(0, images, batch)]
            torch.manual_seed(0)
            t = _latency(models, batches, args.timing_rounds)
            twin = t['twin']
            res[f'batch{batch}'] = {
                k: dict(median_ms=statistics.median(v), min_ms=min(v), max_ms=max(v),
                        speed_vs_twin=statistics.median([a / b for a, b in zip(twin, v)]),
                        speed_vs_twin_min=min(a / b for a, b in zip(twin, v)),
                        speed_vs_twin_max=max(a / b for a, b in zip(twin, v)))
                for k, v in t.items()}
        out['networks'][network] = res
    out['load_after'] = os.getloadavg()
    write_json(Path(args.out_dir).parent / 'budget_timing.json', out)
    return out


def analyse(args: argparse.Namespace) -> Dict[str, str]:
    """The routing report (``timm_ddw.routing``) of every trained seed-0 budget model over the test set:
    mean, std and closed share of each edge, and how often each node is removed, per class too."""
    import timm
    from safetensors.torch import load_file

    from timm_ddw.routing import collect_routing
    torch.set_num_threads(args.timing_threads)
    xte, yte = load_split(args.data_dir, 'test', args.test_size, args.img_size)
    loader = [(xte[i:i + 500], yte[i:i + 500]) for i in range(0, len(xte), 500)]
    summaries = {}
    for network in args.networks:
        for b in args.budgets:
            name = run_name(network, 'budget', b, 0)
            if not weights_path(args, name).exists():
                continue
            model = timm.create_model('ddw_resnet18', **model_kwargs(network, 'budget', b, 0, args.img_size))
            model.load_state_dict(load_file(str(weights_path(args, name))))
            stats = collect_routing(model, loader, progress=False)
            stats.meta.update(model=name)
            stats.save(Path(args.out_dir).parent / 'budget_routing' / name, overwrite=True)
            summaries[name] = stats.text_summary()
    write_json(Path(args.out_dir).parent / 'budget_routing' / 'summaries.json', summaries)
    return summaries


# ---------------------------------------------------------------------------------------- report

def load_runs(out_dir: Path) -> Dict[Tuple[str, str], List[Dict[str, Any]]]:
    """Runs by (network, variant tag), with the depth ablation's off/chain runs of the long network
    where this folder has none of its own."""
    by: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for p in sorted(out_dir.glob('*.json')):
        r = json.loads(p.read_text())
        tag = run_name(r['network'], r['variant'], r['node_budget'], 0).split('_')[1]
        by.setdefault((r['network'], tag), []).append(r)
    depth = out_dir.parent / 'depth'
    for variant, theirs in DEPTH_RUNS.items():
        if ('long', variant) not in by:
            runs = [json.loads(p.read_text()) for p in sorted(depth.glob(f'long_{theirs}_seed*.json'))]
            for r in runs:
                r.update(network='long', variant=variant, node_budget=None, from_depth_ablation=True,
                         executed_share=1.0, executed_block_share=1.0, executed_macs=r['macs'], patterns=1)
            if runs:
                by[('long', variant)] = runs
    return by


def _order(tag: str) -> Tuple[int, float]:
    for i, v in enumerate(VARIANTS):
        if tag.startswith(v):
            rest = tag[len(v):]
            return i, -float(rest) if rest else 0.0
    return len(VARIANTS), 0.0


def plot(by: Dict[Tuple[str, str], List[Dict[str, Any]]], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    networks = sorted({n for n, _ in by})
    fig, axes = plt.subplots(1, len(networks), figsize=(6 * len(networks), 4.5), squeeze=False)
    colours = dict(budget='tab:blue', random='tab:orange', static='tab:green', off='tab:purple', chain='black')
    for ax, network in zip(axes[0], networks):
        for (net, tag), runs in sorted(by.items(), key=lambda kv: _order(kv[0][1])):
            if net != network:
                continue
            kind = next(v for v in VARIANTS if tag.startswith(v))
            macs = np.array([r['executed_macs'] / 1e6 for r in runs])
            top1 = np.array([r['top1'] for r in runs])
            ax.errorbar(macs.mean(), top1.mean(), yerr=top1.std(ddof=1) if len(runs) > 1 else 0, fmt='o',
                        color=colours[kind], capsize=3)
            ax.annotate(tag, (macs.mean(), top1.mean()), textcoords='offset points', xytext=(5, 4), fontsize=8)
        ax.set_xlabel('MACs executed per image (M)')
        ax.set_ylabel('top-1 % (mean +- std over seeds)')
        ax.set_title(f'{network}: accuracy against executed compute')
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: Path, command: str) -> Path:
    by = load_runs(out_dir)
    lines = ['# Node removal that pays: compute budgets on Fashion-MNIST', '',
             'Generated by `benchmarks/budget.py`; every run\'s JSON is in [`budget/`](budget/). Commands:', '',
             '```', command, '```', '',
             'Top-1 on all 10,000 test images after the last epoch (eval mode); *executed* = share of the '
             'removable block nodes (nodes 1..n-1 of each stage; the input node of a stage always runs) that ran '
             'per image, through the live path (`set_skip_closed`); *blocks* = the same over all blocks; MACs '
             'executed per image count convolutions and matmuls of the blocks that ran (routers and sums of the '
             'DDW models are in the fixed part); patterns = distinct sets of executed nodes over the test set. '
             'Rows `off` and `chain` of `long` are the depth ablation\'s runs (same network, recipe and code path) '
             'unless marked otherwise.', '']
    for network in NETWORKS:
        rows = sorted([(tag, rs) for (n, tag), rs in by.items() if n == network], key=lambda kv: _order(kv[0]))
        if not rows:
            continue
        r0 = rows[0][1][0]
        lines += [f"## {network}: stages of {list(NETWORKS[network]['layers'])} blocks, widths "
                  f"{list(NETWORKS[network]['channels'])}, {r0['budget']['epochs']} epochs", '',
                  '| variant | layers | seeds | top-1 % mean | std | per seed | executed | blocks | MACs (M) | '
                  'patterns | train time (s) |', '|---|---|---|---|---|---|---|---|---|---|---|']
        for tag, rs in rows:
            m, s = _stats([r['top1'] for r in rs])
            lines.append(
                f"| {tag} | {r0_layers(rs[0])} | {len(rs)} | {m:.2f} | {s:.2f} | "
                f"{', '.join(format(r['top1'], '.2f') for r in rs)} | "
                f"{np.mean([r['executed_share'] for r in rs]):.3f} | "
                f"{np.mean([r['executed_block_share'] for r in rs]):.3f} | "
                f"{np.mean([r['executed_macs'] for r in rs]) / 1e6:.2f} | "
                f"{np.mean([r['patterns'] for r in rs]):.0f} | {np.mean([r['train_time_s'] for r in rs]):.0f} |")
        groups = {tag: [r['top1'] for r in rs] for tag, rs in rows}
        lines += ['', '| comparison | difference (points) | 95% interval | verdict |', '|---|---|---|---|']
        for tag in groups:
            if not tag.startswith('budget'):
                continue
            b = tag[len('budget'):]
            for other in ('chain', 'off', f'static{b}', f'random{b}'):
                if other in groups:
                    d, _, verdict, hw = _compare(groups[tag], groups[other])
                    lines.append(f'| {tag} vs {other} | {d:+.2f} | {d - hw:+.2f} .. {d + hw:+.2f} | {verdict} |')
        per_class = [(tag, rs) for tag, rs in rows if rs[0].get('removal_per_class') and rs[0]['executed_share'] < 1]
        if per_class:
            lines += ['', 'Share of removable block nodes removed, per class of the test set (mean over seeds):', '',
                      '| variant | ' + ' | '.join(FASHION_MNIST_CLASSES) + ' |', '|---|' + '---|' * 10]
            for tag, rs in per_class:
                vals = np.mean([r['removal_per_class'] for r in rs], 0)
                lines.append(f'| {tag} | ' + ' | '.join(f'{v:.3f}' for v in vals) + ' |')
        lines.append('')
    timing_path = out_dir.parent / 'budget_timing.json'
    if timing_path.exists():
        t = json.loads(timing_path.read_text())
        lines += ['## Inference time against the twin (eager CPU, fp32)', '',
                  f"{t['threads']} threads, {t['rounds']} interleaved rounds in one process, started {t['started']}; "
                  f"load average before {t['load_before'][0]:.2f}, after {t['load_after'][0]:.2f}. Speed = twin's "
                  'time / model\'s time per round, median (min-max over rounds); above 1 is faster than the twin.', '',
                  '| network | model | batch 1: ms/image | speed vs twin | batch 64: ms/image | speed vs twin |',
                  '|---|---|---|---|---|---|']
        for network, res in t['networks'].items():
            for k in res['batch1']:
                a, b = res['batch1'][k], res['batch64'][k]
                lines.append(f"| {network} | {k} | {a['median_ms']:.3f} | {a['speed_vs_twin']:.3f} "
                             f"({a['speed_vs_twin_min']:.2f}-{a['speed_vs_twin_max']:.2f}) | {b['median_ms']:.4f} | "
                             f"{b['speed_vs_twin']:.3f} ({b['speed_vs_twin_min']:.2f}-{b['speed_vs_twin_max']:.2f}) |")
        lines.append('')
    routing = out_dir.parent / 'budget_routing' / 'summaries.json'
    if routing.exists():
        lines += ['## Routing of the trained budget models (seed 0, test set)', '',
                  'The routing report (`timm_ddw.routing`, as `timm-ddw routing` writes it) of each: files in '
                  '[`budget_routing/`](budget_routing/).', '']
        for text in json.loads(routing.read_text()).values():
            lines += ['```', text, '```', '']
    png = plot(by, out_dir.parent / 'budget_pareto.png')
    if png:
        lines += [f'![accuracy against executed MACs]({png.name})', '']
    path = out_dir.parent / 'budget.md'
    path.write_text('\n'.join(lines) + '\n')
    return path


def r0_layers(r: Dict[str, Any]) -> str:
    return 'x'.join(str(v) for v in r.get('layers') or r['model_args'].get('layers', []))


# ---------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--networks', nargs='+', default=['long'], choices=list(NETWORKS))
    p.add_argument('--budgets', nargs='+', type=float, default=[0.8, 0.6, 0.4])
    p.add_argument('--variants', nargs='+', default=['budget', 'random', 'static'], choices=VARIANTS)
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--timing', action='store_true', help='time the trained seed-0 models against the twin')
    p.add_argument('--analyse', action='store_true', help='routing report of the trained seed-0 budget models')
    p.add_argument('--report-only', action='store_true')
    add_recipe_args(p, train_size=60000, epochs=0, epochs_help="0: the network's own (long 8, resnet18 3)")
    p.add_argument('--jobs', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--timing-threads', type=int, default=2)
    p.add_argument('--timing-rounds', type=int, default=7)
    p.add_argument('--timing-images-b1', type=int, default=200)
    p.add_argument('--timing-images-b64', type=int, default=1024)
    p.add_argument('--data-dir', default=DATA_DIR)
    p.add_argument('--out-dir', default=str(HERE / 'results' / 'budget'))
    args = p.parse_args(argv)
    args.model = 'ddw_resnet18'
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = recorded_command(out_dir.parent / 'budget.md', 'budget.py', argv,
                               args.report_only or args.timing or args.analyse)
    if args.timing:
        print(json.dumps(timing(args)['networks'], indent=1))
    elif args.analyse:
        print('\n'.join(analyse(args).values()))
    elif not args.report_only:
        runs = []
        for seed in args.seeds:
            for network in args.networks:
                for variant in args.variants:
                    for b in ([None] if variant in DEPTH_RUNS else args.budgets):
                        runs.append((network, variant, b, seed))
        run_pending(runs, lambda r: (out_dir / f'{run_name(*r)}.json').exists(), _worker, args, args.jobs,
                    lambda: write_report(out_dir, command))
    print('wrote', write_report(out_dir, command))
    return 0


if __name__ == '__main__':
    sys.exit(main())
