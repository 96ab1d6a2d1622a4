"""Rules for ``call_function`` and ``call_method`` nodes: functional ops in ``forward``."""

from __future__ import annotations

from torch import fx

from ._infra import FunctionRule
from .fused_heads import is_stacked, stacked_refusal
from .heads import merge_heads, permute_heads, reshape_heads
from .residual_norm import normalise_channels
from .shape_ops import flatten_layout, normalise_dim, reshape_layout


class Unary(FunctionRule):
    """Elementwise on its first argument (activations, dropout, casts, scalar arithmetic).

    Another tensor operand that carries channels (``x.to(other)`` and ``x.type_as(other)`` read
    only its dtype and device) would have to grow with the first one, which a unary rule cannot
    follow: such a call is refused rather than left to break (ops with tensor operands are
    :class:`Elementwise`).
    """

    #: Methods whose other tensor operands supply only a dtype or a device.
    METADATA_ONLY = frozenset({"to", "type_as"})
    heads_aware = True  # elementwise: attention heads pass through alike

    def infer(self, ctx, node):  # type: ignore[override]
        first = node.args[0] if node.args else None
        if node.target not in self.METADATA_ONLY and any(
            a is not first and ctx.layout(a) is not None for a in node.all_input_nodes
        ):
            return ctx.opaque(node, "has a second tensor operand, which a unary rule ignores")
        return ctx.passthrough(node)


class Spatial(FunctionRule):
    """Functional pooling / interpolation: channels on dim 1 unchanged."""

    def infer(self, ctx, node):  # type: ignore[override]
        layout = ctx.layout(node.args[0])
        if layout is not None and layout.dim != 1:
            return ctx.opaque(node, "pools along the channel dimension")
        return ctx.passthrough(node)


class Elementwise(FunctionRule):
    """Binary (or n-ary) elementwise ops with broadcasting: ``x + y``, ``x * gate``, maximum.

    Operands that carry the output's channels are joined into one space group (residual adds);
    an operand broadcast along the channels (size 1 there) is left alone; anything else of full
    channel size (a constant, a parameter) blocks growth of the group.
    """

    def infer(self, ctx, node):  # type: ignore[override]
        out_shape = ctx.shape(node)
        if out_shape is None:
            return None
        operands = [a for a in node.all_input_nodes if ctx.shape(a) is not None]
        carrying, carried, out_dim = [], set(), None
        for a in operands:
            lay, shape = ctx.layout(a), ctx.shape(a)
            if lay is None:
                continue
            dim = lay.dim + len(out_shape) - len(shape)
            if shape[lay.dim] == 1 and out_shape[dim] != 1:
                ctx.spaces.block_layout(lay, f"{node.name}: broadcast along its channels")
                continue
            if out_dim is not None and dim != out_dim:
                return ctx.opaque(node, "joins tensors whose channels lie on different dims")
            out_dim = dim
            carrying.append(lay.with_dim(dim))
            carried.add(a)
        if not carrying:
            return ctx.fixed(node, f"output of {node.name}")
        for a in operands:  # constants, parameters, tensors broadcast: of full channel size?
            if a not in carried:
                shape = ctx.shape(a)
                k = out_dim - (len(out_shape) - len(shape))
                if 0 <= k < len(shape) and shape[k] != 1:
                    return ctx.opaque(node, f"uses {a.name} along the channels")
        return ctx.join(carrying, node)


class Cat(FunctionRule):
    """``torch.cat``: along channels the segments are concatenated; along another dim, joined."""

    def infer(self, ctx, node):  # type: ignore[override]
        tensors = ctx.arg(node, 0, "tensors")
        dim = ctx.arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            return ctx.opaque(node)
        layouts = [ctx.layout(t) for t in tensors]
        shape = ctx.shape(node)
        if any(lay is None for lay in layouts) or shape is None:
            return ctx.opaque(node)
        dim = normalise_dim(dim, len(shape))
        if any(lay.dim != layouts[0].dim for lay in layouts):
            return ctx.opaque(node, "concatenates tensors whose channels lie on different dims")
        if dim == layouts[0].dim:
            from ..layout import Layout

            return Layout(dim, tuple(seg for lay in layouts for seg in lay.segments))
        return ctx.join(layouts, node)


class Flatten(FunctionRule):
    """``torch.flatten(x, start, end)`` and ``x.flatten(start, end)`` (attention heads merged
    back into channels: ``a.transpose(1, 2).flatten(-2)``)."""

    heads_aware = True

    def infer(self, ctx, node):  # type: ignore[override]
        src = node.args[0]
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is None:
            return ctx.fixed(node, f"output of {node.name}")
        start = ctx.arg(node, 1, "start_dim", 0)
        end = ctx.arg(node, 2, "end_dim", -1)
        if is_stacked(layout):
            return stacked_refusal(ctx, node)
        if layout.inner is not None:
            out_shape = ctx.shape(node)
            s, e = normalise_dim(start, len(shape)), normalise_dim(end, len(shape))
            if (s, e) != (layout.dim, layout.inner) or out_shape is None:
                return ctx.opaque(node, "flattens attention heads with other dimensions")
            return merge_heads(ctx, node, layout, shape, out_shape, None)
        return flatten_layout(ctx, node, layout, shape, start, end)


