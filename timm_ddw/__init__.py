"""Differentiable Dynamic Wirings (Yuan et al., ICCV 2021) for timm models.

Importing this package registers the ``ddw_*`` models with timm.
"""
from . import wirings  # noqa: F401  (registers dense/er/ba/ws)
from .capture import applied_weights, capture_routing, graph_stages, set_skip_closed
from .graph import AGGREGATIONS, GATES, WIRINGS, GraphStage, register_wiring
from .models import *  # noqa: F401,F403  (registers the models)
from .models._ddw import DDW_DEFAULTS

__version__ = '0.1.0'

__all__ = ['AGGREGATIONS', 'GATES', 'WIRINGS', 'DDW_DEFAULTS', 'GraphStage', 'applied_weights', 'capture_routing',
           'graph_stages', 'register_wiring', 'set_skip_closed']
