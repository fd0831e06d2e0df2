"""The nine models honour timm's model contract the way their twins do."""
import pickle

import pytest
import timm
import torch
from conftest import MODELS, TWINS, build_pair
from timm.optim import create_optimizer_v2

import timm_ddw

ROUTING = ('router_weight', 'router_bias', 'tau')


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def test_nine_models_registered():
    assert sorted(timm.list_models('ddw_*')) == sorted([
        'ddw_resnet18', 'ddw_resnet50', 'ddw_resnet101', 'ddw_resnext50_32x4d', 'ddw_mobilenetv2_100',
        'ddw_efficientnet_b0', 'ddw_regnetx_600m', 'ddw_regnetx_1600m', 'ddw_regnety_600m'])


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_every_param_gets_grad(name):
    model = timm.create_model(name, num_classes=10).train()
    x = torch.randn(2, 3, 64, 48)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    for n, p in model.named_parameters():
        if n.rpartition('.')[2] in ROUTING:
            assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize('name', MODELS)
def test_keys_params_and_chain_equivalence(name):
    model, twin = build_pair(name, wiring='chain')
    assert _nparams(model) == _nparams(twin)
    x = torch.randn(2, 3, 64, 64)
    for mode in ('eval', 'train'):
        model.train(mode == 'train')
        twin.train(mode == 'train')
        with torch.no_grad():
            assert (model(x) - twin(x)).abs().max() <= 1e-5, mode

    ddw = timm.create_model(name, device='meta')
    ddw_sd, twin_sd = ddw.state_dict(), twin.state_dict()
    for k, v in twin_sd.items():
        assert ddw_sd[k].shape == v.shape, k
    extra = set(ddw_sd) - set(twin_sd)
    assert extra and all(k.rpartition('.')[2] in ROUTING for k in extra)
    result = ddw.load_state_dict(twin_sd, strict=False, assign=True)
    assert set(result.missing_keys) == extra and not result.unexpected_keys

    overhead = _nparams(ddw) / _nparams(twin) - 1
    print(f'{name}: {_nparams(ddw) / 1e6:.3f}M vs {_nparams(twin) / 1e6:.3f}M (+{overhead * 100:.2f}%)')
    assert 0 < overhead < 0.02


@pytest.mark.parametrize('name', MODELS)
def test_features_only_matches_twin(name):
    torch.manual_seed(0)
    twin = timm.create_model(TWINS[name], features_only=True).eval()
    model = timm.create_model(name, features_only=True, wiring='chain').eval()
    assert model.feature_info.channels() == twin.feature_info.channels()
    assert model.feature_info.reduction() == twin.feature_info.reduction()
    model.load_state_dict(twin.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), twin(x)):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    dyn = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in dyn(x)] == [twin.feature_info.channels()[i] for i in (1, 3)]


FEATURE_CLASSES = [None, 'list', 'dict', 'hook', 'fx', 'getter']


@pytest.mark.parametrize('name', ['ddw_resnet18', 'ddw_mobilenetv2_100'])  # the two feature paths
def test_every_feature_class_the_twin_supports(name):
    """Each features_only mode of the twin works, has every graph stage, equals the twin in chain
    mode, and checkpoints node by node (two modes once raised, three silently built the static twin)."""
    x = torch.randn(1, 3, 64, 64)
    num_stages = len(timm_ddw.graph_stages(timm.create_model(name)))
    for feature_cls in FEATURE_CLASSES:
        kw = {} if feature_cls is None else dict(feature_cls=feature_cls)
        try:
            twin = timm.create_model(TWINS[name], features_only=True, **kw).eval()
        except AssertionError:  # timm's own wrapper refuses this model (EfficientNet with list/dict)
            with pytest.raises(AssertionError):
                timm.create_model(name, features_only=True, **kw)
            continue
        model = timm.create_model(name, features_only=True, wiring='chain', **kw).eval()
        assert len(timm_ddw.graph_stages(model)) == num_stages, feature_cls
        model.load_state_dict(twin.state_dict(), strict=True)
        with torch.no_grad():
            out, ref = model(x), twin(x)
        out, ref = (list(o.values()) if isinstance(o, dict) else o for o in (out, ref))
        assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref)), feature_cls
        dyn = timm.create_model(name, features_only=True, **kw)
        dyn.set_grad_checkpointing(True)
        stages = timm_ddw.graph_stages(dyn).values()
        assert len(stages) == num_stages and all(s.grad_checkpointing for s in stages), feature_cls
        assert not getattr(dyn, 'grad_checkpointing', False), f'{feature_cls}: the wrapper checkpoints whole stages'
        assert isinstance(pickle.loads(pickle.dumps(dyn)), type(dyn))


