"""``nn.MultiheadAttention``: self-attention whose embedding width grows by whole heads.

Its input (query = key = value) and its output (``out_proj``) share ``embed_dim``, so the
analysis joins them: they grow together, with the residual stream they usually belong to. The
packed ``in_proj_weight`` (q, k and v rows, ``3 * embed_dim`` of them) reads the input's units
(columns, split like any consumer's) and makes ``num_heads`` heads of ``head_dim`` units each;
``embed_dim = num_heads * head_dim`` ties their count to the input's width. Growing to a width
``E'`` (a multiple of ``head_dim``) therefore adds heads: each new head copies every q, k and v
row of an existing head, the copies of a head compute the same attention output, and the output
projection's columns of a head are split among its copies (fixed, unequal shares, so that the
copies receive different gradients and learn apart). Exact, in eval and train mode (dropout on
the attention weights is applied per head alike to copies that see the same weights only in
distribution; the probe check runs in eval mode).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import GrowthError, UnsupportedLayerError
from ..layout import Layout, Segment
from ..mapping import AxisMap
from ..transform import AxisStep
from ._infra import ModuleSpec, ModuleUpdate, TensorGrowth
from .linear import LastDimFollower


def head_shares(copies: torch.Tensor) -> torch.Tensor:
    """Shares of the copies of each head (``copies[h]`` of head ``h``, original first): unequal,
    fixed, summing to one per head: copy ``j`` of ``c`` gets ``(c + j) / sum``."""
    out = []
    for c in copies.tolist():
        w = torch.arange(c, 2 * c, dtype=torch.float64)
        out.append(w / w.sum())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def head_mapping(heads: int, new_heads: int, head_dim: int, device: torch.device) -> AxisMap:
    """The map of one ``heads * head_dim`` block growing to ``new_heads`` heads: new head ``j``
    copies head ``j % heads`` (every head copied once before any twice). ``share`` is each
    position's share of its head's outgoing weights."""
    src_head = torch.arange(new_heads) % heads
    copies = torch.bincount(src_head, minlength=heads)
    per_head = head_shares(copies)  # indexed by (head, copy number)
    offsets = torch.cumsum(copies, 0) - copies
    rank = torch.arange(new_heads) // heads  # copy number of each new head
    share = per_head[offsets[src_head] + rank]
    within = torch.arange(head_dim)
    source = (src_head[:, None] * head_dim + within).reshape(-1)
    original = (torch.arange(new_heads) < heads).repeat_interleave(head_dim)
    return AxisMap(
        source.to(device),
        original.to(device),
        share.repeat_interleave(head_dim).to(device),
        heads * head_dim,
    )


def stacked_map(amap: AxisMap, blocks: int, old_block: int) -> AxisMap:
    """``amap`` repeated for ``blocks`` consecutive blocks (q, k and v rows)."""
    return AxisMap(
        torch.cat([amap.source + b * old_block for b in range(blocks)]),
        amap.original.repeat(blocks),
        amap.share.repeat(blocks),
        amap.prefix,
    )


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class MultiheadAttentionRule(LastDimFollower):
    """Self-attention (``query is key is value``) of ``nn.MultiheadAttention``; see the module
    docstring. Its width is ``embed_dim``; refused: cross-attention, ``kdim``/``vdim`` other
    than ``embed_dim``, ``add_bias_kv``, ``add_zero_attn``, per-head attention weights
    (``need_weights=True, average_attn_weights=False``) used downstream."""

    is_layer = True

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        query, key, value = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        layout, shape = ctx.layout(query), ctx.shape(query)
        space = ctx.module_space(name, module.embed_dim)
        out = Layout(len(shape) - 1 if shape else 2, (Segment(space, module.embed_dim),))
        why = None
        if key is not query or value is not query:
            why = "is cross-attention (key or value is not the query)"
        elif not module._qkv_same_embed_dim:
            why = "has kdim/vdim other than embed_dim"
        elif module.bias_k is not None or module.add_zero_attn:
            why = "has add_bias_kv or add_zero_attn"
        elif layout is None or shape is None or layout.dim != len(shape) - 1:
            why = "reads a query whose channels are not its last dimension"
        need = _arg(node, 4, "need_weights", True)
        average = _arg(node, 7, "average_attn_weights", True)
        weights = ctx.item_shape(node, 1)
        if why is None and need is not False and average is not True and weights is not None:
            why = "returns per-head attention weights (average_attn_weights=False)"
        if why is not None:
            reason = (
                f"layer {name!r} (MultiheadAttention) {why}; net2grow grows self-attention "
                f"only. Grow layers that do not reach it"
            )
            ctx.spaces.block_layout(layout, reason, UnsupportedLayerError)
            ctx.spaces.block(space, reason, UnsupportedLayerError)
        else:
            ctx.join([layout, out], node)  # embed_dim is both the input's and output's width
        ctx.item_layouts[node] = {0: out, 1: None}
        return out

    def width(self, module):  # type: ignore[override]
        return module.embed_dim

    def follower_like(self, module: nn.Module) -> torch.Tensor:
        return module.in_proj_weight  # its output (item 0) has the units on the last dim

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if in_map is None and out_map is None:
            return None
        new = in_size if in_size is not None else out_size
        e, h, d = module.embed_dim, module.num_heads, module.head_dim
        if in_size is not None and out_size is not None and in_size != out_size:
            raise GrowthError("internal: MultiheadAttention input and output grow differently")
        if new % d:
            raise GrowthError(
                f"nn.MultiheadAttention grows by whole heads of {d} units (embed_dim = "
                f"num_heads * head_dim): width {new} is not a multiple of {d}. Exact widths "
                f"for this layer: {', '.join(str(e + d * k) for k in range(1, 4))}, ..."
            )
        device = module.in_proj_weight.device
        heads = head_mapping(h, new // d, d, device)
        heads = AxisMap(
            heads.source,
            heads.original,
            heads.share.to(module.in_proj_weight.dtype),
            heads.prefix,
        )
        rows = stacked_map(heads, 3, e)
        update = ModuleUpdate()
        w_steps = [AxisStep(0, rows, "out")]
        if in_map is not None:
            w_steps.append(AxisStep(1, in_map, "in"))
        update.tensors["in_proj_weight"] = TensorGrowth(w_steps)
        if module.in_proj_bias is not None:
            update.tensors["in_proj_bias"] = TensorGrowth([AxisStep(0, rows, "out")], "zeros")
        o_steps = [AxisStep(1, heads, "in")]
        if out_map is not None:
            o_steps.append(AxisStep(0, out_map, "out"))
            if module.out_proj.bias is not None:
                update.tensors["out_proj.bias"] = TensorGrowth(
                    [AxisStep(0, out_map, "out")], "zeros"
                )
        update.tensors["out_proj.weight"] = TensorGrowth(o_steps)
        update.attrs.update(
            {
                "embed_dim": new,
                "kdim": new,
                "vdim": new,
                "num_heads": new // d,
                "out_proj.in_features": new,
                "out_proj.out_features": new,
            }
        )
        return update


def _read_mha(module: nn.Module) -> dict:
    return {
        "embed_dim": module.embed_dim,
        "num_heads": module.num_heads,
        "dropout": module.dropout,
        "bias": module.in_proj_bias is not None,
        "add_bias_kv": module.bias_k is not None,
        "add_zero_attn": module.add_zero_attn,
        "kdim": module.kdim,
        "vdim": module.vdim,
        "batch_first": module.batch_first,
    }


MHA_ARGS = ("embed_dim", "num_heads", "dropout", "bias", "add_bias_kv", "add_zero_attn")
MHA_ARGS += ("kdim", "vdim", "batch_first")
#: How checkpoints rebuild an ``nn.MultiheadAttention`` (its arguments are not all attributes).
MHA_SPEC = ModuleSpec(MHA_ARGS, read=_read_mha)
