"""Compiled DDW against its compiled timm twin, all nine models: compile time and throughput.

``torch.compile(model, fullgraph=True)`` (inductor, CPU, fp32) of each DDW model and of its twin.
Compile time is cold, first call to first call: each model compiles in its own fresh process with
an empty inductor cache (a training step, then an inference batch), and the time of that first
call minus a steady call is its compile time. Throughput is then measured side by side in one
more process that loads both compiled models from those two caches: interleaved rounds, the order
alternating, ratio = DDW img/s / twin img/s per round. One JSON per model in ``results/compiled/``
(skipped when present, so the command resumes); the table goes to ``results/compiled.md``.

    python benchmarks/compiled.py                              # about 80 min on 2 idle cores
    python benchmarks/compiled.py --models ddw_resnet18 --rounds 3
    python benchmarks/compiled.py --report-only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, load_note, recorded_command, t_975, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / 'results' / 'compiled'
REPORT = HERE / 'results' / 'compiled.md'
# smallest first, so that results arrive early
MODELS = ('ddw_resnet18', 'ddw_mobilenetv2_100', 'ddw_efficientnet_b0', 'ddw_regnetx_600m', 'ddw_regnety_600m',
          'ddw_regnetx_1600m', 'ddw_resnet50', 'ddw_resnext50_32x4d', 'ddw_resnet101')
MODES = ('train', 'infer')
THROUGHPUT_TARGET = 0.97
COMPILE_TIME_TARGET = 2.0


def _bench(model: str, variant: str, args: argparse.Namespace):
    """speed.py's Bench (model, optimizer, inputs, steps), compiled with fullgraph=True."""
    import speed

    from timm_ddw.models import TWINS
    bench_args = speed.parse_args(['--model', model, '--batch-size', str(args.batch_size),
                                   '--img-size', str(args.img_size), '--compile',
                                   '--compile-backend', args.backend])
    return speed.Bench(TWINS[model] if variant == 'twin' else model, bench_args, speed.torch.device('cpu'))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compile_child(args: argparse.Namespace) -> Dict[str, float]:
    """In a fresh process with an empty cache: first call (compile + run) and steady calls, per mode."""
    bench = _bench(args.models[0], args.child[1], args)
    out: Dict[str, float] = {}
    for mode in MODES:
        first = _timed(lambda m=mode: bench.step(m))
        steady = statistics.median(_timed(lambda m=mode: bench.step(m)) for _ in range(3))
        out.update({f'{mode}_first_s': first, f'{mode}_step_s': steady, f'{mode}_compile_s': first - steady})
    return out


def bench_child(args: argparse.Namespace) -> Dict[str, Any]:
    """Both compiled models (from the children's caches) side by side, interleaved rounds."""
    import speed
    benches = {v: _bench(args.models[0], v, args) for v in ('twin', 'ddw')}
    warm = {f'{v}_{mode}_first_s': _timed(lambda b=b, m=mode: b.step(m)) for v, b in benches.items() for mode in MODES}
    # steps per timed window: at least --steps, and enough for --window-s seconds (short windows are noisy)
    steps = {mode: max(args.steps, math.ceil(args.window_s / min(_timed(lambda b=b, m=mode: b.step(m))
                                                                for b in benches.values())))
             for mode in MODES}
    rounds: Dict[str, List[Dict[str, float]]] = {mode: [] for mode in MODES}  # per round: img/s, ratio
    for r in range(args.rounds):
        for mode in MODES:
            order = ('twin', 'ddw') if r % 2 == 0 else ('ddw', 'twin')
            ips = {v: speed.throughput(benches[v], mode, 'static' if v == 'twin' else 'ddw', steps[mode], 1)
                   for v in order}
            rounds[mode].append(dict(ips, ratio=ips['ddw'] / ips['twin']))
        print(f'round {r + 1}/{args.rounds}: ' + ', '.join(f"{m} {rounds[m][-1]['ratio']:.3f}" for m in MODES),
              file=sys.stderr, flush=True)
    return dict(warm_first_calls=warm, steps_per_window=steps, throughput=rounds)


def _child(args: argparse.Namespace, kind: List[str], cache: Path) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), '--child', *kind, '--models', args.models[0],
           '--batch-size', str(args.batch_size), '--img-size', str(args.img_size), '--threads', str(args.threads),
           '--rounds', str(args.rounds), '--steps', str(args.steps), '--window-s', str(args.window_s),
           '--backend', args.backend]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed with exit status {res.returncode}')
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_model(args: argparse.Namespace, model: str) -> Dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix='ddw_compiled_'))
    try:
        margs = argparse.Namespace(**{**vars(args), 'models': [model]})
        started = time.time()
        record: Dict[str, Any] = dict(model=model, batch=args.batch_size, px=args.img_size, backend=args.backend,
                                      threads=args.threads, rounds=args.rounds, steps=args.steps,
                                      load_average_before=list(os.getloadavg()))
        merged = root / 'both'
        for variant in ('twin', 'ddw'):
            print(f'{model}: compiling the {variant} (cold cache)', flush=True)
            record[f'{variant}_compile'] = _child(margs, ['compile', variant], root / variant)
            shutil.copytree(root / variant, merged, dirs_exist_ok=True)
        print(f'{model}: interleaved rounds', flush=True)
        record.update(_child(margs, ['bench'], merged))
        record['wall_s'] = time.time() - started
        record['environment'] = environment('cpu', args.threads, 1)
        record['ended_utc'] = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
        return record
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _median_range(values: List[float]) -> str:
    return f'{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})'


