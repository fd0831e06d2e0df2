"""Is the opt-in operator's C++ sum (timm_ddw/csrc/weighted_sum.cpp) as fast as inductor's own?

A compiled stage with ``timm_ddw.fused`` sums every node's input through one C++ kernel; without
it inductor generates one fused kernel per node. This script times the two on the same inputs, in
isolation, at the feature-map shapes and in-degrees of DDW's stages (channels_last, as inductor
runs its convolutions), beside the eager ``addcmul_`` chain: interleaved rounds in one process,
median milliseconds per sum and the ratio to inductor's (> 1: faster). Inputs are reused between
calls, so the smaller sums run from cache; ResNet-101's deepest nodes (23 inputs of 2 MiB at
batch 8, 128 px) do not fit it.

    python benchmarks/fused_sum.py                  # ~2 min on 2 cores
    python benchmarks/fused_sum.py --profile-model ddw_resnet101   # + ~3 min: where a compiled step goes

``--profile-model`` compiles the model's inference graph with the operator off and on and profiles
a few steady steps of each (torch.profiler, self CPU ms per step of every operator, top rows).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, write_json  # noqa: E402

from timm_ddw import fused  # noqa: E402
from timm_ddw.graph import weighted_sum  # noqa: E402

HERE = Path(__file__).resolve().parent
# (batch, channels, height, width) and in-degrees: ResNet-50/101 stages at batch 8, 128 px
CASES = [((8, 256, 32, 32), (2, 4)), ((8, 512, 16, 16), (3, 6)), ((8, 1024, 8, 8), (4, 12, 16, 23)),
         ((8, 2048, 4, 4), (3,))]
CONTENDERS = ('inductor', 'operator', 'addcmul_')


def traced_sum(xs: List[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """What inductor fuses per node with the operator off: one multiply-add per edge, traced."""
    out = xs[0] * w[:, 0].reshape(-1, 1, 1, 1)
    for k in range(1, len(xs)):
        out = out + xs[k] * w[:, k].reshape(-1, 1, 1, 1)
    return out


def contenders() -> Dict[str, Callable[[List[torch.Tensor], torch.Tensor], torch.Tensor]]:
    """The three sums; inductor's compiles afresh for every case (one graph per shape and in-degree)."""
    torch._dynamo.reset()
    compiled = torch.compile(traced_sum, fullgraph=True, dynamic=False)
    return dict(zip(CONTENDERS, (compiled, torch.ops.timm_ddw_kernels.weighted_sum, weighted_sum)))


def time_case(shape: Sequence[int], k: int, fns: Dict[str, Callable], rounds: int, calls: int) -> Dict[str, float]:
    g = torch.Generator().manual_seed(k)
    xs = [torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(k)]
    w = torch.rand(shape[0], k, generator=g)
    ref = traced_sum(xs, w)
    for f in fns.values():  # warm-up (compiles) and the check that all three sum the same
        torch.testing.assert_close(f(xs, w), ref, rtol=1e-5, atol=1e-5)
    names = list(fns)
    ms: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            for _ in range(calls):
                out = fns[n](xs, w)
                del out
            ms[n].append((time.perf_counter() - t) / calls * 1e3)
    return {n: statistics.median(v) for n, v in ms.items()}


def profile_model(name: str, batch: int, px: int, steps: int, top: int = 12) -> Dict[str, Dict[str, float]]:
    """Self CPU ms per inference step by operator, compiled with inductor's sums and with the operator."""
    import timm  # the ddw_* models are registered: importing timm_ddw.fused imported the package

    out: Dict[str, Dict[str, float]] = {}
    x = torch.randn(batch, 3, px, px)
    was = fused.enabled()
    try:
        for label, flag in (('inductor sums', False), ('operator', True)):
            torch._dynamo.reset()
            fused.set_enabled(flag)
            torch.manual_seed(0)
            fn = torch.compile(timm.create_model(name).eval(), fullgraph=True)
            with torch.no_grad():
                for _ in range(3):
                    fn(x)
                t = time.perf_counter()
                for _ in range(steps):
                    fn(x)
                wall = (time.perf_counter() - t) / steps * 1e3
                with torch.profiler.profile() as prof:
                    for _ in range(steps):
                        fn(x)
            rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
            out[label] = dict({'wall ms per step (unprofiled)': wall},
                              **{e.key: e.self_cpu_time_total / 1e3 / steps for e in rows})
            print(f'{name} b{batch}/{px}, {label}: ' + ', '.join(f'{k} {v:.1f}' for k, v in out[label].items()),
                  flush=True)
    finally:
        fused.set_enabled(was)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--calls', type=int, default=10, help='sums per timing')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', default=str(HERE / 'results' / 'fused_sum.json'))
    p.add_argument('--profile-model', default=None, help='also profile this model compiled, operator off and on')
    p.add_argument('--batch-size', type=int, default=8, help='for --profile-model')
    p.add_argument('--img-size', type=int, default=128, help='for --profile-model')
    p.add_argument('--profile-steps', type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not fused.kernel_available():
        print('the C++ kernel is not available here (no compiler?): nothing to compare')
        return 1
    rows = []
    print(f'{"maps":>18} {"K":>3} ' + ' '.join(f'{n:>10}' for n in CONTENDERS) + '   operator/inductor speed')
    for shape, ks in CASES:
        for k in ks:
            fns = contenders()
            med = time_case(shape, k, fns, args.rounds, args.calls)
            rows.append(dict(shape=list(shape), inputs=k, median_ms=med,
                             operator_speedup=med['inductor'] / med['operator']))
            print(f'{"x".join(map(str, shape)):>18} {k:>3} ' + ' '.join(f'{med[n]:>8.3f}ms' for n in fns)
                  + f'   {rows[-1]["operator_speedup"]:.2f}x', flush=True)
    profile = None if args.profile_model is None else \
        profile_model(args.profile_model, args.batch_size, args.img_size, args.profile_steps)
    write_json(Path(args.json), dict(rows=rows, rounds=args.rounds, calls=args.calls, profile=profile,
                                     profile_model=args.profile_model, environment=environment('cpu', args.threads, 1)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
