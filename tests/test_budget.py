"""Node budgets (the threshold controller) and the live eval path that turns removal into time."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_ddw

NARROW = dict(in_chans=1, num_classes=10, stem_width=8, channels=(8, 16, 32, 64))


def narrow(layers=(2, 2, 4, 2), **kwargs):
    torch.manual_seed(0)
    return timm.create_model('ddw_resnet18', layers=layers, **NARROW, **kwargs)


def set_quantile_thresholds(model, x, share=0.4):
    """Thresholds at each node's ``share`` quantile of its strongest input edge, so that nodes are
    removed for some samples of a batch and live for others (mixed live patterns)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        for stage in timm_ddw.graph_stages(model).values():
            stage.tau.zero_()
        with timm_ddw.capture_routing(model) as cap:
            model(x)
        for name, stage in timm_ddw.graph_stages(model).items():
            adj = cap[name][0]
            for j in range(1, stage.num_blocks):
                stage.tau[j - 1] = adj[:, j, :j].max(1).values.quantile(share)
    model.train(was)
    return model


def live_shares(model, x):
    """Per stage, the share of (sample, block node 1..n-1) pairs whose node ran, read off the routing."""
    with torch.no_grad(), timm_ddw.capture_routing(model) as cap:
        model(x)
    out = {}
    for name, stage in timm_ddw.graph_stages(model).items():
        adj = cap[name][0]
        ran = [adj[:, j, :j].ne(0).any(1) for j in range(1, stage.num_blocks)]
        if stage.removal == 'random':  # a coin closes the node's output edges, its input edges stay open
            ran = [r & adj[:, j + 1:, j].ne(0).any(1) for j, r in enumerate(ran, 1)]
        out[name] = torch.stack(ran, 1).float()
    return out


@pytest.mark.parametrize('kwargs, match', [
    (dict(node_budget=1.5), 'share of block nodes in'),
    (dict(node_budget=0.0), 'share of block nodes in'),
    (dict(node_budget=True), 'share of block nodes in'),
    (dict(node_budget=0.5, wiring='chain'), "needs routed edges"),
    (dict(removal='random'), 'give node_budget'),
    (dict(node_budget=0.5, removal='sometimes'), "removal='sometimes' is not one of"),
])
def test_bad_budget_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('ddw_resnet18', **kwargs)


def test_budget_off_has_no_extra_state_and_the_twins_keys():
    off, on = narrow(), narrow(node_budget=0.6)
    assert all(s.budget_shift is None for s in timm_ddw.graph_stages(off).values())
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra == {f'{name}.budget_shift' for name in timm_ddw.graph_stages(on)}
    assert set(narrow(node_budget=0.6, removal='random').state_dict()) == set(off.state_dict())
    # a model with a budget removes in eval mode (validate.py, benchmark.py see its speed); one without keeps
    # today's dense forward
    assert all(s.skip_closed for s in timm_ddw.graph_stages(on).values())
    assert not any(s.skip_closed for s in timm_ddw.graph_stages(off).values())


def test_a_budget_that_has_removed_nothing_yet_computes_exactly_what_the_model_without_one_computes():
    """Until the controller closes edges the budget must not touch the dense forward or backward."""
    off, on = narrow(), narrow(node_budget=0.6)
    on.load_state_dict(off.state_dict(), strict=False)
    x, y = torch.randn(6, 1, 32, 32), torch.randint(0, 10, (6,))
    for model in (off, on):
        model.train()
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(off.named_parameters(), on.parameters()):
        assert torch.equal(p.grad, q.grad), name
    off.eval(), timm_ddw.set_skip_closed(on.eval(), False)
    with torch.no_grad():
        assert torch.equal(off(x), on(x))


