"""Graph-stage semantics against independent computations, on small stages."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_ddw
from timm_ddw.graph import GraphStage, gate_edges, weighted_sum


class Block(nn.Module):
    """A BN-free block, so train and eval modes compute the same features."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm = nn.GroupNorm(1, cout)  # a norm layer, for the channel count

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


def make_stage(n=4, cin=3, c=8, **kwargs):
    torch.manual_seed(0)
    blocks = nn.Sequential(Block(cin, c, 2), *[Block(c, c) for _ in range(n - 1)])
    return GraphStage(blocks, **kwargs)


def node_outputs(stage, x):
    """Outputs x_0..x_{n-1} of every block node, captured with hooks."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in stage.children()]
    y = stage(x)
    for h in hooks:
        h.remove()
    return outs, y


def reference_adjacency(stage, outs):
    """Eq. 4 and Eq. 5 recomputed from the documented parameter layout, with node removal:
    a node whose input edges are all closed is removed and its output edges close."""
    n = stage.num_blocks
    B = outs[0].shape[0]
    adj = torch.zeros(B, n + 1, n + 1, dtype=outs[0].dtype)
    for i in range(n):
        live = torch.ones(B, dtype=torch.bool) if i == 0 else adj[:, i, :i].ne(0).any(1)
        for j in range(i + 1, n + 1):
            row = stage.offsets[i] + (j - i - 1)
            z = outs[i].mean((2, 3)) @ stage.router_weight[row] + stage.router_bias[row]
            alpha = torch.sigmoid(z)
            open_ = (alpha >= stage.tau[j - 1]) & live
            adj[:, j, i] = torch.where(open_, alpha, torch.zeros_like(alpha))
    return adj


def reference_input(adj, outs, j, aggregation):
    """Node j's input by Eq. 3 from the adjacency (a_ij), divided by max(1, sum_i a_ij) when bounded."""
    a = adj[:, j, :j]
    if aggregation == 'bounded':
        a = a / a.sum(1, keepdim=True).clamp(min=1.0)
    return sum(a[:, i].view(-1, 1, 1, 1) * outs[i] for i in range(j))


@pytest.mark.parametrize('aggregation', ['bounded', 'sum'])
def test_stage_output_equals_independent_graph_computation(aggregation):
    stage = make_stage(aggregation=aggregation).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad(), timm_ddw.capture_routing(stage) as cap:
        outs, y = node_outputs(stage, x)
    adj = reference_adjacency(stage, outs)
    M = cap[''][0]
    assert M.shape == (3, 5, 5)
    assert torch.allclose(M, adj, atol=1e-6)
    assert torch.equal(M, M.tril(-1)) and M.min() >= 0 and M.max() <= 1
    # node j's input is sum_i a_ij x_i, and the output node aggregates every block node
    blocks = list(stage.children())
    assert (adj[:, 1:].sum(2) > 1).any()  # the bound acts
    for j in range(1, 4):
        assert torch.allclose(blocks[j](reference_input(adj, outs, j, aggregation)), outs[j], atol=1e-5)
    ref_y = reference_input(adj, outs, 4, aggregation)
    assert torch.allclose(y, ref_y, atol=1e-5)


def test_capture_on_real_model_matches_routers():
    model = timm.create_model('ddw_regnetx_600m', router_bias=0.0, threshold_init=0.5).eval()  # some edges close
    stage = model.s2
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in stage.children()]
    with torch.no_grad(), timm_ddw.capture_routing(model) as cap:
        model(torch.randn(2, 3, 64, 64))
    assert set(cap) == {'s1', 's2', 's3', 's4'} and cap['s4'][0].shape == (2, 8, 8)
    ref = reference_adjacency(stage, outs)
    assert torch.allclose(cap['s2'][0], ref, atol=1e-6)
    assert (ref == 0).logical_and(torch.ones_like(ref).tril(-1) > 0).any(), 'some edges must be closed'
    for h in hooks:
        h.remove()


