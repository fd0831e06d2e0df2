"""DDW ResNet and ResNeXt: timm's ResNet with ``layer1..layer4`` as graph stages."""
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import ResNet

from ._ddw import DdwMixin, create_ddw, twin_cfg
from ._pretrained import chaininit_name

__all__ = ['DdwResNet']


class DdwResNet(DdwMixin, ResNet):
    stage_prefix = r'^layer(\d+)'

    @classmethod
    def stage_names(cls, model):
        return ['layer1', 'layer2', 'layer3', 'layer4']


_TWINS = dict(
    ddw_resnet18='resnet18',
    ddw_resnet50='resnet50',
    ddw_resnet101='resnet101',
    ddw_resnext50_32x4d='resnext50_32x4d',
)

default_cfgs = generate_default_cfgs({chaininit_name(name, twin): twin_cfg(twin) for name, twin in _TWINS.items()})


def _create(variant: str, pretrained: bool = False, **kwargs) -> DdwResNet:
    return create_ddw(DdwResNet, variant, _TWINS[variant], pretrained, **kwargs)


@register_model
def ddw_resnet18(pretrained: bool = False, **kwargs) -> DdwResNet:
    """ResNet-18 with dynamic wiring."""
    return _create('ddw_resnet18', pretrained, **kwargs)


@register_model
def ddw_resnet50(pretrained: bool = False, **kwargs) -> DdwResNet:
    """ResNet-50 with dynamic wiring."""
    return _create('ddw_resnet50', pretrained, **kwargs)


@register_model
def ddw_resnet101(pretrained: bool = False, **kwargs) -> DdwResNet:
    """ResNet-101 with dynamic wiring."""
    return _create('ddw_resnet101', pretrained, **kwargs)


@register_model
def ddw_resnext50_32x4d(pretrained: bool = False, **kwargs) -> DdwResNet:
    """ResNeXt-50 (32x4d) with dynamic wiring."""
    return _create('ddw_resnext50_32x4d', pretrained, **kwargs)
