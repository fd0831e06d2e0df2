"""DDW EfficientNet and MobileNetV2: timm's EfficientNet with each ``blocks.<i>`` as a graph stage."""
from timm.models import generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet

from ._ddw import DdwMixin, create_ddw, twin_cfg
from ._pretrained import chaininit_name

__all__ = ['DdwEfficientNet']


class DdwEfficientNet(DdwMixin, EfficientNet):
    stage_prefix = r'^blocks\.(\d+)'
    twin_features_class = True  # EfficientNetFeatures

    @classmethod
    def stage_names(cls, model):
        return [f"blocks.{i}" for i in range(len(model.blocks))]


_TWINS = dict(
    ddw_mobilenetv2_100='mobilenetv2_100',
    ddw_efficientnet_b0='efficientnet_b0',
)

default_cfgs = generate_default_cfgs({chaininit_name(name, twin): twin_cfg(twin) for name, twin in _TWINS.items()})


def _create(variant: str, pretrained: bool = False, **kwargs) -> DdwEfficientNet:
    return create_ddw(DdwEfficientNet, variant, _TWINS[variant], pretrained, **kwargs)


@register_model
def ddw_mobilenetv2_100(pretrained: bool = False, **kwargs) -> DdwEfficientNet:
    """MobileNetV2-1.0 with dynamic wiring."""
    return _create('ddw_mobilenetv2_100', pretrained, **kwargs)


@register_model
def ddw_efficientnet_b0(pretrained: bool = False, **kwargs) -> DdwEfficientNet:
    """EfficientNet-B0 with dynamic wiring."""
    return _create('ddw_efficientnet_b0', pretrained, **kwargs)
