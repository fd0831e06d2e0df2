"""The CPU performance targets in one command: speed.py over every target setting, then one table.

Targets (DDW against its timm twin, same-run ratios over interleaved rounds): training step and
inference >= 0.95x the twin's throughput and peak training memory <= 1.10x, for ddw_resnet50 and
ddw_resnet101 at batch 8 / 128 px and batch 16 / 224 px (fp32, eager, 2 threads), with the default
aggregation and with the literal sum; torch.compile (inductor) for ddw_resnet50 >= 0.97x the
compiled twin. Each setting's JSON is the one ``speed.py`` writes (skipped when present, so the
command resumes); the table goes to ``benchmarks/results/cpu_targets.md``.

    python benchmarks/cpu_targets.py              # about 45 minutes on 2 idle cores
    python benchmarks/cpu_targets.py --report-only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402
from _runs import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / 'results' / 'cpu_targets'
SIZES = ((8, 128), (16, 224))


def settings(args: argparse.Namespace) -> List[Dict[str, object]]:
    out: List[Dict[str, object]] = []
    for model in ('ddw_resnet50', 'ddw_resnet101'):
        for batch, px in SIZES:
            out.append(dict(model=model, batch=batch, px=px, extra=[]))
    for model in ('ddw_resnet50', 'ddw_resnet101'):
        out.append(dict(model=model, batch=8, px=128, extra=['--aggregation', 'sum']))
    if not args.no_compile:
        out.append(dict(model='ddw_resnet50', batch=8, px=128, extra=['--compile']))
    return out


def argv_of(s: Dict[str, object], args: argparse.Namespace) -> List[str]:
    name = f"{s['model']}_b{s['batch']}_{s['px']}" + ''.join(str(e).lstrip('-') for e in s['extra'])
    return ['--model', str(s['model']), '--batch-size', str(s['batch']), '--img-size', str(s['px']),
            '--threads', str(args.threads), '--rounds', str(args.rounds), '--steps', str(args.steps),
            '--no-reference', '--variants', 'static', 'ddw', '--device', 'cpu',
            '--json', str(OUT / f'{name}.json'), *map(str, s['extra'])]


# feature-map passes per edge and step. Training with the feature buffer: forward sum 3 (read the
# source, read and write the running sum), its recomputation in backward 3, the edge-gradient dot 2
# (the node's input gradient and the source), the source's gradient sum 3: 11. Of these, only the
# reads of a source (or of a consumer's gradient) must come from memory; the running sum (one map of
# at most 12 MiB here) can stay in the 32 MiB L3 cache: 4 passes. Inference with per-node sums: 3 and 1.
PASSES_PER_EDGE = {'train': (11, 4), 'infer': (3, 1)}


def aggregation_traffic(model: str, batch: int, px: int) -> Dict[str, object]:
    """Edges and bytes of one feature map per graph stage (from a meta-device forward)."""
    import timm
    import torch

    import timm_ddw
    m = timm.create_model(model, device='meta').eval()
    shapes: Dict[str, object] = {}
    stages = timm_ddw.graph_stages(m)
    for name, st in stages.items():
        st.register_forward_hook(lambda mod, i, o, k=name: shapes.__setitem__(k, tuple(o.shape)))
    with torch.no_grad():
        m(torch.empty(batch, 3, px, px, device='meta'))
    per_stage = {n: dict(edges=sum(len(p) for p in st.preds), map_mib=torch.Size(shapes[n]).numel() * 4 / 2 ** 20)
                 for n, st in stages.items()}
    return dict(stages=per_stage, edge_mib=sum(v['edges'] * v['map_mib'] for v in per_stage.values()))


def bandwidth_gbs(threads: int, mib: int = 512, repeats: int = 10) -> float:
    """Copy bandwidth (bytes read + written per second) of torch on this machine."""
    import time

    import torch
    torch.set_num_threads(threads)
    a = torch.ones(mib * 2 ** 18)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def write_report() -> Path:
    rows = ['| model | batch, px | setting | mode | DDW / twin throughput: median (min-max) | target | '
            'peak memory ratio | target |', '|---|---|---|---|---|---|---|---|']
    for path in sorted(OUT.glob('*.json')):
        if path.name == 'bandwidth.json':
            continue
        r = json.loads(path.read_text())
        a = r['args']
        setting = 'compiled (inductor)' if a.get('compile') else f"aggregation={a.get('aggregation') or 'bounded'}"
        target = 0.97 if a.get('compile') else 0.95
        for mode in ('train', 'infer'):
            ratio = r['ratios'][mode]['ddw']
            mem = r['memory_ratios'].get(mode, {}).get('ddw') if mode == 'train' else None
            rows.append(
                f"| {r['model']} | {a['batch_size']}, {a['img_size']} | {setting} | {mode} | {ratio['median']:.3f} "
                f"({ratio['min']:.3f}-{ratio['max']:.3f}) | {'met' if ratio['median'] >= target else 'not met'} "
                f"(>= {target}) | {'-' if mem is None else f'{mem:.3f}'} | "
                f"{'-' if mem is None else ('met' if mem <= 1.10 else 'not met')} |")
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob('*.json')) if p.name != 'bandwidth.json']
    head = ['# CPU performance targets', '', 'Generated by `benchmarks/cpu_targets.py` from the `speed.py` JSONs in '
            '[`cpu_targets/`](cpu_targets/) (each with its command line, rounds and per-round figures).']
    if runs:
        r = min(runs, key=lambda run: run['date'])
        head += ['', f"Machine: {r['cpu_count']} cores ({r['device_name']}), {r['threads']} threads, "
                 f"torch {r['torch']}, timm {r['timm']}, fp32, eager unless compiled; {r['args']['rounds']} "
                 f"interleaved rounds of {r['args']['steps']} steps; {len(runs)} settings run one after another from "
                 f"{r['date']}. Ratio = DDW img/s / "
                 'twin img/s per round; peak memory of one training step in a fresh process (VmHWM), DDW / twin.']
    limits = []
    bw_path = OUT / 'bandwidth.json'
    if bw_path.exists():
        bw = json.loads(bw_path.read_text())
        limits = ['', '## Where the time goes: memory traffic of the weighted sums', '',
                  f"Measured copy bandwidth (torch `copy_` of {bw['mib']} MiB, read + write, best of {bw['repeats']}, "
                  f"{bw['threads']} threads): **{bw['gbs']:.1f} GB/s**. The weighted sums are memory-bound: a step "
                  'reads or writes every source feature map several times per edge (training with the feature '
                  'buffer: 11 passes per edge, 4 of them reads that must come from memory; inference with per-node '
                  'sums: 3 and 1; ResNet-101 inference uses blocked sums, which move less). Below, the bytes that '
                  'implies per step (all passes / memory reads only), the time they take at that bandwidth, and '
                  'the measured difference of DDW and twin step times (from the table\'s JSONs).',
                  '', '| model | batch, px | edges | feature-map MiB per edge (sum over edges) | mode | '
                  'GB moved per step (all / from memory) | at the bandwidth (s) | measured DDW - twin (s per step) |',
                  '|---|---|---|---|---|---|---|---|']
        for path in sorted(OUT.glob('*.json')):
            if path.name == 'bandwidth.json':
                continue
            r = json.loads(path.read_text())
            a = r['args']
            if a.get('compile') or a.get('aggregation'):
                continue
            t = aggregation_traffic(r['model'], a['batch_size'], a['img_size'])
            edges = sum(v['edges'] for v in t['stages'].values())
            for mode in ('train', 'infer'):
                gb = [passes * t['edge_mib'] * 2 ** 20 / 1e9 for passes in PASSES_PER_EDGE[mode]]
                tp = r['throughput'][mode]
                diff = a['batch_size'] / tp['ddw']['median'] - a['batch_size'] / tp['static']['median']
                limits.append(f"| {r['model']} | {a['batch_size']}, {a['img_size']} | {edges} | {t['edge_mib']:.0f} | "
                              f"{mode} | {gb[0]:.1f} / {gb[1]:.1f} | {gb[0] / bw['gbs']:.2f} / {gb[1] / bw['gbs']:.2f} "
                              f"| {diff:.2f} |")
    path = HERE / 'results' / 'cpu_targets.md'
    path.write_text('\n'.join(head + [''] + rows + limits + compiled_rows()) + '\n')
    return path


def _table_from(name: str, intro: str) -> List[str]:
    """The first table of another report in results/, after a line saying where it comes from; none if not run."""
    md = HERE / 'results' / name
    if not md.exists():
        return []
    lines = md.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('|'))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith('|')), len(lines))
    return ['', intro, ''] + lines[start:end]


def compiled_rows() -> List[str]:
    """The compiled targets for all nine models: compiled.py's table, then compile_breakdown.py's, where run."""
    compiled = _table_from('compiled.md', 'From [`compiled.md`](compiled.md) (`python benchmarks/compiled.py`: cold '
                           'compile times in fresh processes, 5 interleaved rounds; method and machine there).')
    if not compiled:
        return []
    paired = _table_from('compiled_paired.md', 'Throughput again with 20 paired rounds per model (these supersede '
                         'the 5-round ratios above): from [`compiled_paired.md`](compiled_paired.md) '
                         '(`python benchmarks/compiled_paired.py`).')
    return ['', '## Compiled (inductor), all nine models, batch 8, 128 px'] + compiled + paired + _table_from(
        'compile_breakdown.md', 'Compile time by part, each mode in its own fresh process (nothing reused from the '
        'training graph): from [`compile_breakdown.md`](compile_breakdown.md) '
        '(`python benchmarks/compile_breakdown.py`).')


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--no-compile', action='store_true')
    p.add_argument('--report-only', action='store_true')
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        if not (OUT / 'bandwidth.json').exists():
            write_json(OUT / 'bandwidth.json', dict(gbs=bandwidth_gbs(args.threads), mib=512, repeats=10,
                                                    threads=args.threads))
        for s in settings(args):
            argv_s = argv_of(s, args)
            if Path(argv_s[argv_s.index('--json') + 1]).exists():
                continue
            speed.main(argv_s)
            write_report()
    print('wrote', write_report())
    return 0


if __name__ == '__main__':
    sys.exit(main())
