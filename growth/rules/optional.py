"""Rules for layer types of optional packages (registered in ``growth.rules._OPTIONAL_LAYERS``
once their package has been imported).

- Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): a ``Linear`` layer
  with its weight stored transposed, ``y = x W + b`` with ``W`` of shape ``(nx, nf)`` (inputs on
  dim 0, outputs on dim 1); ``forward`` reshapes its output with ``self.nf``, which growth
  updates.
- torchvision's ``LayerNorm2d`` (ConvNeXt): an ``nn.LayerNorm`` subclass that normalises the
  channels of an ``(N, C, H, W)`` tensor (it permutes them last, normalises, permutes back).
  As a LayerNorm over the channels, its space grows only to integer multiples of its width.
- torchvision's Swin layers (``ShiftedWindowAttention``/``V2``, ``PatchMerging``/``V2``): their
  rules live in :mod:`growth.rules.swin` (attention that grows by whole heads).
"""

from __future__ import annotations

from ..transform import AxisStep
from ._infra import ModuleRule, ModuleUpdate, TensorGrowth
from .linear import LinearRule
from .residual_norm import normalise_channels


class Conv1DRule(LinearRule):
    """``y = x W + b`` along the last dimension: columns of ``W`` and ``b`` are output units,
    rows of ``W`` input units (a :class:`LinearRule` with the weight's axes swapped)."""

    label = "Conv1D"
    in_attr, out_attr = "nx", "nf"
    in_axis, out_axis = 0, 1

    def square_like(self, module, width):  # type: ignore[override]
        w = module.weight
        return type(module)(width, width).to(device=w.device, dtype=w.dtype)


class ChannelsFirstLayerNormRule(ModuleRule):
    """A LayerNorm over dim 1 of its input (the channels of an ``(N, C, ...)`` tensor)."""

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        layout = ctx.layout(node.args[0])
        if layout is None:
            return ctx.fixed(node, f"output of {name!r}")
        if layout.dim != 1:
            return ctx.opaque(node, "normalises dim 1, which does not hold the channels")
        normalise_channels(ctx, layout, f"layer {name!r} ({type(module).__name__})")
        return ctx.passthrough(node)

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if in_map is None:
            return None
        update = ModuleUpdate(attrs={"normalized_shape": (in_size,)})
        for tname in ("weight", "bias"):
            if getattr(module, tname, None) is not None:
                update.tensors[tname] = TensorGrowth([AxisStep(0, in_map, "channel")])
        return update
