"""Layout arithmetic shared by modules and functions that move or merge tensor dimensions."""

from __future__ import annotations

import math

from torch import fx

from ..layout import Layout


def normalise_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def flatten_layout(
    ctx, node: fx.Node, layout: Layout, in_shape: tuple[int, ...], start: int, end: int
) -> Layout | None:
    """Layout after flattening dims ``start..end`` (inclusive) of a tensor of ``in_shape``."""
    ndim = len(in_shape)
    start, end = normalise_dim(start, ndim), normalise_dim(end, ndim)
    if end <= start:
        return layout
    if layout.dim < start:
        return layout
    if layout.dim > end:
        return layout.with_dim(layout.dim - (end - start))
    outer = math.prod(in_shape[start : layout.dim])
    if outer != 1:
        return ctx.opaque(node, "interleaves the channels with another dimension")
    inner = math.prod(in_shape[layout.dim + 1 : end + 1])
    return layout.expanded(inner).with_dim(start)


def reshape_layout(
    ctx, node: fx.Node, layout: Layout, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> Layout | None:
    """Layout after a ``view``/``reshape``: channels kept whole, or flattened with trailing dims."""
    d = layout.dim
    if tuple(in_shape[: d + 1]) == tuple(out_shape[: d + 1]):
        return layout  # only dimensions after the channels change
    tail = len(in_shape) - d  # dims from the channel dim to the end
    if len(out_shape) >= tail and tuple(in_shape[d:]) == tuple(out_shape[len(out_shape) - tail :]):
        return layout.with_dim(len(out_shape) - tail)  # only dimensions before the channels change
    if tuple(in_shape[:d]) == tuple(out_shape[:d]) and len(out_shape) > d:
        # channels flattened with the following dims d..e into out dim d
        for e in range(d, len(in_shape)):
            if math.prod(in_shape[d : e + 1]) == out_shape[d] and tuple(in_shape[e + 1 :]) == tuple(
                out_shape[d + 1 :]
            ):
                return layout.expanded(math.prod(in_shape[d + 1 : e + 1]))
    return ctx.opaque(node, "reshapes the channel dimension in a way net2grow cannot follow")
