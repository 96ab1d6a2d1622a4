"""One entry per strategy plugin in a resume file: which handler saves and restores it (the
evaluator, replay, EWC, LwF or the generic object state), recorded as its ``kind``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...growth import GrowthError
from .evaluator import evaluator_state, prepare_evaluator
from .objects import has_state_dict, object_state, prepare_object_state, qualified_name
from .regularization import ewc_state, lwf_state, prepare_ewc, prepare_lwf
from .replay import prepare_storage, storage_state
from .steps import RestoreStep

__all__ = ["plugin_state", "prepare_plugin"]


def _where(plugin: Any, index: int) -> str:
    """How messages name the plugin at ``index`` of ``strategy.plugins``."""
    return f"plugin {index} ({type(plugin).__qualname__})"


def plugin_state(plugin: Any, strategy: Any, index: int) -> dict[str, Any]:
    """The resume-file entry of ``plugin``, the ``index``-th of ``strategy.plugins``: its class,
    its ``kind`` and (but for a :class:`~.plugin.ResumePlugin`) its state."""
    from avalanche.training.plugins import (
        EvaluationPlugin,
        EWCPlugin,
        LwFPlugin,
        ReplayPlugin,
    )

    from .plugin import ResumePlugin  # here: plugin.py saves through this module

    where = _where(plugin, index)
    entry: dict[str, Any] = {"class": qualified_name(plugin)}
    if isinstance(plugin, ResumePlugin):
        entry["kind"] = "none"
    elif isinstance(plugin, EvaluationPlugin):
        entry.update(kind="evaluator", state=evaluator_state(plugin, where))
    elif has_state_dict(plugin):
        entry.update(kind="object", state=object_state(plugin, where))
    elif isinstance(plugin, ReplayPlugin):
        entry.update(kind="replay", state=storage_state(plugin.storage_policy, where))
    elif isinstance(plugin, EWCPlugin):
        entry.update(kind="ewc", state=ewc_state(plugin))
    elif isinstance(plugin, LwFPlugin):
        entry.update(kind="lwf", state=lwf_state(plugin.lwf, strategy.model, where))
    else:
        entry.update(kind="object", state=object_state(plugin, where))
    return entry


def prepare_plugin(
    plugin: Any, entry: dict[str, Any], model: nn.Module, index: int
) -> RestoreStep | None:
    """Check and decode :func:`plugin_state`'s ``entry`` for ``plugin`` (``model`` is the model
    being restored); None for a plugin without state."""
    where = _where(plugin, index)
    kind, state = entry.get("kind"), entry.get("state")
    if kind == "none":
        return None
    if kind == "evaluator":
        return prepare_evaluator(plugin, state, where)
    if kind == "object":
        return prepare_object_state(plugin, state, where)
    if kind == "replay":
        return prepare_storage(plugin.storage_policy, state, where)
    if kind == "ewc":
        return prepare_ewc(plugin, state)
    if kind == "lwf":
        return prepare_lwf(plugin.lwf, state, model, where)
    raise GrowthError(f"malformed resume file: unknown state kind {kind!r} of {where}")
