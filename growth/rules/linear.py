"""Rules for ``nn.Linear`` (reads and creates units) and ``nn.Embedding`` (creates units)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from ..layout import Layout, Segment
from ..transform import AxisStep
from ._infra import ModuleRule, ModuleUpdate, TensorGrowth


class LinearRule(ModuleRule):
    """``y = x W^T + b``: rows of ``W`` and ``b`` are output units, columns of ``W`` input units.

    Subclasses for linear layers that store their weight another way (Hugging Face's ``Conv1D``)
    name their size attributes and weight axes in the class attributes below.
    """

    is_layer = True
    label = "Linear"
    in_attr, out_attr = "in_features", "out_features"
    in_axis, out_axis = 1, 0  # the weight's axes of input and output units

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        src = node.args[0]
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is not None and shape is not None and layout.dim != len(shape) - 1:
            ctx.spaces.block_layout(
                layout,
                f"layer {name!r} ({self.label}) is applied along a dimension that is not channels",
            )
        out_shape = ctx.shape(node)
        width = self.width(module)
        space = ctx.module_space(name, width)
        return Layout(len(out_shape) - 1, (Segment(space, width),))

    def width(self, module):  # type: ignore[override]
        return getattr(module, self.out_attr)

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        update = ModuleUpdate()
        w_steps = []
        if in_map is not None:
            w_steps.append(AxisStep(self.in_axis, in_map, "in"))
            update.attrs[self.in_attr] = in_size
        if out_map is not None:
            w_steps.append(AxisStep(self.out_axis, out_map, "out"))
            update.attrs[self.out_attr] = out_size
            if module.bias is not None:
                update.tensors["bias"] = TensorGrowth([AxisStep(0, out_map, "out")], fresh="zeros")
        update.tensors["weight"] = TensorGrowth(w_steps)
        return update

    def square_like(self, module, width):  # type: ignore[override]
        return square_linear(module.weight, width)

    def set_identity(self, module):  # type: ignore[override]
        set_linear_identity(module)


class LastDimFollower(ModuleRule):
    """A layer whose output has its units on the last dimension and no identity of its own
    type: ``deepen`` inserts a square ``Linear`` there (on :meth:`follower_like`'s device and
    dtype)."""

    def follower_like(self, module: nn.Module) -> Tensor:
        """A parameter of ``module`` whose device and dtype the inserted Linear takes."""
        raise NotImplementedError

    def square_like(self, module, width):  # type: ignore[override]
        return square_linear(self.follower_like(module), width)

    def set_identity(self, module):  # type: ignore[override]
        set_linear_identity(module)


class EmbeddingRule(LastDimFollower):
    """``nn.Embedding``: the columns of its table are its output units."""

    is_layer = True

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        out_shape = ctx.shape(node)
        space = ctx.module_space(name, module.embedding_dim)
        if module.max_norm is not None:
            # renormalisation reads the norm of a whole row: replicated columns change it
            ctx.spaces.block(
                space,
                f"layer {name!r} (Embedding) has max_norm={module.max_norm}: each row it looks "
                f"up is rescaled to norm {module.max_norm} over all {module.embedding_dim} "
                f"columns, and replicated columns would change that norm (and the rescaling). "
                f"Set max_norm=None on it, or keep its embedding_dim fixed (grow layers that "
                f"are not coupled to its output)",
                UnsupportedLayerError,
            )
        return Layout(len(out_shape) - 1, (Segment(space, module.embedding_dim),))

    def width(self, module):  # type: ignore[override]
        return module.embedding_dim

    def follower_like(self, module: nn.Module) -> Tensor:
        return module.weight  # a lookup's units lie on the last dim of its output

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if out_map is None:
            return None
        return ModuleUpdate(
            tensors={"weight": TensorGrowth([AxisStep(1, out_map, "out")])},
            attrs={"embedding_dim": out_size},
        )


def square_linear(like: Tensor, width: int) -> nn.Linear:
    """A fresh ``width -> width`` Linear (with bias) on ``like``'s device and dtype: the layer
    inserted after any layer whose units lie on the last dim of its output."""
    return nn.Linear(width, width, bias=True, device=like.device, dtype=like.dtype)


def set_linear_identity(module: nn.Module) -> None:
    """Make a square Linear-like layer (a square ``weight``, a ``bias``) compute the identity."""
    with torch.no_grad():
        module.weight.copy_(torch.eye(module.weight.shape[0], dtype=module.weight.dtype))
        module.bias.zero_()
