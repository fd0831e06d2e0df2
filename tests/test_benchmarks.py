"""The benchmark scripts count and compare the right things (fast: meta device, tiny inputs)."""
import argparse
import importlib.util
import json
import os
import statistics
from pathlib import Path

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import timm_ddw
import timm_ddw.graph as graph

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f'bench_{name}', ROOT / 'benchmarks' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def overhead():
    return _load('overhead')


def test_chain_wiring_costs_exactly_the_twin(overhead):
    twin = overhead.count('resnet18', 64, 'meta')
    chain = overhead.count('ddw_resnet18', 64, 'meta', wiring='chain')
    assert chain['params_m'] == twin['params_m']
    assert chain['macs_m'] == twin['macs_m']
    assert chain['aggregation_macs_m'] == chain['router_gap_macs_m'] == 0


def test_dynamic_resnet18_overhead_matches_closed_form(overhead):
    # resnet18 at 64 px: four stages of 2 blocks (3 nodes, 3 edges), outputs C x (16/2^s)^2
    twin = overhead.count('resnet18', 64, 'meta')
    ddw = overhead.count('ddw_resnet18', 64, 'meta')
    chans, sides = [64, 128, 256, 512], [16, 8, 4, 2]
    numel = [c * s * s for c, s in zip(chans, sides, strict=True)]
    # edges 0->1, 0->2, 1->2: two take x_0, one x_1, all of the same size
    assert ddw['aggregation_macs_m'] * 1e6 == pytest.approx(sum(3 * n for n in numel))
    assert ddw['router_gap_macs_m'] * 1e6 == pytest.approx(sum(2 * n for n in numel))  # nodes 0 and 1 route
    # FlopCounterMode adds exactly the routers' FC layers: 3 edges x C inputs per stage
    assert (ddw['counted_macs_m'] - twin['macs_m']) * 1e6 == pytest.approx(sum(3 * c for c in chans))
    router_params = sum(3 * c + 3 + 2 for c in chans)  # weight, bias, tau (2 receiving nodes)
    assert (ddw['params_m'] - twin['params_m']) * 1e6 == pytest.approx(router_params)


def test_paper_table_copy_is_verbatim():
    shared = ROOT.parent / 'shared' / 'paper' / 'tables.json'  # shared/ sits beside the checkout
    if not shared.exists():
        pytest.skip('no shared/ beside this checkout')
    assert (ROOT / 'benchmarks' / 'paper_tables.json').read_bytes() == shared.read_bytes()


def test_speed_reference_loop_matches_library():
    speed = _load('speed')
    xs = [torch.randn(3, 4, 5, 5) for _ in range(4)]
    w = torch.rand(3, 4)
    expected = sum(w[:, k].view(3, 1, 1, 1) * xs[k] for k in range(4))
    torch.testing.assert_close(speed.loop_weighted_sum(xs, w), expected)
    torch.testing.assert_close(graph.weighted_sum(xs, w), expected)
    model = timm.create_model('ddw_resnet18', device='meta')
    stages = list(timm_ddw.graph_stages(model).values())
    settings = [(m.use_buffer, m.sum_block_size) for m in stages]
    assert all(s == (True, 6) for s in settings)
    for variant, fn in [('ddw', speed.LIBRARY_WEIGHTED_SUM), ('ddw-nobuf', speed.LIBRARY_WEIGHTED_SUM),
                        ('ddw-loop', speed.REFERENCE_WEIGHTED_SUM)]:
        with speed.variant_setup(variant, model):
            assert graph.weighted_sum is fn
            if variant != 'ddw':  # the per-edge paths go through neither the buffer nor blocked sums
                assert all((m.use_buffer, m.sum_block_size) == (False, 0) for m in stages)
            else:
                assert [(m.use_buffer, m.sum_block_size) for m in stages] == settings
    assert graph.weighted_sum is speed.LIBRARY_WEIGHTED_SUM
    assert [(m.use_buffer, m.sum_block_size) for m in stages] == settings


