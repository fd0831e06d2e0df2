"""Routing statistics: the accumulator against plain numpy, figures, files and the report job."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_ddw
from timm_ddw.data import FASHION_MNIST_DIR, fashion_mnist
from timm_ddw.routing import RoutingStats, collect_routing, plot_stage_heatmaps
from timm_ddw.routing_report import routing_report

N1, N2 = 5, 4
CHAIN = np.eye(N2, k=-1, dtype=bool)  # edges j-1 -> j only


def _captured(seed: int = 0, samples: int = 23):
    """Adjacency matrices with exact zeros (closed edges), some nodes fully cut off, labels 0..3."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(samples, N1, N1, generator=g).tril(-1)
    a = torch.where(a < 0.35, torch.zeros_like(a), a)
    a[3, 2, :] = 0          # sample 3: node 2 gets no input
    a[5, :, 1] = 0          # sample 5: node 1 sends nothing
    a[7, 4, :] = 0          # sample 7: the output node gets nothing
    a[9, :, 0] = 0          # sample 9: the input node sends nothing
    b = torch.rand(samples, N2, N2, generator=g).tril(-1)
    b = torch.where(b < 0.3, torch.zeros_like(b), b) * torch.from_numpy(CHAIN)
    labels = torch.randint(0, 4, (samples,), generator=g)
    return a.float(), b.float(), labels


def _feed(stats: RoutingStats, a, b, labels, splits=(1, 7, 2, 13)):
    start = 0
    for k, size in enumerate(splits):
        sl = slice(start, start + size)
        if k % 2:  # odd batches as a list of two forwards, as capture_routing gives them
            half = (size + 1) // 2
            part = {'s1': [a[sl][:half], a[sl][half:]], 's2': [b[sl][:half], b[sl][half:]]}
        else:
            part = {'s1': a[sl], 's2': b[sl]}
        stats.update(part, labels[sl] if labels is not None else None)
        start += size
    assert start == a.shape[0]


