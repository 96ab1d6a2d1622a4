"""Unit mappings: how the units of a grown space derive from the old ones.

A :class:`UnitMapping` says, for every unit of the grown space, which old unit it copies
(``source``), whether it *is* that old unit (``original``: exactly one per old unit) and which
share of the old unit's outgoing weights it carries (``share``: the shares of one old unit's
copies sum to one). :func:`axis_map` turns it into an :class:`AxisMap` over the positions of one
tensor dimension, through that tensor's :class:`~growth.layout.Layout` (segments, expansion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import GrowthError
from .layout import Layout, Segment, SpaceTable

SPLITS = ("random", "equal")


@dataclass(frozen=True)
class UnitMapping:
    """Old-to-new unit correspondence of one grown space (see module docstring)."""

    source: Tensor
    original: Tensor
    share: Tensor
    prefix: int = 0  # leading units that are the old units, in place (source[:prefix] == arange)

    @property
    def new_width(self) -> int:
        return self.source.numel()


@dataclass(frozen=True)
class AxisMap:
    """The same correspondence over the positions of one tensor dimension."""

    source: Tensor  # long [new_size]: old position each new position copies
    original: Tensor  # bool [new_size]: True where the position is an old one, kept
    share: Tensor  # float [new_size]: share of the outgoing weight carried by the position
    prefix: int = 0  # leading positions that are old positions, in place (copied as a block)

    @property
    def new_size(self) -> int:
        return self.source.numel()


def build_unit_mapping(
    old_width: int,
    new_width: int,
    *,
    groups: int,
    split: str,
    generator: torch.Generator,
    device: torch.device,
) -> UnitMapping:
    """Draw the mapping of a space growing from ``old_width`` to ``new_width`` units.

    New units are appended at the end of each of ``groups`` equal contiguous blocks (one block
    unless a grouped convolution reads or writes the space) and copy old units of the same block,
    spread evenly: every old unit is copied once before any is copied twice, in random order.
    The mapping is drawn on ``generator``'s device (a few integers per unit) and moved to
    ``device``; the same seed gives the same mapping on every machine.
    """
    if split not in SPLITS:
        raise GrowthError(f"split must be one of {SPLITS}, got {split!r}")
    old_block, new_block = old_width // groups, new_width // groups
    extra = new_block - old_block
    gen_device = generator.device
    reps = -(-extra // old_block) if extra else 0
    picks = [
        torch.randperm(old_block, generator=generator, device=gen_device)
        for _ in range(groups * reps)
    ]
    sources, originals = [], []
    for b in range(groups):
        base = b * old_block
        copies = (
            torch.cat(picks[b * reps : (b + 1) * reps])[:extra]
            if extra
            else torch.empty(0, dtype=torch.long, device=gen_device)
        )
        sources.append(torch.arange(base, base + old_block, device=gen_device))
        sources.append(copies + base)
        originals.append(torch.ones(old_block, dtype=torch.bool, device=gen_device))
        originals.append(torch.zeros(extra, dtype=torch.bool, device=gen_device))
    source = torch.cat(sources)
    original = torch.cat(originals)
    if split == "equal":
        weight = torch.ones(new_width, device=gen_device, dtype=torch.float64)
    else:
        # random positive shares, normalised per old unit below: copies get different outgoing
        # weights, hence different gradients, and learn apart (exactness is kept).
        weight = 0.2 + 0.8 * torch.rand(
            new_width, generator=generator, device=gen_device, dtype=torch.float64
        )
    # shares in float64, cast to each parameter's dtype where used: exact for float64 models
    total = torch.zeros(old_width, device=gen_device, dtype=torch.float64)
    total.index_add_(0, source, weight)
    share = weight / total[source]
    return UnitMapping(source.to(device), original.to(device), share.to(device), old_block)


def identity_mapping(width: int, device: torch.device) -> UnitMapping:
    """The mapping of a space that does not change."""
    return UnitMapping(
        torch.arange(width, device=device),
        torch.ones(width, dtype=torch.bool, device=device),
        torch.ones(width, device=device, dtype=torch.float64),
        width,
    )


def shape_mapping(old_width: int, new_width: int, groups: int = 1) -> UnitMapping:
    """A mapping with the shapes of a real one but no data (``meta`` tensors): planning growth
    with it gives every new tensor shape without allocating anything (memory-limit check)."""
    meta = torch.device("meta")
    return UnitMapping(
        torch.empty(new_width, dtype=torch.long, device=meta),
        torch.empty(new_width, dtype=torch.bool, device=meta),
        torch.empty(new_width, dtype=torch.float64, device=meta),
        old_width // groups,
    )


def grown_layout(layout: Layout, spaces: SpaceTable, group: int, new_width: int) -> Layout:
    """``layout`` after the space group ``group`` grows to ``new_width`` units."""
    segs = tuple(
        Segment(s.space, new_width // s.parts, s.expand, s.parts, s.part)
        if spaces.find(s.space) == group
        else s
        for s in layout.segments
    )
    return Layout(layout.dim, segs, layout.inner)


def part_mapping(mapping: UnitMapping, parts: int, part: int, old: int) -> UnitMapping:
    """The mapping of block ``part`` of ``parts`` equal blocks (``old`` units each) of a space
    that grows by whole blocks (each block's units copy units of the same block)."""
    if parts == 1:
        return mapping
    new = mapping.new_width // parts
    at = slice(part * new, (part + 1) * new)
    source = mapping.source[at] - part * old
    return UnitMapping(source, mapping.original[at], mapping.share[at], min(mapping.prefix, old))


def axis_map(
    layout: Layout, spaces: SpaceTable, group: int, mapping: UnitMapping, dtype: torch.dtype
) -> AxisMap | None:
    """Position-level map of a dimension with ``layout`` when ``group`` grows by ``mapping``.

    Returns None when no segment of ``layout`` belongs to ``group`` (the dimension is unchanged).
    """
    device = mapping.source.device
    if not any(spaces.find(s.space) == group for s in layout.segments):
        return None
    sources, originals, shares = [], [], []
    offset, prefix, grown_seen = 0, 0, False
    for seg in layout.segments:
        grows = spaces.find(seg.space) == group
        um = part_mapping(mapping, seg.parts, seg.part, seg.units) if grows else None
        um = um if um is not None else identity_mapping(seg.units, device)
        if not grown_seen:
            prefix += um.prefix * seg.expand
            grown_seen = grows
        within = torch.arange(seg.expand, device=device)
        sources.append((um.source[:, None] * seg.expand + within).reshape(-1) + offset)
        originals.append(um.original.repeat_interleave(seg.expand))
        shares.append(um.share.repeat_interleave(seg.expand))
        offset += seg.size
    return AxisMap(torch.cat(sources), torch.cat(originals), torch.cat(shares).to(dtype), prefix)
