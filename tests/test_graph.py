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


def test_stage_output_equals_independent_graph_computation():
    stage = make_stage().eval()
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
    for j in range(1, 4):
        agg = sum(adj[:, j, i].view(-1, 1, 1, 1) * outs[i] for i in range(j))
        assert torch.allclose(blocks[j](agg), outs[j], atol=1e-5)
    ref_y = sum(adj[:, 4, i].view(-1, 1, 1, 1) * outs[i] for i in range(4))
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
    assert all(s._capture is None for s in timm_ddw.graph_stages(model).values())
    model(torch.randn(2, 3, 32, 32))
    assert len(cap['layer2']) == 2
    with pytest.raises(ValueError, match='no DDW graph stages'):
        with timm_ddw.capture_routing(nn.Linear(2, 2)):
            pass


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
    assert torch.equal(out, ref)
    for name in dense:
        assert torch.equal(dense[name][0], skipped[name][0])
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


def test_blocked_sums_equal_the_independent_graph_computation(monkeypatch):
    import timm_ddw.blocked as blocked
    folds = []
    real = blocked.BlockedSums.put
    monkeypatch.setattr(blocked.BlockedSums, 'put', lambda self, i, *a: folds.append(self.start) or real(self, i, *a))
    stage = make_stage(n=7, router_bias=0.5, threshold_init=0.4).double().eval()
    stage.sum_block_size = 2  # 2k < 7 blocks: blocked; folds after nodes 1, 3 and 5
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad(), timm_ddw.capture_routing(stage) as cap:
        outs, y = node_outputs(stage, x)
    assert folds == [0, 0, 2, 2, 4, 4, 6]  # the open block's first node when each node is put
    adj = reference_adjacency(stage, outs)
    assert torch.allclose(cap[''][0].double(), adj, atol=1e-6)
    assert (adj.tril(-1) == 0).any() and (adj.tril(-1) > 0).any()  # some edges closed, some open
    blocks = list(stage.children())
    for j in range(1, 7):
        agg = sum(adj[:, j, i].view(-1, 1, 1, 1) * outs[i] for i in range(j))
        assert torch.allclose(blocks[j](agg), outs[j], rtol=0, atol=1e-12)
    ref_y = sum(adj[:, 7, i].view(-1, 1, 1, 1) * outs[i] for i in range(7))
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


def test_blocked_sums_skip_removed_nodes_with_identical_outputs():
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
    assert not ran and torch.equal(out, ref)


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
