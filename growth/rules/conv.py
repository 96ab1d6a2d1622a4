"""Rule for ``nn.Conv1d/2d/3d``: ordinary, grouped and depthwise convolutions.

- ``groups == 1``: like ``Linear`` over the channel dimension (dim 1).
- depthwise (``groups == in_channels > 1``, ``out_channels = m * in_channels``): a per-channel
  operation; it grows with its input, each new input channel bringing ``m`` new output channels
  copied from its source's.
- grouped (``1 < groups < in_channels``): the spaces it reads and writes grow by whole groups:
  every group gains the same number of units, copied from units of the same group.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GrowthError
from ..layout import Layout, Segment
from ..transform import AxisStep
from ._infra import ModuleRule, ModuleUpdate, TensorGrowth


def is_depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


class ConvRule(ModuleRule):
    is_layer = True

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        src = node.args[0]
        layout = ctx.layout(src)
        if layout is not None and layout.dim != 1:
            ctx.spaces.block_layout(layout, f"layer {name!r} reads channels from an unexpected dim")
            layout = None
        if is_depthwise(module):
            if layout is None:
                return ctx.fixed(node, f"output of {name!r}")
            return layout.expanded(module.out_channels // module.in_channels)
        space = ctx.module_space(name, module.out_channels)
        if module.groups > 1:
            if layout is not None:
                if len(layout.segments) != 1:
                    ctx.spaces.block_layout(
                        layout,
                        f"grouped conv {name!r} reads a concatenation; only a single producer "
                        f"can grow by whole groups",
                    )
                else:
                    ctx.spaces.require_groups(layout.segments[0].space, module.groups)
            ctx.spaces.require_groups(space, module.groups)
        return Layout(1, (Segment(space, module.out_channels),))

    def width(self, module):  # type: ignore[override]
        return module.out_channels

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        update = ModuleUpdate()
        if is_depthwise(module):
            if out_map is None:
                return None
            steps = [AxisStep(0, out_map, "channel")]
            update.tensors["weight"] = TensorGrowth(steps)
            if module.bias is not None:
                update.tensors["bias"] = TensorGrowth(steps)
            update.attrs.update(in_channels=in_size, out_channels=out_size, groups=in_size)
            return update
        w_steps = []
        if in_map is not None:
            w_steps.append(AxisStep(1, in_map, "in", groups=module.groups))
            update.attrs["in_channels"] = in_size
        if out_map is not None:
            w_steps.append(AxisStep(0, out_map, "out"))
            update.attrs["out_channels"] = out_size
            if module.bias is not None:
                update.tensors["bias"] = TensorGrowth([AxisStep(0, out_map, "out")], fresh="zeros")
        update.tensors["weight"] = TensorGrowth(w_steps)
        return update

    def square_like(self, module, width):  # type: ignore[override]
        kernel = tuple(module.kernel_size)
        if any(k % 2 == 0 for k in kernel):
            raise GrowthError(
                f"cannot insert an identity convolution after a layer with even kernel size "
                f"{kernel}: no centred identity exists; deepen after a layer with an odd kernel, "
                f"or use kind='residual' (its branch takes the next smaller odd kernel)"
            )
        return _same_size_conv(module, width, kernel)

    def residual_like(self, module, width):  # type: ignore[override]
        # a zero branch is exact whatever its kernel: an even one is made odd (2 -> 1, 8 -> 7)
        # so that a centred, shape-preserving padding exists
        kernel = tuple(k if k % 2 else k - 1 for k in module.kernel_size)
        return _same_size_conv(module, width, kernel)

    def set_identity(self, module):  # type: ignore[override]
        per_group = module.out_channels // module.groups
        centre = tuple(k // 2 for k in module.kernel_size)
        with torch.no_grad():
            module.weight.zero_()
            rows = torch.arange(module.out_channels, device=module.weight.device)
            module.weight[(rows, rows % per_group, *centre)] = 1.0
            module.bias.zero_()


def _same_size_conv(module: nn.Module, width: int, kernel: tuple[int, ...]) -> nn.Module:
    """A fresh ``width -> width`` convolution of ``module``'s type with an odd ``kernel``,
    stride 1 and centred padding (its output has its input's size), on ``module``'s device."""
    if is_depthwise(module):
        groups = width
    else:
        groups = module.groups if width % module.groups == 0 else 1
    w = module.weight
    return type(module)(
        width,
        width,
        kernel,
        stride=1,
        padding=tuple(k // 2 for k in kernel),
        groups=groups,
        bias=True,
        device=w.device,
        dtype=w.dtype,
    )
