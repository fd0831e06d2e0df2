"""The dense/er/ba/ws wirings and the ablation experiment script."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_ddw
from timm_ddw.graph import GraphStage, complete_graph
from timm_ddw.wirings import dag_from_edges

nx = pytest.importorskip('networkx')

ROOT = Path(__file__).resolve().parents[1]
MODELS = ['ddw_resnet18', 'ddw_resnet50', 'ddw_resnet101', 'ddw_resnext50_32x4d', 'ddw_mobilenetv2_100',
          'ddw_efficientnet_b0', 'ddw_regnetx_600m', 'ddw_regnetx_1600m', 'ddw_regnety_600m']
RANDOM = ('er', 'ba', 'ws')
SEEDS = range(5)


def _stage_nodes() -> set:
    """Node counts (blocks + output node) of every stage of the nine models, built on the meta device."""
    sizes = set()
    with torch.device('meta'):
        for name in MODELS:
            m = timm.create_model(name, wiring='chain')
            sizes |= {s.num_nodes for s in m.modules() if isinstance(s, GraphStage)}
    return sizes


STAGE_NODES = sorted(_stage_nodes())


def _reach(adj: dict, start: int) -> set:
    seen, todo = {start}, [start]
    while todo:
        for k in adj.get(todo.pop(), ()):
            if k not in seen:
                seen.add(k)
                todo.append(k)
    return seen


def _nx_edges(kind: str, n: int, seed: int) -> set:
    """The paper's generators with its settings, independently of the package."""
    if kind == 'er':
        g = nx.erdos_renyi_graph(n, 0.2, seed=seed)
    elif kind == 'ba':
        g = nx.barabasi_albert_graph(n, min(5, n - 1), seed=seed)
    else:
        g = nx.watts_strogatz_graph(n, min(4, n - 1), 0.75, seed=seed)
    return {(min(u, v), max(u, v)) for u, v in g.edges()}


def test_stage_sizes_cover_the_models():
    # ResNet-18 stages have 2 blocks, ResNet-101's third 23, RegNetX-1.6GF's 2/4/10/2, MobileNetV2 has 1-block stages
    assert {2, 3, 24, 11}.issubset(STAGE_NODES)


@pytest.mark.parametrize('kind', RANDOM)
def test_random_wirings_are_reachable_dags_from_the_generators(kind):
    fn = timm_ddw.WIRINGS[kind].graph
    for n in STAGE_NODES:
        for seed in SEEDS:
            preds = fn(n, seed)
            assert len(preds) == n and preds[0] == []
            edges = {(i, j) for j in range(n) for i in preds[j]}
            for j in range(1, n):
                assert preds[j] and len(set(preds[j])) == len(preds[j]) and all(0 <= i < j for i in preds[j])
            succ = {}
            pred = {}
            for i, j in edges:
                succ.setdefault(i, []).append(j)
                pred.setdefault(j, []).append(i)
            assert _reach(succ, 0) == set(range(n)), (kind, n, seed)  # everything reachable from the input
            assert _reach(pred, n - 1) == set(range(n)), (kind, n, seed)  # everything reaches the output
            # every generated edge kept (oriented low -> high); additions are only repair edges to neighbours
            if n > 2:
                gen = _nx_edges(kind, n, seed)
                assert gen <= edges
                assert all(j == i + 1 for i, j in edges - gen), (kind, n, seed, edges - gen)


def test_repair_rule():
    # 4 nodes, only edge 0-2: node 1 gets 0->1 (no predecessor), node 1 then 1->2 (no successor),
    # node 3 gets 2->3 (no predecessor); node 0 already has a successor
    assert dag_from_edges(4, [(2, 0)]) == [[], [0], [0, 1], [2]]
    assert dag_from_edges(3, []) == [[], [0], [1]]


@pytest.mark.parametrize('kind', RANDOM)
def test_seed_determines_the_graph(kind):
    fn = timm_ddw.WIRINGS[kind].graph
    assert fn(2, 0) == fn(2, 7) == [[], [0]]  # one block: the only DAG
    for n in [s for s in STAGE_NODES if s >= 10]:
        graphs = [fn(n, seed) for seed in SEEDS]
        assert graphs == [fn(n, seed) for seed in SEEDS]
        for a in range(len(graphs)):
            for b in range(a + 1, len(graphs)):
                assert graphs[a] != graphs[b], (kind, n, a, b)


@pytest.mark.parametrize('kind', ['ws', 'er'])
def test_equal_sized_stages_draw_their_own_graphs(kind):
    """RandWire draws each stage's graph separately; one shared seed gave every 13-node stage one graph."""
    args = dict(wiring=kind, layers=(12, 12, 12, 12), channels=(8, 8, 8, 8), stem_width=8, device='meta')
    graphs = [s.preds for s in timm_ddw.graph_stages(timm.create_model('ddw_resnet18', **args)).values()]
    assert all(len(g) == 13 for g in graphs)
    assert len({json.dumps(g) for g in graphs}) == 4
    again = [s.preds for s in timm_ddw.graph_stages(timm.create_model('ddw_resnet18', **args)).values()]
    assert again == graphs  # reproducible from wiring_seed
    other = timm.create_model('ddw_resnet18', **dict(args, wiring_seed=1))
    assert [s.preds for s in timm_ddw.graph_stages(other).values()] != graphs


def test_bad_node_count():
    with pytest.raises(ValueError, match='num_nodes'):
        timm_ddw.WIRINGS['er'].graph(1, 0)