def _removed(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-node share of samples with all existing input or all existing output edges closed (loops)."""
    n = mask.shape[0]
    out = np.zeros(n)
    for m in x:
        for k in range(n):
            ins = [m[k, i] for i in range(n) if mask[k, i]]
            outs = [m[j, k] for j in range(n) if mask[j, k]]
            out[k] += (bool(ins) and all(v == 0 for v in ins)) or (bool(outs) and all(v == 0 for v in outs))
    return out / len(x)


def _check_against_numpy(stats: RoutingStats, a, b, labels, num_classes):
    for name, x, mask in (('s1', a, np.tri(N1, k=-1, dtype=bool)), ('s2', b, CHAIN)):
        x = x.double().numpy()
        s = stats.stage(name)
        np.testing.assert_array_equal(s['edges'], mask)
        nan = ~mask
        assert np.isnan(s['mean'][nan]).all() and np.isnan(s['std'][nan]).all()
        np.testing.assert_allclose(s['mean'][mask], x.mean(0)[mask], rtol=0, atol=1e-12)
        np.testing.assert_allclose(s['std'][mask], x.std(0)[mask], rtol=0, atol=1e-12)
        np.testing.assert_allclose(s['closed_share'][mask], (x == 0).mean(0)[mask], rtol=0, atol=1e-12)
        np.testing.assert_allclose(s['node_removed_share'], _removed(x, mask), rtol=0, atol=1e-12)
        lab = labels.numpy()
        assert s['class_mean'].shape == (num_classes, *mask.shape)
        for c in range(num_classes):
            if (lab == c).any():
                np.testing.assert_allclose(s['class_mean'][c][mask], x[lab == c].mean(0)[mask], atol=1e-12)
                assert s['class_count'][c] == (lab == c).sum()
            else:
                assert np.isnan(s['class_mean'][c]).all() and s['class_count'][c] == 0


def test_stats_equal_numpy_on_uneven_batches():
    a, b, labels = _captured()
    stats = RoutingStats(edges={'s2': CHAIN}, num_classes=5)  # class 4 never occurs
    _feed(stats, a, b, labels)
    assert stats.num_samples == 23
    _check_against_numpy(stats, a, b, labels, 5)
    # the removed-node cases planted in _captured are counted
    s1 = stats.stage('s1')['node_removed_share']
    assert (s1 * 23 >= 1).all()

    summary = stats.stage_summary('s1')
    x = a.double().numpy()
    mask = np.tri(N1, k=-1, dtype=bool)
    mean = np.where(mask, x.mean(0), -1)
    j, i = np.unravel_index(mean.argmax(), mean.shape)
    assert (summary['strongest_edge']['from'], summary['strongest_edge']['to']) == (i, j)
    assert summary['mean_edge_weight'] == pytest.approx(x.mean(0)[mask].mean())
    assert summary['closed_share'] == pytest.approx((x == 0).mean(0)[mask].mean())
    assert f"strongest {i}->{j}" in stats.text_summary().splitlines()[1]


def test_class_count_grows_without_num_classes_and_std_is_stable():
    a, b, labels = _captured(seed=1, samples=40)
    stats = RoutingStats(edges={'s2': CHAIN})
    _feed(stats, a, b, labels, splits=(3, 17, 1, 19))
    _check_against_numpy(stats, a, b, labels, int(labels.max()) + 1)
    # many one-sample updates around a large offset: Welford keeps full float64 precision
    g = torch.Generator().manual_seed(2)
    x = (1e4 + 1e-3 * torch.randn(600, 3, 3, generator=g, dtype=torch.float64)).tril(-1)
    one = RoutingStats()
    for k in range(600):
        one.update({'s': x[k:k + 1]})
    mask = np.tri(3, k=-1, dtype=bool)
    np.testing.assert_allclose(one.stage('s')['std'][mask], x.numpy().std(0)[mask], rtol=1e-6)


def test_update_rejects_bad_input():
    a, b, labels = _captured()
    stats = RoutingStats()
    with pytest.raises(ValueError, match='labels has 3 entries for 23'):
        stats.update({'s1': a}, labels[:3])
    with pytest.raises(ValueError, match='same samples'):
        stats.update({'s1': a, 's2': b[:5]})
    with pytest.raises(ValueError, match='B x N x N'):
        stats.update({'s1': a[0]})
    with pytest.raises(ValueError, match='out of range for num_classes=2'):
        RoutingStats(num_classes=2).update({'s1': a}, labels)
    stats.update({'s1': a})
    with pytest.raises(ValueError, match='differ from the earlier updates'):
        stats.update({'s2': b})


def test_save_load_and_continue(tmp_path):
    a, b, labels = _captured()
    stats = RoutingStats(edges={'s2': CHAIN}, num_classes=5, class_names=list('abcde'), meta={'model': 'x'})
    _feed(stats, a[:10], b[:10], labels[:10], splits=(4, 6))
    paths = stats.save(tmp_path, plots=False)
    assert {p.name for p in paths.values()} == {'routing.json', 'routing.npz', 'summary.txt'}
    doc = json.loads(paths['json'].read_text())
    assert doc['schema'] == 'timm-ddw/routing' and doc['schema_version'] == 1
    assert doc['num_samples'] == 10 and doc['class_names'] == list('abcde') and doc['meta'] == {'model': 'x'}
    s2 = next(s for s in doc['stages'] if s['name'] == 's2')
    assert s2['num_nodes'] == N2 and s2['num_edges'] == 3 and s2['edges'] == [[0, 1], [1, 2], [2, 3]]
    assert s2['mean'][0] == [None] * N2  # node 0 has no inputs
    np.testing.assert_allclose(np.array(s2['std'], dtype=float), stats.stage('s2')['std'], equal_nan=True)
    assert set(s2['summary']) == {'mean_edge_weight', 'closed_share', 'nodes_removed_share', 'strongest_edge',
                                  'most_variable_edge'}

    loaded = RoutingStats.load(paths['json'])
    assert loaded.compare(stats) == {s: dict.fromkeys(('mean', 'std', 'closed_share', 'node_removed_share'), 0.0)
                                     for s in ('s1', 's2')}
    # the files keep the exact running state: updating a reloaded run equals one uninterrupted run
    rest = dict(splits=(5, 8))
    _feed(loaded, a[10:], b[10:], labels[10:], **rest)
    _check_against_numpy(loaded, a, b, labels, 5)
    assert loaded.stage('s2')['edges'].tolist() == CHAIN.tolist()


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_figures_have_one_panel_per_stage_and_class(tmp_path):
    pytest.importorskip('matplotlib')
    from timm_ddw.routing import plot_class_differences, plot_stage_heatmaps

    a, b, labels = _captured()
    stats = RoutingStats(edges={'s2': CHAIN}, num_classes=4, class_names=['w', 'x', 'y', 'z'])
    _feed(stats, a, b, labels)
    for which in ('mean', 'std'):
        fig = plot_stage_heatmaps(stats, which)
        axes = _image_axes(fig)
        assert [ax.get_title() for ax in axes] == ['s1 (N=5)', 's2 (N=4)']
        for ax, name in zip(axes, ('s1', 's2'), strict=True):
            shown = ax.images[0].get_array()  # row 0 and the last column never hold an edge
            expect = stats.stage(name)[which][1:, :-1]
            np.testing.assert_allclose(shown.filled(np.nan), expect, equal_nan=True)
            assert ax.get_yticklabels()[-1].get_text().startswith('out')
        assert len(fig.axes) == 3  # two panels and one colour bar
    fig = plot_class_differences(stats)
    present = len(np.unique(labels.numpy()))
    assert len(_image_axes(fig)) == present * 2
    diff = stats.stage('s1')['class_mean'][0] - stats.stage('s1')['mean']
    np.testing.assert_allclose(_image_axes(fig)[0].images[0].get_array().filled(np.nan), diff[1:, :-1],
                               equal_nan=True)

    paths = stats.save(tmp_path)
    for key in ('mean_png', 'std_png', 'closed_png', 'class_diff_png'):
        img = np.asarray(Image.open(paths[key]).convert('RGB')).astype(int)
        assert img.shape[0] > 200 and img.shape[1] > 400
        coloured = (np.abs(img - img.mean(-1, keepdims=True)).max(-1) > 40).mean()
        assert coloured > 0.05, f'{key}: only {coloured:.3f} of the pixels are coloured'


def test_save_never_mixes_two_reports(tmp_path):
    pytest.importorskip('matplotlib')
    a, b, labels = _captured()
    stats = RoutingStats(edges={'s2': CHAIN}, num_classes=4)
    _feed(stats, a, b, labels)
    stats.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match='already holds a routing report .routing.json, .*nothing was written'):
        stats.save(tmp_path, plots=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / 'notes.txt').write_text('mine')
    paths = stats.save(tmp_path, plots=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in paths.values()] + ['notes.txt'])


def test_heatmap_numbers_follow_the_data_scale():
    pytest.importorskip('matplotlib')
    from timm_ddw.routing_plots import value_format

    assert [value_format(v) for v in (1.0, 0.5, 0.02, 0.0049, 0.0)] == ['{:.2f}', '{:.2f}', '{:.3f}', '{:.4f}',
                                                                       '{:.2f}']
    a, _, _ = _captured()
    stats = RoutingStats()
    stats.update({'s1': 0.5 + 0.01 * a})  # std of each edge about 0.003
    fig = plot_stage_heatmaps(stats, 'std')
    texts = [t.get_text() for ax in _image_axes(fig) for t in ax.texts]
    vmax = np.nanmax(stats.stage('s1')['std'])
    assert texts and all(len(t.split('.')[1]) == len(value_format(vmax).format(0.0).split('.')[1]) for t in texts)
    assert not any(t in ('0.00', '0.01') for t in texts), texts  # two decimals would show nothing


def test_missing_matplotlib_is_explained(tmp_path, monkeypatch):
    import sys

    a, b, _ = _captured()
    stats = RoutingStats()
    stats.update({'s1': a})
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.warns(UserWarning, match=r"timm-ddw\[plots\]"):
        paths = stats.save(tmp_path / 'a')
    assert not any(p.suffix == '.png' for p in paths.values())
    with pytest.raises(ImportError, match=r"timm-ddw\[plots\]"):
        stats.save(tmp_path / 'b', plots=True)


def _model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('ddw_resnet18', **kwargs).eval()
    with torch.no_grad():
        for stage in timm_ddw.graph_stages(model).values():
            if getattr(stage, 'tau', None) is not None:
                stage.tau.fill_(0.5)  # close some edges for some samples
                stage.router_bias.normal_(0, 1.5)
    return model


def test_collect_routing_equals_direct_capture():
    model = _model(num_classes=3)
    x = torch.randn(7, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    stats = collect_routing(model, [(x[:3], y[:3]), (x[3:], y[3:]), (x, y)], max_batches=2, progress=False)
    assert stats.num_samples == 7 and stats.meta['model'] == 'ddw_resnet18'
    with timm_ddw.capture_routing(model) as cap, torch.no_grad():
        model(x)
    for name, (m,) in cap.items():
        m = m.double().numpy()
        s = stats.stage(name)
        mask = s['edges']
        np.testing.assert_allclose(s['mean'][mask], m.mean(0)[mask], atol=1e-6)
        np.testing.assert_allclose(s['closed_share'][mask], (m == 0).mean(0)[mask])
        np.testing.assert_allclose(s['class_mean'][2][mask], m[[2, 3]].mean(0)[mask], atol=1e-6)
    assert any(np.nanmax(stats.stage(n)['closed_share']) > 0 for n in stats.stage_names)

    chain = collect_routing(timm.create_model('ddw_resnet18', wiring='chain'), [x[:2]], progress=False)
    s = chain.stage('layer1')
    assert s['edges'].sum() == 2 and chain.meta['wiring']['layer1'] == 'chain'
    assert np.nanmin(s['mean']) == 1.0 and np.nanmax(s['closed_share']) == 0.0


# ------------------------------------------------------------------ the report job (timm-ddw routing)
def _report(**kwargs):
    return routing_report('ddw_resnet18', workers=0, progress=False, batch_size=4, **kwargs)


def _image_folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for cls in ('cat', 'dog'):
        (root / cls).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / cls / f'{k}.png')
    return root


def _closing_model(bias: float = -20.0, **kwargs):
    """A model whose edge 0 -> 1 of layer1 is closed (bias -20) or open (+20) for every sample."""
    model = _model(**kwargs)
    with torch.no_grad():
        model.layer1.router_bias[0] = bias
        model.layer1.router_weight[0] = 0.0
    return model


def test_report_image_folder_with_safetensors_and_config(tmp_path, capsys):
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    model = _closing_model(num_classes=2)
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    save_file(model.state_dict(), str(ckpt / 'model.safetensors'))
    save_config_for_hf(model, str(ckpt / 'config.json'), model_args=dict(num_classes=2))
    data = _image_folder(tmp_path / 'images')
    out = tmp_path / 'out'
    stats, paths = _report(checkpoint=ckpt / 'model.safetensors', data=str(data), output=out, img_size=32)
    doc = json.loads((out / 'routing.json').read_text())
    assert doc['num_samples'] == 6 and doc['class_names'] == ['cat', 'dog'] and doc['class_count'] == [3, 3]
    assert doc['meta']['input_size'] == [3, 32, 32] and doc['meta']['model'] == 'ddw_resnet18'
    layer1 = doc['stages'][0]
    assert layer1['name'] == 'layer1' and layer1['closed_share'][1][0] == 1.0  # the checkpoint was loaded
    assert [s['name'] for s in doc['stages']] == ['layer1', 'layer2', 'layer3', 'layer4']
    assert 'strongest' in stats.text_summary() and 'most variable' in stats.text_summary()
    names = {p.name for p in out.iterdir()}
    assert {'routing.json', 'routing.npz', 'summary.txt'} <= names
    try:
        import matplotlib  # noqa: F401
        assert {'routing_mean.png', 'routing_std.png', 'routing_class_diff.png'} <= names
    except ImportError:
        pass
    assert RoutingStats.load(out).num_samples == 6

    # a second report never lands next to the first: the next free folder is used
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _, paths = _report(checkpoint=ckpt / 'model.safetensors', data=str(data), output=out, img_size=32, plots=False,
                       limit=2)
    assert paths['json'].parent == tmp_path / 'out-1' and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list((tmp_path / 'out-1').glob('*.png'))


def test_report_torch_checkpoint_ema_and_kwargs(tmp_path):
    plain, ema = _closing_model(20.0, num_classes=2).state_dict(), _closing_model(num_classes=2).state_dict()
    torch.save({'state_dict': plain, 'state_dict_ema': ema, 'epoch': 1}, tmp_path / 'last.pth.tar')
    data = _image_folder(tmp_path / 'images', per_class=1)
    for use_ema, closed in ((False, 0.0), (True, 1.0)):
        _, paths = _report(checkpoint=tmp_path / 'last.pth.tar', data=str(data), img_size=32,
                           model_kwargs=dict(num_classes=2), plots=False, use_ema=use_ema,
                           output=tmp_path / f'out{use_ema}')
        doc = json.loads(paths['json'].read_text())
        assert doc['stages'][0]['closed_share'][1][0] == closed
    assert not (tmp_path / 'outFalse' / 'routing_mean.png').exists()


@pytest.mark.skipif(not (FASHION_MNIST_DIR / 't10k-labels-idx1-ubyte.gz').is_file(), reason='no Fashion-MNIST')
def test_report_fashion_mnist(tmp_path):
    from safetensors.torch import save_file

    save_file(_model(num_classes=10, in_chans=1).state_dict(), str(tmp_path / 'w.safetensors'))
    stats, _ = _report(checkpoint=tmp_path / 'w.safetensors', model_kwargs=dict(num_classes=10, in_chans=1),
                       data='fashion-mnist', limit=10, img_size=32, output=tmp_path / 'out', plots=False)
    doc = json.loads((tmp_path / 'out' / 'routing.json').read_text())
    labels = fashion_mnist('test').labels[:10]
    assert doc['num_samples'] == 10 and doc['class_count'] == np.bincount(labels, minlength=10).tolist()
    assert doc['class_names'][9] == 'Ankle boot' and doc['meta']['input_size'] == [1, 32, 32]
    assert 'routing over 10 samples' in stats.text_summary()


def test_report_bad_arguments(tmp_path):
    from safetensors.torch import save_file

    data = _image_folder(tmp_path / 'images', per_class=1)
    save_file(_model(num_classes=2).state_dict(), str(tmp_path / 'w.safetensors'))
    good = dict(checkpoint=tmp_path / 'w.safetensors', data=str(data), output=tmp_path / 'o', img_size=32)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('no images here')
    _image_folder(tmp_path / 'loose')
    Image.new('RGB', (8, 8)).save(tmp_path / 'loose' / 'stray.png')
    cases = [
        (dict(good, model='ddw_nope'), ValueError, "'ddw_nope' is not a timm model"),
        (dict(good, model='resnet18'), ValueError, "'resnet18' is not a DDW model"),
        (dict(good, checkpoint=tmp_path / 'missing.pth'), FileNotFoundError, 'missing.pth: no such file'),
        (dict(good, model_kwargs=dict(num_classes=2), data=str(tmp_path / 'empty')), ValueError, 'Found 0 images'),
        (dict(good, model_kwargs=dict(num_classes=2), data=str(tmp_path / 'loose')), ValueError,
         'holds images outside class sub-folders .e.g. stray.png.'),
        (dict(good, data=str(tmp_path / 'nowhere')), ValueError, "neither 'fashion-mnist' nor an existing folder"),
        (dict(good, model_kwargs=dict(num_classes=2), limit=0), ValueError, 'limit=0: must be a positive integer'),
        (dict(good, checkpoint=None), ValueError, 'give a checkpoint file or pretrained=True'),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            routing_report(**{'model': 'ddw_resnet18', 'progress': False, 'workers': 0, **kwargs})
    assert not (tmp_path / 'o').exists()  # no empty report folder left behind
