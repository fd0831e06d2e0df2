import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests never reach the Hub; set before huggingface_hub loads

import pytest
import timm
import torch

import timm_ddw  # noqa: F401,E402  (registers the models)
from timm_ddw.models import TWINS  # noqa: E402

MODELS = sorted(TWINS)


def build_pair(name: str, **kwargs):
    """A DDW model and its timm twin holding the same weights."""
    torch.manual_seed(0)
    twin = timm.create_model(TWINS[name], **{k: v for k, v in kwargs.items() if k != 'wiring'})
    model = timm.create_model(name, **kwargs)
    result = model.load_state_dict(twin.state_dict(), strict=False)
    assert not result.unexpected_keys
    return model, twin


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
