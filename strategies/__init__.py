"""Avalanche side of net2grow: growth plugins, policies, strategies and metrics.

Importing this package registers growth rules for Avalanche's ``IncrementalClassifier`` and
``MultiHeadClassifier`` heads (when the engine supports them): import it before building a
``GrowableNetwork`` around a model with such heads.
"""

from . import policies
from .growing import Growing
from .metrics import growth_metrics
from .multitask import MultiTaskGrowableNetwork
from .plugin import GrowthEvent, GrowthPlugin
from .rules_avalanche import register_avalanche_rules

HEAD_RULES = register_avalanche_rules()

__all__ = [
    "HEAD_RULES",
    "Growing",
    "GrowthEvent",
    "GrowthPlugin",
    "MultiTaskGrowableNetwork",
    "growth_metrics",
    "policies",
]
