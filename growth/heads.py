"""Growing attention heads written out (q/k/v ``Linear`` -> heads -> scaled dot-product attention).

The analysis (:mod:`growth.rules.heads`) marks the space of q, k and v (joined; or the three
blocks of one fused projection, split by ``.split``/``.chunk`` or by timm's ``reshape(B, N, 3,
H, D)`` + ``unbind``: :mod:`growth.rules.fused_heads`) with its head structure: ``heads``
heads of ``head_dim`` units per block. Two growths of that space are exact:

- **more heads** (``mode="heads"``, what ``widen`` does with a width that is a multiple of the
  head width): each new head copies every q, k and v unit of an existing head, so it computes
  that head's attention output; the output projection's columns of a head are split among its
  copies (``split``: one share per copy of a head, so that every q, k and v row of the copy
  receives its source's gradient times that share, and Adam moments scaled by it stay exact).
  With ``init="zero"`` new heads are random and their output-projection columns zero.
- **wider heads** (``mode="head_dim"``): within every head, new positions copy positions of the
  same head (the same choice in every head and in q, k, v). Copy ``j`` of a position with share
  ``s_j`` (shares of a position's copies sum to one) gets its q, k and v rows multiplied by
  ``f_j = sqrt(s_j * r)``, ``r = sqrt(D' / D)`` under the default attention scale ``1/sqrt(D)``
  (``r = 1`` with a fixed ``scale=``), and the output projection reads it with ``s_j / f_j``.
  Then every score ``q . k / sqrt(D')`` keeps its value (``sum_j f_j**2 = r``), the attention
  weights are unchanged, and the output projection receives what it did. Exact for any new
  width, but only where the units go straight from ``Linear`` layers through views into the
  attention and from it into ``Linear`` layers (anything else would see the scaled values).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .errors import GrowthError
from .mapping import UnitMapping, axis_map
from .rules import ModuleUpdate, PassThroughRule, module_rule_for
from .transform import AxisStep

if TYPE_CHECKING:
    from .analysis import ChannelAnalysis
    from .layout import _SpaceInfo

MODES = ("heads", "head_dim")
#: ops that pass head-structured units on unchanged (values, not just shapes, for linear maps)
_HEAD_DIM_OPS = frozenset(
    {
        "view", "reshape", "unflatten", "flatten", "transpose", "permute", "movedim",
        "contiguous", "clone", "to", "float", "split", "chunk", "unbind", "getitem", "size",
        "scaled_dot_product_attention", "dropout",
        "getattr",  # a shape read (rules.heads.HeadShape refuses any other attribute)
    }
)  # fmt: skip


def structure(info: _SpaceInfo) -> tuple[int, int, int]:
    """(blocks, heads per block, head width) of a space with heads."""
    blocks = info.groups
    per_block = info.width // blocks
    return blocks, info.heads, per_block // info.heads


def exact_widths(info: _SpaceInfo, mode: str) -> str:
    blocks, heads, d = structure(info)
    if mode == "heads":
        return ", ".join(str(blocks * (heads + k) * d) for k in (1, 2, 3)) + ", ..."
    return ", ".join(str(blocks * heads * (d + k)) for k in (1, 2, 3)) + ", ..."


def new_sizes(info: _SpaceInfo, new_units: int, mode: str) -> tuple[int, int]:
    """(heads, head width) after the space grows to ``new_units`` units in ``mode``."""
    blocks, heads, d = structure(info)
    per_block = new_units // blocks
    return (per_block // d, d) if mode == "heads" else (heads, per_block // heads)


def check_head_growth(
    name: str, info: _SpaceInfo, new_units: int, mode: str, init: str, noise: float
) -> None:
    """Refuse, before anything changes, a head growth that cannot be exact."""
    blocks, heads, d = structure(info)
    unit = d if mode == "heads" else heads
    what = (
        f"{name!r} makes attention heads ({blocks * heads} heads of {d} units"
        + (f", {blocks} fused blocks q, k, v" if blocks > 1 else "")
        + ")"
    )
    if new_units % (blocks * unit):
        how = "adds whole heads" if mode == "heads" else "widens every head alike"
        other = (
            "net.widen_heads(name, head_dim=...) to widen the heads instead"
            if mode == "heads"
            else "net.widen_heads(name, heads=...) to add heads instead"
        )
        raise GrowthError(
            f"cannot grow {what} to {new_units} units: growth {how}, so exact widths for this "
            f"layer are {exact_widths(info, mode)} (or use {other})"
        )
    if init not in ("net2net", "zero", "random"):
        raise GrowthError(
            f"cannot grow {what} with init={init!r}: attention heads grow with init='net2net' "
            f"(copies) or init='zero' (new heads with zero output-projection columns)"
        )
    if mode == "heads" and init == "net2net" and info.copy_refused:
        raise GrowthError(
            f"cannot add heads to {what} by copying heads: {info.copy_refused[0]}. Use "
            f"init='zero' (new heads with zero output-projection columns: exact in train mode)"
        )
    if mode == "head_dim":
        if init != "net2net" or noise:
            raise GrowthError(
                f"cannot widen the heads of {what} with init={init!r}, noise={noise}: a wider "
                f"head is exact only with init='net2net' and noise=0 (copied positions, scaled)"
            )
        if info.attention_scale not in ("default", "fixed"):
            raise GrowthError(
                f"cannot widen the heads of {what}: its heads reach attention calls with "
                f"different scales (or none); add heads instead (net.widen_heads(name, heads=...))"
            )


def check_only_linear_paths(net: nn.Module, analysis: ChannelAnalysis, group: int, name: str):
    """Wider heads scale q, k and v: refuse unless every op touching the units is a ``Linear``,
    a view-like op or the attention (see the module docstring)."""
    spaces = analysis.spaces

    def touches(node: Any) -> bool:
        lay = analysis.layouts.get(node) if isinstance(node, fx.Node) else None
        return lay is not None and any(spaces.find(s.space) == group for s in lay.segments)

    for node in net.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if not (touches(node) or any(touches(a) for a in node.all_input_nodes)):
            continue
        if node.op == "call_module":
            module = net.get_submodule(str(node.target))
            if type(module) is nn.Linear or type(module_rule_for(module)) is PassThroughRule:
                continue
        else:
            target = node.target if isinstance(node.target, str) else node.target.__name__
            if target in _HEAD_DIM_OPS:
                continue
        from .analysis import describe

        raise GrowthError(
            f"cannot widen the heads of {name!r}: {describe(node)} uses their units, and a "
            f"wider head scales q, k and v, which only Linear layers, views and the attention "
            f"follow exactly. Add heads instead (net.widen_heads({name!r}, heads=...))"
        )


def head_mappings(
    info: _SpaceInfo,
    new_units: int,
    mode: str,
    *,
    split: str,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[UnitMapping, UnitMapping | None]:
    """The mapping of a head space growing to ``new_units`` units in ``mode``, and for
    ``mode="head_dim"`` the mapping whose shares are the factors of the q/k/v rows.

    New heads (or new positions of every head) are appended to each block; they copy heads
    (positions) spread evenly over the old ones, in random order, the same in every block.
    """
    blocks, heads, d = structure(info)
    new_heads, new_d = new_sizes(info, new_units, mode)
    gen = generator.device
    old_n, new_n = (heads, new_heads) if mode == "heads" else (d, new_d)
    extra = new_n - old_n
    reps = -(-extra // old_n) if extra else 0
    picks = [torch.randperm(old_n, generator=generator, device=gen) for _ in range(reps)]
    src = torch.cat([torch.arange(old_n, device=gen), *picks])[:new_n]
    per_old = heads * d
    if mode == "heads":  # old heads in place, then the new ones
        block_src = (src[:, None] * d + torch.arange(d, device=gen)).reshape(-1)
        block_orig = torch.arange(new_heads * d, device=gen) < per_old
        prefix = per_old
    else:  # every head: its old positions in place, then its new ones
        head = torch.arange(heads, device=gen)
        block_src = (head[:, None] * d + src[None, :]).reshape(-1)
        block_orig = (torch.arange(new_d, device=gen) < d).repeat(heads)
        prefix = d
    source = torch.cat([block_src + b * per_old for b in range(blocks)])
    original = block_orig.repeat(blocks)
    # one share per head copy (every position of a head alike: the head's q, k and v rows then
    # all see its gradient times that share), per position for wider heads; the same shares in
    # every block (fused q, k, v copies scale alike)
    n = new_heads if mode == "heads" else block_src.numel()
    if split == "equal":
        weight = torch.ones(n, device=gen, dtype=torch.float64)
    else:
        weight = 0.2 + 0.8 * torch.rand(n, generator=generator, device=gen, dtype=torch.float64)
    if mode == "heads":
        weight = weight.repeat_interleave(d)
    weight = weight.repeat(blocks)
    total = torch.zeros(blocks * per_old, device=gen, dtype=torch.float64)
    total.index_add_(0, source, weight)
    share = weight / total[source]
    producer = None
    if mode == "head_dim":
        r = math.sqrt(new_d / d) if info.attention_scale == "default" else 1.0
        factor = torch.sqrt(share * r)
        producer = UnitMapping(source.to(device), original.to(device), factor.to(device), prefix)
        share = share / factor
    mapping = UnitMapping(source.to(device), original.to(device), share.to(device), prefix)
    return mapping, producer


def scale_producers(
    plans: list[tuple[str, nn.Module, ModuleUpdate]],
    analysis: ChannelAnalysis,
    group: int,
    producer: UnitMapping,
) -> None:
    """Give the layers making the head units (q, k, v) rows copied *and* scaled by the
    producer mapping's factors: an ``"in"``-role step along their output dim does exactly that
    (``transform.grow_value``: selected by ``source``, multiplied by ``share``)."""
    spaces = analysis.spaces
    for name, module, update in plans:
        nodes = analysis.module_nodes.get(name)
        if not nodes:
            continue
        layout = analysis.layouts.get(nodes[0])
        if layout is None or not any(spaces.find(s.space) == group for s in layout.segments):
            continue
        for tname, growth in update.tensors.items():
            owner, _, leaf = tname.rpartition(".")
            dtype = getattr(module.get_submodule(owner) if owner else module, leaf).dtype
            amap = axis_map(layout, spaces, group, producer, dtype)
            growth.steps = [
                AxisStep(s.dim, amap, "in") if s.role == "out" else s for s in growth.steps
            ]


def head_literal_values(
    analysis: ChannelAnalysis, group: int, sizes: tuple[int, int]
) -> list[tuple[fx.Node, tuple[int, int | None], int]]:
    """``(node, (arg, item), value)``: the new head count or head width of every literal size
    of ``group``'s heads in the graph (``widen.rewrite_literals`` writes them)."""
    return [
        (node, where, sizes[0] if kind == "heads" else sizes[1])
        for node, where, space, kind in analysis.head_literals
        if analysis.spaces.find(space) == group
    ]


