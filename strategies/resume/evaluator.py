"""State of Avalanche's ``EvaluationPlugin``: its metrics' state and its metric histories
(values that are not plain data are left out, with a warning)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

from ...growth import GrowthError
from .codec import decode_state, encode_state
from .errors import ResumeMismatchError
from .objects import object_state, prepare_object_state, qualified_name
from .steps import RestoreStep

__all__ = ["evaluator_state", "prepare_evaluator"]

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time this process meets ``key``."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=4)


def _plain_entries(table: dict[str, Any]) -> list[Any]:
    """``[[name, encoded value], ...]`` of a metric table, without the values that are not
    plain data."""
    out = []
    for name, value in table.items():
        try:
            out.append([str(name), encode_state(value, f"metric {name!r}")])
        except GrowthError:
            _warn_once(
                f"value:{name}",
                f"resume: values of metric {name!r} are not plain data and are not saved",
            )
    return out


def evaluator_state(ev: Any, where: str) -> dict[str, Any]:
    """``ev``'s metrics' state (None for a metric whose state is not plain data) and its
    ``all_metric_results`` and ``last_metric_results``."""
    metrics = []
    for metric in ev.metrics:
        try:
            state = object_state(metric, where)
        except GrowthError:
            _warn_once(
                f"metric:{qualified_name(metric)}",
                f"resume: the state of metric {type(metric).__qualname__} is not plain data and "
                f"is not saved (a resumed run restarts it)",
            )
            state = None
        metrics.append({"class": qualified_name(metric), "state": state})
    return {
        "metrics": metrics,
        "all": _plain_entries(dict(ev.all_metric_results)),
        "last": _plain_entries(dict(ev.last_metric_results)),
    }


def prepare_evaluator(ev: Any, state: dict[str, Any], where: str) -> RestoreStep:
    """Check and decode :func:`evaluator_state`'s output for ``ev`` (same metrics, same order);
    the step is fallible when a metric's own ``load_state_dict`` runs."""
    if len(state["metrics"]) != len(ev.metrics):
        raise ResumeMismatchError(
            f"{where}: the resume file has {len(state['metrics'])} metrics, the evaluator "
            f"{len(ev.metrics)}"
        )
    steps = []
    for i, (metric, saved) in enumerate(zip(ev.metrics, state["metrics"])):
        if saved["class"] != qualified_name(metric):
            raise ResumeMismatchError(
                f"{where}: metric {i} is a {qualified_name(metric)}, the resume file's a "
                f"{saved['class']}"
            )
        if saved["state"] is not None:
            steps.append(prepare_object_state(metric, saved["state"], f"{where} metric {i}"))
    all_results = {name: decode_state(v) for name, v in state["all"]}
    last = {name: decode_state(v) for name, v in state["last"]}

    def apply() -> None:
        for step in steps:
            step.apply()
        table = ev.all_metric_results
        fresh = defaultdict(table.default_factory) if isinstance(table, defaultdict) else {}
        for name, (xs, values) in all_results.items():
            fresh[name] = (list(xs), list(values))
        ev.all_metric_results = fresh
        ev.last_metric_results = dict(last)

    fallible = [s for s in steps if s.fallible]
    if not fallible:
        return RestoreStep(apply)

    def undo() -> None:  # the metrics' own load_state_dict methods ran: put their state back
        for step in fallible:
            step.undo()

    return RestoreStep(apply, undo)
