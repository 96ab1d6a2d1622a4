"""Channel layouts: which growable unit spaces a tensor's channel dimension is made of.

A *space* is a set of units that grow together (the outputs of one layer, or of several layers
joined by a residual add). A tensor's channel dimension is a sequence of :class:`Segment`s, each a
run of one space's units, every unit spread over ``expand`` consecutive positions (a channel
flattened with its H*W spatial positions, or a depthwise conv's channel multiplier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import GrowthError, UnsupportedLayerError


@dataclass(frozen=True)
class Segment:
    """``units`` units of ``space``, each covering ``expand`` consecutive positions.

    ``parts > 1``: the segment is block ``part`` of ``parts`` equal contiguous blocks of the
    space (one of q, k, v split from a fused projection); ``units`` counts that block's units.
    """

    space: int
    units: int
    expand: int = 1
    parts: int = 1
    part: int = 0

    @property
    def size(self) -> int:
        return self.units * self.expand


@dataclass(frozen=True)
class Layout:
    """The channel structure of one tensor: its channel dim and the segments along it."""

    dim: int
    segments: tuple[Segment, ...]
    #: attention heads: the channels are split into heads (on ``dim``) of ``inner`` positions
    #: (the tensor dimension holding the position within a head); None for plain channels
    inner: int | None = None

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def with_dim(self, dim: int) -> Layout:
        return Layout(dim, self.segments, self.inner)

    def expanded(self, factor: int) -> Layout:
        """Each unit spread over ``factor`` times as many positions."""
        return Layout(
            self.dim,
            tuple(
                Segment(s.space, s.units, s.expand * factor, s.parts, s.part)
                for s in self.segments
            ),
            self.inner,
        )


@dataclass
class Block:
    """Why a space cannot grow, and which error to raise."""

    reason: str
    error: type[GrowthError] = GrowthError
    priority: int = 1  # the reason reported first is the one of lowest priority value


@dataclass
class _SpaceInfo:
    width: int
    origin: str
    blocks: list[Block] = field(default_factory=list)
    groups: int = 1  # new units must keep this many equal contiguous blocks (grouped convs)
    # what normalises over these units (LayerNorm, RMSNorm, a mean over channels): the space
    # then grows only by replicating every unit the same number of times (integer multiples)
    normalised: list[str] = field(default_factory=list)
    # attention heads per block (0: no head structure): the units of each of ``groups`` blocks
    # are ``heads`` heads of equal size, which grow by whole heads or by equal head widths
    heads: int = 0
    # attention scale of scaled_dot_product_attention reading these units: "default"
    # (1/sqrt(head width)), "fixed" (a number) or "" (not read by attention)
    attention_scale: str = ""
    # why copying heads would change the function (dropout on the attention weights)
    copy_refused: list[str] = field(default_factory=list)


class SpaceTable:
    """Union-find over unit spaces, with each group's width, blocks and grouping constraint."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._info: list[_SpaceInfo] = []

    def new(self, width: int, origin: str) -> int:
        self._parent.append(len(self._parent))
        self._info.append(_SpaceInfo(width, origin))
        return len(self._parent) - 1

    def find(self, space: int) -> int:
        root = space
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[space] != root:
            self._parent[space], space = root, self._parent[space]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ia, ib = self._info[ra], self._info[rb]
        if ia.width != ib.width:
            raise GrowthError(f"internal: joining spaces of widths {ia.width} and {ib.width}")
        self._parent[rb] = ra
        ia.blocks.extend(ib.blocks)
        ia.groups = math.lcm(ia.groups, ib.groups)
        ia.normalised.extend(n for n in ib.normalised if n not in ia.normalised)
        if ia.heads and ib.heads and ia.heads != ib.heads:
            ia.blocks.append(
                Block(f"its units are split into {ia.heads} and into {ib.heads} heads at once")
            )
        ia.heads = ia.heads or ib.heads
        if ia.attention_scale and ib.attention_scale and ia.attention_scale != ib.attention_scale:
            ia.attention_scale = "mixed"
        ia.attention_scale = ia.attention_scale or ib.attention_scale
        ia.copy_refused.extend(ib.copy_refused)
        return ra

    def info(self, space: int) -> _SpaceInfo:
        return self._info[self.find(space)]

    def block(
        self, space: int, reason: str, error: type[GrowthError] = GrowthError, priority: int = 1
    ) -> None:
        self.info(space).blocks.append(Block(reason, error, priority))

    def block_layout(
        self,
        layout: Layout | None,
        reason: str,
        error: type[GrowthError] = UnsupportedLayerError,
        priority: int = 1,
    ) -> None:
        if layout is None:
            return
        for seg in layout.segments:
            self.block(seg.space, reason, error, priority)

    def first_block(self, space: int) -> Block | None:
        """The reason to report for a blocked space (the network's output first)."""
        blocks = self.info(space).blocks
        return min(blocks, key=lambda b: b.priority) if blocks else None

    def require_groups(self, space: int, groups: int) -> None:
        info = self.info(space)
        info.groups = math.lcm(info.groups, groups)

    def require_multiple(self, space: int, who: str) -> None:
        """``who`` normalises over the units of ``space`` (mean/variance over them): growth
        must replicate every unit the same number of times to keep those statistics."""
        info = self.info(space)
        if who not in info.normalised:
            info.normalised.append(who)

    def require_heads(self, space: int, heads: int) -> None:
        """The units of ``space`` are split into ``heads`` heads per block (attention)."""
        info = self.info(space)
        if info.heads and info.heads != heads:
            self.block(space, f"its units are split into {info.heads} and into {heads} heads")
        info.heads = info.heads or heads

    def members(self, space: int) -> list[int]:
        root = self.find(space)
        return [s for s in range(len(self._parent)) if self.find(s) == root]
