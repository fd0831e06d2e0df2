"""The compiled CPU path's operators (fused.py): the C++ weighted-sum kernel and its ATen fallback
against float64 sums, their gradients against autograd, the edge-table operators, and compiled
complete-graph stages against eager with closed edges at the depth of ResNet-50."""
import copy
import os
import warnings

import pytest
import timm
import torch
from torch._dynamo.backends.registry import lookup_backend

import timm_ddw
from timm_ddw import fused

# tolerance relative to the largest |output|: the kernel accumulates in float32 (or float64), the
# fallback in the inputs' dtype, one rounding per step
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# per sample: fewer than one 16-element lane; one tile and a partial lane; several tiles and a tail
SHAPES = [(3, 1, 3, 5), (2, 5, 7, 9), (2, 17, 11, 13)]


def _inputs(shape, k, dtype, channels_last=False, extra=0):
    g = torch.Generator().manual_seed(k * 7 + shape[1])
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(k)]
    w = torch.rand(shape[0], k + extra, generator=g, dtype=torch.float64) * 2 - 0.5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [x.to(dtype).contiguous(memory_format=fmt) for x in xs]
    ref = sum(x.double() * w[:, i].reshape(-1, 1, 1, 1) for i, x in enumerate(xs))
    return xs, w.float() if dtype != torch.float64 else w, ref


def _check(out, ref, xs, dtype):
    assert out.dtype == dtype and out.shape == ref.shape and out.stride() == xs[0].stride()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), err


@pytest.fixture
def no_kernel(monkeypatch):
    monkeypatch.setattr(fused, '_kernel_state', False)


@pytest.fixture
def fused_on():
    was = fused.enabled()
    fused.set_enabled(True)
    yield
    fused.set_enabled(was)


@pytest.mark.skipif(os.environ.get('TIMM_DDW_NO_EXTENSION') == '1', reason='extension switched off')
@pytest.mark.parametrize('dtype', list(TOL), ids=str)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('channels_last', [False, True])
def test_kernel_matches_float64(dtype, shape, channels_last):
    assert fused.kernel_available()  # CI has a compiler: the kernel is what is tested here
    for k in (1, 2, 5, 13):  # 13: past kManyInputs, the kernel's narrow lanes
        xs, w, ref = _inputs(shape, k, dtype, channels_last, extra=3)
        _check(torch.ops.timm_ddw_kernels.weighted_sum(xs, w), ref, xs, dtype)
        _check(fused.weighted_sum(xs, w), ref, xs, dtype)  # columns past len(xs) are ignored


@pytest.mark.parametrize('dtype', list(TOL), ids=str)
@pytest.mark.parametrize('channels_last', [False, True])
def test_fallback_matches_float64(no_kernel, dtype, channels_last):
    xs, w, ref = _inputs((2, 5, 7, 9), 4, dtype, channels_last, extra=2)
    _check(fused.weighted_sum(xs, w), ref, xs, dtype)  # and in xs[0]'s layout, as the fake says


def test_operator_takes_the_compilers_layout():
    # without the tag inductor converts every channels_last map to the eager strides and back
    assert torch.Tag.flexible_layout in torch.ops.timm_ddw.weighted_sum.default.tags


def test_layouts_the_kernel_does_not_take_fall_back():
    xs, w, ref = _inputs((2, 5, 7, 9), 3, torch.float32)
    xs[1] = xs[1].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not fused._kernel_takes(xs, w)
    out = fused.weighted_sum(xs, w)
    assert out.stride() == xs[0].stride()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_no_extension_falls_back_quietly(monkeypatch):
    monkeypatch.setattr(fused, '_kernel_state', None)
    monkeypatch.setenv('TIMM_DDW_NO_EXTENSION', '1')  # asked for: no warning
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not fused.kernel_available()
    xs, w, ref = _inputs((2, 5, 7, 9), 3, torch.float32)
    torch.testing.assert_close(fused.weighted_sum(xs, w).double(), ref, atol=1e-5, rtol=1e-5)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError('no C++ compiler')
    monkeypatch.setattr(fused, '_kernel_state', None)
    monkeypatch.delenv('TIMM_DDW_NO_EXTENSION', raising=False)
    monkeypatch.setattr(cpp_extension, 'load', no_compiler)
    with pytest.warns(UserWarning, match='kernel unavailable'):
        assert not fused.kernel_available()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not fused.kernel_available()  # decided once, warned once
    xs, w, ref = _inputs((2, 5, 7, 9), 3, torch.float32)
    torch.testing.assert_close(fused.weighted_sum(xs, w).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kernel', [True, False])
def test_weighted_sum_gradients(monkeypatch, kernel):
    if not kernel:
        monkeypatch.setattr(fused, '_kernel_state', False)
    xs, w, _ = _inputs((2, 3, 4, 5), 3, torch.float64, extra=2)
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fused.weighted_sum(list(a[:-1]), a[-1]), (*xs, w))
    out = fused.weighted_sum(xs, w)
    (out * out).sum().backward()
    assert torch.all(w.grad[:, 3:] == 0)  # the ignored columns get no gradient


