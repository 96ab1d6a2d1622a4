"""Base classes of the rule registry.

A *module rule* tells the engine how one layer type treats the channel dimension it reads and
writes (``infer``: the analysis pass), how its parameters follow a unit mapping (``grow``), and,
for layers that can be inserted by ``deepen``, how to build an identity of it. A *function rule*
does the analysis part for a ``call_function``/``call_method`` node (functions have no weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import fx, nn

from ..layout import Layout
from ..mapping import AxisMap
from ..transform import AxisStep

if TYPE_CHECKING:
    from ..analysis import AnalysisContext


@dataclass
class TensorGrowth:
    """How one parameter or buffer of a module grows."""

    steps: list[AxisStep]
    fresh: str = "random"  # how rows of brand-new units are drawn: "random" (weights) or "zeros"


@dataclass
class ModuleUpdate:
    """Everything that changes in one module when a space grows."""

    tensors: dict[str, TensorGrowth] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleSpec:
    """How a checkpoint stores and rebuilds one layer type without pickling it.

    Attributes
    ----------
    args : tuple of str
        Constructor keywords, each read from the module's attribute of the same name
        (``bias`` is stored as ``module.bias is not None``). A checkpoint calls
        ``type(**args)`` on the ``meta`` device, then loads the saved tensors.
    omit_if_default : dict
        Keywords stored only when their value differs from the one given (keywords that
        older torch versions lack).
    state : tuple of str
        Plain attributes (numbers, strings, tuples) restored after construction: state the
        layer gathers while it is used (class counts of an incremental head).
    dynamic_buffers : bool
        The layer registers buffers after construction; a checkpoint restores the saved ones.
    read : callable, optional
        ``read(module) -> {arg: value}`` for layers whose constructor arguments are not
        attributes of the same name (it must return exactly ``args``).
    """

    args: tuple[str, ...]
    omit_if_default: dict[str, Any] = field(default_factory=dict)
    state: tuple[str, ...] = ()
    dynamic_buffers: bool = False
    read: Callable[[nn.Module], dict[str, Any]] | None = None


class ModuleRule:
    """How one module type takes part in growth. Subclass and register for new layer types."""

    #: True for layers whose output width can be chosen (listed in ``GrowableNetwork.layers``).
    is_layer: ClassVar[bool] = False

    def infer(
        self, ctx: AnalysisContext, name: str, module: nn.Module, node: fx.Node
    ) -> Layout | None:
        """The output layout of ``module`` called at ``node`` (see ``AnalysisContext``)."""
        raise NotImplementedError

    def width(self, module: nn.Module) -> int:
        """Current number of output units (layers only)."""
        raise NotImplementedError

    def grow(
        self,
        module: nn.Module,
        in_map: AxisMap | None,
        out_map: AxisMap | None,
        in_size: int | None,
        out_size: int | None,
    ) -> ModuleUpdate | None:
        """Parameter growth and new attributes, given the maps of the input and output channels.

        ``in_map``/``out_map`` are None when that side does not change; ``in_size``/``out_size``
        are the new channel counts of the input and output tensors.
        """
        return None

    def square_like(self, module: nn.Module, width: int) -> nn.Module | None:
        """A new layer of the same kind mapping ``width`` units to ``width`` units, freshly
        initialised and shape-preserving (``deepen``); None when the type has no such rule."""
        return None

    def set_identity(self, module: nn.Module) -> None:
        """Make a layer built by :meth:`square_like` compute the identity."""
        raise NotImplementedError

    def residual_like(self, module: nn.Module, width: int) -> nn.Module | None:
        """A new layer mapping ``width`` units to ``width`` units for the branch of a zero
        residual block (``deepen(kind="residual")``). The branch's last layer starts at zero,
        so, unlike :meth:`square_like`'s, this layer need not be able to compute the identity."""
        return self.square_like(module, width)


class PassThroughRule(ModuleRule):
    """Modules that act on each channel alike and have no per-channel state."""

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        return ctx.passthrough(node)


class FunctionRule:
    """Analysis of one ``call_function`` target or ``call_method`` name."""

    def infer(self, ctx: AnalysisContext, node: fx.Node) -> Layout | None:
        raise NotImplementedError