def test_speed_wiring_variants_are_models_of_their_own(tmp_path):
    """ddw-learned and ddw-chain split DDW's cost into sums and routers: each must be the DDW model
    under its own wiring, not the dynamic model reconfigured."""
    speed = _load('speed')
    out = tmp_path / 'speed.json'
    built = []
    bench_cls = speed.Bench

    class Recording(bench_cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    speed.Bench = Recording
    argv = ['--model', 'ddw_resnet18', '--batch-size', '2', '--img-size', '32', '--rounds', '1', '--steps', '1',
            '--warmup', '0', '--threads', '1', '--modes', 'infer', '--variants', 'ddw', 'ddw-learned', 'ddw-chain',
            '--no-reference', '--no-memory', '--device', 'cpu', '--json', str(out)]
    assert speed.main(argv) == 0
    wirings = [sorted({m.wiring for m in timm_ddw.graph_stages(b.model).values()}) for b in built]
    assert wirings == [[], ['dynamic'], ['static'], ['chain']]  # the twin has no graph stages
    assert set(json.loads(out.read_text())['ratios']['infer']) == {'static', 'ddw', 'ddw-learned', 'ddw-chain'}
    assert 'ddw-chain' not in speed.parse_args([]).variants  # opt-in: two more models to build


@pytest.mark.skipif(not Path('/usr/share/datasets/fashion-mnist').is_dir(), reason='Fashion-MNIST not installed')
def test_depth_ablation_tiny_run_writes_every_required_key(tmp_path):
    depth = _load('depth')
    out = tmp_path / 'depth'
    argv = ['--variants', 'chain', 'dynamic', '--seeds', '0', '--train-size', '256', '--epochs', '1',
            '--max-steps', '2', '--test-size', '200', '--curve-test-size', '200', '--jobs', '1', '--out-dir', str(out)]
    assert depth.main(argv) == 0
    runs = sorted(p.name for p in out.glob('*.json'))
    assert runs == [f'{d}_{v}_seed0.json' for d in ('long', 'shallow') for v in ('chain', 'dynamic')]
    required = {'variant', 'wiring', 'router_bias', 'aggregation', 'layers', 'channels', 'seed', 'train_images',
                'epochs', 'top1', 'train_time_s', 'curve'}
    for name in runs:
        rec = json.loads((out / name).read_text())
        assert required <= set(rec), required - set(rec)
        assert rec['layers'] == ([2, 2, 12, 2] if name.startswith('long') else [2, 2, 2, 2])
        assert rec['aggregation'] == 'bounded' and rec['train_images'] == 256 and rec['curve'][0]['test_images'] == 200
    assert (out / 'models' / 'long_dynamic_seed0.safetensors').exists()  # kept for the routing analysis
    md = (tmp_path / 'depth.md').read_text()
    assert '## long: stages of [2, 2, 12, 2] blocks' in md and 'dynamic vs chain' in md
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob('*.json')}
    assert depth.main(argv) == 0  # a rerun skips finished runs
    assert {p: p.stat().st_mtime_ns for p in out.glob('*.json')} == mtimes


def test_gpu_check_smoke_runs_every_path_on_cpu(tmp_path):
    """The GPU check must be known to work before a GPU is lent: --smoke runs its code paths on CPU."""
    gpu_check = _load('gpu_check')
    out = tmp_path / 'gpu_check.json'
    torch._dynamo.reset()
    counters.clear()
    assert gpu_check.main(['--smoke', '--json', str(out)]) == 0
    res = json.loads(out.read_text())
    cells = {(c['model'], c['amp'], c['compiled']) for c in res['cells']}
    assert cells == {(m, a, False) for m in ('ddw_resnet50', 'ddw_efficientnet_b0') for a in ('bfloat16', 'float16')} \
        | {('ddw_resnet18', 'bfloat16', True)}
    for c in res['cells']:
        for mode in ('train', 'infer'):
            assert c[mode]['finite'] == {'twin': True, 'ddw': True} and c[mode]['ratio'] > 0
    assert res['all_finite'] and not res['skipped']
    # the compiled cell traced twin and DDW once per mode, and its timed rounds did not recompile
    assert counters['stats']['unique_graphs'] == 4, dict(counters['stats'])
    blocked = res['blocked_sums']
    assert blocked['blocked_stage'] and blocked['max_abs_difference'] < 0.05 and blocked['speedup'] > 0
    split = res['gap_split']  # the twin, then DDW without sums, with sums, with routers
    assert split['wirings'] == {'twin': [], 'chain': ['chain'], 'static': ['static'], 'dynamic': ['dynamic']}
    for mode in ('train', 'infer'):
        assert set(split[mode]['ratios']) == {'chain/twin', 'static/chain', 'dynamic/static'}
        assert all(r > 0 for r in split[mode]['ratios'].values()) and len(split[mode]['img_s']) == 4


