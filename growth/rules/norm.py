"""Rules for normalisation layers and other per-channel modules."""

from __future__ import annotations

from ..errors import UnsupportedLayerError
from ..transform import AxisStep
from ._infra import ModuleRule, ModuleUpdate, TensorGrowth
from .residual_norm import NormRule


class ChannelwiseRule(ModuleRule):
    """Per-channel parameters and buffers along dim 0, channels on dim 1 of the input.

    BatchNorm (running statistics and affine parameters follow the replicated channels),
    InstanceNorm, PReLU with one slope per channel.
    """

    tensor_names = ("weight", "bias", "running_mean", "running_var")
    size_attr = "num_features"

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        layout = ctx.layout(node.args[0])
        if layout is not None and layout.dim != 1:
            return ctx.opaque(node, "normalises a dimension other than channels")
        return ctx.passthrough(node)

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if in_map is None:
            return None
        update = ModuleUpdate(attrs={self.size_attr: in_size})
        for tname in self.tensor_names:
            if getattr(module, tname, None) is not None:
                update.tensors[tname] = TensorGrowth([AxisStep(0, in_map, "channel")])
        return update


class PReLURule(ChannelwiseRule):
    tensor_names = ("weight",)
    size_attr = "num_parameters"

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        if module.num_parameters == 1:
            return ctx.passthrough(node)
        return super().infer(ctx, name, module, node)

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if module.num_parameters == 1:
            return None
        return super().grow(module, in_map, out_map, in_size, out_size)


class LayerNormRule(NormRule):
    """LayerNorm (and RMSNorm): exact over other dimensions than the channels, and over the
    channels for growth by integer multiples (``residual_norm``)."""


class GroupNormRule(ModuleRule):
    """GroupNorm mixes channels of a group in its statistics: refused (unless one per group)."""

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        if module.num_groups == module.num_channels:
            return ChannelwiseRule.infer(self, ctx, name, module, node)  # type: ignore[arg-type]
        layout = ctx.layout(node.args[0])
        ctx.spaces.block_layout(
            layout,
            f"layer {name!r} (GroupNorm, {module.num_groups} groups) normalises over groups of "
            f"channels; replicated units would change its statistics. Grow layers that do not "
            f"feed it, or use BatchNorm / GroupNorm with one channel per group",
            UnsupportedLayerError,
        )
        return ctx.fixed(node, f"output of {name!r}")

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if in_map is None:
            return None
        update = ModuleUpdate(attrs={"num_channels": in_size, "num_groups": in_size})
        for tname in ("weight", "bias"):
            if getattr(module, tname, None) is not None:
                update.tensors[tname] = TensorGrowth([AxisStep(0, in_map, "channel")])
        return update
