"""DDW RegNet: timm's RegNet with ``s1..s4`` as graph stages (the paper's DDW-A and DDW-B)."""
from timm.models import generate_default_cfgs, register_model
from timm.models.regnet import RegNet

from ._ddw import DdwMixin, create_ddw, twin_cfg
from ._pretrained import chaininit_name

__all__ = ['DdwRegNet']


class DdwRegNet(DdwMixin, RegNet):
    stage_prefix = r'^s(\d+)'

    @classmethod
    def stage_names(cls, model):
        return ['s1', 's2', 's3', 's4']


_TWINS = dict(
    ddw_regnetx_600m='regnetx_006',
    ddw_regnetx_1600m='regnetx_016',
    ddw_regnety_600m='regnety_006',
)

default_cfgs = generate_default_cfgs({chaininit_name(name, twin): twin_cfg(twin) for name, twin in _TWINS.items()})


def _create(variant: str, pretrained: bool = False, **kwargs) -> DdwRegNet:
    return create_ddw(DdwRegNet, variant, _TWINS[variant], pretrained, **kwargs)


@register_model
def ddw_regnetx_600m(pretrained: bool = False, **kwargs) -> DdwRegNet:
    """RegNetX-600MF with dynamic wiring (the paper's DDW-A)."""
    return _create('ddw_regnetx_600m', pretrained, **kwargs)


@register_model
def ddw_regnetx_1600m(pretrained: bool = False, **kwargs) -> DdwRegNet:
    """RegNetX-1.6GF with dynamic wiring."""
    return _create('ddw_regnetx_1600m', pretrained, **kwargs)


@register_model
def ddw_regnety_600m(pretrained: bool = False, **kwargs) -> DdwRegNet:
    """RegNetY-600MF with dynamic wiring (the paper's DDW-B)."""
    return _create('ddw_regnety_600m', pretrained, **kwargs)
