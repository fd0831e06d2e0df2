"""pretrained=True: the chain-equivalent warm start from the twins' ImageNet weights, and checked loading."""
import argparse
from pathlib import Path

import pytest
import timm
import torch

import timm_ddw
from timm_ddw.hub import TWINS
from timm_ddw.models._pretrained import CHAIN_TAU, DdwCheckpointError, chain_init_state_dict, ddw_filter_fn

README = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm layers (timm zero-inits some), so every block changes its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.weight.uniform_(0.5, 1.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.mark.parametrize('name', list(TWINS))
def test_chaininit_tag_reproduces_twin(name):
    twin_name = TWINS[name]
    twin_cfg = timm.models.get_pretrained_cfg(twin_name)
    twin = randomise_(timm.create_model(twin_name)).eval()
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    # the tag names the twin's weights and says what they are; the data config is the twin's
    assert cfg['tag'] == f'{twin_cfg.tag}_chaininit'
    assert cfg['hf_hub_id'] == twin_cfg.hf_hub_id == f'timm/{twin_name}.{twin_cfg.tag}'
    assert 'not DDW-trained' in cfg['description']
    assert f"| `{name}.{cfg['tag']}` | [`{cfg['hf_hub_id']}`]" in README  # the README's tag table
    for key in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'license'):
        assert cfg[key] == getattr(twin_cfg, key), key

    model.load_state_dict(ddw_filter_fn(twin.state_dict(), model))
    with torch.no_grad():
        diff = (model(X) - twin(X)).abs().max().item()
    assert diff <= 1e-4
    # not vacuous: with every edge open the same weights give another network
    with torch.no_grad():
        for stage in timm_ddw.graph_stages(model).values():
            stage.tau.fill_(0.0)
        assert (model(X) - twin(X)).abs().max().item() > 1e-3


@pytest.mark.parametrize('wiring', ['dynamic', 'static'])
def test_closed_edges_get_gradients(wiring):
    twin = randomise_(timm.create_model('resnet18', num_classes=10))
    model = timm.create_model('ddw_resnet18', num_classes=10, wiring=wiring)
    model.load_state_dict(chain_init_state_dict(twin.state_dict(), model))
    model.train()
    twin.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with timm_ddw.capture_routing(model) as routing:
        out = model(x)
    assert torch.equal(out, twin(x))  # 'ste' forward in training is the twin's too
    out.logsumexp(1).sum().backward()
    for name, stage in timm_ddw.graph_stages(model).items():
        adj = routing[name][0]
        n = stage.num_blocks
        chain = torch.diag(torch.ones(n), -1)  # a_{j-1,j} = 1 exactly, every other edge 0
        assert torch.equal(adj, chain.expand_as(adj)), name
        assert torch.all(stage.tau == CHAIN_TAU)
        for j in range(2, n + 1):
            for k, i in enumerate(stage.preds[j]):
                if i == j - 1:
                    continue
                row = stage.offsets[i] + stage.pos[j][k]
                assert stage.router_bias.grad[row] != 0, (name, i, j)
                if wiring == 'dynamic':
                    assert stage.router_weight.grad[row].abs().sum() > 0, (name, i, j)
        assert stage.tau.grad.abs().sum() > 0


def _static_checkpoint():
    model = timm.create_model('ddw_resnet18', wiring='static')
    return model.state_dict()


def test_wrong_wiring_or_model_fails_before_loading():
    model = timm.create_model('ddw_resnet18')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DdwCheckpointError) as e:
        ddw_filter_fn(_static_checkpoint(), model)
    msg = str(e.value)
    assert 'ddw_resnet18' in msg and "wiring='dynamic'" in msg
    assert 'missing keys (4)' in msg and 'layer1.router_weight' in msg
    assert "wiring='static'" in msg  # names what the checkpoint looks like

    other = timm.create_model('ddw_resnet50').state_dict()
    with pytest.raises(DdwCheckpointError) as e:
        ddw_filter_fn(other, model)
    msg = str(e.value)
    assert 'ddw_resnet18' in msg and 'unexpected keys' in msg and 'shape mismatches' in msg
    assert 'layer1.0.conv1.weight: checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)' in msg
    # a twin's weights are only turned into a DDW model by a *_chaininit tag
    model.pretrained_cfg = dict(model.pretrained_cfg, tag='a1_in1k')
    with pytest.raises(DdwCheckpointError, match='missing keys'):
        ddw_filter_fn(timm.create_model('resnet18').state_dict(), model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_file_overlay_loads_train_checkpoint_ema(tmp_path):
    src = randomise_(timm.create_model('ddw_resnet18', num_classes=10, wiring='static'), seed=3)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in src.state_dict().items()}
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save(dict(arch='ddw_resnet18', state_dict=src.state_dict(), state_dict_ema=ema,
                    args=argparse.Namespace(model_kwargs=dict(wiring='static'))), path)
    model = timm.create_model('ddw_resnet18', pretrained=True, num_classes=10, wiring='static',
                              pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k  # EMA weights, classifier included

    with pytest.raises(DdwCheckpointError, match=r"(?s)ddw_resnet18 \(wiring='dynamic'.*missing keys"):
        timm.create_model('ddw_resnet18', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(DdwCheckpointError, match=r"could not load pretrained weights from file=.*nope"):
        timm.create_model('ddw_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope')))


def test_features_only_pretrained(tmp_path):
    twin = randomise_(timm.create_model('mobilenetv2_100')).eval()
    path = tmp_path / 'twin.safetensors'
    import safetensors.torch
    safetensors.torch.save_file(twin.state_dict(), path)
    kw = dict(pretrained=True, features_only=True, out_indices=(1, 3), pretrained_cfg_overlay=dict(file=str(path)))
    model = timm.create_model('ddw_mobilenetv2_100', **kw).eval()
    ref = timm.create_model('mobilenetv2_100', **kw).eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(X), ref(X)))
    # a feature model still refuses weights that lack its own keys
    del_key = 'blocks.1.0.conv_pw.weight'
    safetensors.torch.save_file({k: v for k, v in twin.state_dict().items() if k != del_key}, path)
    with pytest.raises(DdwCheckpointError, match=f'missing keys \\(1\\): {del_key}'):
        timm.create_model('ddw_mobilenetv2_100', **kw)


def test_fixed_wirings():
    twin_sd = timm.create_model('resnet18').state_dict()
    chain = timm.create_model('ddw_resnet18', wiring='chain')
    assert chain_init_state_dict(twin_sd, chain).keys() == twin_sd.keys()  # the twin's weights as they are
    timm_ddw.register_wiring('_test_skip', 'fixed', lambda n, seed: [[j - 1, j - 2][:j] for j in range(n)])
    try:
        skip = timm.create_model('ddw_resnet18', wiring='_test_skip')
        with pytest.raises(DdwCheckpointError, match="stage 'layer1' has fixed edges that are not the chain"):
            chain_init_state_dict(twin_sd, skip)
    finally:
        timm_ddw.WIRINGS.pop('_test_skip')
