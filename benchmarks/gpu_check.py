"""One GPU check that fits in a few minutes: DDW against its timm twin where it will be trained.

For ddw_resnet50, ddw_resnet101, ddw_regnetx_1600m and ddw_efficientnet_b0 against their twins, at
batch 128, 224 px, channels_last, under bfloat16 autocast and under float16 autocast with a
GradScaler, eager and ``torch.compile``-d: training-step and inference throughput (interleaved
rounds, median), peak memory (``torch.cuda.max_memory_allocated``), the DDW/twin ratios, whether
every loss and logit is finite, and each model's first call (compiled: the compilation; the twin
compiles first, so the DDW model finds the kernels they share cached). Then the blocked-sum
inference path (CPU-only in the library) is timed once on the GPU against the per-node sums, to
decide whether it should stay CPU-only, and ddw_resnet101's gap to its twin is split as on the CPU
(``speed.py``'s ddw-chain and ddw-learned: the graph stage alone, then the sums, then the routers).
Cells run in priority order (eager bfloat16 first, compiled float16 last) under a time budget; a
cell that would start past it is recorded as skipped, so the command ends in time and says what it
did not measure.

    python benchmarks/gpu_check.py                  # about 9 minutes on one GPU; one JSON
    python benchmarks/gpu_check.py --smoke          # seconds on CPU: every code path, tiny sizes (CI)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, write_json  # noqa: E402
from speed import WIRING_VARIANTS, Bench, _sync, cuda_peak_mib, throughput  # noqa: E402

import timm_ddw  # noqa: E402
import timm_ddw.graph as graph  # noqa: E402
from timm_ddw.models import TWINS  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = ('ddw_resnet50', 'ddw_resnet101', 'ddw_regnetx_1600m', 'ddw_efficientnet_b0')
AMPS = ('bfloat16', 'float16')


def cells(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every (model, amp, compiled) cell, most important first."""
    eager = [dict(model=m, amp=a, compiled=False) for a in args.amps for m in args.models]
    return eager + [dict(model=m, amp=a, compiled=True) for a in args.compile_amps for m in args.compile_models]


def bench_args(args: argparse.Namespace, amp: str, compiled: bool) -> argparse.Namespace:
    return argparse.Namespace(
        batch_size=args.batch_size, img_size=args.img_size, channels_last=args.channels_last, amp_dtype=amp,
        compile=compiled, compile_backend=args.compile_backend, features_only=False, grad_checkpointing=False,
        aggregation=None, wiring=None)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


def interleaved_rounds(args: argparse.Namespace, benches: Dict[str, Bench], mode: str) -> Dict[str, List[float]]:
    """img/s of every model per round, the order reversed every other round."""
    rounds: Dict[str, List[float]] = {name: [] for name in benches}
    for r in range(args.rounds):
        for name in (list(benches) if r % 2 == 0 else list(benches)[::-1]):
            rounds[name].append(throughput(benches[name], mode, 'ddw', args.steps, 0))
    return rounds


def run_cell(args: argparse.Namespace, device: torch.device, model: str, amp: str, compiled: bool) -> Dict[str, Any]:
    """Twin and DDW side by side: finiteness, interleaved throughput rounds, peak memory."""
    t0 = time.perf_counter()
    benches = {'twin': Bench(TWINS[model], bench_args(args, amp, compiled), device),
               'ddw': Bench(model, bench_args(args, amp, compiled), device)}
    cell: Dict[str, Any] = dict(model=model, twin=TWINS[model], amp=amp, compiled=compiled)
    # Inference first, on the freshly initialised pair: after a few SGD steps BatchNorm's running
    # statistics are still mostly their initial (0, 1), so random-init timm EfficientNet grows about
    # 10x per block in eval mode (1e29 at the head, NaN under bfloat16 with one thread), twin and DDW
    # alike. That would test timm's initialisation, not DDW.
    for mode in sorted(args.modes, key=['infer', 'train'].index):
        finite, first_s = {}, {}
        for name, b in benches.items():  # also the warm-up (and, compiled, the compilation)
            t = time.perf_counter()
            first = _finite(b.step(mode))
            _sync(device)
            first_s[name] = time.perf_counter() - t
            finite[name] = first and all(_finite(b.step(mode)) for _ in range(args.warmup - 1))
        rounds = interleaved_rounds(args, benches, mode)
        ratios = [d / t for d, t in zip(rounds['ddw'], rounds['twin'], strict=True)]
        peak = {name: cuda_peak_mib(b, mode, 'ddw') if device.type == 'cuda' else None for name, b in benches.items()}
        cell[mode] = dict(
            img_s={name: statistics.median(v) for name, v in rounds.items()},
            ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
            peak_mib=peak, memory_ratio=None if peak['twin'] is None else peak['ddw'] / peak['twin'],
            finite=finite, first_call_s=first_s)
    cell['seconds'] = time.perf_counter() - t0
    return cell