def test_closed_edge_contributes_nothing_at_inference():
    stage = make_stage(n=4).eval()
    j = 2
    captured = []
    stage.get_submodule(str(j)).register_forward_pre_hook(lambda m, a: captured.append(a[0].clone()))
    noise = {}
    stage.get_submodule(str(j - 1)).register_forward_hook(lambda m, i, o: o + noise.get('d', 0))
    x = torch.randn(2, 3, 16, 16)

    def input_change():
        captured.clear()
        noise.clear()
        with torch.no_grad():
            stage(x)
            noise['d'] = 10 * torch.randn(2, 8, 8, 8)
            stage(x)
        return (captured[1] - captured[0]).abs().max().item()

    assert input_change() > 0  # edge (j-1 -> j) open: perturbing x_{j-1} changes node j's input
    with torch.no_grad():
        stage.router_bias[stage.offsets[j - 1]] = -4.0  # alpha ~ 0.02 whatever the input
        stage.router_weight[stage.offsets[j - 1]] = 0.0
        stage.tau[j - 1] = 0.5
    assert input_change() == 0.0  # closed: exactly nothing of x_{j-1} reaches node j


def test_open_edges_carry_the_same_value_in_train_and_eval():
    alpha = torch.rand(64, 5)
    tau = torch.full((5,), 0.4)
    train = gate_edges(alpha, tau, 'ste', training=True)
    evals = gate_edges(alpha, tau, 'ste', training=False)
    assert torch.equal(train, evals)
    assert torch.equal(evals, torch.where(alpha >= tau, alpha, torch.zeros_like(alpha)))
    literal = gate_edges(alpha, tau, 'psi', training=True)
    assert torch.allclose(literal, alpha * torch.sigmoid(alpha - tau))
    assert not torch.allclose(literal, evals)

    stage = make_stage(threshold_init=0.5)
    x = torch.randn(4, 3, 16, 16)
    with timm_ddw.capture_routing(stage) as cap:
        stage.train()(x)
        stage.eval()(x)
    assert torch.equal(cap[''][0], cap[''][1])


def test_ste_gradients_are_psi_derivatives():
    alpha = torch.tensor([[0.2, 0.7, 0.95]], requires_grad=True)
    tau = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    gate_edges(alpha, tau, 'ste', training=True).sum().backward()
    a2 = alpha.detach().clone().requires_grad_()
    t2 = tau.detach().clone().requires_grad_()
    (a2 * torch.sigmoid(a2 - t2)).sum().backward()
    assert torch.allclose(alpha.grad, a2.grad) and torch.allclose(tau.grad, t2.grad)
    assert alpha.grad[0, 0] > 0, 'a closed edge still learns'


def test_routers_and_thresholds_get_gradients_every_step():
    stage = make_stage(threshold_init=0.3).train()
    stage(torch.randn(2, 3, 16, 16)).sum().backward()
    for name in ('router_weight', 'router_bias', 'tau'):
        g = getattr(stage, name).grad
        assert g is not None and g.abs().sum() > 0, name


def test_static_wiring_is_shared_by_all_samples():
    stage = make_stage(wiring='static').eval()
    assert stage.router_weight is None and stage.router_bias.numel() == 10
    with torch.no_grad(), timm_ddw.capture_routing(stage) as cap:
        stage(torch.randn(3, 3, 16, 16))
    M = cap[''][0]
    assert torch.equal(M[0], M[1]) and torch.equal(M[1], M[2])
    assert torch.allclose(M[0][1, 0], torch.sigmoid(torch.tensor(3.0)))


def test_chain_wiring_has_no_parameters_and_is_sequential():
    stage = make_stage(wiring='chain').eval()
    assert [n for n, _ in stage.named_parameters() if '.' not in n] == []
    x = torch.randn(2, 3, 16, 16)
    seq = x
    for b in stage.children():
        seq = b(seq)
    with timm_ddw.capture_routing(stage) as cap:
        assert torch.equal(stage(x), seq)
    assert torch.equal(cap[''][0][0], torch.diag(torch.ones(4), -1))