@pytest.mark.parametrize('aggregation', ['bounded', 'sum'])
def test_dense_is_the_complete_graph_with_unit_weights(aggregation):
    m = timm.create_model('ddw_resnet18', wiring='dense', in_chans=1, num_classes=3, layers=(3, 3, 3, 3),
                          channels=(8, 8, 8, 8), stem_width=8, aggregation=aggregation).eval()
    assert not any(k.rpartition('.')[2] in ('router_weight', 'router_bias', 'tau') for k in m.state_dict())
    stage = m.layer2
    assert stage.preds == complete_graph(4)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        f0 = stage.get_submodule('0')(x)
        f1 = stage.get_submodule('1')(f0)
        if aggregation == 'sum':
            f2 = stage.get_submodule('2')(f0 + f1)
            expect = f0 + f1 + f2
        else:  # weight 1 on every edge, bounded: the mean of the sources
            f2 = stage.get_submodule('2')((f0 + f1) / 2)
            expect = (f0 + f1 + f2) / 3
        torch.testing.assert_close(stage(x), expect)
        with timm_ddw.capture_routing(m) as rec:
            m(torch.randn(2, 1, 32, 32))
    assert torch.equal(rec['layer1'][0][0], torch.ones(4, 4).tril(-1))


def test_networkx_missing_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'networkx', None)
    with pytest.raises(ImportError, match=r'pip install timm-ddw\[graphs\]'):
        timm_ddw.WIRINGS['ws'].graph(5, 0)
    assert timm_ddw.WIRINGS['ws'].graph(2, 0) == [[], [0]]  # no generator needed


def test_registration_does_not_import_networkx(monkeypatch):
    # networkx is an extra: registering the wirings (at ``import timm_ddw``) must not import it
    import timm_ddw.wirings as wirings
    monkeypatch.delitem(sys.modules, 'networkx')
    monkeypatch.setattr(timm_ddw.graph, 'WIRINGS', dict(timm_ddw.WIRINGS))
    importlib.reload(wirings)
    assert 'networkx' not in sys.modules and 'er' in timm_ddw.graph.WIRINGS


@pytest.mark.parametrize('model_name,kind', [('ddw_regnetx_600m', 'ws'), ('ddw_mobilenetv2_100', 'er')])
def test_saved_model_keeps_its_graph(tmp_path, model_name, kind):
    from timm.models import save_for_hf
    args = dict(wiring=kind, wiring_seed=3, num_classes=5)
    torch.manual_seed(0)
    model = timm.create_model(model_name, **args).eval()
    other = timm.create_model(model_name, **dict(args, wiring_seed=4))
    preds = {n: s.preds for n, s in model.named_modules() if isinstance(s, GraphStage)}
    assert preds != {n: s.preds for n, s in other.named_modules() if isinstance(s, GraphStage)}
    save_for_hf(model, tmp_path, model_args=args)
    assert json.loads((tmp_path / 'config.json').read_text())['model_args']['wiring_seed'] == 3
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert {n: s.preds for n, s in loaded.named_modules() if isinstance(s, GraphStage)} == preds
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def _load_script():
    spec = importlib.util.spec_from_file_location('ablation', ROOT / 'benchmarks' / 'ablation.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_welch_comparison():
    abl = _load_script()
    a, b = [90.0, 91.0, 92.0], [88.0, 88.5, 89.0]
    d, t, verdict, half = abl._compare(a, b)
    # means 91 and 88.5, variances 1 and 0.25, n=3: se = sqrt(1/3 + 0.25/3); 95% half-width t(2 dof) * se
    assert d == pytest.approx(2.5) and t == pytest.approx(2.5 / (1.25 / 3) ** 0.5)
    assert half == pytest.approx(4.30 * (1.25 / 3) ** 0.5)
    assert verdict == 'larger than one std, not significant'  # t = 3.87 < 4.30 (2 dof)
    assert abl._compare([90.0, 90.1, 90.2], [88.0, 88.1, 88.2])[2] == 'exceeds the seed spread'
    assert abl._compare([90.0, 91.0, 92.0], [90.5, 91.0, 91.5])[2] == 'within the seed spread'


@pytest.mark.skipif(not Path('/usr/share/datasets/fashion-mnist').is_dir(), reason='Fashion-MNIST not installed')
def test_experiment_smoke_run(tmp_path):
    abl = _load_script()
    out = tmp_path / 'ablation'
    assert abl.main(['--smoke', '--out-dir', str(out), '--paper', str(ROOT / 'benchmarks' / 'paper_tables.json')]) == 0
    runs = sorted(p.name for p in out.glob('*.json'))
    assert runs == ['chain_seed0.json', 'dynamic_seed0.json']
    rec = json.loads((out / 'dynamic_seed0.json').read_text())
    chain = json.loads((out / 'chain_seed0.json').read_text())
    assert rec['wiring'] == 'dynamic' and rec['budget']['test_size'] == 500 and len(rec['curve']) == 1
    assert 0 <= rec['top1'] <= 100 and rec['params'] > chain['params'] and rec['macs'] > chain['macs']
    md = (tmp_path / 'ablation.md').read_text()
    assert '| chain | chain |' in md and '| er | er | +3 | 0 |' in md and '70.3 (T6, R-18)' in md
    assert (tmp_path / 'ablation_curves.png').stat().st_size > 1000