def blocked_sums_on_device(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """ddw_resnet101 inference with the blocked sums allowed on this device, against per-node sums."""
    b = Bench('ddw_resnet101', bench_args(args, 'bfloat16', False), device)
    stages = timm_ddw.graph_stages(b.model).values()
    times: Dict[str, List[float]] = {'per_node': [], 'blocked': []}
    outs = {}
    saved = set(graph.BLOCKED_SUM_DEVICES)
    try:
        for r in range(args.rounds):
            for mode in (('per_node', 'blocked') if r % 2 == 0 else ('blocked', 'per_node')):
                graph.BLOCKED_SUM_DEVICES.clear()
                graph.BLOCKED_SUM_DEVICES.update(saved | {device.type} if mode == 'blocked' else saved - {device.type})
                outs[mode] = b.step('infer').float()
                times[mode].append(throughput(b, 'infer', 'ddw', args.steps, 1))
    finally:
        graph.BLOCKED_SUM_DEVICES.clear()
        graph.BLOCKED_SUM_DEVICES.update(saved)
    used = any(2 * s.sum_block_size < s.num_blocks for s in stages)
    return dict(model='ddw_resnet101', amp='bfloat16', img_s={k: statistics.median(v) for k, v in times.items()},
                speedup=statistics.median(times['blocked']) / statistics.median(times['per_node']),
                max_abs_difference=float((outs['blocked'] - outs['per_node']).abs().max()), blocked_stage=used)


def gap_split_on_device(args: argparse.Namespace, device: torch.device, model: str = 'ddw_resnet101') -> Dict[str, Any]:
    """Eager bfloat16 twin, then the DDW model under wiring='chain', 'static' and its own, in interleaved
    rounds: neighbouring ratios say what the stage, the sums and the routers each cost on this device."""
    wirings = {'twin': None, 'chain': WIRING_VARIANTS['ddw-chain'], 'static': WIRING_VARIANTS['ddw-learned'],
               'dynamic': None}
    benches = {name: Bench(TWINS[model] if name == 'twin' else model, bench_args(args, 'bfloat16', False), device, w)
               for name, w in wirings.items()}
    split: Dict[str, Any] = dict(model=model, amp='bfloat16', compiled=False, wirings={
        name: sorted({s.wiring for s in timm_ddw.graph_stages(b.model).values()}) for name, b in benches.items()})
    for mode in sorted(args.modes, key=['infer', 'train'].index):  # inference first, as in run_cell
        for b in benches.values():
            for _ in range(args.warmup):
                b.step(mode)
        rounds = interleaved_rounds(args, benches, mode)
        names = list(benches)
        split[mode] = dict(img_s={n: statistics.median(v) for n, v in rounds.items()}, ratios={
            f'{b}/{a}': statistics.median(x / y for x, y in zip(rounds[b], rounds[a], strict=True))
            for a, b in zip(names, names[1:])})
    return split


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--smoke', action='store_true', help='CPU, tiny sizes, one round: checks every code path')
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(TWINS))
    p.add_argument('--compile-models', nargs='+', default=None, help='default: --models')
    p.add_argument('--amps', nargs='+', default=list(AMPS), choices=AMPS)
    p.add_argument('--compile-amps', nargs='+', default=None, choices=AMPS, help='default: --amps')
    p.add_argument('--modes', nargs='+', default=['train', 'infer'], choices=['train', 'infer'])
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--no-channels-last', dest='channels_last', action='store_false')
    p.add_argument('--compile-backend', default='inductor')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--budget-s', type=float, default=420.0, help='no new cell starts after this many seconds')
    p.add_argument('--device', default='cuda')
    p.add_argument('--json', default=str(HERE / 'results' / 'gpu_check.json'))
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.batch_size, args.img_size, args.rounds, args.steps, args.warmup = 'cpu', 2, 32, 1, 1, 1
        if args.models == p.get_default('models'):  # one residual and one inverted-residual family
            args.models = ['ddw_resnet50', 'ddw_efficientnet_b0']
        args.compile_backend = 'aot_eager'  # compiles in seconds; inductor is what the GPU run measures
        args.compile_models = args.compile_models or ['ddw_resnet18']  # the smallest graph to trace
        args.compile_amps = args.compile_amps or args.amps[:1]
        if args.json == p.get_default('json'):
            args.json = str(HERE / 'results' / 'gpu_check_smoke.json')
    args.compile_models = args.compile_models or args.models
    args.compile_amps = args.compile_amps or args.amps
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('no CUDA device here: run it where a GPU is, or use --smoke on CPU')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    results: Dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        env=environment(str(device), torch.get_num_threads(), 1),
        date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), args=vars(args), cells=[], skipped=[])
    for c in cells(args):
        if time.perf_counter() - start > args.budget_s:
            results['skipped'].append(dict(c, reason='time budget'))
            continue
        try:
            cell = run_cell(args, device, **c)
        except torch.cuda.OutOfMemoryError as e:  # say so and go on: the other cells still fit
            results['skipped'].append(dict(c, reason=f'out of memory: {str(e).splitlines()[0]}'))
            torch.cuda.empty_cache()
            continue
        results['cells'].append(cell)
        print(json.dumps({k: cell[k] for k in ('model', 'amp', 'compiled')}),
              ' '.join(f"{m}: ratio {cell[m]['ratio']:.3f} mem {cell[m]['memory_ratio'] or float('nan'):.3f} "
                       f"finite {all(cell[m]['finite'].values())}" for m in args.modes), flush=True)
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    if time.perf_counter() - start <= args.budget_s + 60:
        results['blocked_sums'] = blocked_sums_on_device(args, device)
        print('blocked sums:', json.dumps(results['blocked_sums']), flush=True)
    if time.perf_counter() - start <= args.budget_s + 90:
        results['gap_split'] = gap_split_on_device(args, device)
        print('gap split:', json.dumps(results['gap_split']), flush=True)
    results['seconds'] = time.perf_counter() - start
    results['all_finite'] = all(all(cell[m]['finite'].values()) for cell in results['cells'] for m in args.modes)
    print('wrote', write_json(Path(args.json), results), f"({results['seconds']:.0f} s)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
