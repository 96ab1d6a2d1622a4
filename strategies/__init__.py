"""Avalanche side of net2grow: growth plugins, policies, strategies and metrics.

Importing this package registers growth rules for Avalanche's ``IncrementalClassifier`` and
``MultiHeadClassifier`` heads (:mod:`strategies.rules_avalanche`): import it before building a
``GrowableNetwork`` around a model with such heads.
"""

from . import policies, resume, rules_avalanche
from .cohort_lr import CohortLRPlugin
from .expand import Expand
from .growing import Growing
from .metrics import growth_metrics
from .multitask import MultiTaskGrowableNetwork
from .plugin import GrowthEvent, GrowthPlugin
from .resume import ResumePlugin, load_run, save_run

__all__ = [
    "CohortLRPlugin",
    "Expand",
    "Growing",
    "GrowthEvent",
    "GrowthPlugin",
    "MultiTaskGrowableNetwork",
    "ResumePlugin",
    "growth_metrics",
    "load_run",
    "policies",
    "resume",
    "rules_avalanche",
    "save_run",
]