def test_edge_table_operators():
    g = torch.Generator().manual_seed(0)
    table = torch.rand(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    row = torch.rand(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = fused.put_row(table, row, 1)
    ref = table.detach().clone()
    ref[:, 1] = row.detach()
    assert torch.equal(out, ref) and not torch.equal(table, ref)  # a copy; the input is unchanged
    assert torch.equal(fused.column(table, 2), table[:, :, 2])
    assert torch.autograd.gradcheck(lambda t, r: fused.put_row(t, r, 2), (table, row))
    assert torch.autograd.gradcheck(lambda t: fused.column(t, 3), (table,))


def _recording(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend('aot_eager')(gm, example_inputs)
    return backend


def _run(fn, model, x, train):
    model.train(train)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train):
        out = fn(x)
    grads = {}
    if train:
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_compiled_stages_use_the_operators_and_match_eager(fused_on, train):
    """ddw_resnet50 (3, 4, 6, 3 blocks), a share of edges and nodes closed by the routers; the node
    budget's threshold shifts are updated in training. Compiled: every stage through the
    operators, outputs, all gradients and the budget buffers as in eager."""
    torch.manual_seed(0)
    model = timm.create_model('ddw_resnet50', num_classes=5, router_bias=0.0, threshold_init=0.5,
                              node_budget=0.7)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    state = copy.deepcopy(model.state_dict())
    graphs = []
    torch._dynamo.reset()
    out_c, grads_c = _run(torch.compile(model, fullgraph=True, backend=_recording(graphs)), model, x, train)
    state_c = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    out_e, grads_e = _run(model, model, x, train)
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes if 'timm_ddw' in str(n.target)]
    stages = timm_ddw.graph_stages(model).values()
    assert ops.count('timm_ddw.weighted_sum.default') == sum(s.num_blocks for s in stages)
    with timm_ddw.capture_routing(model) as routing, torch.no_grad():
        model.eval()(x)
    vals = []
    for (adj,) in routing.values():
        rows, cols = torch.tril_indices(adj.shape[1], adj.shape[1], -1)
        vals.append(adj[:, rows, cols].flatten())
    closed = torch.cat(vals).eq(0).float().mean().item()
    assert 0.05 < closed < 0.95, closed  # the gate's both sides are exercised
    torch.testing.assert_close(out_c, out_e, atol=1e-4, rtol=1e-4)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-4, rtol=1e-3, msg=name)
    shifts = [k for k in state if k.endswith('budget_shift')]
    assert shifts
    for k in shifts:
        torch.testing.assert_close(state_c[k], model.state_dict()[k], atol=1e-6, rtol=0, msg=k)
        assert train == (not torch.equal(state_c[k], state[k]))  # moved in training only


def test_off_by_default_and_the_switch_recompiles():
    if 'TIMM_DDW_FUSED_SUM' not in os.environ:
        assert not fused.enabled()  # opt-in: inductor's own sums are as fast or faster (fused.py)
    was = fused.enabled()
    fused.set_enabled(False)
    torch.manual_seed(0)
    model = timm.create_model('ddw_resnet18', num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    graphs = []
    torch._dynamo.reset()
    fn = torch.compile(model, fullgraph=True, backend=_recording(graphs))
    with torch.no_grad():
        a = fn(x)
        fused.set_enabled(True)
        try:
            b = fn(x)
        finally:
            fused.set_enabled(was)
    counts = [sum('timm_ddw' in str(n.target) for n in gm.graph.nodes) for gm in graphs]
    assert len(counts) == 2 and counts[0] == 0 and counts[1] > 0, counts
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
