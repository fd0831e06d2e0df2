from .efficientnet import *
from .efficientnet import _TWINS as _EFFICIENTNET_TWINS
from .regnet import *
from .regnet import _TWINS as _REGNET_TWINS
from .resnet import *
from .resnet import _TWINS as _RESNET_TWINS

# every DDW model and the timm model it wraps
TWINS = {**_RESNET_TWINS, **_REGNET_TWINS, **_EFFICIENTNET_TWINS}
