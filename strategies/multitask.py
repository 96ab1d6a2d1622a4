"""A ``GrowableNetwork`` that Avalanche treats as a multi-task model.

Avalanche passes task labels to a model only when it is a ``MultiTaskModule``
(``avalanche_forward``), and a ``GrowableNetwork`` is not one, whatever model it adopted. For
task-incremental streams, trace a model whose ``forward(x, task_labels)`` hands the labels to a
``MultiHeadClassifier`` with this class instead::

    net = MultiTaskGrowableNetwork(model, (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long)))
"""

from __future__ import annotations

from typing import Any

from avalanche.models import MultiTaskModule

from ..growth import GrowableNetwork


class MultiTaskGrowableNetwork(GrowableNetwork, MultiTaskModule):
    """``GrowableNetwork`` whose forward takes ``(x, task_labels)`` like a ``MultiTaskModule``.

    The traced model's own ``forward(x, task_labels)`` is run (not ``MultiTaskModule``'s
    per-task split); ``task_labels=None`` reaches the heads, which then return one output per
    known task (as LwF asks of multi-task models).
    """

    checkpoint_state = ("max_class_label", "known_train_tasks_labels")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return GrowableNetwork.forward(self, *args, **kwargs)
