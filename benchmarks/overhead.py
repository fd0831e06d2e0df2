"""Parameters and multiply-adds of the DDW models vs their timm twins, next to the paper's Table 1.

Counting (per image, at --img-size, batch 1):
* conv / linear MACs: torch.utils.flop_counter.FlopCounterMode FLOPs / 2 (it counts matmul-like ops
  only; the paper's "FLOPs" are multiply-adds, i.e. MACs). This includes the routers' FC layers.
* the graph stages' elementwise work, which FlopCounterMode does not see, counted from the stage's
  graph and the block output shapes recorded by forward hooks:
  - aggregation: one multiply-add per element per edge (node j with k inputs of C x H x W does
    k * C * H * W), the output node included;
  - routers' global average pool: one add per element of every routed node's output.
  The gate (sigmoid, threshold) on B x E scalars is negligible and not counted.
While counting, ``timm_ddw.graph.weighted_sum`` is replaced by a plain elementwise loop so that an
implementation built on matmuls is not counted twice; the script checks both counts agree.

    python benchmarks/overhead.py                     # all nine models at 224
    python benchmarks/overhead.py --models ddw_resnet50 --json /tmp/o.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import timm_ddw
import timm_ddw.graph as graph
from timm_ddw.models import TWINS

HERE = Path(__file__).resolve().parent

# the paper's Table 1 keys; RegNetY-600M is only in Table 5 (DDW-B, no baseline figure)
PAPER_KEYS = {name: name[len('ddw_'):] for name in TWINS}
TABLE5_KEYS = {'ddw_regnety_600m': 'DDW-B (RegNetY-600M)'}


loop_weighted_sum = graph.weighted_sum_loop  # one multiply and one add per edge


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def stage_elementwise_macs(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Per-image aggregation and router-GAP multiply-adds of all graph stages (see module doc)."""
    sizes: Dict[int, List[int]] = {}
    handles = []
    stages = [m for m in model.modules() if isinstance(m, graph.GraphStage)]
    for s, stage in enumerate(stages):
        sizes[s] = []
        for block in stage.children():
            handles.append(block.register_forward_hook(
                lambda mod, inp, out, s=s: sizes[s].append(out[0].numel())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    agg = gap = 0
    for s, stage in enumerate(stages):
        numel = sizes[s]
        if len(numel) != stage.num_blocks:
            raise RuntimeError(f'stage {s}: recorded {len(numel)} block outputs, expected {stage.num_blocks}')
        if stage.edges == 'fixed':
            # weight-1 edges: k - 1 adds per element, no multiply
            agg += sum((len(stage.preds[j]) - 1) * numel[stage.preds[j][0]] for j in range(1, stage.num_blocks + 1))
            continue
        agg += sum(numel[i] for j in range(1, stage.num_blocks + 1) for i in stage.preds[j])
        if stage.edges == 'router':
            gap += sum(numel)
    return dict(aggregation=agg, router_gap=gap)


def count(name: str, img_size: int, device: str, **kwargs) -> Dict[str, float]:
    model = timm.create_model(name, device=device, **kwargs).eval()
    for m in model.modules():  # blocked sums (no-grad forwards) do the same multiply-adds as GEMMs,
        if isinstance(m, graph.GraphStage):  # which FlopCounterMode would count on top
            m.sum_block_size = 0
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    params = sum(p.numel() for p in model.parameters())
    out = dict(params_m=params / 1e6)
    if any(isinstance(m, graph.GraphStage) for m in model.modules()):
        native = _flops(model, x)
        saved = graph.weighted_sum
        graph.weighted_sum = loop_weighted_sum
        try:
            flops = _flops(model, x)
        finally:
            graph.weighted_sum = saved
        extra = stage_elementwise_macs(model, x)
        out.update(
            counted_macs_m=flops / 2e6, aggregation_macs_m=extra['aggregation'] / 1e6,
            router_gap_macs_m=extra['router_gap'] / 1e6,
            macs_m=(flops / 2 + extra['aggregation'] + extra['router_gap']) / 1e6,
            # > 0 when the library's weighted_sum uses ops FlopCounterMode counts (then the
            # elementwise part is still added once, analytically)
            native_counted_minus_loop_macs_m=(native - flops) / 2e6)
        out['router_params_m'] = sum(
            p.numel() for n, p in model.named_parameters() if n.endswith(('router_weight', 'router_bias', 'tau'))) / 1e6
    else:
        out['macs_m'] = out['counted_macs_m'] = _flops(model, x) / 2e6
    return out


def paper_row(tables: dict, name: str) -> Optional[Dict[str, Optional[float]]]:
    t1 = tables['table1_imagenet']
    key = PAPER_KEYS[name]
    if key in t1['rows']:
        r = dict(zip(t1['columns'], t1['rows'][key], strict=True))
        return dict(source='table1', twin_params_m=r['baseline_params_m'], twin_macs_m=r['baseline_flops_m'],
                    ddw_params_m=r['ddw_params_m'], ddw_macs_m=r['ddw_flops_m'])
    if name in TABLE5_KEYS:
        t5 = tables['table5_mobile_setting_250_epochs']
        r = dict(zip(t5['columns'], t5['rows'][TABLE5_KEYS[name]], strict=True))
        return dict(source='table5', twin_params_m=None, twin_macs_m=None,
                    ddw_params_m=r['params_m'], ddw_macs_m=r['flops_m'])
    return None


def _rel(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else 100.0 * (a - b) / b


def _fmt(v: Optional[float], spec: str) -> str:
    return '-' if v is None else format(v, spec)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=list(TWINS), choices=list(TWINS), metavar='MODEL')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--wiring', default='dynamic', help='DDW wiring to count (default: dynamic)')
    parser.add_argument('--device', default='meta', help="'meta' counts without computing (default), or 'cpu'")
    parser.add_argument('--json', default=str(HERE / 'results' / 'overhead.json'))
    args = parser.parse_args(argv)
    if args.img_size <= 0:
        parser.error(f'--img-size={args.img_size} must be positive')
    tables = json.loads((HERE / 'paper_tables.json').read_text())

    rows = []
    for name in args.models:
        t0 = time.time()
        twin = count(TWINS[name], args.img_size, args.device)
        ddw = count(name, args.img_size, args.device, wiring=args.wiring)
        if abs(ddw['native_counted_minus_loop_macs_m']) > 1e-9:
            print(f'note: {name}: the library weighted_sum adds {ddw["native_counted_minus_loop_macs_m"]:.3f} M '
                  'counted MACs over the elementwise loop; reported MACs use the loop + analytic count',
                  file=sys.stderr)
        paper = paper_row(tables, name)
        row = dict(model=name, twin=TWINS[name], img_size=args.img_size, wiring=args.wiring, twin_stats=twin,
                   ddw_stats=ddw, paper=paper,
                   params_overhead_m=ddw['params_m'] - twin['params_m'],
                   params_overhead_pct=_rel(ddw['params_m'], twin['params_m']),
                   macs_overhead_m=ddw['macs_m'] - twin['macs_m'],
                   macs_overhead_pct=_rel(ddw['macs_m'], twin['macs_m']))
        if paper is not None:
            row.update(
                paper_params_overhead_m=None if paper['twin_params_m'] is None
                else paper['ddw_params_m'] - paper['twin_params_m'],
                paper_params_overhead_pct=_rel(paper['ddw_params_m'], paper['twin_params_m']),
                paper_macs_overhead_pct=_rel(paper['ddw_macs_m'], paper['twin_macs_m']))
            if row['paper_params_overhead_m'] is not None:
                row['params_overhead_within_paper'] = row['params_overhead_m'] <= row['paper_params_overhead_m'] + 5e-3
        rows.append(row)
        print(f'counted {name} in {time.time() - t0:.1f}s', file=sys.stderr)

    head = ('model', 'params twin', 'params DDW', 'dParams', 'paper twin/DDW', 'paper dP',
            'MACs twin', 'MACs DDW', '(agg+gap)', 'dMACs', 'paper twin/DDW', 'paper dM')
    lines = [head]
    for r in rows:
        t, d, p = r['twin_stats'], r['ddw_stats'], r['paper'] or {}
        lines.append((
            r['model'], f"{t['params_m']:.2f}M", f"{d['params_m']:.2f}M", f"+{r['params_overhead_pct']:.2f}%",
            f"{_fmt(p.get('twin_params_m'), '.2f')}/{_fmt(p.get('ddw_params_m'), '.2f')}",
            _fmt(r.get('paper_params_overhead_pct'), '+.2f') + '%',
            f"{t['macs_m']:.0f}M", f"{d['macs_m']:.0f}M",
            f"{d['aggregation_macs_m'] + d['router_gap_macs_m']:.1f}M", f"+{r['macs_overhead_pct']:.2f}%",
            f"{_fmt(p.get('twin_macs_m'), '.0f')}/{_fmt(p.get('ddw_macs_m'), '.0f')}",
            _fmt(r.get('paper_macs_overhead_pct'), '+.2f') + '%'))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    for k, row in enumerate(lines):
        print('  '.join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if k == 0:
            print('  '.join('-' * w for w in widths))
    print(f'\nMACs = FlopCounterMode FLOPs / 2 (conv + linear, incl. routers\' FC) + aggregation (1 MAC per element '
          f'per edge) + routers\' GAP (1 per element); {args.img_size}x{args.img_size}, batch 1, '
          f'wiring={args.wiring!r}. Paper: Table 1 (RegNetY-600M: Table 5, DDW only).')

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(
        torch=torch.__version__, timm=timm.__version__, timm_ddw=getattr(timm_ddw, '__version__', None),
        macs_definition='FlopCounterMode FLOPs/2 + aggregation (1 per element per edge) + router GAP '
                        '(1 per element of each routed node output)',
        rows=rows), indent=1))
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
