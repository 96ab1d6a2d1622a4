"""The comparison's own Avalanche metrics: the training loss and the hidden widths, logged to
every logger (TensorBoard) for every method alike."""

from __future__ import annotations

import functools
from typing import Any

from .models import hidden_widths


@functools.cache
def metric_classes() -> tuple[type, type]:
    """The benchmark's own Avalanche metrics, ``(TrainingLoss, HiddenWidths)``: defined on
    first use, as this module imports Avalanche only when a run starts (``--help`` stays fast).
    """
    from avalanche.evaluation import PluginMetric
    from avalanche.evaluation.metric_results import MetricValue

    class TrainingLoss(PluginMetric[float]):
        """``Loss/train`` after every training iteration (``strategy.loss``: the minibatch
        loss, penalties included) and ``Loss/train_epoch``, the epoch's mean, at its end."""

        def __init__(self) -> None:
            super().__init__()
            self.total = 0.0
            self.count = 0

        def result(self) -> float | None:
            return self.total / self.count if self.count else None

        def reset(self) -> None:
            self.total, self.count = 0.0, 0

        def before_training_epoch(self, strategy: Any) -> None:
            self.reset()

        def after_training_iteration(self, strategy: Any) -> Any:
            super().after_training_iteration(strategy)
            loss = float(strategy.loss.detach())
            self.total += loss
            self.count += 1
            return [MetricValue(self, "Loss/train", loss, int(strategy.clock.train_iterations))]

        def after_training_epoch(self, strategy: Any) -> Any:
            if not self.count:
                return None
            x = int(strategy.clock.train_iterations)
            return [MetricValue(self, "Loss/train_epoch", self.total / self.count, x)]

        def __str__(self) -> str:
            return "TrainingLoss"

    class HiddenWidths(PluginMetric[list]):
        """``Model/width/hidden<i>`` at the start and end of every training experience."""

        def __init__(self) -> None:
            super().__init__()
            self.widths: list[int] = []

        def result(self) -> list[int]:
            return list(self.widths)

        def reset(self) -> None:
            self.widths = []

        def _emit(self, strategy: Any) -> Any:
            self.widths = hidden_widths(strategy.model)
            x = int(strategy.clock.train_iterations)
            return [
                MetricValue(self, f"Model/width/hidden{i + 1}", w, x)
                for i, w in enumerate(self.widths)
            ]

        def before_training_exp(self, strategy: Any) -> Any:
            return self._emit(strategy)

        def after_training_exp(self, strategy: Any) -> Any:
            return self._emit(strategy)

        def __str__(self) -> str:
            return "HiddenWidths"

    TrainingLoss.__qualname__ = "TrainingLoss"  # resume files name metrics by class
    HiddenWidths.__qualname__ = "HiddenWidths"
    return TrainingLoss, HiddenWidths
