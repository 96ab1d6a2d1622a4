"""torchvision's Swin attention (``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2``) as a
layer of the traced graph, whose embedding width grows by whole heads.

Its ``forward`` hands ``self.qkv.weight``, ``self.proj.weight`` and a relative position bias
built from a per-head table to the function ``shifted_window_attention``, which reads the
weights directly; traced through, ``qkv`` and ``proj`` would never be called. With this rule
the module is a leaf of the graph (rules imply leaves) and grows as a whole, like
``nn.MultiheadAttention`` (:mod:`growth.rules.attention`, whose helpers it uses): its input
``x`` (channels last, ``[B, H, W, C]``) and its output share the width ``C`` and are joined,
``C = num_heads * head_dim``, and growing ``C`` to a multiple of ``head_dim`` adds heads.
Each new head copies every q, k and v row of an existing head and that head's column of the
relative position bias table (for V2: its ``logit_scale`` and its output row of ``cpb_mlp``),
so it computes the same attention weights; ``proj``'s columns of a head are split among its
copies (fixed, unequal shares, :func:`~growth.rules.attention.head_shares`). The attention
scale ``head_dim ** -0.5`` (V2: cosine attention) and the shifted-window mask do not depend on
the number of heads, so the function is kept, in eval and in train mode. ``init="zero"`` gives
new heads random q, k, v rows and zero ``proj`` columns.

Refused (the space is blocked at analysis, nothing changes): an input whose channels are not
its last dimension, ``attention_dropout > 0`` (dropout on the attention weights is drawn
independently per head, so a copied head would not compute what its source does in train
mode), inconsistent projection sizes, and subclasses that override ``forward`` or
``get_relative_position_bias`` (register this rule for such a subclass only if it computes the
same function).

``PatchMerging`` / ``PatchMergingV2`` (between stages) are leaves too, with their own rule
(:class:`PatchMergingRule`): torchvision's ``_patch_merging_pad`` concatenates four strided
sub-grids of ``x`` along the channels, so the input's unit map applies to each of the four
blocks of the merged ``4C`` channels; a stage's residual stream can then grow through them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..errors import GrowthError, UnsupportedLayerError
from ..layout import Layout, Segment
from ..mapping import AxisMap
from ..transform import AxisStep
from ._infra import ModuleSpec, ModuleUpdate, TensorGrowth
from .attention import head_mapping, stacked_map
from .linear import LastDimFollower
from .residual_norm import normalise_channels

_TORCHVISION = "torchvision.models.swin_transformer"
_V1, _V2 = "ShiftedWindowAttention", "ShiftedWindowAttentionV2"
#: Methods whose torchvision versions this rule describes (a subclass must not override them).
_METHODS = ("forward", "get_relative_position_bias")


def torchvision_base(module: nn.Module, names: tuple[str, ...] = (_V1, _V2)) -> type | None:
    """The torchvision Swin class among ``names`` that ``module`` derives from (None: none)."""
    for cls in type(module).__mro__:
        if cls.__module__ == _TORCHVISION and cls.__name__ in names:
            return cls
    return None


def overridden(module: nn.Module, base: type, methods: tuple[str, ...]) -> list[str]:
    """The ``methods`` that ``module``'s class defines anew over torchvision's ``base``."""
    return [m for m in methods if getattr(type(module), m) is not getattr(base, m)]


def is_v2(module: nn.Module) -> bool:
    """True for ``ShiftedWindowAttentionV2`` (cosine attention, ``cpb_mlp`` bias)."""
    base = torchvision_base(module)
    return base is not None and base.__name__ == _V2


def embed_width(module: nn.Module) -> int:
    """``C``: the width of the module's input and output."""
    return int(module.qkv.in_features)


def _problem(module: nn.Module) -> str | None:
    """Why the rule cannot describe ``module`` (None: it can)."""
    base = torchvision_base(module)
    if base is None:
        return "is not a torchvision ShiftedWindowAttention"
    changed = overridden(module, base, _METHODS)
    if changed:
        return (
            f"is a subclass of {base.__name__} that overrides {', '.join(changed)}, so its "
            f"function may differ from torchvision's"
        )
    c, heads = embed_width(module), module.num_heads
    sizes = (module.qkv.out_features, module.proj.in_features, module.proj.out_features)
    if sizes != (3 * c, c, c) or c % heads:
        return (
            f"has projections qkv {c}->{module.qkv.out_features}, proj "
            f"{module.proj.in_features}->{module.proj.out_features} for {heads} heads, not "
            f"C->3C and C->C with C a multiple of num_heads"
        )
    if module.attention_dropout:
        return (
            f"drops attention weights at random (attention_dropout={module.attention_dropout}), "
            f"independently for each head, so a copied head would not compute what its source "
            f"does in train mode. Set its attention_dropout to 0.0 to grow it"
        )
    return None