def test_profile_step_groups_ops_and_sees_the_weighted_sums(tmp_path):
    prof = _load('profile_step')
    assert [prof.group_of(op) for op in ('aten::convolution_backward', 'aten::native_batch_norm', 'aten::addmm',
                                         'aten::addcmul_', 'aten::max_pool2d_with_indices', 'aten::empty')] \
        == ['convolution', 'batch norm', 'matmul / linear', 'elementwise sum / copy', 'pooling', 'other']
    out = tmp_path / 'p.json'
    assert prof.main(['--model', 'ddw_resnet18', '--batch-size', '2', '--img-size', '32', '--steps', '1',
                      '--rounds', '2', '--threads', '1', '--flush-mb', '1', '--json', str(out)]) == 0
    res = json.loads(out.read_text())
    assert res['groups']['ddw']['convolution'] > 0 and res['groups']['twin']['convolution'] > 0
    calls = res['group_calls']  # counts, not times: the same on a busy machine
    assert calls['ddw']['convolution'] == calls['twin']['convolution']  # the same blocks, no extra convolutions
    # the flushed twin: the twin's ops plus one read before each of the 8 blocks' forward and backward
    assert calls['twin+flush']['convolution'] == calls['twin']['convolution']
    op_calls = res['op_calls']
    assert op_calls['twin+flush']['aten::sum'] - op_calls['twin'].get('aten::sum', 0) == 16
    assert prof.add_cache_flush(timm.create_model('resnet18'), 1) == 8
    # the graph stages' weighted sums are elementwise work the twin does not have
    assert calls['ddw']['elementwise sum / copy'] > calls['twin']['elementwise sum / copy']


def test_blocked_training_bound_times_the_same_sums_both_ways():
    """The blocked-GEMM estimate is only a bound if it computes what the feature buffer computes:
    every recomputed input, edge dot product and source gradient, against einsum in float64."""
    bench = _load('blocked_training')
    gen = torch.Generator().manual_seed(0)
    b, n, k, shape = 3, 9, 4, (3, 5, 2, 2)
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]
    grads = [None] + [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]
    w = torch.rand(b, n + 1, n + 1, generator=gen, dtype=torch.float64).triu(1)
    x, g = torch.stack([t.flatten(1) for t in xs], 1), torch.stack([t.flatten(1) for t in grads[1:]], 1)
    want = {'dots': {j: torch.einsum('bd,bid->bi', g[:, j - 1], x[:, :j]) for j in range(1, n + 1)},
            'dx': {i: torch.einsum('bj,bjd->bd', w[:, i, 1:], g).view(shape) for i in range(n)},
            'inputs': {j: torch.einsum('bi,bid->bd', w[:, :n, j], x).view(shape) for j in range(1, n)}}
    ws = {}
    for run in (lambda out: bench.per_node(xs, grads, w, out=out),
                lambda out: bench.blocked(xs, grads, w, k, out=out),
                lambda out: bench.blocked(xs, grads, w, k, ws=ws, out=out),
                lambda out: bench.blocked(xs, grads, w, k, ws=ws, out=out)):  # reused buffers, second step
        got = {}
        run(got)
        assert set(got) == set(want)
        for kind, values in want.items():
            assert set(got[kind]) == set(values), kind
            for key, value in values.items():
                torch.testing.assert_close(got[kind][key], value, msg=f'{kind} {key}')
    doc = bench.main(['--batch-size', '2', '--channels', '4', '--img-size', '2', '--blocks', '5',
                      '--block-size', '2', '--rounds', '2'])
    assert set(doc['speedup_median']) == {'blocked', 'blocked, reused'} and doc['edges'] == 15