def head_shape(layout: Any, shape: list[int], sizes: tuple[int, int]) -> list[int]:
    """A recorded shape with a head layout after growth to ``sizes`` (heads, head width)."""
    shape = list(shape)
    shape[layout.dim], shape[layout.inner] = sizes
    return shape


def head_target(net: Any, name: str, heads: Any, head_dim: Any) -> tuple[int, str]:
    """(new width of layer ``name``, mode) for ``widen_heads(name, heads=, head_dim=)``."""
    if (heads is None) == (head_dim is None):
        raise GrowthError(
            f"widen_heads({name!r}): give exactly one of heads= (more heads) and head_dim= "
            f"(wider heads); to grow both, call it twice"
        )
    width = net.width(name)
    group, expand = net._group_of(name)
    info = net.analysis.spaces.info(group)
    if not info.heads or expand != 1:
        raise GrowthError(
            f"widen_heads({name!r}): its units are not split into attention heads read by "
            f"F.scaled_dot_product_attention (nn.MultiheadAttention grows heads through "
            f"net.widen of the hidden size); use net.widen({name!r}, width)"
        )
    blocks, old_heads, d = structure(info)
    if heads is not None:
        mode, value, old = "heads", heads, old_heads
    else:
        mode, value, old = "head_dim", head_dim, d
    if isinstance(value, bool) or not isinstance(value, int) or value <= old:
        what = "heads" if mode == "heads" else "head_dim"
        raise GrowthError(
            f"widen_heads({name!r}): {what} must be an int larger than the current {old}, "
            f"got {value!r}"
        )
    per_block = value * d if mode == "heads" else old_heads * value
    return per_block * blocks * width // info.width, mode
