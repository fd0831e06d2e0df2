"""torch.compile(fullgraph=True) traces a DDW model without graph breaks and matches eager.

The test uses the 'aot_eager' backend: it runs dynamo (graph capture, where graph breaks would
fail ``fullgraph=True``) and AOTAutograd (the joint forward/backward graph) but not inductor's
code generation, which takes minutes on 2 CPU cores. benchmarks/README.md has the inductor run.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from conftest import MODELS
from timm.task import ClassificationTask
from torch._dynamo.utils import counters

import timm_ddw


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


@pytest.mark.parametrize('name', MODELS)
def test_train_py_torchcompile_path(name, monkeypatch):
    """timm's ``train.py --torchcompile``: ``ClassificationTask.compile(backend, mode)`` before training,
    then ``task(x, y)`` in training and ``task.get_eval_model()`` under no_grad in validation. Every model at
    its full depth, on dynamo's eager backend (graph capture, where a break would show; AOTAutograd is
    tested above, inductor by benchmarks/compiled.py for all nine): no graph break, and loss, router
    gradients and eval logits as in eager. Stages of more than 2 * sum_block_size blocks (ResNet-101's
    third) are traced through the folded sums in the eval graph, and only there."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    folded, real = [], timm_ddw.GraphStage._forward_folded
    monkeypatch.setattr(timm_ddw.GraphStage, '_forward_folded',
                        lambda self, x: folded.append(self.training) or real(self, x))
    long_stages = sum(2 * s.sum_block_size < s.num_blocks for s in timm_ddw.graph_stages(model).values())
    # 64 px, batch 4: at 32 px / batch 2, random-init MobileNetV2's BatchNorm over 1 x 1 maps drives
    # gradients to 1e5, where float32 summation order alone moves them by 1e-3
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1, 0])
    state = copy.deepcopy(model.state_dict())
    runs = {}
    for backend in ('eager', None):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        task = ClassificationTask(model=model, criterion=nn.CrossEntropyLoss(), device=torch.device('cpu'))
        if backend:
            torch._dynamo.reset()
            counters.clear()
            task.compile(backend=backend, mode=None)
        model.train()
        loss = task(x, y)['loss']
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(('router_weight', 'tau'))}
        model.eval()
        with torch.no_grad():
            logits = task.get_eval_model()(x)  # train.py validates with it
        runs[backend] = loss.detach(), grads, logits
        if backend:
            assert not counters['graph_break'], dict(counters['graph_break'])
            assert counters['stats']['unique_graphs'] == 2  # one training graph, one eval graph
            assert folded == [False] * long_stages
    (loss_c, grads_c, logits_c), (loss_e, grads_e, logits_e) = runs['eager'], runs[None]
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == 2 * len(timm_ddw.graph_stages(model))
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-3, atol=1e-5, msg=n)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-4 * float(logits_e.abs().max()))