def geometric_interval(ratios: List[float]) -> Tuple[float, float, float]:
    """Geometric mean of per-round ratios and its 95% interval (Student's t on the log ratios)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = t_975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.inf
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def summary(rec: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = dict(model=rec['model'])
    for mode in MODES:
        ratios = [r['ratio'] for r in rec['throughput'][mode]]
        twin_c, ddw_c = rec['twin_compile'][f'{mode}_compile_s'], rec['ddw_compile'][f'{mode}_compile_s']
        out[mode] = dict(ratio_median=statistics.median(ratios), ratios=ratios, twin_compile_s=twin_c,
                         ddw_compile_s=ddw_c, compile_ratio=ddw_c / twin_c)
    return out


def throughput_verdict(median: float, lo: float, hi: float) -> str:
    """'met' or 'not met' only where the whole interval is on one side of the target."""
    if lo >= THROUGHPUT_TARGET:
        return 'met'
    if hi < THROUGHPUT_TARGET:
        return 'not met'
    return f"unresolved (median {'above' if median >= THROUGHPUT_TARGET else 'below'})"


def report(records: List[Dict[str, Any]], argv: Optional[List[str]], report_only: bool) -> str:
    envs = [r['environment'] for r in records]
    first = records[0] if records else {}
    lines = ['# Compiled DDW against the compiled twin (inductor, CPU)', '',
             'Generated by `benchmarks/compiled.py`; one JSON per model in [`compiled/`](compiled/) with every '
             'round and both compile processes.', '', '```', recorded_command(REPORT, 'compiled.py', argv, report_only),
             '```', '',
             f"Machine: {first.get('environment', {}).get('host_cpus', '?')} cores, "
             f"{first.get('threads', '?')} threads, torch {first.get('environment', {}).get('torch', '?')}, "
             f"timm {first.get('environment', {}).get('timm', '?')}, fp32, `torch.compile(fullgraph=True)`, "
             f"backend {first.get('backend', '?')}, batch {first.get('batch', '?')}, {first.get('px', '?')} px; "
             f"{load_note(envs)}; runs ended {first.get('ended_utc', '?')} to "
             f"{records[-1]['ended_utc'] if records else '?'}.",
             '',
             f'Throughput ratio = DDW img/s / twin img/s per round ({first.get("rounds", "?")} interleaved rounds; '
             'per model and mode a window of 3 steps, or, from the runs that record `steps_per_window`, of at least '
             '3 steps and 2 s), median (min-max); '
             f'target >= {THROUGHPUT_TARGET}. Compile time = '
             'first call - steady call, each model in a fresh process with an empty inductor cache '
             f'(training step first, then inference, which reuses the kernels the two graphs share: more of them '
             'in the twin; [`compile_breakdown.md`](compile_breakdown.md) compiles each mode on its own); '
             f'target DDW <= {COMPILE_TIME_TARGET}x twin.',
             'The geometric mean of the rounds\' ratios comes with its 95% interval (Student\'s t on log ratios); '
             'a target is met or not met only where the whole interval lies on one side of it, else unresolved.',
             '', '| model | mode | throughput DDW / twin, median (min-max) | geometric mean (95% interval) | target '
             '| compile s, twin | compile s, DDW | DDW / twin | target |',
             '|---|---|---|---|---|---|---|---|---|']
    for rec in records:
        s = summary(rec)
        for mode in MODES:
            m = s[mode]
            gm, lo, hi = geometric_interval(m['ratios'])
            met = throughput_verdict(m['ratio_median'], lo, hi)
            cmet = 'met' if m['compile_ratio'] <= COMPILE_TIME_TARGET else 'not met'
            lines.append(f"| {rec['model']} | {mode} | {_median_range(m['ratios'])} | {gm:.3f} ({lo:.3f}-{hi:.3f}) "
                         f"| {met} | "
                         f"{m['twin_compile_s']:.0f} | {m['ddw_compile_s']:.0f} | {m['compile_ratio']:.2f} | {cmet} |")
    return '\n'.join(lines) + '\n'


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--steps', type=int, default=3, help='timed steps per model, mode and round, at least')
    p.add_argument('--window-s', type=float, default=2.0, help='... and enough steps for this many seconds')
    p.add_argument('--backend', default='inductor')
    p.add_argument('--report-only', action='store_true')
    p.add_argument('--child', nargs='+', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ('batch_size', 'img_size', 'threads', 'rounds', 'steps'):
        if getattr(args, key) <= 0:
            p.error(f'--{key.replace("_", "-")}={getattr(args, key)} must be positive')
    if args.window_s < 0:
        p.error(f'--window-s={args.window_s} must be >= 0')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(compile_child(args) if args.child[0] == 'compile' else bench_child(args)))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for model in args.models:
            path = OUT / f'{model}_b{args.batch_size}_{args.img_size}.json'
            if path.exists():
                print(f'{model}: done ({path.name})')
                continue
            write_json(path, run_model(args, model))
            print('wrote', path, flush=True)
    paths = [OUT / f'{m}_b{args.batch_size}_{args.img_size}.json' for m in MODELS]
    records = [json.loads(p.read_text()) for p in paths if p.exists()]
    REPORT.write_text(report(records, argv, args.report_only))
    print(REPORT.read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