def _x(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("x")


def _channels_last(layout: Layout | None, shape: tuple[int, ...] | None) -> bool:
    """True when ``layout`` holds plain channels (not heads) on the last dim of ``shape``."""
    return (
        layout is not None
        and shape is not None
        and layout.dim == len(shape) - 1
        and layout.inner is None
    )


class ShiftedWindowAttentionRule(LastDimFollower):
    """torchvision's ``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2``: window
    self-attention over channels-last ``[B, H, W, C]``; its width is ``C``, grown by whole heads
    (see the module docstring)."""

    is_layer = True

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        x = _x(node)
        layout, shape = ctx.layout(x), ctx.shape(x)
        width = embed_width(module)
        space = ctx.module_space(name, width)
        out_shape = ctx.shape(node)
        out = Layout(len(out_shape) - 1 if out_shape else 3, (Segment(space, width),))
        why = _problem(module)
        if why is None and not _channels_last(layout, shape):
            why = "reads an input whose channels are not its last dimension ([B, H, W, C])"
        if why is not None:
            reason = (
                f"layer {name!r} ({type(module).__name__}) {why}. Grow layers that are not "
                f"coupled to its input or output"
            )
            ctx.spaces.block_layout(layout, reason, UnsupportedLayerError)
            ctx.spaces.block(space, reason, UnsupportedLayerError)
        else:
            ctx.join([layout, out], node)  # C is both the input's and the output's width
        return out

    def width(self, module):  # type: ignore[override]
        return embed_width(module)

    def follower_like(self, module: nn.Module) -> torch.Tensor:
        return module.qkv.weight  # its output has the units on the last dim

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if in_map is None and out_map is None:
            return None
        if in_size is not None and out_size is not None and in_size != out_size:
            raise GrowthError("internal: ShiftedWindowAttention input and output grow differently")
        new = in_size if in_size is not None else out_size
        c, h = embed_width(module), module.num_heads
        d = c // h
        if new % d:
            raise GrowthError(
                f"{type(module).__name__} grows by whole heads of {d} units (C = num_heads * "
                f"head_dim): width {new} is not a multiple of {d}. Exact widths for this "
                f"layer: {', '.join(str(c + d * k) for k in range(1, 4))}, ..."
            )
        weight = module.qkv.weight
        units = _typed(head_mapping(h, new // d, d, weight.device), weight)
        per_head = _typed(head_mapping(h, new // d, 1, weight.device), weight)
        rows = stacked_map(units, 3, c)  # q, k and v rows
        update = ModuleUpdate()
        qkv_steps = [AxisStep(0, rows, "out")]
        if in_map is not None:
            qkv_steps.append(AxisStep(1, in_map, "in"))
        update.tensors["qkv.weight"] = TensorGrowth(qkv_steps)
        if module.qkv.bias is not None:
            update.tensors["qkv.bias"] = TensorGrowth([AxisStep(0, rows, "out")], "zeros")
        proj_steps = [AxisStep(1, units, "in")]
        if out_map is not None:
            proj_steps.append(AxisStep(0, out_map, "out"))
            if module.proj.bias is not None:
                update.tensors["proj.bias"] = TensorGrowth([AxisStep(0, out_map, "out")], "zeros")
        update.tensors["proj.weight"] = TensorGrowth(proj_steps)
        update.attrs.update(
            {
                "num_heads": new // d,
                "qkv.in_features": new,
                "qkv.out_features": 3 * new,
                "proj.in_features": new,
                "proj.out_features": new,
            }
        )
        if is_v2(module):
            # a new head's temperature is its source's; its bias MLP row a weight like q, k, v
            update.tensors["logit_scale"] = TensorGrowth([AxisStep(0, per_head, "channel")])
            update.tensors["cpb_mlp.2.weight"] = TensorGrowth([AxisStep(0, per_head, "out")])
            update.attrs["cpb_mlp.2.out_features"] = new // d
        else:
            update.tensors["relative_position_bias_table"] = TensorGrowth(
                [AxisStep(1, per_head, "out")]
            )
        return update


def _typed(amap: AxisMap, like: Any) -> AxisMap:
    """``amap`` with its shares in ``like``'s dtype."""
    return AxisMap(amap.source, amap.original, amap.share.to(like.dtype), amap.prefix)


def _read_swin_attention(module: nn.Module) -> dict[str, Any]:
    return {
        "dim": embed_width(module),
        "window_size": module.window_size,
        "shift_size": module.shift_size,
        "num_heads": module.num_heads,
        "qkv_bias": module.qkv.bias is not None,
        "proj_bias": module.proj.bias is not None,
        "attention_dropout": module.attention_dropout,
        "dropout": module.dropout,
    }


SWIN_ATTENTION_ARGS = ("dim", "window_size", "shift_size", "num_heads", "qkv_bias", "proj_bias")
SWIN_ATTENTION_ARGS += ("attention_dropout", "dropout")
#: How checkpoints rebuild a Swin attention layer (``dim`` is not an attribute of it).
SWIN_ATTENTION_SPEC = ModuleSpec(SWIN_ATTENTION_ARGS, read=_read_swin_attention)


# --- patch merging: the residual stream of one stage into the next ------------------------------
_MERGING, _MERGING_V2 = "PatchMerging", "PatchMergingV2"
#: The four strided sub-grids ``_patch_merging_pad`` concatenates along the channels.
MERGED_BLOCKS = 4


def _merging_problem(module: nn.Module) -> str | None:
    """Why :class:`PatchMergingRule` cannot describe ``module`` (None: it can)."""
    base = torchvision_base(module, (_MERGING, _MERGING_V2))
    if base is None:
        return "is not a torchvision PatchMerging"
    changed = overridden(module, base, ("forward",))
    if changed:
        return f"is a subclass of {base.__name__} that overrides forward"
    c, red, norm = module.dim, module.reduction, module.norm
    normed = 2 * c if base.__name__ == _MERGING_V2 else MERGED_BLOCKS * c
    if type(red) is not nn.Linear or (red.in_features, red.out_features) != (4 * c, 2 * c):
        return f"has a reduction that is not an nn.Linear({4 * c}, {2 * c})"
    if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (normed,):
        return (
            f"has a norm layer {type(norm).__name__} that is not an nn.LayerNorm({normed}) (other "
            f"normalisations are not described by this rule)"
        )
    return None


def _merging_v2(module: nn.Module) -> bool:
    base = torchvision_base(module, (_MERGING, _MERGING_V2))
    return base is not None and base.__name__ == _MERGING_V2


class PatchMergingRule(LastDimFollower):
    """torchvision's ``PatchMerging`` / ``PatchMergingV2``: ``x [..., H, W, C]`` ->
    concatenation of its four strided sub-grids ``[..., H/2, W/2, 4C]`` -> LayerNorm(4C) ->
    Linear(4C, 2C) (V2: Linear, then LayerNorm(2C)). A layer whose width is ``2C``.

    Its input's units appear in all four blocks of ``4C``: each block follows the input's
    unit map, the LayerNorm's weight and bias copy their units, the reduction's columns are
    split among the copies (the LayerNorm normalises over the input's units: they grow by
    integer multiples, which keeps its statistics). Its output units are the reduction's rows
    (V2: normalised over, so they too grow by integer multiples)."""

    is_layer = True

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        x = _x(node)
        layout, shape = ctx.layout(x), ctx.shape(x)
        width = module.reduction.out_features
        space = ctx.module_space(name, width)
        out_shape = ctx.shape(node)
        out = Layout(len(out_shape) - 1 if out_shape else 3, (Segment(space, width),))
        who = f"layer {name!r} ({type(module).__name__})"
        why = _merging_problem(module)
        if why is None and not _channels_last(layout, shape):
            why = "reads an input whose channels are not its last dimension ([..., H, W, C])"
        if why is not None:
            ctx.spaces.block_layout(
                layout,
                f"{who} {why}. Grow layers that are not coupled to its input",
                UnsupportedLayerError,
            )
            return out
        if _merging_v2(module):
            normalise_channels(ctx, out, who)
        else:
            normalise_channels(ctx, layout, who)
        return out

    def width(self, module):  # type: ignore[override]
        return module.reduction.out_features

    def follower_like(self, module: nn.Module) -> torch.Tensor:
        return module.reduction.weight

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if in_map is None and out_map is None:
            return None
        update = ModuleUpdate()
        red_steps = []
        v2 = _merging_v2(module)
        if in_map is not None:
            merged = stacked_map(in_map, MERGED_BLOCKS, module.dim)
            red_steps.append(AxisStep(1, merged, "in"))
            update.attrs.update({"dim": in_size, "reduction.in_features": 4 * in_size})
            if not v2:
                _grow_norm(update, module.norm, merged, 4 * in_size)
        if out_map is not None:
            red_steps.append(AxisStep(0, out_map, "out"))
            update.attrs["reduction.out_features"] = out_size
            if v2:
                _grow_norm(update, module.norm, out_map, out_size)
        update.tensors["reduction.weight"] = TensorGrowth(red_steps)
        if module.reduction.bias is not None and out_map is not None:
            update.tensors["reduction.bias"] = TensorGrowth([AxisStep(0, out_map, "out")], "zeros")
        return update


def _grow_norm(update: ModuleUpdate, norm: nn.LayerNorm, amap: AxisMap, size: int) -> None:
    """The merging layer's LayerNorm follows ``amap``: its units copy their source's."""
    update.attrs["norm.normalized_shape"] = (size,)
    for tname in ("weight", "bias"):
        if getattr(norm, tname, None) is not None:
            update.tensors[f"norm.{tname}"] = TensorGrowth([AxisStep(0, amap, "channel")])


def _read_merging(module: nn.Module) -> dict[str, Any]:
    # norm_layer is a callable: rebuilt as nn.LayerNorm, then replaced by the saved child
    return {"dim": module.dim}


#: How checkpoints rebuild a patch merging layer (its ``norm`` child is saved as a layer).
PATCH_MERGING_SPEC = ModuleSpec(("dim",), read=_read_merging)