@pytest.mark.skipif(not Path('/usr/share/datasets/fashion-mnist').is_dir(), reason='Fashion-MNIST not installed')
def test_budget_benchmark_tiny_run_writes_every_required_key(tmp_path):
    budget = _load('budget')
    out = tmp_path / 'budget'
    argv = ['--budgets', '0.6', '--seeds', '0', '--train-size', '256', '--epochs', '1', '--max-steps', '2',
            '--test-size', '200', '--curve-test-size', '200', '--jobs', '1', '--out-dir', str(out)]
    assert budget.main(argv) == 0
    runs = sorted(p.name for p in out.glob('*.json'))
    assert runs == ['long_budget0.6_seed0.json', 'long_random0.6_seed0.json', 'long_static0.6_seed0.json']
    required = {'network', 'variant', 'node_budget', 'model_args', 'top1', 'top1_live', 'executed_share',
                'executed_block_share', 'executed_macs', 'dense_macs', 'patterns', 'removal_per_class', 'node_shares',
                'train_time_s', 'curve', 'env'}
    recs = {name: json.loads((out / name).read_text()) for name in runs}
    for rec in recs.values():
        assert required <= set(rec), required - set(rec)
    rnd, static = recs['long_random0.6_seed0.json'], recs['long_static0.6_seed0.json']
    assert rnd['model_args']['removal'] == 'random' and 0.45 < rnd['executed_share'] < 0.75
    assert rnd['executed_macs'] < rnd['dense_macs'] and rnd['patterns'] > 10
    # the static network of equal compute: fewer blocks, MACs near the budget's
    assert sum(static['model_args']['layers']) < 18 and abs(static['macs'] / rnd['executed_macs'] - 1) < 0.15
    md = (tmp_path / 'budget.md').read_text()
    assert '## long: stages of [2, 2, 12, 2] blocks' in md and 'budget0.6 vs static0.6' in md
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob('*.json')}
    assert budget.main(argv) == 0  # a rerun skips finished runs
    assert {p: p.stat().st_mtime_ns for p in out.glob('*.json')} == mtimes
    tiny = ['--budgets', '0.6', '--out-dir', str(out), '--timing-rounds', '1', '--timing-images-b1', '2',
            '--timing-images-b64', '64', '--test-size', '200']
    assert budget.main(['--timing', *tiny]) == 0
    timing = json.loads((tmp_path / 'budget_timing.json').read_text())['networks']['long']
    assert {'twin', 'off', 'budget0.6', 'random0.6', 'static0.6'} == set(timing['batch1']) == set(timing['batch64'])
    assert budget.main(['--analyse', *tiny]) == 0
    assert (tmp_path / 'budget_routing' / 'long_budget0.6_seed0' / 'routing.json').exists()
    assert 'Inference time against the twin' in (tmp_path / 'budget.md').read_text()


