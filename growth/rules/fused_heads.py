"""A fused q/k/v projection split into its blocks *and* heads by one reshape (timm's form).

timm's ``Attention`` (and many ViTs after it) write::

    qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)          # or qkv[0], qkv[1], qkv[2]

The reshape splits the channels of the fused projection into ``parts`` blocks (q, k, v) and
each block into ``H`` heads of ``D`` positions at once. The analysis gives that tensor a
:class:`StackedHeads` layout: a head layout (heads on ``dim``, positions on ``inner``) of one
block's units, whose blocks lie along a third tensor dimension, ``stack``. Permutations move
the three dims; ``unbind`` along ``stack`` (or an integer index there) gives block ``i`` as an
ordinary head layout of segment ``parts=P, part=i`` — what ``x.split(...)`` followed by a view
gives (:class:`~growth.rules.heads.Split`) — so scaled dot-product attention joins them as one
fused space. The block count stays a literal; head count and head width literals are rewritten
on growth (``ctx.head_literals``).

Every other op reading a stacked layout is refused (its segments carry ``part=-1``, which no
other rule accepts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

from ..layout import Layout, Segment
from ._infra import FunctionRule
from .indexing import Index
from .shape_ops import normalise_dim

#: ``Segment.part`` of a stacked layout: all blocks at once, along :attr:`StackedHeads.stack`
ALL_PARTS = -1


@dataclass(frozen=True)
class StackedHeads(Layout):
    """Blocks of a fused projection along tensor dim ``stack``, each split into heads."""

    stack: int = 0

    def with_dim(self, dim: int) -> Layout:
        """The same layout shifted by ``dim - self.dim`` dims (a rank-changing pass-through)."""
        shift = dim - self.dim
        inner = None if self.inner is None else self.inner + shift
        return StackedHeads(dim, self.segments, inner, self.stack + shift)

    @property
    def parts(self) -> int:
        return self.segments[0].parts


def is_stacked(layout: Layout | None) -> bool:
    """Whether ``layout`` is a :class:`StackedHeads` layout (blocks not yet separated)."""
    return isinstance(layout, StackedHeads)


def stacked_refusal(ctx: Any, node: fx.Node) -> Layout | None:
    """Refuse ``node`` reading the blocks of a fused projection before they are separated."""
    return ctx.opaque(
        node,
        "reads the q, k and v blocks of a fused projection split into heads before they are "
        "separated; net2grow follows them through permute/transpose and unbind(dim) or "
        "qkv[i] along the blocks' dimension",
    )


def split_into_stacked_heads(
    ctx: Any,
    node: fx.Node,
    layout: Layout,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    sizes: list[tuple[Any, tuple]] | None,
) -> Layout | None:
    """The stacked layout when ``out_shape`` splits ``layout``'s channel dim into three dims
    (blocks, heads, head width), else None (not this form).

    ``sizes``: the (value, position) of the three size arguments, if known.
    """
    from .heads import check_head_sizes

    d = layout.dim
    if layout.inner is not None or len(out_shape) != len(in_shape) + 2:
        return None
    same = tuple(in_shape[:d]) == tuple(out_shape[:d])
    if not same or tuple(in_shape[d + 1 :]) != tuple(out_shape[d + 3 :]):
        return None
    parts, heads, head_dim = out_shape[d : d + 3]
    if parts * heads * head_dim != in_shape[d] or parts < 2:
        return None
    if len(layout.segments) != 1:
        return ctx.opaque(node, "splits channels made of several parts into heads")
    seg = layout.segments[0]
    if seg.expand != 1 or seg.parts != 1 or ctx.spaces.info(seg.space).groups != 1:
        return ctx.opaque(node, "splits channels of a grouped or split layer into heads")
    if sizes is not None and sizes[0][0] not in (parts, -1):
        return ctx.opaque(node, f"splits the channels into {sizes[0][0]!r} blocks, not a number")
    ctx.spaces.require_groups(seg.space, parts)
    ctx.spaces.require_heads(seg.space, heads)
    block = Segment(seg.space, seg.units // parts, 1, parts, ALL_PARTS)
    out = StackedHeads(d + 1, (block,), d + 2, d)
    if sizes is not None:
        (h, h_at), (w, w_at) = sizes[1], sizes[2]
        check_head_sizes(ctx, node, out, [(h, h_at, "heads"), (w, w_at, "head_dim")])
    return out


def permute_stacked(layout: StackedHeads, where: Any) -> StackedHeads:
    """A stacked layout after a permutation: ``where(old_dim) -> new_dim``."""
    inner = None if layout.inner is None else where(layout.inner)
    return StackedHeads(where(layout.dim), layout.segments, inner, where(layout.stack))


def block_layout(layout: StackedHeads, part: int) -> Layout:
    """Block ``part`` of a stacked layout with its ``stack`` dim removed: a head layout."""

    def shift(d: int) -> int:
        return d - 1 if d > layout.stack else d

    seg = layout.segments[0]
    block = Segment(seg.space, seg.units, seg.expand, seg.parts, part)
    inner = None if layout.inner is None else shift(layout.inner)
    return Layout(shift(layout.dim), (block,), inner)


class Unbind(FunctionRule):
    """``x.unbind(dim)`` / ``torch.unbind``: along the blocks of a stacked layout, block ``i``
    for item ``i``; along another dim of plain channels, every item keeps them. Anything else
    (unbinding the channels or a dim of heads) is refused."""

    heads_aware = True

    def infer(self, ctx, node):  # type: ignore[override]
        src = node.args[0]
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is None or shape is None:
            return ctx.fixed(node, f"output of {node.name}")
        dim = normalise_dim(ctx.arg(node, 1, "dim", 0), len(shape))
        if is_stacked(layout) and dim == layout.stack:  # type: ignore[attr-defined]
            outs = {i: block_layout(layout, i) for i in range(shape[dim])}
        elif is_stacked(layout):
            return stacked_refusal(ctx, node)
        elif layout.inner is not None or dim == layout.dim:
            return ctx.opaque(node, "unbinds the channels or the dimensions of attention heads")
        else:
            plain = layout.with_dim(layout.dim - (dim < layout.dim))
            outs = {i: plain for i in range(shape[dim])}
        ctx.item_layouts[node] = outs
        return outs[0]


def _stack_index(layout: StackedHeads, index: Any) -> int | None:
    """The block picked by ``x[index]`` when it is an int on the stack dim after only full
    slices (``x[1]``, ``x[:, 2]``), else None."""
    items = list(index) if isinstance(index, tuple) else [index]
    if len(items) != layout.stack + 1 or isinstance(items[-1], bool):
        return None
    if not isinstance(items[-1], int) or any(i != slice(None) for i in items[:-1]):
        return None
    return items[-1]


class HeadsIndex(FunctionRule):
    """``operator.getitem``: :class:`~growth.rules.indexing.Index` for tuples and plain
    channels; on a stacked layout, an int index along the blocks gives that block (timm's
    ``q, k = qkv[0], qkv[1]``); any other index of attention heads is refused."""

    heads_aware = True
    _plain = Index()

    def infer(self, ctx, node):  # type: ignore[override]
        src, index = node.args[0], node.args[1]
        if isinstance(src, fx.Node) and src in ctx.item_layouts:
            return self._plain.infer(ctx, node)
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is None or layout.inner is None:
            return self._plain.infer(ctx, node)
        if not is_stacked(layout) or shape is None:
            from ..analysis import HEADS_REASON

            return ctx.opaque(node, HEADS_REASON)
        part = _stack_index(layout, index)
        if part is None or not -shape[layout.stack] <= part < shape[layout.stack]:
            return stacked_refusal(ctx, node)
        return block_layout(layout, part % shape[layout.stack])
