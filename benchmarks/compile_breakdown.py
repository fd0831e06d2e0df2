"""Where DDW's extra compile time goes: cold inductor compiles of the twin and of three DDW wirings.

Each variant compiles in its own fresh process with an empty inductor cache, one mode per process
(so no kernel is reused from an earlier graph): the twin, ``wiring='chain'`` (DDW's stage code, no
sums), ``wiring='static'`` (the complete graph's sums, one learned weight per edge, no routers),
``dynamic`` (sums and routers) and ``dynamic-fused`` (the same with the opt-in
``timm_ddw::weighted_sum`` operator, timm_ddw/fused.py, instead of inductor's own sums). Beside the
compile time (first call minus a steady call) it records inductor's phases from
``torch._dynamo.utils.compilation_time_metrics`` (fusion scheduling, code generation, waiting for
the C++ compiler) and how many kernels were built, so
static - chain is the sums' share and dynamic - static the routers'. One JSON per (model, mode,
variant) in ``results/compile_breakdown/`` (skipped when present); the table goes to
``results/compile_breakdown.md``.

    python benchmarks/compile_breakdown.py --models ddw_resnet101 --modes infer     # about 5 min
    python benchmarks/compile_breakdown.py --report-only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, load_note, recorded_command, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / 'results' / 'compile_breakdown'
REPORT = HERE / 'results' / 'compile_breakdown.md'
VARIANTS = ('twin', 'chain', 'static', 'dynamic', 'dynamic-fused')
# inductor phases (compilation_time_metrics keys) and the names the report gives them
PHASES = {'Scheduler.__init__': 'fusion', 'Scheduler.codegen': 'codegen', 'async_compile.wait': 'C++ wait'}


def child(args: argparse.Namespace) -> Dict[str, Any]:
    """In a fresh process (the parent set an empty TORCHINDUCTOR_CACHE_DIR): one cold compile."""
    import timm
    import torch
    import torch._dynamo.utils as dynamo_utils

    import timm_ddw  # noqa: F401  (registers the models)
    from timm_ddw import fused
    from timm_ddw.models import TWINS
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, mode, variant = args.models[0], args.modes[0], args.child
    kw = {} if variant == 'twin' else dict(wiring=variant.split('-')[0])
    fused.set_enabled(variant == 'dynamic-fused')
    net = timm.create_model(TWINS[model] if variant == 'twin' else model, num_classes=1000, **kw)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    fn = torch.compile(net, fullgraph=True)
    if fused.enabled():
        fused.kernel_available()  # build the C++ sum kernel before the clock starts (cached per machine)
    net.train(mode == 'train')

    def step() -> float:
        t0 = time.perf_counter()
        if mode == 'train':
            torch.nn.functional.cross_entropy(fn(x), y).backward()
        else:
            with torch.no_grad():
                fn(x)
        return time.perf_counter() - t0

    first = step()
    steady = sorted(step() for _ in range(3))[1]
    cache = Path(os.environ['TORCHINDUCTOR_CACHE_DIR'])
    phases = {name: sum(dynamo_utils.compilation_time_metrics.get(key, [])) for key, name in PHASES.items()}
    return dict(compile_s=first - steady, step_s=steady, phases_s=phases, kernels=len(list(cache.rglob('*.so'))))


def run_one(args: argparse.Namespace, model: str, mode: str, variant: str) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix='ddw_breakdown_') as cache:
        cmd = [sys.executable, os.path.abspath(__file__), '--child', variant, '--models', model, '--modes', mode,
               '--batch-size', str(args.batch_size), '--img-size', str(args.img_size), '--threads', str(args.threads)]
        res = subprocess.run(cmd, env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache), stdout=subprocess.PIPE,
                             text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed with exit status {res.returncode}')
    record = json.loads(res.stdout.strip().splitlines()[-1])
    return dict(record, model=model, mode=mode, variant=variant, batch=args.batch_size, px=args.img_size,
                environment=environment('cpu', args.threads, 1))


def report(records: List[Dict[str, Any]], argv: Optional[List[str]], report_only: bool) -> str:
    """One row per (model, mode, variant); ratios against the twin of the same model and mode."""
    twins = {(r['model'], r['mode']): r for r in records if r['variant'] == 'twin'}
    lines = ['# Compile time by part: twin, chain, static and dynamic wirings (inductor\'s sums or fused)', '',
             'Cold inductor compiles, each in its own process with an empty cache, one mode per process '
             '(nothing reused from an earlier graph); written by `benchmarks/compile_breakdown.py`.', '',
             '```', recorded_command(REPORT, 'compile_breakdown.py', argv, report_only), '```', '',
             f'Machine: {load_note([r["environment"] for r in records])}. One process per row: single '
             'measurements (compile times on this machine vary by about 10-30% between runs).', '',
             '| model | mode | variant | compile s | x twin | ' + ' | '.join(f'{p} s' for p in PHASES.values())
             + ' | kernels | step s |', '|' + '---|' * (7 + len(PHASES))]
    for r in sorted(records, key=lambda r: (r['model'], r['mode'], VARIANTS.index(r['variant']))):
        twin = twins.get((r['model'], r['mode']))
        ratio = f"{r['compile_s'] / twin['compile_s']:.2f}" if twin else '-'
        phases = ' | '.join(f"{r['phases_s'][p]:.1f}" for p in PHASES.values())
        lines.append(f"| {r['model']} | {r['mode']} | {r['variant']} | {r['compile_s']:.1f} | {ratio} | {phases} | "
                     f"{r['kernels']} | {r['step_s']:.3f} |")
    return '\n'.join(lines) + '\n'


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=['ddw_resnet101'])
    p.add_argument('--modes', nargs='+', choices=('train', 'infer'), default=['infer'])
    p.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--report-only', action='store_true')
    p.add_argument('--child', choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for model in args.models:
            for mode in args.modes:
                for variant in args.variants:
                    path = OUT / f'{model}_{mode}_{variant}.json'
                    if path.exists():
                        continue
                    print(f'{model} {mode} {variant}: compiling', flush=True)
                    write_json(path, run_one(args, model, mode, variant))
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob('*.json'))]
    REPORT.write_text(report(records, argv, args.report_only))
    print(REPORT.read_text())


if __name__ == '__main__':
    main()