def test_one_block_stage_scales_its_block():
    stage = make_stage(n=1).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x0 = next(stage.children())(x)
        a01 = torch.sigmoid(x0.mean((2, 3)) @ stage.router_weight[0] + stage.router_bias[0])
        assert torch.allclose(stage(x), a01.view(-1, 1, 1, 1) * x0, atol=1e-6)


def test_capture_leaves_no_state_and_costs_nothing_outside():
    model = timm.create_model('ddw_resnet18')
    keys, buffers = set(model.state_dict()), [n for n, _ in model.named_buffers()]
    with timm_ddw.capture_routing(model) as cap:
        model(torch.randn(2, 3, 32, 32))
        model(torch.randn(3, 3, 32, 32))
    assert [m.shape[0] for m in cap['layer2']] == [2, 3]
    assert set(model.state_dict()) == keys and [n for n, _ in model.named_buffers()] == buffers
    assert all(not s._captures for s in timm_ddw.graph_stages(model).values())
    model(torch.randn(2, 3, 32, 32))
    assert len(cap['layer2']) == 2
    with pytest.raises(ValueError, match='no DDW graph stages'):
        with timm_ddw.capture_routing(nn.Linear(2, 2)):
            pass


def test_nested_captures_each_record_every_forward():
    stage = make_stage().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), timm_ddw.capture_routing(stage) as outer:
        stage(x)
        with timm_ddw.capture_routing(stage) as inner:
            stage(x)
        stage(x)  # the inner block's exit once turned the outer one off
    assert len(outer['']) == 3 and len(inner['']) == 1
    assert torch.equal(inner[''][0], outer[''][1]) and not stage._captures


def test_applied_weights_are_what_the_nodes_sum():
    stage = make_stage(router_bias=1.0).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), timm_ddw.capture_routing(stage) as cap:
        outs, y = node_outputs(stage, x)
    a = cap[''][0].double()
    for aggregation in ('bounded', 'sum'):
        w = timm_ddw.applied_weights(a, aggregation)
        assert torch.allclose(w, a / a.sum(2, keepdim=True).clamp(min=1) if aggregation == 'bounded' else a)
    w = timm_ddw.applied_weights(a)
    assert (a.sum(2) > 1).any() and torch.allclose(w.sum(2)[a.sum(2) > 1], torch.ones(1, dtype=w.dtype))
    ref_y = sum(w[:, 4, i].view(-1, 1, 1, 1) * outs[i].double() for i in range(4))
    assert torch.allclose(y.double(), ref_y, atol=1e-5)
    with pytest.raises(ValueError, match='aggregation'):
        timm_ddw.applied_weights(a, 'mean')


def test_weighted_sum_matches_reference_and_grads():
    xs = [torch.randn(3, 4, 5, 5, requires_grad=True) for _ in range(4)]
    w = torch.rand(3, 4, requires_grad=True)
    out = weighted_sum(xs, w)
    ref = sum(w[:, k].view(-1, 1, 1, 1) * xs[k] for k in range(4))
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, xs + [w], g)
    ref_grads = torch.autograd.grad(ref, xs + [w], g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_register_wiring_rejects_bad_graphs():
    with pytest.raises(ValueError, match="edges='soft' is not one of"):
        timm_ddw.register_wiring('x', 'soft', lambda n, s: [])
    timm_ddw.register_wiring('_test_skip', 'fixed', lambda n, s: [[]] + [[j - 1] for j in range(1, n)][:-1] + [[5]])
    try:
        with pytest.raises(ValueError, match='node 4 needs predecessors among nodes 0..3'):
            make_stage(n=4, wiring='_test_skip')
    finally:
        del timm_ddw.WIRINGS['_test_skip']


@pytest.mark.parametrize('batch', [1, 4])
def test_skip_closed_nodes_gives_identical_outputs(batch):
    torch.manual_seed(1)
    model = timm.create_model('ddw_regnetx_600m', router_bias=0.0, threshold_init=0.5).eval()
    with torch.no_grad():
        model.s3.tau[1] = 1.0  # node 2 of s3 receives nothing: removed for every sample
    ran = []
    model.s3.b3.register_forward_hook(lambda *a: ran.append(1))
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad(), timm_ddw.capture_routing(model) as dense:
        ref = model(x)
    assert ran and dense['s3'][0][:, 2].abs().sum() == 0 and dense['s3'][0][:, :, 2].abs().sum() == 0
    ran.clear()
    timm_ddw.set_skip_closed(model)
    with torch.no_grad(), timm_ddw.capture_routing(model) as skipped:
        out = model(x)
    assert not ran, 'the removed node is skipped'
    # the live path sums by GEMM: equal up to float summation order
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name in dense:
        torch.testing.assert_close(dense[name][0], skipped[name][0], rtol=1e-5, atol=1e-6)
    model.train()
    model(x)
    assert ran, 'training never skips'


@pytest.mark.parametrize('channels_last', [False, True])
def test_feature_buffer_gives_the_plain_gradients(channels_last):
    # float64, so that the two summation orders agree to rounding
    model = timm.create_model('ddw_regnetx_600m', num_classes=4, threshold_init=0.3).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)

    def grads(use_buffer):
        for s in timm_ddw.graph_stages(model).values():
            s.use_buffer = use_buffer
        torch.manual_seed(0)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, plain = grads(False)
    out_buf, buf = grads(True)
    assert torch.allclose(out_plain, out_buf, atol=1e-10)
    for n in plain:
        assert (plain[n] - buf[n]).abs().max() <= 1e-9 * plain[n].abs().max() + 1e-12, n