def test_compiled_benchmark_times_compiles_and_interleaved_rounds(tmp_path, monkeypatch):
    """benchmarks/compiled.py's two child jobs in this process on dynamo's eager backend (seconds), a record
    assembled as run_model does, the report's verdicts, and main skipping a finished model."""
    compiled = _load('compiled')
    monkeypatch.setattr(compiled, 'OUT', tmp_path / 'compiled')
    monkeypatch.setattr(compiled, 'REPORT', tmp_path / 'compiled.md')
    argv = ['--models', 'ddw_resnet18', '--batch-size', '2', '--img-size', '32', '--rounds', '2', '--steps', '1',
            '--threads', '1', '--window-s', '0', '--backend', 'eager']
    args = compiled.parse_args(argv)
    rec = dict(model='ddw_resnet18', batch=2, px=32, backend='eager', threads=1, rounds=2, steps=1,
               environment=compiled.environment('cpu', 1, 1), ended_utc='now')
    for variant in ('twin', 'ddw'):
        torch._dynamo.reset()
        counters.clear()
        c = compiled.compile_child(argparse.Namespace(**{**vars(args), 'child': ['compile', variant]}))
        # one graph per mode, traced on the first call: the steady calls timed after it do not recompile
        assert counters['stats']['unique_graphs'] == 2, dict(counters['stats'])
        assert c['train_compile_s'] == pytest.approx(c['train_first_s'] - c['train_step_s'])
        rec[f'{variant}_compile'] = c
    rec.update(compiled.bench_child(args))
    assert rec['steps_per_window'] == {'train': 1, 'infer': 1}
    for mode in ('train', 'infer'):
        rounds = rec['throughput'][mode]
        assert len(rounds) == 2 and all(r['ratio'] == pytest.approx(r['ddw'] / r['twin']) for r in rounds)
    (tmp_path / 'compiled').mkdir()
    path = tmp_path / 'compiled' / 'ddw_resnet18_b2_32.json'
    path.write_text(json.dumps(rec))
    mtime = path.stat().st_mtime_ns
    assert compiled.main(argv) == 0  # finished: skipped, only the report is written
    assert path.stat().st_mtime_ns == mtime
    md = (tmp_path / 'compiled.md').read_text()
    assert md.count('| ddw_resnet18 |') == 2 and 'backend eager' in md
    ratio = rec['ddw_compile']['train_compile_s'] / rec['twin_compile']['train_compile_s']
    assert f'| {ratio:.2f} | {"met" if ratio <= 2 else "not met"} |' in md
    assert compiled.throughput_verdict(0.99, 0.975, 1.1) == 'met'
    assert compiled.throughput_verdict(0.95, 0.90, 0.969) == 'not met'
    assert compiled.throughput_verdict(0.98, 0.90, 1.05) == 'unresolved (median above)'
    gm, lo, hi = compiled.geometric_interval([0.9, 1.0, 1.1])
    assert lo < gm < hi and gm == pytest.approx((0.9 * 1.0 * 1.1) ** (1 / 3))


def test_conv_inputs_captures_each_blocks_input_and_times_both(tmp_path):
    conv = _load('conv_inputs')
    argv = ['--model', 'ddw_resnet18', '--batch-size', '2', '--img-size', '32', '--rounds', '2', '--repeats', '1',
            '--threads', '1', '--json', str(tmp_path / 'c.json')]
    args = conv.parse_args(argv)
    ddw, twin, names, inputs, x, _ = conv.captured(args)
    assert names == [f'layer{s}.{b}' for s in range(1, 5) for b in range(2)]
    # the same stem weights: the first block sees the same input in both models
    torch.testing.assert_close(inputs['ddw']['layer1.0'], inputs['twin']['layer1.0'], rtol=0, atol=0)
    blocks = dict(twin.named_modules())
    with torch.no_grad():  # the twin's block 1 input is block 0's output; DDW's is its weighted sum
        torch.testing.assert_close(inputs['twin']['layer2.1'], blocks['layer2.0'](inputs['twin']['layer2.0']))
        assert not torch.allclose(inputs['ddw']['layer2.1'], inputs['twin']['layer2.1'])
    assert conv.main(argv) == 0
    res = json.loads((tmp_path / 'c.json').read_text())
    assert set(res['per_block']) == set(names) and len(res['steps']['ddw']) == 2
    assert res['isolated_ratio']['median'] == pytest.approx(statistics.median(
        d / t for d, t in zip(res['block_seconds']['ddw'], res['block_seconds']['twin'])))
    assert res['per_block']['layer3.1']['ddw_input']['shape'] == [2, 256, 2, 2]
    assert res['step_medians']['ddw']['minor_faults'] >= 0


