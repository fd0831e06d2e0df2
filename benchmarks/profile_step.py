"""Where a DDW step's extra time goes: torch.profiler over the twin and the DDW model, side by side.

Both models run the same steps (``speed.Bench``: same input, SGD step), profiled in alternating
rounds in one process. Self CPU time per aten op is summed per step and grouped (convolution,
batch norm, activations, matmul/linear, pooling, elementwise sums and copies, the autograd engine's
and Python functions' own time, other), so the table says whether the twin's own work (convolutions, batch norm) runs
slower inside DDW, and how much the aggregation adds.

``--flush-mb N`` adds a third model, the twin with an N MiB read of an unrelated tensor before
every block's forward and backward: it evicts the cache as DDW's sums do, but adds no sums, no
allocations and no other layout. If the twin's convolutions slow down as much there as inside DDW,
the cache explains DDW's slower convolutions.

    python benchmarks/profile_step.py --model ddw_resnet101 --batch-size 8 --img-size 128 --mode train
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import TWINS, Bench  # noqa: E402

GROUPS = (  # first match wins
    ('convolution', ('convolution',)),
    ('batch norm', ('batch_norm',)),
    ('activation', ('relu', 'threshold_backward', 'silu', 'sigmoid', 'hardtanh')),
    ('matmul / linear', ('addmm', 'mm', 'bmm', 'linear', 'baddbmm', 'matmul')),
    ('pooling', ('pool',)),
    ('elementwise sum / copy', ('add', 'addcmul', 'mul', 'dot', 'copy_', 'sum', 'mean', 'div', 'clone',
                                'fill_', 'zero_', 'where', 'clamp', 'max', 'lerp', 'sub')),
)


def group_of(op: str) -> str:
    if not op.startswith('aten::'):
        return 'autograd engine, Python functions'
    name = op[len('aten::'):]
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return 'other'


def add_cache_flush(model: torch.nn.Module, mib: int) -> int:
    """Read ``mib`` MiB before the forward and the backward of every block of the model's stages
    (the children of the modules its ``feature_info`` names); returns the number of blocks hooked."""
    flush = torch.ones(mib * 2 ** 18)  # float32

    def read(*_):
        flush.sum()

    blocks = [b for info in model.feature_info for b in model.get_submodule(info['module']).children()
              if next(b.parameters(), None) is not None]
    for b in blocks:
        b.register_forward_pre_hook(read)
        b.register_full_backward_pre_hook(read)
    return len(blocks)


def profile_ms(bench: Bench, mode: str, steps: int) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Self CPU ms per step, and calls per step, for every op of ``steps`` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            bench.step(mode)
    events = prof.key_averages()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}, {e.key: e.count / steps for e in events}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='ddw_resnet50', choices=list(TWINS))
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--mode', default='train', choices=['train', 'infer'])
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--top', type=int, default=12)
    p.add_argument('--flush-mb', type=int, default=0, help='also profile the twin with this cache flush per block')
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_args = argparse.Namespace(batch_size=args.batch_size, img_size=args.img_size, channels_last=False,
                                    amp_dtype='none', compile=False, compile_backend='inductor',
                                    features_only=False, grad_checkpointing=False, aggregation=None, wiring=None)
    benches = {'twin': Bench(TWINS[args.model], bench_args, torch.device('cpu')),
               'ddw': Bench(args.model, bench_args, torch.device('cpu'))}
    if args.flush_mb:
        benches['twin+flush'] = Bench(TWINS[args.model], bench_args, torch.device('cpu'))
        add_cache_flush(benches['twin+flush'].model, args.flush_mb)
    for b in benches.values():  # warm-up: allocator, oneDNN primitives
        b.step(args.mode), b.step(args.mode)
    per_op: Dict[str, Dict[str, List[float]]] = {n: defaultdict(list) for n in benches}
    calls: Dict[str, Dict[str, float]] = {}
    for r in range(args.rounds):
        for name in (list(benches) if r % 2 == 0 else list(benches)[::-1]):
            times, calls[name] = profile_ms(benches[name], args.mode, args.steps)
            for op, ms in times.items():
                per_op[name][op].append(ms)
    ops = {n: {op: sum(v) / args.rounds for op, v in d.items()} for n, d in per_op.items()}
    groups: Dict[str, Dict[str, float]] = {n: defaultdict(float) for n in benches}
    group_calls: Dict[str, Dict[str, float]] = {n: defaultdict(float) for n in benches}
    for n, d in ops.items():
        for op, ms in d.items():
            groups[n][group_of(op)] += ms
            group_calls[n][group_of(op)] += calls[n].get(op, 0.0)
    names = sorted(set().union(*groups.values()), key=lambda g: -(groups['ddw'][g] - groups['twin'][g]))
    head = (f"{args.model} vs {TWINS[args.model]}, {args.mode}, batch {args.batch_size}, {args.img_size} px, "
            f"{args.threads} threads, fp32 eager; self CPU ms per step, mean of {args.rounds} profiled rounds of "
            f"{args.steps} steps")
    flushed = 'twin+flush' in benches
    if flushed:
        head += f"; twin+flush: the twin reading {args.flush_mb} MiB before each block's forward and backward"
    extra = (' twin+flush | twin+flush - twin |', '---|---|') if flushed else ('', '')
    lines = [head, '', '| group | twin | DDW | DDW - twin |' + extra[0], '|---|---|---|---|' + extra[1]]
    rows = [(g, {n: groups[n][g] for n in benches}) for g in names]
    rows.append(('**total**', {n: sum(groups[n].values()) for n in benches}))
    for g, row in rows:
        t, d = row['twin'], row['ddw']
        line = f'| {g} | {t:.1f} | {d:.1f} | {d - t:+.1f} |'
        if flushed:
            line += f" {row['twin+flush']:.1f} | {row['twin+flush'] - t:+.1f} |"
        lines.append(line)
    diff = {op: ops['ddw'].get(op, 0.0) - ops['twin'].get(op, 0.0) for op in set(ops['ddw']) | set(ops['twin'])}
    lines += ['', f'Ops that differ most (top {args.top}):', '',
              '| op | twin | DDW | DDW - twin |', '|---|---|---|---|']
    for op in sorted(diff, key=lambda o: -abs(diff[o]))[:args.top]:
        lines.append(f"| `{op}` | {ops['twin'].get(op, 0.0):.1f} | {ops['ddw'].get(op, 0.0):.1f} | {diff[op]:+.1f} |")
    print('\n'.join(lines))
    if args.json:
        res = dict(args=vars(args), groups=groups, group_calls=group_calls, ops=ops, op_calls=calls,
                   table='\n'.join(lines))
        Path(args.json).write_text(json.dumps(res, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