def test_buffer_recomputes_block_inputs_instead_of_saving_them(monkeypatch):
    import timm_ddw.buffer as buffer
    calls = []
    real = buffer.accumulate
    monkeypatch.setattr(buffer, 'accumulate', lambda *a, **k: calls.append(1) or real(*a, **k))
    stage = make_stage(n=4).train()
    x = torch.randn(2, 3, 16, 16)
    counts = {}
    for recompute in (False, True):
        stage.recompute_inputs = recompute
        calls.clear()
        stage(x).sum().backward()
        counts[recompute] = len(calls)
    # forward: nodes 1..4 aggregate; backward: nodes 0..3 sum their consumers' gradients;
    # recomputing adds one sum per block node 1..3 (node 0's input is the stage input)
    assert counts[False] == 8 and counts[True] == 11


def _double_stage():
    stage = make_stage(n=4, threshold_init=0.3).double().train()
    plain = make_stage(n=4, threshold_init=0.3).double().train()
    plain.use_buffer = False
    return stage, plain


def _grads(stage, loss_fn, x):
    stage.zero_grad(set_to_none=True)
    loss_fn(stage, x)
    return [p.grad.clone() for p in stage.parameters()]


def _assert_same(a, b, what):
    for ga, gb in zip(a, b, strict=True):
        assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12), what


def test_buffer_allows_repeated_and_partial_backward():
    """retain_graph, a second backward, autograd.grad and a backward from inside the stage give
    plain autograd's gradients (the buffer used to raise KeyError on the second pass)."""
    stage, plain = _double_stage()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def twice(s, x):
        out = s(x)
        out[:, 0].sum().backward(retain_graph=True)
        out[:, 1].sum().backward()
    _assert_same(_grads(stage, twice, x), _grads(plain, twice, x), 'two backwards')

    def by_grad(s, x):
        out = s(x)
        params = list(s.parameters())
        first = torch.autograd.grad(out.square().sum(), params, retain_graph=True)
        second = torch.autograd.grad(out.sum(), params[-3:], retain_graph=True)  # a subset
        for p, g1 in zip(params, first, strict=True):
            p.grad = g1.clone()
        for p, g2 in zip(params[-3:], second, strict=True):
            p.grad += g2
    _assert_same(_grads(stage, by_grad, x), _grads(plain, by_grad, x), 'autograd.grad')

    def from_inside(s, x):  # a pass that reaches only the first nodes, then a full one
        outs = []
        hook = list(s.children())[1].register_forward_hook(lambda m, i, o: outs.append(o))
        out = s(x)
        hook.remove()
        outs[0].sum().backward(retain_graph=True)
        out.square().sum().backward()
    _assert_same(_grads(stage, from_inside, x), _grads(plain, from_inside, x), 'partial pass first')


