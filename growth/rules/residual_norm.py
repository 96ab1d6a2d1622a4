"""Normalisation over the channels (LayerNorm, RMSNorm, a mean over the channels).

A transformer's residual stream is normalised over its channels before every block. Its mean,
variance and mean square are unchanged when every unit is replicated the same number of times
``k``: the normalised values of the copies equal their source's, and consumers that split their
source's outgoing weights among the copies compute what they did before. Any other growth (some
units copied more often than others, fresh units) changes those statistics, so a space that is
normalised over grows only to integer multiples of its width, by ``init="net2net"`` without
noise. Those constraints are recorded in the analysis (``SpaceTable.require_multiple``) and
checked by :func:`check_normalised_widen` before anything changes.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from torch import nn

from ..errors import GrowthError, UnsupportedLayerError
from ..layout import Layout
from ..transform import AxisStep
from ._infra import ModuleRule, ModuleUpdate, TensorGrowth

if TYPE_CHECKING:
    from ..analysis import AnalysisContext
    from ..layout import _SpaceInfo


def normalise_channels(ctx: AnalysisContext, layout: Layout, who: str) -> None:
    """Record that ``who`` normalises over the channels of ``layout`` (or block them, when they
    are made of several spaces that could grow by different factors)."""
    spaces = {ctx.spaces.find(s.space) for s in layout.segments}
    if len(spaces) != 1:
        ctx.spaces.block_layout(
            layout,
            f"{who} normalises over channels concatenated from {len(spaces)} independently "
            f"growing parts; growing one of them would change its statistics. Grow layers that "
            f"do not reach it",
            UnsupportedLayerError,
        )
        return
    ctx.spaces.require_multiple(layout.segments[0].space, who)


def exact_widths(width: int, count: int = 3) -> str:
    """``"2w, 3w, 4w, ..."``: the widths a space normalised over can grow to."""
    return ", ".join(str(width * k) for k in range(2, 2 + count)) + ", ..."


def check_normalised_widen(
    name: str, info: _SpaceInfo, old_width: int, new_width: int, init: str, noise: float
) -> None:
    """Refuse, before anything changes, a widening of a space normalised over that cannot be
    exact (see the module docstring)."""
    if not info.normalised:
        return
    who = " and ".join(info.normalised[:2]) + (" and others" if len(info.normalised) > 2 else "")
    why = (
        f"its units are normalised over by {who}: mean and variance over the channels stay "
        f"exact only when every unit is replicated the same number of times"
    )
    if new_width % old_width:
        raise GrowthError(
            f"cannot widen {name!r} from {old_width} to {new_width}: {why}; exact widths for "
            f"this layer: {exact_widths(old_width)} (use one of them)"
        )
    if init != "net2net":
        raise GrowthError(
            f"cannot widen {name!r} with init={init!r}: {why}, and fresh units would change "
            f"those statistics. Use init='net2net' (copies, exact) with a width among "
            f"{exact_widths(old_width)}"
        )
    if noise:
        raise GrowthError(
            f"cannot widen {name!r} with noise={noise}: {why}, and noisy copies would change "
            f"those statistics in every normalisation they reach. Use noise=0"
        )


class NormRule(ModuleRule):
    """``nn.LayerNorm`` and ``nn.RMSNorm`` over the trailing dimensions.

    Exact when they normalise dimensions other than the channels. Over the channels (the last
    dimension: transformers' residual stream) the space must grow by integer multiples
    (:func:`normalise_channels`); weight and bias then follow the replicated units.
    """

    def __init__(self) -> None:
        # layers that normalise the channels at their last call analysed (only they grow)
        self.over_channels: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        layout, shape = ctx.layout(node.args[0]), ctx.shape(node.args[0])
        self.over_channels.discard(module)
        if layout is not None and shape is not None:
            if layout.dim >= len(shape) - len(module.normalized_shape):
                if layout.dim != len(shape) - 1:
                    reason = (
                        f"layer {name!r} ({type(module).__name__}) normalises over the channels "
                        f"together with later dimensions; only a normalisation whose last "
                        f"dimension holds the channels can follow them. Put the growth before "
                        f"or after it"
                    )
                    ctx.spaces.block_layout(layout, reason, UnsupportedLayerError)
                    return ctx.fixed(node, f"output of {name!r}", layout.dim)
                normalise_channels(ctx, layout, f"layer {name!r} ({type(module).__name__})")
                self.over_channels.add(module)
        return ctx.passthrough(node)

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if in_map is None or module not in self.over_channels:
            return None  # normalises other dimensions: nothing of it depends on the channels
        shape = tuple(module.normalized_shape)
        update = ModuleUpdate(attrs={"normalized_shape": (*shape[:-1], in_size)})
        for tname in ("weight", "bias"):
            if getattr(module, tname, None) is not None:
                step = AxisStep(len(shape) - 1, in_map, "channel")
                update.tensors[tname] = TensorGrowth([step])
        return update


def norm_modules() -> tuple[type[nn.Module], ...]:
    """The normalisation layer types of this torch version that :class:`NormRule` handles."""
    rms = getattr(nn, "RMSNorm", None)
    return (nn.LayerNorm,) if rms is None else (nn.LayerNorm, rms)
