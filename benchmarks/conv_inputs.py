"""Are the twin's blocks slower on DDW's aggregated inputs? The same blocks, timed on both inputs.

A profile of a ddw_resnet50 training step put its convolutions +23% above the twin's at equal call
counts. If the cause were the blocks' inputs (the weighted sums a DDW stage feeds its blocks:
strides, memory format, alignment, values), the same block would be slower on DDW's input than on
the twin's input in isolation. This script captures every graph-stage block's input in one
training forward of the DDW model and of its twin (same weights), records each input's layout,
then times each twin block's forward + backward on both inputs (the captured tensors themselves,
so storage, strides and alignment are kept), in interleaved rounds. It also counts, per full
training step of both models, the minor page faults and user / system CPU time, which is where
allocation differences would show.

    python benchmarks/conv_inputs.py --model ddw_resnet50 --batch-size 8 --img-size 128
    python benchmarks/conv_inputs.py --model ddw_resnet50 --batch-size 16 --img-size 224
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, write_json  # noqa: E402

import timm_ddw  # noqa: E402
from timm_ddw.models import TWINS  # noqa: E402

HERE = Path(__file__).resolve().parent


def build_pair(name: str):
    """The DDW model and its twin, the same block weights (the routers are DDW's own)."""
    torch.manual_seed(0)
    twin = timm.create_model(TWINS[name])
    ddw = timm.create_model(name)
    missing = ddw.load_state_dict(twin.state_dict(), strict=False)
    assert not missing.unexpected_keys
    return ddw.train(), twin.train()


def capture_inputs(model: torch.nn.Module, names: List[str], x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Each named block's input in one training forward, as the block received it."""
    modules = dict(model.named_modules())
    got: Dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n, a[0])) for n in names]
    try:
        model(x).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return got


def layout(t: torch.Tensor) -> Dict[str, Any]:
    t = t.detach()
    return dict(shape=list(t.shape), stride=list(t.stride()), contiguous=t.is_contiguous(),
                channels_last=t.is_contiguous(memory_format=torch.channels_last), storage_offset=t.storage_offset(),
                align_64=t.data_ptr() % 64, align_4096=t.data_ptr() % 4096, is_view=t._base is not None,
                zero_share=float((t == 0).float().mean()), mean=float(t.float().mean()), std=float(t.float().std()))


def block_time(block: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, repeats: int) -> float:
    """Seconds for one forward + backward of ``block`` on ``x`` (the captured tensor, detached in place)."""
    inp = x.detach().requires_grad_(True)  # same storage, strides and alignment
    t0 = time.perf_counter()
    for _ in range(repeats):
        block(inp).backward(g)
    return (time.perf_counter() - t0) / repeats


def step_counters(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Wall time, minor page faults and user / system CPU seconds of one training step."""
    model.zero_grad(set_to_none=True)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return dict(wall_s=t1 - t0, minor_faults=r1.ru_minflt - r0.ru_minflt, user_s=r1.ru_utime - r0.ru_utime,
                sys_s=r1.ru_stime - r0.ru_stime)


def captured(args: argparse.Namespace):
    """The pair, the graph-stage block names, every block's input in both models, the batch."""
    ddw, twin = build_pair(args.model)
    names = [f'{s}.{b}' for s, st in timm_ddw.graph_stages(ddw).items() for b, _ in st.named_children()]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 1000, (args.batch_size,), generator=torch.Generator().manual_seed(1))
    inputs = {'twin': capture_inputs(twin, names, x), 'ddw': capture_inputs(ddw, names, x)}
    return ddw, twin, names, inputs, x, y


