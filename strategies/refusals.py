"""Refusing, before training, the Avalanche strategies and plugins that cannot follow growth.

They replace, reset or rebuild the model, or need a model class a ``GrowableNetwork`` is not, so
growth would be lost or training would fail inside Avalanche (:func:`refuse_incompatible`). The
plugins whose per-parameter state can follow growth are remapped by :mod:`strategies.plugin_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from avalanche.models import BaseModel
from avalanche.training.plugins import FromScratchTrainingPlugin, GDumbPlugin, LFLPlugin
from avalanche.training.supervised import ICaRL

from ..growth import GrowthError


def _gdumb(plugin: Any, strategy: Any) -> str | None:
    if isinstance(plugin, GDumbPlugin):
        return (
            "GDumbPlugin replaces strategy.model with a copy of the initial model before every "
            "experience (it retrains from scratch), so every growth would be discarded"
        )
    return None


def _lfl(plugin: Any, strategy: Any) -> str | None:
    if isinstance(plugin, LFLPlugin) and not isinstance(strategy.model, BaseModel):
        return (
            "LFLPlugin compares the features of strategy.model.get_features() and needs an "
            "avalanche.models.BaseModel; a GrowableNetwork is not one"
        )
    return None


def _from_scratch(plugin: Any, strategy: Any) -> str | None:
    if isinstance(plugin, FromScratchTrainingPlugin):
        return (
            "FromScratchTrainingPlugin resets the weights before every experience only where "
            "their shape did not change, so grown parameters would keep their trained values"
        )
    return None


_REFUSALS: tuple[Callable[[Any, Any], str | None], ...] = (_gdumb, _from_scratch, _lfl)


def refuse_incompatible(strategy: Any) -> None:
    """Raise ``GrowthError`` before training when ``strategy`` or one of its plugins cannot work
    with a growing model (instead of a failure deep inside Avalanche, or growth silently lost):

    - ``ICaRL`` builds ``strategy.model`` itself (a ``TrainEvalModel`` of the feature extractor,
      the classifier and a nearest-class-mean classifier): there is no ``GrowableNetwork`` to grow;
    - ``GDumbPlugin`` resets the model to its initial copy before every experience;
    - ``FromScratchTrainingPlugin`` resets the weights only where their shape did not change;
    - ``LFLPlugin`` needs an ``avalanche.models.BaseModel`` (``get_features``).
    """
    if isinstance(strategy, ICaRL):
        raise GrowthError(
            "GrowthPlugin cannot grow ICaRL: the strategy builds its own model (a TrainEvalModel "
            "of feature_extractor and classifier, with a nearest-class-mean classifier for "
            "evaluation), not a growth.GrowableNetwork"
        )
    problems = [msg for p in strategy.plugins for check in _REFUSALS if (msg := check(p, strategy))]
    if problems:
        raise GrowthError("GrowthPlugin cannot grow this strategy's model: " + "; ".join(problems))
