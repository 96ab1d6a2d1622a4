"""Rules for modules that leave channels alone: activations, dropout, pooling, flatten, softmax."""

from __future__ import annotations

from ._infra import ModuleRule, PassThroughRule
from .shape_ops import flatten_layout, normalise_dim


class SpatialRule(ModuleRule):
    """Pooling, upsampling and padding: channels on dim 1 pass through unchanged."""

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        layout = ctx.layout(node.args[0])
        if layout is not None and layout.dim != 1:
            return ctx.opaque(node, "pools along the channel dimension")
        return ctx.passthrough(node)


class FlattenRule(ModuleRule):
    """``nn.Flatten``: each channel expands to its positions in the flattened dimension."""

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        src = node.args[0]
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is None:
            return ctx.fixed(node, f"output of {name!r}")
        return flatten_layout(ctx, node, layout, shape, module.start_dim, module.end_dim)


class UnflattenRule(ModuleRule):
    """``nn.Unflatten`` of a network's input (a flat image made 2-D): its units never grow. On
    units that can grow (the output of a growable layer) it is refused."""

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        if ctx.layout(node.args[0]) is None:
            return ctx.fixed(node, f"output of {name!r}")
        return ctx.opaque(node, "splits the dimension of growable units")


class SoftmaxRule(ModuleRule):
    """Softmax over channels mixes units (refused); over another dimension it passes through."""

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        layout, shape = ctx.layout(node.args[0]), ctx.shape(node.args[0])
        if layout is None or module.dim is None:
            return ctx.opaque(node, "normalises over all dimensions")
        if normalise_dim(module.dim, len(shape)) == layout.dim:
            return ctx.refuse_channels(node, "normalises over the channels")
        return ctx.passthrough(node)


__all__ = ["FlattenRule", "PassThroughRule", "SoftmaxRule", "SpatialRule", "UnflattenRule"]