def run(args: argparse.Namespace) -> Dict[str, Any]:
    ddw, twin, names, inputs, x, y = captured(args)
    twin_blocks = dict(twin.named_modules())
    grads = {n: torch.randn_like(twin_blocks[n](inputs['twin'][n].detach())) for n in names}
    times: Dict[str, Dict[str, List[float]]] = {n: {'twin': [], 'ddw': []} for n in names}
    totals: Dict[str, List[float]] = {'twin': [], 'ddw': []}
    steps: Dict[str, List[Dict[str, float]]] = {'twin': [], 'ddw': []}
    for r in range(args.rounds):
        order = ('twin', 'ddw') if r % 2 == 0 else ('ddw', 'twin')
        for kind in order:  # the twin's blocks on each model's inputs
            per = {n: block_time(twin_blocks[n], inputs[kind][n], grads[n], args.repeats) for n in names}
            for n, t in per.items():
                times[n][kind].append(t)
            totals[kind].append(sum(per.values()))
        for kind in order:  # and the two full steps, for their page faults and CPU time
            model = twin if kind == 'twin' else ddw
            steps[kind].append(step_counters(model, x, y))
        print(f"round {r + 1}/{args.rounds}: blocks on DDW inputs / on twin inputs "
              f"{totals['ddw'][-1] / totals['twin'][-1]:.3f}", file=sys.stderr, flush=True)
    ratios = [d / t for d, t in zip(totals['ddw'], totals['twin'], strict=True)]
    per_block = {n: dict(twin_input=layout(inputs['twin'][n]), ddw_input=layout(inputs['ddw'][n]),
                         time_ratio=statistics.median(times[n]['ddw']) / statistics.median(times[n]['twin']))
                 for n in names}

    def med(kind: str, key: str) -> float:
        return statistics.median(s[key] for s in steps[kind])
    step_summary = {k: {key: med(k, key) for key in ('wall_s', 'minor_faults', 'user_s', 'sys_s')} for k in steps}
    return dict(model=args.model, batch=args.batch_size, px=args.img_size, rounds=args.rounds, repeats=args.repeats,
                threads=torch.get_num_threads(), blocks=len(names),
                isolated_ratio=dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios), values=ratios),
                block_seconds=totals, per_block=per_block, steps=steps, step_medians=step_summary,
                date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                environment=environment('cpu', args.threads, 1))


def summary_lines(res: Dict[str, Any]) -> List[str]:
    layouts = [(b['twin_input'], b['ddw_input']) for b in res['per_block'].values()]
    same = all(t['stride'] == d['stride'] for t, d in layouts)
    iso = res['isolated_ratio']
    s = res['step_medians']
    return [f"{res['model']} b{res['batch']}/{res['px']}: {res['blocks']} blocks, strides equal in all: {same}; "
            f"DDW inputs 64-byte aligned {sum(d['align_64'] == 0 for _, d in layouts)}/{len(layouts)}, "
            f"twin inputs {sum(t['align_64'] == 0 for t, _ in layouts)}/{len(layouts)}",
            f"  blocks on DDW inputs / on twin inputs (fwd+bwd, {res['rounds']} rounds): "
            f"{iso['median']:.3f} ({iso['min']:.3f}-{iso['max']:.3f})",
            f"  full step, twin / DDW: wall {s['twin']['wall_s']:.3f} / {s['ddw']['wall_s']:.3f} s, minor faults "
            f"{s['twin']['minor_faults']:.0f} / {s['ddw']['minor_faults']:.0f}, user {s['twin']['user_s']:.2f} / "
            f"{s['ddw']['user_s']:.2f} s, sys {s['twin']['sys_s']:.2f} / {s['ddw']['sys_s']:.2f} s"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='ddw_resnet50', choices=list(TWINS))
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--repeats', type=int, default=2, help='forward + backward calls per block, input and round')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', default=None, help='default: results/conv_inputs/<model>_b<batch>_<px>.json')
    args = p.parse_args(argv)
    for key in ('batch_size', 'img_size', 'rounds', 'repeats', 'threads'):
        if getattr(args, key) <= 0:
            p.error(f'--{key.replace("_", "-")}={getattr(args, key)} must be positive')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args)
    path = Path(args.json or HERE / 'results' / 'conv_inputs' / f'{args.model}_b{args.batch_size}_{args.img_size}.json')
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, res)
    print('\n'.join(summary_lines(res)))
    print('wrote', path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
