"""Exported DDW folders in transformers' timm wrapper, offline: the loading lines of README's
"Loading others' DDW weights", with the exporting model's logits and class names."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_ddw
from timm_ddw.hub import export_checkpoint, export_folder

transformers = pytest.importorskip('transformers', reason="pip install 'timm-ddw[hub]'")
pytest.importorskip('torchvision', reason="transformers' timm image processor needs torchvision")
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline  # noqa: E402

NAMES = ['cat', 'dog', 'owl', 'fox', 'elk']
# (model, constructor arguments, input size): a dynamic RGB model and a static grayscale one (as
# `timm-ddw train` writes for Fashion-MNIST); router bias 0 and thresholds 0.5 close some edges
CASES = {
    'dynamic': ('ddw_resnet18', dict(wiring='dynamic', router_bias=0.0, threshold_init=0.5), (3, 32, 32)),
    'static-1ch': ('ddw_mobilenetv2_100', dict(wiring='static', in_chans=1), (1, 32, 32)),
}


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


_EXPORTS = {}


def _exported(kind: str, tmp_path_factory):
    """(kind, model, folder, input size) of CASES[kind], exported once per test session."""
    if kind not in _EXPORTS:
        name, kwargs, size = CASES[kind]
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=len(NAMES), **kwargs).eval()
        folder = tmp_path_factory.mktemp(kind) / 'folder'
        export_folder(model, folder, label_names=NAMES, data_config=dict(input_size=size))
        _EXPORTS[kind] = kind, model, folder, size
    return _EXPORTS[kind]


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path_factory):
    return _exported(request.param, tmp_path_factory)


def test_auto_model_loads_the_export_with_its_logits_and_names(case):
    kind, model, folder, size = case
    hf = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(hf).__name__ == 'TimmWrapperForImageClassification'
    assert {s.wiring for s in timm_ddw.graph_stages(hf.timm_model).values()} == {kind.split('-')[0]}
    assert hf.config.id2label == dict(enumerate(NAMES)) and hf.config.label2id == {n: i for i, n in enumerate(NAMES)}
    x = torch.randn(4, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        diff = (hf(pixel_values=x).logits - ref).abs().max().item()
    assert diff <= 1e-5, diff
    # README's lines: the processor applies the export's preprocessing (a grayscale image for 1 channel)
    processor = AutoImageProcessor.from_pretrained(folder)
    image = _image() if size[0] == 3 else _image().convert('L')
    pixels = processor(image)['pixel_values']
    assert tuple(pixels.shape) == (1, *size)
    with torch.no_grad():
        assert torch.allclose(hf(**processor(image)).logits, model(pixels), atol=1e-5, rtol=0)


def test_pipeline_names_the_classes(tmp_path_factory):
    # an RGB model: pipeline() converts every image to RGB (README: 1-channel models take the lines above)
    kind, model, folder, size = _exported('dynamic', tmp_path_factory)
    classify = pipeline('image-classification', model=str(folder))
    image = _image(2)
    result = classify(image, top_k=len(NAMES))
    assert sorted(r['label'] for r in result) == sorted(NAMES)
    with torch.no_grad():
        probs = model(AutoImageProcessor.from_pretrained(folder)(image)['pixel_values']).softmax(-1)[0]
    assert result[0]['label'] == NAMES[int(probs.argmax())]
    assert result[0]['score'] == pytest.approx(probs.max().item(), abs=1e-5)


def test_old_layout_reexported_loads_in_transformers(case, tmp_path):
    """Folders exported before label_names (num_classes in model_args) keep loading in timm; their
    re-export with ``timm-ddw export FOLDER/model.safetensors NEW`` loads in transformers too."""
    kind, model, folder, size = case
    config = json.loads((folder / 'config.json').read_text())
    config.pop('label_names')
    config['model_args'] = dict(num_classes=config['num_classes'], **config['model_args'])
    old = tmp_path / 'old'
    old.mkdir()
    (old / 'model.safetensors').write_bytes((folder / 'model.safetensors').read_bytes())
    (old / 'config.json').write_text(json.dumps(config))
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(timm.create_model(f'local-dir:{old}', pretrained=True).eval()(x), model(x))
    new = export_checkpoint(old / 'model.safetensors', tmp_path / 'new', label_names=NAMES)
    hf = AutoModelForImageClassification.from_pretrained(new).eval()
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).logits, model(x), atol=1e-5, rtol=0)
    assert hf.config.id2label[0] == 'cat'