def test_buffer_double_backward_and_gradcheck():
    """Gradient penalties (create_graph) get plain autograd's second derivatives."""
    stage, plain = _double_stage()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def penalty(s, x):
        g, = torch.autograd.grad(s(x).square().sum(), x, create_graph=True)
        g.square().sum().backward()
    _assert_same(_grads(stage, penalty, x), _grads(plain, penalty, x), 'double backward')
    assert torch.autograd.gradcheck(stage, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(stage, (x,), fast_mode=True)


@pytest.mark.parametrize('how', ['eval forward', 'autograd.grad on a subset'])
def test_forward_without_backward_frees_every_node_output(how):
    """Nothing of a forward stays alive once its output is dropped (the buffer once kept all of
    ddw_resnet50's 80 node outputs, 77 MiB per forward at batch 4, 96 px)."""
    import gc
    import weakref
    model = timm.create_model('ddw_resnet18', num_classes=3)
    model.eval() if how == 'eval forward' else model.train()
    refs = []
    for stage in timm_ddw.graph_stages(model).values():
        for block in stage.children():
            block.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    out = model(torch.randn(2, 3, 32, 32))
    if how != 'eval forward':
        torch.autograd.grad(out.sum(), [model.fc.weight])
    del out
    gc.collect()
    assert len(refs) == 8 and all(r() is None for r in refs)


@pytest.mark.parametrize('aggregation', ['bounded', 'sum'])
def test_blocked_sums_equal_the_independent_graph_computation(monkeypatch, aggregation):
    import timm_ddw.blocked as blocked
    folds = []
    real = blocked.BlockedSums.put
    monkeypatch.setattr(blocked.BlockedSums, 'put', lambda self, i, *a: folds.append(self.start) or real(self, i, *a))
    stage = make_stage(n=7, router_bias=0.5, threshold_init=0.4, aggregation=aggregation).double().eval()
    stage.sum_block_size = 2  # 2k < 7 blocks: blocked; folds after nodes 1, 3 and 5
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad(), timm_ddw.capture_routing(stage) as cap:
        outs, y = node_outputs(stage, x)
    assert folds == [0, 0, 2, 2, 4, 4, 6]  # the open block's first node when each node is put
    adj = reference_adjacency(stage, outs)
    assert torch.allclose(cap[''][0].double(), adj, atol=1e-6)
    assert (adj.tril(-1) == 0).any() and (adj.tril(-1) > 0).any()  # some edges closed, some open
    blocks = list(stage.children())
    assert (adj[:, 1:].sum(2) > 1).any()  # the bound acts
    for j in range(1, 7):
        assert torch.allclose(blocks[j](reference_input(adj, outs, j, aggregation)), outs[j], rtol=0, atol=1e-12)
    ref_y = reference_input(adj, outs, 7, aggregation)
    assert torch.allclose(y, ref_y, rtol=0, atol=1e-12)


@pytest.mark.parametrize('channels_last', [False, True])
def test_blocked_sums_match_per_node_sums(channels_last):
    stages = [make_stage(n=9), GraphStage(nn.Sequential(*[nn.Identity() for _ in range(9)]), channels=3)]
    x = torch.randn(2, 3, 16, 16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    seen, kept = [], []
    for stage in stages:
        stage.eval()
        seen.clear()
        for b in stage.children():
            b.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
            b.register_forward_pre_hook(lambda m, a: kept.append(a[0].detach()))
        outs, inputs = {}, {}
        for k in (0, 1, 2, 3, 4):  # 4: 2k = 8 < 9 blocks
            stage.sum_block_size = k
            kept.clear()
            with torch.no_grad():
                outs[k] = stage(x)
            inputs[k] = list(kept)  # a hook's copy of each block input must stay what the block saw
        outs['grad'] = stage(x)  # autograd on: per-node sums whatever the block size
        for k, y in outs.items():
            assert torch.allclose(y, outs[0], rtol=1e-5, atol=1e-6), k
        for k in inputs:
            assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(inputs[k], inputs[0], strict=True)), k
        if channels_last and not isinstance(next(stage.children()), nn.Identity):
            assert all(seen), 'blocked sums hand blocks inputs in their layout'


def _as_if_compiling(monkeypatch):
    """Take the compiled paths without a compiler, and count the folded forwards."""
    calls = []
    real = GraphStage._forward_folded
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    monkeypatch.setattr(GraphStage, '_forward_folded', lambda self, x: calls.append(1) or real(self, x))
    return calls


@pytest.mark.parametrize('aggregation', ['bounded', 'sum'])
def test_folded_sums_equal_the_independent_graph_computation(monkeypatch, aggregation):
    """The compiled fold (partial sums of k sources into every later node) gives Eq. 3's inputs, with
    closed edges and removed nodes, for every node and the output node."""
    stage = make_stage(n=7, router_bias=0.5, threshold_init=0.4, aggregation=aggregation).double().eval()
    stage.sum_block_size = 2  # 2k < 7 blocks: folds after nodes 1, 3 and 5
    calls = _as_if_compiling(monkeypatch)
    inputs = []
    for b in stage.children():
        b.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        outs, y = node_outputs(stage, x)
    assert calls == [1]
    adj = reference_adjacency(stage, outs)
    assert (adj.tril(-1) == 0).any() and (adj.tril(-1) > 0).any()  # some edges closed, some open
    assert (adj[:, 1:].sum(2) > 1).any()  # the bound acts
    for j in range(1, 7):
        assert torch.allclose(inputs[j], reference_input(adj, outs, j, aggregation), rtol=0, atol=1e-12), j
    assert torch.allclose(y, reference_input(adj, outs, 7, aggregation), rtol=0, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_folded_sums_match_per_node_sums_at_resnet101_depth(monkeypatch, dtype):
    """ResNet-101's 23-block stage in three dtypes: the fold agrees with the per-node sums (which
    run with autograd on or ``sum_block_size = 0``) to the dtype's rounding, in eval and train mode."""
    stage = make_stage(n=23, router_bias=0.0, threshold_init=0.5).to(dtype)
    calls = _as_if_compiling(monkeypatch)
    x = torch.randn(2, 3, 16, 16).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for train in (False, True):
        stage.train(train)
        with torch.no_grad():
            stage.sum_block_size = 6
            folded = stage(x)
            assert len(calls) == 1
            stage.sum_block_size = 0
            per_node = stage(x)
        stage.sum_block_size = 6
        with_grad = stage(x)  # autograd on: per-node sums whatever the block size
        assert len(calls) == 1
        scale = per_node.abs().max().float()
        assert torch.isfinite(folded).all() and scale > 0
        for ref in (per_node, with_grad.detach()):
            assert (folded.float() - ref.float()).abs().max() <= tol * scale
        calls.clear()


def test_skip_closed_in_a_long_stage_skips_removed_nodes():
    stage = make_stage(n=7, router_bias=0.0, threshold_init=0.5).eval()
    stage.sum_block_size = 2
    with torch.no_grad():
        stage.tau[2] = 1.0  # node 3 receives nothing: removed for every sample
    ran = []
    stage.get_submodule('3').register_forward_hook(lambda *a: ran.append(1))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = stage(x)
        assert ran
        ran.clear()
        stage.skip_closed = True
        out = stage(x)
    assert not ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_tracers_and_scripting_see_per_node_sums():
    stage = make_stage(n=13).eval()  # 2 * 6 < 13 blocks: eager no-grad forwards use blocked sums
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        eager = stage(x)
        traced = {'fx': torch.fx.symbolic_trace(stage), 'jit.trace': torch.jit.trace(stage, x),
                  'jit.script': torch.jit.script(stage)}
        for name, module in traced.items():
            graph_ops = str(module.graph)
            assert 'baddbmm' not in graph_ops, name
            assert torch.allclose(module(x), eager, rtol=1e-5, atol=1e-6), name