def train_steps(model, steps, scaler=None, seed=0, lr=0.05, amp=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 1, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        with torch.autocast('cpu', dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model


@pytest.mark.parametrize('amp', [None, torch.float16], ids=['float32', 'float16'])
def test_budget_strength_is_the_same_with_a_grad_scaler(amp):
    """The controller uses no gradient, so a GradScaler's loss scale cannot weaken or strengthen it:
    the same update after unscaling, thresholds included (in float32 exactly, as the scale is a power
    of 2; under float16 autocast the thresholds exactly and the weights up to float16 rounding, over
    2 steps: from the third on, that rounding can flip a node's removal and so the controller's next
    step, which on an AVX512 CPU it did)."""
    steps = 4 if amp is None else 2
    ref = narrow(node_budget=0.5, router_bias=0.0, threshold_init=0.45)
    for stage in timm_ddw.graph_stages(ref).values():
        stage.budget_rate = 0.05
    scaled = copy.deepcopy(ref)
    train_steps(ref, steps, amp=amp)
    train_steps(scaled, steps, amp=amp, scaler=torch.amp.GradScaler('cpu', init_scale=2.0 ** 12, growth_interval=1000))
    shifts = [s.budget_shift for s in timm_ddw.graph_stages(ref).values()]
    assert max(float(s.abs().max()) for s in shifts) > 0.01, 'the thresholds moved'
    tol = dict(rtol=1e-5, atol=1e-6) if amp is None else dict(rtol=2e-2, atol=2e-3)
    for (name, a), b in zip(ref.state_dict().items(), scaled.state_dict().values()):
        if name.endswith('budget_shift'):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, **tol, msg=name)


def test_grad_checkpointing_moves_the_thresholds_once_per_step():
    ref = narrow(node_budget=0.5, router_bias=0.0, threshold_init=0.45)
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True)
    train_steps(ref, 2)
    train_steps(ckpt, 2)
    for a, b in zip(timm_ddw.graph_stages(ref).values(), timm_ddw.graph_stages(ckpt).values()):
        assert bool(a.budget_shift.abs().max() > 0)
        torch.testing.assert_close(a.budget_shift, b.budget_shift, rtol=0, atol=1e-6)


def test_a_few_steps_with_a_budget_lower_the_executed_share():
    model = narrow(node_budget=0.5, router_bias=0.0)
    for stage in timm_ddw.graph_stages(model).values():
        stage.budget_rate = 0.05
    x = torch.randn(64, 1, 32, 32)
    before = torch.cat(list(live_shares(model.eval(), x).values()), 1).mean()
    train_steps(model, 25, lr=0.01)
    after = live_shares(model.eval(), x)
    share = torch.cat(list(after.values()), 1).mean()
    assert before == 1.0 and share < 0.8, (before, share)
    per_node = torch.cat(list(after.values()), 1).mean(0)
    assert ((per_node > 0) & (per_node < 1)).any(), 'some node is removed for some images and not others'


def test_random_removal_runs_each_block_node_on_its_share():
    model = narrow(node_budget=0.3, removal='random').eval()
    x = torch.randn(512, 1, 32, 32)
    torch.manual_seed(0)
    shares = torch.cat(list(live_shares(model, x).values()), 1)
    # the controller never runs: the routers keep every edge open, the coins remove 70%
    assert all(s.budget_shift is None for s in timm_ddw.graph_stages(model).values())
    assert abs(float(shares.mean()) - 0.3) < 0.03


LIVE_MODELS = [('ddw_resnet18', dict(layers=(2, 2, 12, 2), **NARROW), 32),
               ('ddw_regnetx_600m', {}, 64), ('ddw_efficientnet_b0', {}, 64), ('ddw_mobilenetv2_100', {}, 64)]


def block_batches(model):
    """Hooks recording the batch each block of nodes 1..n-1 ran on."""
    seen, hooks = [], []
    for stage in timm_ddw.graph_stages(model).values():
        for j, block in enumerate(stage.children()):
            if 0 < j < stage.num_blocks:
                hooks.append(block.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])))
    return seen, hooks