@pytest.mark.parametrize('name', ['ddw_resnet50', 'ddw_regnety_600m', 'ddw_efficientnet_b0'])
def test_timm_api_matches_twin_in_chain_mode(name):
    model, twin = build_pair(name, wiring='chain')
    model.eval()
    twin.eval()
    x = torch.randn(2, 3, 80, 64)
    with torch.no_grad():
        f = model.forward_features(x)
        assert torch.allclose(f, twin.forward_features(x), atol=1e-5)
        assert torch.allclose(model.forward_head(f, pre_logits=True), twin.forward_head(f, pre_logits=True))
        ints = model.forward_intermediates(x, indices=3, intermediates_only=True)
        ref = twin.forward_intermediates(x, indices=3, intermediates_only=True)
        assert [t.shape for t in ints] == [t.shape for t in ref]
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ints, ref))
    assert model.num_features == twin.num_features
    assert model.pretrained_cfg['input_size'] == twin.pretrained_cfg['input_size']
    for k in ('mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier'):
        assert model.pretrained_cfg[k] == twin.pretrained_cfg[k], k
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize('name', ['ddw_resnet18', 'ddw_regnetx_600m', 'ddw_mobilenetv2_100'])
def test_grad_checkpointing_same_outputs_and_grads(name):
    # float64: batch-norm backward at init amplifies float32 summation-order differences to ~1%
    model = timm.create_model(name, num_classes=5, drop_rate=0.0).train().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    stage = next(iter(timm_ddw.graph_stages(model).values()))
    first_conv = next(m for m in stage.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda *a: calls.append(1))
    ref_out, ref_grads = run()
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    assert getattr(model, 'grad_checkpointing', False) is False
    assert all(s.grad_checkpointing for s in timm_ddw.graph_stages(model).values())
    calls.clear()
    out, grads = run()
    assert len(calls) == 2, 'checkpointed blocks run again in backward'
    assert torch.allclose(out, ref_out, atol=1e-10)
    for n in ref_grads:
        assert (grads[n] - ref_grads[n]).norm() <= 1e-6 * ref_grads[n].norm() + 1e-12, n


def test_group_matcher_and_layer_decay():
    model = timm.create_model('ddw_resnet18')
    groups = timm.models.group_parameters(model, model.group_matcher())
    names = {n: g for g, ns in groups.items() for n in ns}
    assert set(names) == {n for n, _ in model.named_parameters()}
    # a stage's routers and thresholds join the group of that stage's last block
    assert names['layer2.router_weight'] == names['layer2.tau'] == names['layer2.1.conv1.weight']
    assert names['layer2.router_weight'] != names['layer2.0.conv1.weight']
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    coarse_of = {n: g for g, ns in coarse.items() for n in ns}
    assert coarse_of['layer3.tau'] == coarse_of['layer3.0.conv1.weight']
    opt = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    scale = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    assert scale[id(params['layer3.router_weight'])] == scale[id(params['layer3.1.conv1.weight'])]
    assert scale[id(params['layer3.0.conv1.weight'])] < scale[id(params['layer3.router_weight'])] \
        < scale[id(params['layer4.0.conv1.weight'])]


def test_routing_params_excluded_from_weight_decay():
    model = timm.create_model('ddw_regnetx_600m')
    nwd = model.no_weight_decay()
    assert 's3.router_weight' in nwd and 's3.tau' in nwd and 's3.b1.conv1.conv.weight' not in nwd
    opt = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4)
    decay = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    assert decay[id(params['s3.router_weight'])] == 0.0
    assert decay[id(params['s3.b1.conv1.conv.weight'])] == 1e-4


def test_meta_device_and_dtype():
    model = timm.create_model('ddw_resnet50', device='meta')
    assert all(p.device.type == 'meta' for p in model.parameters())
    model = timm.create_model('ddw_mobilenetv2_100', dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize('wiring', ['dynamic', 'static', 'chain'])
def test_torchscript(wiring):
    model = timm.create_model('ddw_resnet18', wiring=wiring).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-5)


@pytest.mark.parametrize('name', ['ddw_resnet18', 'ddw_regnety_600m', 'ddw_efficientnet_b0'])
def test_fx_trace(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(wiring='ring'), r"wiring='ring' is not one of \[.*'chain'.*'dynamic'.*'static'.*\]"),
    (dict(wiring=3), r"wiring=3 is not one of"),
    (dict(router_bias='3'), r"router_bias='3' must be a finite number"),
    (dict(router_bias=float('nan')), r"router_bias=nan must be a finite number"),
    (dict(threshold_init=1.5), r"threshold_init=1.5 must be a number in \[0, 1\)"),
    (dict(gate='sigmoid'), r"gate='sigmoid' is not one of \('ste', 'psi'\)"),
    (dict(wiring_seed=-1), r"wiring_seed=-1 must be a non-negative int"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('ddw_resnet18', **kwargs)