class Reshape(FunctionRule):
    """``view``/``reshape``: followed through shapes; literal channel counts are refused.
    Channels split into attention heads (and merged back) are followed by
    :func:`~growth.rules.heads.reshape_heads`."""

    heads_aware = True

    def infer(self, ctx, node):  # type: ignore[override]
        heads = reshape_heads(ctx, node)
        if heads is not False:
            return heads
        src = node.args[0]
        layout, in_shape, out_shape = ctx.layout(src), ctx.shape(src), ctx.shape(node)
        if layout is None or out_shape is None:
            return ctx.fixed(node, f"output of {node.name}")
        result = reshape_layout(ctx, node, layout, in_shape, out_shape)
        if result is None:
            return result
        sizes = list(node.args[1:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
        if packed:
            sizes = list(sizes[0])
        if len(sizes) == len(out_shape) and not isinstance(sizes[result.dim], fx.Node):
            if sizes[result.dim] == result.size:
                # a channel count written as a number (torchvision's ViT: reshape(n, hidden, -1)):
                # widen rewrites it in the graph
                where = (1, result.dim) if packed else (1 + result.dim, None)
                ctx.literals.append((node, where, result))
            elif sizes[result.dim] != -1:
                ctx.spaces.block_layout(
                    result,
                    f"{node.name} = .{node.target}(...) hard-codes the channel count "
                    f"{sizes[result.dim]}; write x.flatten(1) or x.view(x.size(0), -1)",
                )
        return result


class Reduce(FunctionRule):
    """``mean``/``sum``/``amax`` over dims other than channels (global average pooling)."""

    def infer(self, ctx, node):  # type: ignore[override]
        src = node.args[0]
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is None:
            return ctx.fixed(node, f"output of {node.name}")
        dims = ctx.arg(node, 1, "dim", None)
        keepdim = ctx.arg(node, 2, "keepdim", False)
        if dims is None:
            return ctx.opaque(node, "reduces over all dimensions, channels included")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [normalise_dim(d, len(shape)) for d in dims]
        if layout.dim in dims:
            name = node.target if isinstance(node.target, str) else node.target.__name__
            if name == "mean" and keepdim is True:
                # a statistic over the channels (a traced RMSNorm or LayerNorm): exact under
                # uniform replication; its one value per position grows no further
                from ..analysis import describe

                normalise_channels(ctx, layout, describe(node))
                return ctx.fixed(node, f"a mean over the channels ({node.name})", layout.dim)
            return ctx.opaque(node, "reduces over the channels")
        if keepdim:
            return layout
        return layout.with_dim(layout.dim - sum(d < layout.dim for d in dims))


class Permute(FunctionRule):
    """``permute``/``transpose``/``movedim``: the channel dim moves with its tensor dim (both
    dims of attention heads do)."""

    heads_aware = True

    def infer(self, ctx, node):  # type: ignore[override]
        src = node.args[0]
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is None:
            return ctx.fixed(node, f"output of {node.name}")
        ndim = len(shape)
        name = node.target if isinstance(node.target, str) else node.target.__name__
        if name == "permute":
            perm = node.args[1:]
            if len(perm) == 1 and isinstance(perm[0], (list, tuple)):
                perm = perm[0]
            perm = [normalise_dim(p, ndim) for p in perm]
            where = perm.index
        else:
            a = normalise_dim(ctx.arg(node, 1, "dim0"), ndim)
            b = normalise_dim(ctx.arg(node, 2, "dim1"), ndim)
            if name == "movedim":
                order = [d for d in range(ndim) if d != a]
                order.insert(b, a)
                where = order.index
            else:
                swap = {a: b, b: a}

                def where(d: int) -> int:
                    return swap.get(d, d)

        if layout.inner is not None:
            return permute_heads(layout, where)
        return layout.with_dim(where(layout.dim))


class Squeeze(FunctionRule):
    """``squeeze``/``unsqueeze``: the channel dim shifts; squeezing it away is refused."""

    def infer(self, ctx, node):  # type: ignore[override]
        src = node.args[0]
        layout, in_shape, out_shape = ctx.layout(src), ctx.shape(src), ctx.shape(node)
        if layout is None:
            return ctx.fixed(node, f"output of {node.name}")
        return reshape_layout(ctx, node, layout, in_shape, out_shape)


class Softmax(FunctionRule):
    """Functional softmax: refused over the channels, pass-through otherwise."""

    def infer(self, ctx, node):  # type: ignore[override]
        layout, shape = ctx.layout(node.args[0]), ctx.shape(node.args[0])
        dim = ctx.arg(node, 1, "dim", None)
        if layout is None or not isinstance(dim, int):
            return ctx.opaque(node, "normalises over an unknown dimension")
        if normalise_dim(dim, len(shape)) == layout.dim:
            return ctx.refuse_channels(node, "normalises over the channels")
        return ctx.passthrough(node)


class NonTensor(FunctionRule):
    """Ops returning sizes and other Python values (``x.size(0)``, ``x.dim()``)."""

    def infer(self, ctx, node):  # type: ignore[override]
        return None
