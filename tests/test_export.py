"""torch.export and ONNX (run with onnxruntime) reproduce the eager eval forward of DDW models."""
import pytest
import timm
import torch

import timm_ddw
from timm_ddw import fused
from timm_ddw.export import export_onnx, export_program

MODELS = ['ddw_resnet18', 'ddw_mobilenetv2_100']
SIZE = (3, 64, 64)


def _model(name: str) -> torch.nn.Module:
    # router bias 0 and thresholds 0.5 close a share of the edges, per sample, so the exported
    # graphs must carry the data-dependent gate rather than a constant "all open" wiring
    torch.manual_seed(0)
    return timm.create_model(name, router_bias=0.0, threshold_init=0.5).eval()


def _inputs(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, *SIZE, generator=g)


def _mixed_gates(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Some edges are closed and some open in this input, else the check below is weaker."""
    with timm_ddw.capture_routing(model) as routing, torch.no_grad():
        model(x)
    vals = []
    for (adj,) in routing.values():
        rows, cols = torch.tril_indices(adj.shape[1], adj.shape[1], -1)
        vals.append(adj[:, rows, cols].flatten())
    vals = torch.cat(vals)
    closed = (vals == 0).float().mean().item()
    assert 0.05 < closed < 0.95, f'share of closed edges {closed:.2f}: choose other router settings'


@pytest.fixture(scope='module', params=MODELS)
def exported(request):
    """(model, eager output on a batch of 3, program exported with a batch of 2): tracing is slow."""
    model = _model(request.param)
    x = _inputs(3)
    _mixed_gates(model, x)
    with torch.no_grad():
        ref = model(x)
    # skipping closed nodes is data-dependent control flow: the helpers export the dense forward
    timm_ddw.set_skip_closed(model, True)
    was = fused.enabled()
    fused.set_enabled(True)  # exported programs stay plain ATen even with the compiled-path operators on
    try:
        program = export_program(model, SIZE, batch_size=2)
    finally:
        fused.set_enabled(was)
    assert all(s.skip_closed for s in timm_ddw.graph_stages(model).values())
    return model, x, ref, program


def test_torch_export_matches_eager(exported):
    _, x, ref, program = exported
    out = program.module()(x)  # another batch size than at export time: the batch is dynamic
    assert out.shape == ref.shape
    # plain ATen: the compiled path's operators (fused.py) would tie the program to timm_ddw
    assert not [n for n in program.graph.nodes if 'timm_ddw' in str(n.target)]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_onnx_matches_eager(exported, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    _, x, ref, program = exported
    path = export_onnx(program, tmp_path / 'model.onnx')
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == ['input']
    out = session.run(['output'], {'input': x.numpy()})[0]
    assert out.shape == tuple(ref.shape)
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-4, rtol=1e-4)


def test_export_rejects_bad_input_size():
    model = _model('ddw_resnet18')
    with pytest.raises(ValueError, match='input_size'):
        export_program(model, (64, 64))
    with pytest.raises(ValueError, match='batch_size'):
        export_program(model, SIZE, batch_size=1)
