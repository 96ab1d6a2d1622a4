"""``CohortLRPlugin``: per-cohort learning rates for the units growth adds, in Avalanche.

The rates live in a :class:`growth.cohorts.CohortLR` attached to the strategy's
``GrowableNetwork`` (the ``module`` of a DDP wrapper); the plugin rescales each optimizer
update from Avalanche's ``before_update``/``after_update`` callbacks, so it keeps working when
Avalanche rebuilds or resets the optimizer (``make_optimizer``) and whatever optimizer the
strategy holds (SGD, Adam, ...). Its state (the cohort of every parameter entry) is saved by
``strategies.resume`` through ``state_dict``/``load_state_dict``. Under DDP every rank holds the
same parameters and sees the same growth, so every rank rescales alike.
"""

from __future__ import annotations

from typing import Any

from avalanche.training.plugins import SupervisedPlugin

from ..growth import GrowthError
from ..growth.cohorts import CohortLR, check_options
from .plugin import GrowthPlugin


class CohortLRPlugin(SupervisedPlugin, supports_distributed=True):
    """Scale the learning rate of the units added by each growth (see ``growth.cohorts``).

    Parameters
    ----------
    new_unit_lr : float
        Factor of the learning rate of units added by growth (``rule="constant"``), or a
        multiplier of the ``"vt"`` ratio.
    rule : {"constant", "vt"}
    decay_steps : int, optional
        ``"constant"``: the factor fades back to 1 over this many optimizer steps.

    List it beside the ``GrowthPlugin`` (any order: it attaches in ``before_training``, before
    the first growth).
    """

    def __init__(
        self, new_unit_lr: float = 1.0, *, rule: str = "constant", decay_steps: int | None = None
    ) -> None:
        super().__init__()
        check_options(new_unit_lr, rule, decay_steps)
        self.new_unit_lr = float(new_unit_lr)
        self.rule = rule
        self.decay_steps = decay_steps
        self.cohorts: CohortLR | None = None
        self._saved: dict[str, Any] | None = None  # loaded before the network was known

    def _attach(self, strategy: Any) -> CohortLR:
        """The ``CohortLR`` of the strategy's network (a new network, say a resumed one, gets
        the state of the previous one, or the state loaded last)."""
        net = GrowthPlugin.network(strategy)
        if self.cohorts is None or self.cohorts.net is not net:
            if self.cohorts is not None:
                self.cohorts.remove()
                if self._saved is None:
                    self._saved = self.cohorts.state_dict()
            self.cohorts = CohortLR(
                net, self.new_unit_lr, rule=self.rule, decay_steps=self.decay_steps
            )
        if self._saved is not None:
            saved, self._saved = self._saved, None
            self.cohorts.load_state_dict(saved)
        return self.cohorts

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self._attach(strategy)

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        self._attach(strategy).before_step()

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self._attach(strategy).after_step()

    def state_dict(self) -> dict[str, Any]:
        """The cohorts (plain data) for a resume file."""
        if self._saved is not None or self.cohorts is None:
            return {"cohorts": self._saved}
        return {"cohorts": self.cohorts.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output: applied to the strategy's network at the next
        callback (checked against it then)."""
        if not isinstance(state, dict) or "cohorts" not in state:
            raise GrowthError("malformed CohortLRPlugin state")
        self._saved = state["cohorts"]