@pytest.mark.parametrize('name, kwargs, size', LIVE_MODELS, ids=[m[0] for m in LIVE_MODELS])
@pytest.mark.parametrize('batch', [1, 7, 64])
def test_live_path_equals_the_dense_forward(name, kwargs, size, batch):
    torch.manual_seed(0)
    model = timm.create_model(name, router_bias=0.0, **kwargs).eval()
    chans = kwargs.get('in_chans', 3)
    set_quantile_thresholds(model, torch.randn(64, chans, size, size))
    x = torch.randn(batch, chans, size, size)
    with torch.no_grad(), timm_ddw.capture_routing(model) as dense_routing:
        dense = model(x)
    timm_ddw.set_skip_closed(model)
    seen, hooks = block_batches(model)
    with torch.no_grad(), timm_ddw.capture_routing(model) as live_routing:
        live = model(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(live, dense, rtol=1e-4, atol=1e-5)
    for stage in dense_routing:
        torch.testing.assert_close(live_routing[stage][0], dense_routing[stage][0], rtol=1e-4, atol=1e-5)
    # each block runs on its live samples: none, all of them (at least dense_above live), or the live ones
    expected = []
    for stage_name, stage in timm_ddw.graph_stages(model).items():
        adj = dense_routing[stage_name][0]
        for j in range(1, stage.num_blocks):
            k = int(adj[:, j, :j].ne(0).any(1).sum())
            expected += [] if k == 0 else [batch if k >= stage.dense_above * batch else k]
    assert seen == expected
    assert sum(expected) < batch * sum(s.num_blocks - 1 for s in timm_ddw.graph_stages(model).values())
    if batch == 64:
        assert any(0 < s < batch for s in seen), 'blocks ran on the live samples only'


def mixed_long_model():
    """The depth ablation's long network with mixed live patterns, and a batch of 64."""
    torch.manual_seed(0)
    model = set_quantile_thresholds(narrow(layers=(2, 2, 12, 2), router_bias=0.0), torch.randn(64, 1, 32, 32))
    return model.eval(), torch.randn(64, 1, 32, 32)


def test_live_path_in_bfloat16_equals_the_dense_forward():
    model, x = mixed_long_model()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            dense = model(x)
            timm_ddw.set_skip_closed(model)
            live = model(x)
    assert live.dtype == dense.dtype
    # bfloat16 keeps 8 bits: both paths are as far from float32 as from each other
    err_dense = (dense.float() - ref).abs().max()
    assert (live.float() - dense.float()).abs().max() <= 2 * err_dense + 1e-3
    assert torch.isfinite(live).all()


def test_live_path_with_random_removal_equals_the_dense_forward():
    model = narrow(layers=(2, 2, 12, 2), node_budget=0.5, removal='random').eval()
    x = torch.randn(64, 1, 32, 32)
    with torch.no_grad():
        torch.manual_seed(3)
        dense = model(x)
        timm_ddw.set_skip_closed(model)
        torch.manual_seed(3)
        live = model(x)
        torch.manual_seed(4)
        other = model(x)
    torch.testing.assert_close(live, dense, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(other, dense), 'other coins remove other nodes'


def test_scripted_models_keep_the_dense_forward_with_a_budget():
    model = set_quantile_thresholds(narrow(node_budget=0.6, router_bias=0.0), torch.randn(16, 1, 32, 32)).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        timm_ddw.set_skip_closed(model)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-6)


def test_routing_summary_lists_how_often_each_node_is_removed():
    model = narrow(router_bias=0.0)
    x = torch.randn(64, 1, 32, 32)
    set_quantile_thresholds(model, x)
    from timm_ddw.routing import collect_routing
    stats = collect_routing(model, [x], progress=False)
    text = stats.text_summary()
    removed = stats.stage('layer3')['node_removed_share']
    assert 0 < removed[1] < 1
    assert f'node 1 {100 * removed[1]:.0f}%' in text, text


def test_live_path_never_reads_rows_a_node_did_not_write():
    """With deterministic algorithms torch fills new memory with NaN: a slab row left unwritten
    and unzeroed would turn the output into NaN (0 * NaN)."""
    model, x = mixed_long_model()
    with torch.no_grad():
        dense = model(x)
        timm_ddw.set_skip_closed(model)
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            live = model(x)
        finally:
            torch.use_deterministic_algorithms(was)
    assert torch.isfinite(live).all()
    torch.testing.assert_close(live, dense, rtol=1e-4, atol=1e-5)


def test_an_exported_budget_model_loads_with_its_budget_and_thresholds(tmp_path):
    from timm_ddw.hub import export_folder
    model = narrow(node_budget=0.6, router_bias=0.0, threshold_init=0.45)
    for stage in timm_ddw.graph_stages(model).values():
        stage.budget_rate = 0.05
    train_steps(model, 3)
    model.eval()
    export_folder(model, tmp_path / 'out')
    config = __import__('json').loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['model_args']['node_budget'] == 0.6 and config['model_args']['removal'] == 'router'
    loaded = timm.create_model('local-dir:' + str(tmp_path / 'out'), pretrained=True).eval()
    for a, b in zip(timm_ddw.graph_stages(model).values(), timm_ddw.graph_stages(loaded).values()):
        assert torch.equal(a.budget_shift, b.budget_shift) and b.skip_closed
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
