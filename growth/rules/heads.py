"""Attention heads written out: q/k/v projections, a view into heads, scaled dot-product attention.

nanoGPT, Hugging Face and ``benchmarks/gpt.py`` write attention as ``q = self.q(x)`` (or one fused
``qkv`` projection split by ``.split``/``.chunk``), ``q.view(b, t, heads, head_dim)`` (or
``.unflatten(-1, (heads, -1))``), ``.transpose(1, 2)``, ``F.scaled_dot_product_attention(q, k,
v)``, ``.transpose(1, 2)``, then ``.flatten(-2)`` / ``.reshape(b, t, -1)`` into an output
projection. The analysis follows the units through these ops with a *head layout*
(:attr:`Layout.inner`: channels split into heads on ``dim`` of ``inner``-dimension positions)
and records on the space how many heads its units form. Scaled dot-product attention joins the
spaces of q, k and v (their heads and positions within a head must correspond), and growth of
that space is planned by :mod:`growth.heads`: by whole heads, or by a wider head.

timm's form, one ``reshape(B, N, 3, H, D)`` of the fused projection into blocks and heads at
once, then ``permute`` and ``unbind(0)`` (or ``qkv[i]``), is followed by
:mod:`growth.rules.fused_heads` into the same per-block head layouts as ``.split``; its merge
back ``x.transpose(1, 2).reshape(B, N, C)`` with ``C`` a number is rewritten like any channel
count, with ``C`` read from a shape it is refused (:func:`check_head_sizes`).

Every other op reading a head layout is refused by the analysis (``analysis.HEADS_REASON``), so
nothing the rules here do not know can see heads grow. ``nn.Identity`` (timm's default
``q_norm``/``k_norm``) passes heads on; any other layer reading them is refused.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

from ..errors import UnsupportedLayerError
from ..layout import Layout, Segment
from ._infra import FunctionRule
from .fused_heads import (
    StackedHeads,
    is_stacked,
    permute_stacked,
    split_into_stacked_heads,
    stacked_refusal,
)
from .shape_ops import normalise_dim


def _describe(node: fx.Node) -> str:
    from ..analysis import describe

    return describe(node)


def block_size_sources(ctx: Any, value: Any, reason: str) -> None:
    """Block the spaces of every tensor whose size computes ``value`` (a size given as a graph
    node, e.g. ``C // n_head`` from ``x.size()``): their growth would change that size."""
    if not isinstance(value, fx.Node):
        return
    todo, seen = [value], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        layout = ctx.layout(node)
        if layout is not None:
            ctx.spaces.block_layout(layout, reason, UnsupportedLayerError)
            continue
        todo.extend(node.all_input_nodes)


def _sizes(node: fx.Node, first: int) -> tuple[list[Any], bool]:
    """The size arguments of a ``view``/``reshape`` (unpacked or one list) and whether packed."""
    sizes = list(node.args[first:])
    packed = len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
    return (list(sizes[0]) if packed else sizes), packed


def _size_at(node: fx.Node, sizes: list[Any], packed: bool, first: int, i: int) -> tuple:
    """(value, position in the node's args) of size ``i``."""
    return sizes[i], ((first, i) if packed else (first + i, None))


def check_head_sizes(
    ctx: Any, node: fx.Node, layout: Layout, items: list[tuple[Any, tuple, str]]
) -> None:
    """Record the literal head count / head width of a split or merge, or refuse sizes computed
    at run time (their growth cannot be followed)."""
    space = layout.segments[0].space
    for value, where, kind in items:
        if isinstance(value, fx.Node) and kind == "merged":
            reason = (
                f"{_describe(node)} merges attention heads back into channels with a size "
                f"computed in forward ({value.name}, e.g. C read from x.shape); net2grow cannot "
                f"follow it when heads or widths grow. Write -1 or the number there "
                f"(x.reshape(B, N, -1)), or use x.flatten(2)"
            )
        elif isinstance(value, fx.Node):
            reason = (
                f"{_describe(node)} splits channels into attention heads with a size computed "
                f"in forward ({value.name}); net2grow cannot follow it when widths grow. Write "
                f"the number of heads as a number and -1 for the head width (x.view(b, t, "
                f"n_head, -1), x.unflatten(-1, (n_head, -1)), back with x.flatten(-2))"
            )
        if isinstance(value, fx.Node):
            ctx.spaces.block_layout(layout, reason, UnsupportedLayerError)
            block_size_sources(ctx, value, reason)
        elif isinstance(value, int) and value != -1 and kind != "merged":
            ctx.head_literals.append((node, where, space, kind))


def split_into_heads(
    ctx: Any,
    node: fx.Node,
    layout: Layout,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    sizes: list[tuple[Any, tuple]] | None,
) -> Layout | None:
    """The head layout when ``out_shape`` splits ``layout``'s channel dim in two, else None.

    ``sizes``: the (value, position) of the two size arguments (heads, head width), if any.
    """
    d = layout.dim
    if layout.inner is not None or len(out_shape) != len(in_shape) + 1:
        return None
    if tuple(in_shape[:d]) != tuple(out_shape[:d]) or tuple(in_shape[d + 1 :]) != tuple(
        out_shape[d + 2 :]
    ):
        return None
    heads, head_dim = out_shape[d], out_shape[d + 1]
    if heads * head_dim != in_shape[d]:
        return None
    if len(layout.segments) != 1 or layout.segments[0].expand != 1:
        return ctx.opaque(node, "splits channels made of several parts into heads")
    seg = layout.segments[0]
    info = ctx.spaces.info(seg.space)
    if info.groups != seg.parts:
        return ctx.opaque(node, "splits channels of a grouped layer into heads")
    ctx.spaces.require_heads(seg.space, heads)
    out = Layout(d, layout.segments, d + 1)
    if sizes is not None:
        (h, h_at), (w, w_at) = sizes
        check_head_sizes(ctx, node, out, [(h, h_at, "heads"), (w, w_at, "head_dim")])
    return out


def merge_heads(
    ctx: Any,
    node: fx.Node,
    layout: Layout,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    size: tuple[Any, tuple] | None,
) -> Layout | None:
    """Plain channels again when ``out_shape`` merges the heads dim with the dim after it."""
    h, i = layout.dim, layout.inner
    ok = i == h + 1 and len(out_shape) == len(in_shape) - 1
    ok = ok and tuple(in_shape[:h]) == tuple(out_shape[:h])
    ok = ok and tuple(in_shape[i + 1 :]) == tuple(out_shape[h + 1 :])
    if not ok or out_shape[h] != in_shape[h] * in_shape[i]:
        return ctx.opaque(
            node,
            "reshapes attention heads other than back into channels (heads, then positions "
            "within a head, merged into one dimension)",
        )
    out = Layout(h, layout.segments)
    if size is not None:
        value, where = size
        if isinstance(value, int) and value not in (-1, out.size):
            return ctx.opaque(node, "merges heads into a channel count it hard-codes")
        if isinstance(value, int) and value != -1:
            ctx.literals.append((node, where, out))  # rewritten like any channel count
        check_head_sizes(ctx, node, out, [(value, where, "merged")])
    return out


def head_shape_read(ctx: Any, value: Any) -> tuple[Layout, int] | None:
    """``(layout, dim)`` when ``value`` is ``t.shape[dim]`` of a tensor ``t`` split into
    heads (Hugging Face reads sizes so), else None."""
    if not (isinstance(value, fx.Node) and value.op == "call_function"):
        return None
    if value.target is not operator.getitem or not isinstance(value.args[1], int):
        return None
    shape = value.args[0]
    if not (isinstance(shape, fx.Node) and shape.op == "call_function"):
        return None
    if shape.target is not getattr or shape.args[1:] != ("shape",):
        return None
    src = shape.args[0]
    layout, src_shape = ctx.layout(src), ctx.shape(src)
    if layout is None or layout.inner is None or src_shape is None:
        return None
    return layout, normalise_dim(value.args[1], len(src_shape))


def _role(layout: Layout, dim: int) -> str | None:
    return "heads" if dim == layout.dim else "head_dim" if dim == layout.inner else None


def _same_heads_reshape(
    ctx: Any, node: fx.Node, layout: Layout, sizes: list[Any] | None, packed: bool, first: int
) -> Layout:
    """A reshape of a head layout to its own shape (``x.reshape(b, -1, t, d)`` with sizes
    read from head tensors): the heads stay; a size of the heads or of their width must be
    -1, a number (rewritten on growth) or read from a tensor of the same heads."""
    space = ctx.spaces.find(layout.segments[0].space)
    for dim in (layout.dim, layout.inner):
        if sizes is None:
            return ctx.opaque(node, "reshapes attention heads with sizes net2grow cannot read")
        value, where = _size_at(node, sizes, packed, first, dim)
        read = head_shape_read(ctx, value)
        if read is not None:
            ok = _role(read[0], read[1]) == _role(layout, dim)
            if not ok or ctx.spaces.find(read[0].segments[0].space) != space:
                return ctx.opaque(node, "reshapes attention heads to sizes of other heads")
        elif isinstance(value, int):
            check_head_sizes(ctx, node, layout, [(value, where, _role(layout, dim) or "heads")])
        else:
            return ctx.opaque(node, "reshapes attention heads to sizes computed in forward")
    return Layout(layout.dim, layout.segments, layout.inner)


def reshape_heads(ctx: Any, node: fx.Node, first: int = 1) -> Layout | bool | None:
    """``view``/``reshape`` splitting channels into heads or merging heads back; False when
    neither (the plain rule decides)."""
    src = node.args[0]
    layout, in_shape, out_shape = ctx.layout(src), ctx.shape(src), ctx.shape(node)
    if layout is None or in_shape is None or out_shape is None:
        return False
    sizes, packed = _sizes(node, first)
    if len(sizes) != len(out_shape):
        sizes = None
    if is_stacked(layout):
        return stacked_refusal(ctx, node)
    if layout.inner is not None and tuple(in_shape) == tuple(out_shape):
        return _same_heads_reshape(ctx, node, layout, sizes, packed, first)
    if layout.inner is not None:
        size = None
        if sizes and layout.dim < len(sizes):
            size = _size_at(node, sizes, packed, first, layout.dim)
        return merge_heads(ctx, node, layout, in_shape, out_shape, size)
    d = layout.dim
    pair = None
    if sizes and d + 1 < len(sizes):
        pair = [_size_at(node, sizes, packed, first, j) for j in (d, d + 1)]
    result = split_into_heads(ctx, node, layout, in_shape, out_shape, pair)
    if result is None:
        triple = None
        if sizes and d + 2 < len(sizes):
            triple = [_size_at(node, sizes, packed, first, j) for j in (d, d + 1, d + 2)]
        result = split_into_stacked_heads(ctx, node, layout, in_shape, out_shape, triple)
    return False if result is None else result


def permute_heads(layout: Layout, where: Any) -> Layout:
    """A head layout after a permutation: ``where(old_dim) -> new_dim``."""
    if isinstance(layout, StackedHeads):
        return permute_stacked(layout, where)
    return Layout(where(layout.dim), layout.segments, where(layout.inner))


class HeadShape(FunctionRule):
    """``getattr(x, "shape")`` (and other attributes): a Python value, no channels. On a tensor
    split into heads, a read of the head count or head width (``x.shape[1]``, ``x.shape[-1]``)
    changes when heads grow: allowed only as the same size of a reshape of those heads
    (:func:`_same_heads_reshape`); sequence and batch sizes are free."""

    heads_aware = True

    def infer(self, ctx, node):  # type: ignore[override]
        src = node.args[0]
        layout = ctx.layout(src) if isinstance(src, fx.Node) else None
        if layout is None or layout.inner is None:
            return None
        shape = ctx.shape(src)
        if node.args[1:] != ("shape",) or shape is None:
            if node.args[1:] in (("dtype",), ("device",)):
                return None
            return ctx.opaque(node, "reads an attribute of attention heads net2grow cannot follow")
        for user in node.users:
            index = user.args[1] if user.target is operator.getitem else None
            if isinstance(index, slice):  # x.shape[:-2]: free when no head size is among them
                if all(_role(layout, d) is None for d in range(len(shape))[index]):
                    continue
            read = head_shape_read(ctx, user)
            if read is None:
                return ctx.opaque(node, "reads the shape of attention heads other than by index")
            dim = read[1]
            if _role(layout, dim) is None:
                continue  # batch or sequence: heads do not change it
            for reader in user.users:
                sizes = _reader_sizes(reader)
                if sizes is None or sizes.count(user) != 1 or sizes.index(user) != dim:
                    return ctx.opaque(
                        node,
                        f"uses the {_role(layout, dim)} of attention heads read from their shape "
                        f"({user.name}) other than to reshape heads to the same shape",
                    )
        return None


def _reader_sizes(node: fx.Node) -> list[Any] | None:
    """The size arguments of a ``view``/``reshape`` call, else None."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes, _ = _sizes(node, 1)
        return sizes
    return None


class Unflatten(FunctionRule):
    """``x.unflatten(dim, (heads, head_dim))`` / ``torch.unflatten``: channels into heads."""

    heads_aware = True

    def infer(self, ctx, node):  # type: ignore[override]
        from .shape_ops import reshape_layout

        src = node.args[0]
        layout, in_shape, out_shape = ctx.layout(src), ctx.shape(src), ctx.shape(node)
        if layout is None or in_shape is None or out_shape is None:
            return ctx.fixed(node, f"output of {node.name}")
        dim = normalise_dim(ctx.arg(node, 1, "dim"), len(in_shape))
        sizes = ctx.arg(node, 2, "sizes")
        if layout.inner is not None:
            return ctx.opaque(node, "splits a dimension of a tensor already split into heads")
        if dim != layout.dim:
            return reshape_layout(ctx, node, layout, in_shape, out_shape)
        if not isinstance(sizes, (list, tuple)) or len(sizes) != 2:
            return ctx.opaque(node, "splits the channels into other than two dimensions")
        at = 2 if len(node.args) > 2 else None
        pair = [(sizes[j], (at, j)) for j in (0, 1)] if at is not None else None
        result = split_into_heads(ctx, node, layout, in_shape, out_shape, pair)
        if result is None:
            return ctx.opaque(node, "reshapes the channels in a way net2grow cannot follow")
        return result


class Split(FunctionRule):
    """``x.split(size, dim)``, ``x.chunk(n, dim)``: along the channels, into equal blocks of
    one layer's units (a fused q/k/v projection); along another dim, every item keeps them."""

    heads_aware = False

    def infer(self, ctx, node):  # type: ignore[override]
        src = node.args[0]
        layout, shape = ctx.layout(src), ctx.shape(src)
        items = sorted(
            u.args[1] for u in node.users if u.op == "call_function" and isinstance(u.args[1], int)
        )
        if layout is None or shape is None:
            return ctx.fixed(node, f"output of {node.name}")
        name = node.target if isinstance(node.target, str) else node.target.__name__
        dim = normalise_dim(ctx.arg(node, 2, "dim", 0), len(shape))
        if dim != layout.dim:
            ctx.item_layouts[node] = {i: layout for i in items}
            return layout
        arg = ctx.arg(node, 1, "chunks" if name == "chunk" else "split_size_or_sections")
        if arg is None:
            arg = ctx.arg(node, 1, "split_size")
        width = shape[dim]
        if name == "chunk":
            parts = arg if isinstance(arg, int) and width % arg == 0 else None
            where: list[tuple] = []
        elif isinstance(arg, int) and arg > 0 and width % arg == 0:
            parts, where = width // arg, [(1, None)]
        elif isinstance(arg, (list, tuple)) and len(set(arg)) == 1 and isinstance(arg[0], int):
            parts, where = len(arg), [(1, j) for j in range(len(arg))]
        else:
            parts = None
        ok = parts is not None and parts > 1 and len(layout.segments) == 1
        seg = layout.segments[0]
        if not ok or seg.expand != 1 or seg.parts != 1:
            return ctx.opaque(node, "splits the channels into unequal parts or split ones again")
        ctx.spaces.require_groups(seg.space, parts)
        unit = seg.units // parts
        outs = {i: Layout(dim, (Segment(seg.space, unit, 1, parts, i),)) for i in range(parts)}
        for at in where:
            ctx.literals.append((node, at, outs[0]))  # the block width, rewritten on growth
        ctx.item_layouts[node] = outs
        return outs[0]


class ScaledDotProductAttention(FunctionRule):
    """``F.scaled_dot_product_attention(q, k, v, ...)`` over head layouts (see module docs).

    q, k and v must come split into the same heads (heads on dim -3, positions within a head
    on dim -1); their spaces are joined. Refused: ``enable_gqa``, an ``attn_mask`` with one
    mask per head, a ``scale`` computed in forward, value heads of another width."""

    heads_aware = True

    def infer(self, ctx, node):  # type: ignore[override]
        q, k, v = (ctx.arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        lays = [ctx.layout(t) for t in (q, k, v)]
        shapes = [ctx.shape(t) for t in (q, k, v)]
        out_shape = ctx.shape(node)
        mask = ctx.arg(node, 3, "attn_mask")
        dropout = ctx.arg(node, 4, "dropout_p", 0.0)
        scale = ctx.arg(node, 6, "scale")
        gqa = ctx.arg(node, 7, "enable_gqa", False)
        why = None
        if out_shape is None or any(s is None for s in shapes):
            why = "has inputs of unknown shape"
        elif any(lay is None or lay.inner is None for lay in lays):
            why = "reads q, k or v that are not split into heads by a view or unflatten"
        elif any(
            (lay.dim, lay.inner) != (len(s) - 3, len(s) - 1) or len(lay.segments) != 1
            for lay, s in zip(lays, shapes)
        ):
            why = "reads heads that are not on dim -3 with their positions on dim -1"
        elif gqa is not False:
            why = "uses enable_gqa (grouped heads)"
        elif isinstance(scale, fx.Node):
            why = "takes a scale computed in forward"
        elif isinstance(mask, fx.Node) and not _absent_input(mask):
            m = ctx.shape(mask)
            if m is None or (len(m) >= 3 and m[-3] != 1):
                why = "takes an attn_mask with one mask per head"
        segs = [lay.segments[0] for lay in lays] if why is None else []
        if segs and len({(s.units, s.expand) for s in segs}) != 1:
            why = "reads value heads of another width than the query's"
        if segs and why is None:
            plain = all(s.parts == 1 for s in segs)
            fused = len({ctx.spaces.find(s.space) for s in segs}) == 1 and len(
                {s.part for s in segs}
            ) == 3
            if plain:
                for s in segs[1:]:
                    ctx.spaces.union(segs[0].space, s.space)
            elif not fused:
                why = "reads q, k and v from parts of different fused layers"
        if why is not None:
            reason = (
                f"{_describe(node)} {why}; net2grow grows attention heads of q, k, v each "
                f"split by a view into (heads, head width), without a per-head mask. Grow "
                f"layers that do not reach it"
            )
            for lay in lays:
                ctx.spaces.block_layout(lay, reason, UnsupportedLayerError)
            return ctx.fixed(node, f"output of {node.name}")
        info = ctx.spaces.info(segs[0].space)
        kind = "default" if scale is None else "fixed"
        if info.attention_scale and info.attention_scale != kind:
            kind = "mixed"
        info.attention_scale = kind
        if isinstance(dropout, fx.Node) or (dropout not in (0, 0.0, None)):
            info.copy_refused.append(
                f"{_describe(node)} drops attention weights at random (dropout_p="
                f"{getattr(dropout, 'name', dropout)}), independently for each head, so a copy "
                f"of a head would not compute what its source does in train mode"
            )
        out = lays[2]
        return Layout(len(out_shape) - 3, out.segments, len(out_shape) - 1)


def _absent_input(node: fx.Node) -> bool:
    """Whether ``node`` is a network input that was None when traced (timm's ``attn_mask=None``
    forwarded from the model's ``forward``). A mask passed later is either shared by all heads
    (exact) or one per head of the old head count, which fails loudly once heads are added."""
    return node.op == "placeholder" and "shape" in node.meta and node.meta["shape"] is None
