"""Rules for layer types of optional packages (registered in ``growth.rules._OPTIONAL_LAYERS``
once their package has been imported).

- Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): a ``Linear`` layer
  with its weight stored transposed, ``y = x W + b`` with ``W`` of shape ``(nx, nf)`` (inputs on
  dim 0, outputs on dim 1); ``forward`` reshapes its output with ``self.nf``, which growth
  updates.
- torchvision's ``LayerNorm2d`` (ConvNeXt): an ``nn.LayerNorm`` subclass that normalises the
  channels of an ``(N, C, H, W)`` tensor (it permutes them last, normalises, permutes back).
  As a LayerNorm over the channels, its space grows only to integer multiples of its width.
"""

from __future__ import annotations

import torch

from ..layout import Layout, Segment
from ..transform import AxisStep
from ._infra import ModuleRule, ModuleUpdate, TensorGrowth
from .residual_norm import normalise_channels


class Conv1DRule(ModuleRule):
    """``y = x W + b`` along the last dimension: columns of ``W`` and ``b`` are output units,
    rows of ``W`` input units."""

    is_layer = True

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        src = node.args[0]
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is not None and shape is not None and layout.dim != len(shape) - 1:
            ctx.spaces.block_layout(
                layout, f"layer {name!r} (Conv1D) is applied along a dimension that is not channels"
            )
        out_shape = ctx.shape(node)
        space = ctx.module_space(name, module.nf)
        return Layout(len(out_shape) - 1, (Segment(space, module.nf),))

    def width(self, module):  # type: ignore[override]
        return module.nf

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        update = ModuleUpdate()
        w_steps = []
        if in_map is not None:
            w_steps.append(AxisStep(0, in_map, "in"))
            update.attrs["nx"] = in_size
        if out_map is not None:
            w_steps.append(AxisStep(1, out_map, "out"))
            update.attrs["nf"] = out_size
            if module.bias is not None:
                update.tensors["bias"] = TensorGrowth([AxisStep(0, out_map, "out")], fresh="zeros")
        update.tensors["weight"] = TensorGrowth(w_steps)
        return update

    def square_like(self, module, width):  # type: ignore[override]
        w = module.weight
        return type(module)(width, width).to(device=w.device, dtype=w.dtype)

    def set_identity(self, module):  # type: ignore[override]
        with torch.no_grad():
            module.weight.copy_(torch.eye(module.nf, dtype=module.weight.dtype))
            module.bias.zero_()


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