def test_compile_breakdown_report_divides_by_the_same_models_twin(tmp_path, monkeypatch):
    bd = _load('compile_breakdown')
    monkeypatch.setattr(bd, 'REPORT', tmp_path / 'r.md')
    env = dict(load_average=[1.0, 1.2, 1.1])

    def rec(model, mode, variant, compile_s):
        return dict(model=model, mode=mode, variant=variant, compile_s=compile_s, step_s=0.1, kernels=7,
                    phases_s={p: 1.0 for p in bd.PHASES.values()}, environment=env)
    records = [rec('m', 'infer', 'dynamic', 50.0), rec('m', 'infer', 'twin', 20.0), rec('m', 'train', 'twin', 80.0),
               rec('m', 'infer', 'chain', 21.0), rec('n', 'infer', 'static', 9.0)]
    rows = [line for line in bd.report(records, [], False).splitlines() if line.startswith(('| m ', '| n '))]
    assert [r.split(' | ')[2] for r in rows] == ['twin', 'chain', 'dynamic', 'twin', 'static']  # variant order
    assert rows[2].split(' | ')[4] == '2.50'  # 50 s against the infer twin's 20 s, not the train twin's 80 s
    assert rows[1].split(' | ')[4] == '1.05'
    assert rows[4].split(' | ')[4] == '-'  # no twin of model n was measured


@pytest.mark.skipif(os.environ.get('TIMM_DDW_NO_EXTENSION') == '1', reason='extension switched off')
def test_fused_sum_times_the_operator_against_inductors_sum(tmp_path, monkeypatch):
    assert timm_ddw.fused.kernel_available()  # CI has a compiler
    fs = _load('fused_sum')
    fns = fs.contenders()
    xs, w = [torch.randn(2, 3, 4, 5) for _ in range(3)], torch.rand(2, 3)
    ref = sum(x * w[:, k].reshape(-1, 1, 1, 1) for k, x in enumerate(xs))
    for f in fns.values():  # all three compute the same sum
        torch.testing.assert_close(f(xs, w), ref)
    monkeypatch.setattr(fs, 'CASES', [((2, 8, 4, 4), (3,))])
    assert fs.main(['--rounds', '3', '--calls', '1', '--threads', '1', '--json', str(tmp_path / 'f.json')]) == 0
    rows = json.loads((tmp_path / 'f.json').read_text())['rows']
    assert [(r['shape'], r['inputs']) for r in rows] == [([2, 8, 4, 4], 3)]
    med = rows[0]['median_ms']
    assert set(med) == {'inductor', 'operator', 'addcmul_'}
    assert rows[0]['operator_speedup'] == pytest.approx(med['inductor'] / med['operator'])


def test_t_975_matches_students_table_beyond_the_tabled_range():
    runs = _load('_runs')
    for dof, table in [(10, 2.228), (19, 2.093), (30, 2.042), (120, 1.980)]:
        assert runs.t_975(dof) == pytest.approx(table, abs=1e-3)


def test_compiled_paired_drops_round_one_and_pairs_rounds(tmp_path, monkeypatch):
    paired = _load('compiled_paired')
    monkeypatch.setattr(paired, 'OUT', tmp_path)
    monkeypatch.setattr(paired, 'REPORT', tmp_path / 'report.md')
    twin = [1.0, 10.0, 20.0, 10.0]  # round 1 (compiling) would pull every mean down
    values = dict(static=twin, ddw=[0.1, 9.0, 18.0, 9.0], **{'ddw-chain': twin, 'ddw-learned': [0.1, 9.5, 19.0, 9.5]})
    rec = dict(model='ddw_resnet50', date='2026-12-07 20:00 UTC', cpu_count=2, device_name='x86_64', threads=2,
               torch='2', timm='1', args=dict(steps=3),
               throughput={m: {v: dict(values=vals) for v, vals in values.items()} for m in ('train', 'infer')})
    (tmp_path / 'ddw_resnet50_b8_128_parts.json').write_text(json.dumps(rec))
    text = paired.report([], False)
    # paired per round: 0.9 in every round, so the interval collapses onto it (unpaired it would not)
    assert '| ddw_resnet50 | train | 3 | 0.900 (0.900-0.900) | not met |' in text  # the parts run stands in
    assert '| ddw_resnet50 | infer | 3 | 1.000 (1.000-1.000) | 0.950 (0.950-0.950) | 0.900 (0.900-0.900) |' in text
