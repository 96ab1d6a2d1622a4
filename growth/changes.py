"""What one growth operation changed, for code that keeps per-parameter tensors of its own.

Growth hooks (``GrowableNetwork.register_growth_hook``) receive a :class:`GrowthChanges` after each
operation, so that EWC importances, SI trajectories, EMA copies or optimizer state can follow
exactly how every parameter grew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from .record import GrowthRecord
from .transform import AxisStep, grow_state


@dataclass
class GrowthChanges:
    """How one operation changed the network's parameters and buffers.

    Attributes
    ----------
    init : str
        The widen ``init`` mode ("net2net", "zero", "random"; "identity" for deepen).
    tensors : dict
        Full name (as in ``named_parameters``/``named_buffers``) -> the ``AxisStep`` s that grew it.
    new_parameters : list of str
        Names of parameters that did not exist before (deepen).
    old_shapes : dict
        Full name -> shape of each grown tensor before the operation.
    """

    init: str
    tensors: dict[str, list[AxisStep]] = field(default_factory=dict)
    new_parameters: list[str] = field(default_factory=list)
    old_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def remap_like_gradient(self, name: str, value: Tensor, power: int = 1) -> Tensor:
        """Remap a tensor shaped like parameter ``name`` that accumulates ``gradient**power``."""
        return grow_state(value, self.tensors[name], init=self.init, power=power)


GrowthHook = Callable[[GrowthRecord, GrowthChanges], None]
"""Called as ``hook(record, changes)`` after every successful widen/deepen."""
