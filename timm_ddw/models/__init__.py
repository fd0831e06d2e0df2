from .efficientnet import *
from .regnet import *
from .resnet import *
