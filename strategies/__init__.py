"""Avalanche side of net2grow: growth plugins, policies, strategies and metrics.

Importing this package registers growth rules for Avalanche's ``IncrementalClassifier`` and
``MultiHeadClassifier`` heads (:mod:`strategies.rules_avalanche`): import it before building a
``GrowableNetwork`` around a model with such heads.
"""

from ..growth.cohorts import CohortLR
from . import policies, resume, rules_avalanche
from .cohort_lr import CohortLRPlugin
from .expand import Expand
from .growing import Growing
from .metrics import growth_metrics
from .multitask import MultiTaskGrowableNetwork
from .plugin import GrowthEvent, GrowthPlugin
from .policies import Early, PlateauWidths, RankWidths
from .resume import ResumePlugin, load_run, save_run

__all__ = [
    "CohortLR",
    "CohortLRPlugin",
    "Early",
    "Expand",
    "Growing",
    "GrowthEvent",
    "GrowthPlugin",
    "MultiTaskGrowableNetwork",
    "PlateauWidths",
    "RankWidths",
    "ResumePlugin",
    "growth_metrics",
    "load_run",
    "policies",
    "resume",
    "rules_avalanche",
    "save_run",
]
