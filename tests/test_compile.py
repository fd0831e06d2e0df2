"""torch.compile(fullgraph=True) traces a DDW model without graph breaks and matches eager.

The test uses the 'aot_eager' backend: it runs dynamo (graph capture, where graph breaks would
fail ``fullgraph=True``) and AOTAutograd (the joint forward/backward graph) but not inductor's
code generation, which takes minutes on 2 CPU cores. benchmarks/README.md has the inductor run.
"""
import pytest
import timm
import torch

import timm_ddw  # noqa: F401


@pytest.fixture(scope='module')
def model_and_input():
    torch.manual_seed(0)
    # closes a share of the edges (router bias 0, thresholds 0.5) so the gate's both branches are traced
    model = timm.create_model('ddw_resnet18', router_bias=0.0, threshold_init=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, x


def _step(fn, model, x):
    model.zero_grad(set_to_none=True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_compile_fullgraph_matches_eager(model_and_input, mode):
    model, x = model_and_input
    model.train(mode == 'train')
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    out_c, grads_c = _step(compiled, model, x)  # fullgraph=True raises on any graph break
    model.load_state_dict(state)  # undo the BN statistics update of the compiled step
    out_e, grads_e = _step(model, model, x)
    torch.testing.assert_close(out_c, out_e, atol=1e-4, rtol=1e-4)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-4, rtol=1e-4, msg=name)
    if mode == 'train':
        routed = [n for n in grads_c if n.endswith(('router_weight', 'router_bias', 'tau'))]
        assert len(routed) == 3 * 4, routed  # every stage's routers and thresholds get gradients
        assert all(grads_c[n].abs().sum() > 0 for n in routed)
