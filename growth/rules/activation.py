"""Activations: elementwise like any pass-through op, plus what ``deepen`` needs to know.

``deepen`` copies the activation that follows a layer after the layer it inserts; an identity
insertion is exact only when that activation is idempotent on its own outputs (``f(f(x)) ==
f(x)``: ReLU after ReLU). Modules say so through :class:`ActivationRule`; functional activations
(``F.relu(x)``, ``x.sigmoid()``) through :class:`ActivationFunction`, which also builds the
equivalent module from the call's arguments.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from ._infra import PassThroughRule
from .functions import Unary


class ActivationRule(PassThroughRule):
    """An elementwise activation module (not dropout, not an identity)."""

    def __init__(self, *, idempotent: bool = False) -> None:
        self.idempotent = idempotent


class ActivationFunction(Unary):
    """A functional activation: ``module_type`` with ``args`` read from the call.

    Parameters
    ----------
    module_type : type
        The module computing the same function (``nn.LeakyReLU`` for ``F.leaky_relu``).
    args : tuple of str
        The call's arguments after the input, by position or keyword, passed on to
        ``module_type`` (``("negative_slope",)``).
    """

    def __init__(self, module_type: type[nn.Module], args: tuple[str, ...] = ()) -> None:
        self.module_type = module_type
        self.args = args

    def module(self, node: fx.Node) -> nn.Module:
        """A fresh module computing what ``node`` computes."""
        kwargs: dict[str, Any] = {}
        for position, name in enumerate(self.args, start=1):
            if name in node.kwargs:
                kwargs[name] = node.kwargs[name]
            elif len(node.args) > position:
                kwargs[name] = node.args[position]
        return self.module_type(**kwargs)
