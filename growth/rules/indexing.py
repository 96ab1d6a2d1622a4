"""Indexing and broadcasting: ``x[:, 0]`` (a ViT's class token), ``tuple[0]``, ``x.expand(...)``."""

from __future__ import annotations

from typing import Any

from torch import fx

from ..layout import Layout
from ._infra import FunctionRule


def _index_layout(layout: Layout, ndim: int, index: Any) -> Layout | None:
    """The layout after ``x[index]`` (ints, slices, None, Ellipsis), or None when the index
    selects within the channels (then the units cannot follow)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in items):
        return None
    if any(isinstance(i, bool) for i in items) or items.count(Ellipsis) > 1:
        return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (ndim - used)
    items += [slice(None)] * (ndim - sum(1 for i in items if i is not None))
    in_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == layout.dim:
            if item != slice(None):
                return None  # picks channels: their units cannot follow growth
            return layout.with_dim(out_dim)
        in_dim += 1
        if not isinstance(item, int):
            out_dim += 1
    return None


class Index(FunctionRule):
    """``operator.getitem``: an item of a tuple-valued layer (attention's output), or basic
    indexing of a tensor along dimensions other than the channels."""

    def infer(self, ctx, node):  # type: ignore[override]
        src, index = node.args[0], node.args[1]
        if isinstance(src, fx.Node) and src in ctx.item_layouts:
            if ctx.shape(node) is None:
                return None
            if isinstance(index, int) and index in ctx.item_layouts[src]:
                layout = ctx.item_layouts[src][index]
                return layout if layout is not None else ctx.fixed(node, f"output of {node.name}")
            return ctx.opaque(node, "reads an item of a layer's output that has no layout")
        if ctx.shape(node) is None:
            return None
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is None or shape is None:
            return ctx.fixed(node, f"output of {node.name}")
        result = _index_layout(layout, len(shape), index)
        if result is None:
            return ctx.opaque(node, "indexes a tensor along its channels")
        out_shape = ctx.shape(node)
        if out_shape[result.dim] != shape[layout.dim]:
            return ctx.opaque(node, "indexes a tensor in a way net2grow cannot follow")
        return result


class Expand(FunctionRule):
    """``x.expand(*sizes)``: broadcasts size-1 dimensions; the channels keep their units when
    their size is given as -1 (or computed), not as a number."""

    def infer(self, ctx, node):  # type: ignore[override]
        src = node.args[0]
        layout, in_shape, out_shape = ctx.layout(src), ctx.shape(src), ctx.shape(node)
        if layout is None or in_shape is None or out_shape is None:
            return ctx.fixed(node, f"output of {node.name}")
        sizes = list(node.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        dim = layout.dim + len(out_shape) - len(in_shape)
        if out_shape[dim] != in_shape[layout.dim]:
            return ctx.opaque(node, "broadcasts along the channels")
        if len(sizes) == len(out_shape) and isinstance(sizes[dim], int) and sizes[dim] != -1:
            ctx.spaces.block_layout(
                layout,
                f"{node.name} = .expand(...) hard-codes the channel count {sizes[dim]}; "
                f"write -1 for that dimension",
            )
        return layout.with_dim(dim)
