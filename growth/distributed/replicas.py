"""Checking that every rank holds the same replica of a network (:func:`check_replicas`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import GrowthError
from .collectives import (
    all_gather_vector,
    control_device,
    global_rank,
    initialized,
    rank0_values,
    wire,
)


@dataclass(frozen=True)
class ReplicaReport:
    """What :func:`check_replicas` compared (returned when the replicas agree).

    Attributes
    ----------
    world_size : int
        Number of ranks compared (1 without a process group: nothing to compare).
    tensors : int
        Parameters and buffers compared (buffers compared by shape only are not counted).
    elements : int
        Total number of values compared.
    max_abs_diff : float
        Largest difference of any value from the reference rank (0.0 for bitwise replicas).
    """

    world_size: int
    tensors: int
    elements: int
    max_abs_diff: float

    def __str__(self) -> str:
        if self.world_size == 1:
            return "replica check: single process, nothing to compare"
        same = "identical" if self.max_abs_diff == 0 else f"max |diff| {self.max_abs_diff:.3g}"
        return (
            f"replica check: {self.tensors} tensors ({self.elements:,} values) "
            f"{same} across {self.world_size} ranks"
        )


@dataclass(frozen=True)
class _Entry:
    kind: str  # "parameter" | "buffer"
    name: str
    tensor: Tensor
    compare_values: bool

    @property
    def signature(self) -> tuple[str, str, tuple[int, ...], str]:
        return (self.kind, self.name, tuple(self.tensor.shape), str(self.tensor.dtype))


def _entries(module: nn.Module, buffers: bool, ignore: Iterable[str]) -> list[_Entry]:
    skip = set(ignore)
    entries = [
        _Entry("parameter", n, p.detach(), True)
        for n, p in module.named_parameters()
        if n not in skip
    ]
    entries += [_Entry("buffer", n, b, buffers) for n, b in module.named_buffers() if n not in skip]
    return entries


def _max_abs_diff(a: Tensor, b: Tensor) -> Tensor:
    """Largest elementwise ``|a - b|`` as a float64 scalar; NaN equals NaN, a lone NaN is inf."""
    if a.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=a.device)
    if a.is_floating_point():
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        equal = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
        diff = torch.nan_to_num((a64 - b64).abs(), nan=math.inf)
        return torch.where(equal, torch.zeros_like(diff), diff).max()
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max()


def _structure_error(signatures: list[list[tuple]], ranks: list[int], context: str) -> GrowthError:
    """Name the first tensor whose name, shape or dtype differs from the reference rank."""
    ref = signatures[0]
    detail = "different parameter sets"
    for r, sig in enumerate(signatures[1:], start=1):
        if sig == ref:
            continue
        i = next((i for i, (a, b) in enumerate(zip(sig, ref)) if a != b), min(len(sig), len(ref)))
        mine = sig[i] if i < len(sig) else None
        theirs = ref[i] if i < len(ref) else None
        if mine is None or theirs is None:
            kind, name = (theirs or mine)[:2]
            where, missing = (ranks[0], ranks[r]) if mine is None else (ranks[r], ranks[0])
            detail = f"{kind} {name!r} exists on rank {where} but not on rank {missing}"
        elif mine[:2] != theirs[:2]:
            detail = (
                f"rank {ranks[r]} has {mine[0]} {mine[1]!r} where rank {ranks[0]} has "
                f"{theirs[0]} {theirs[1]!r} (different architectures)"
            )
        else:
            detail = (
                f"{mine[0]} {mine[1]!r} has shape {mine[2]} ({mine[3]}) on rank {ranks[r]} but "
                f"{theirs[2]} ({theirs[3]}) on rank {ranks[0]}"
            )
        break
    return GrowthError(
        f"replicas diverged{context}: {detail}. The ranks grew differently: grow each with the "
        f"same operation and a generator from net2grow.growth.distributed.shared_generator()"
    )


def check_replicas(
    module: nn.Module,
    group: Any = None,
    atol: float = 0.0,
    *,
    buffers: bool = True,
    ignore: Iterable[str] = (),
    context: str = "after growth",
) -> ReplicaReport:
    """Check that every parameter and buffer of ``module`` is the same on all ranks.

    First the names, shapes and dtypes are compared (one 8-byte hash per rank); then rank 0's
    values are broadcast in buckets of at most 32 MiB and every rank measures its largest
    elementwise difference per tensor (communication of one model copy, like the broadcast
    DistributedDataParallel makes when it is built); finally the per-tensor differences
    (one float per tensor) are gathered, so every rank reaches the same verdict and raises the
    same error. A collective call: every rank of ``group`` must make it.

    Parameters
    ----------
    module : nn.Module
        The replica (a ``DistributedDataParallel`` wrapper is unwrapped).
    group : ProcessGroup, optional
        Ranks to compare (default: the whole world). Its rank 0 is the reference.
    atol : float
        Largest accepted elementwise difference (0.0: bitwise identical, NaN equal to NaN).
    buffers : bool
        Compare buffer values. With False (rank-local buffers, as with DDP's
        ``broadcast_buffers=False``), buffers are compared by name, shape and dtype only.
    ignore : iterable of str
        Parameter and buffer names left out (e.g. DDP's ``_ddp_params_and_buffers_to_ignore``).
    context : str
        Says when the check runs, in the error message.

    Returns
    -------
    ReplicaReport
        What was compared and the largest difference found (at most ``atol``).

    Raises
    ------
    GrowthError
        On every rank, naming the first diverged tensor (in ``named_parameters`` then
        ``named_buffers`` order) and the rank that differs from the reference:
        ``"replicas diverged after growth: parameter 'fc.weight' on rank 1 differs from rank 0
        by up to 0.01 (atol 0)"``.
    """
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise GrowthError(f"atol must be a non-negative number, got {atol!r}")
    if isinstance(module, DistributedDataParallel):
        module = module.module
    context = f" {context}" if context else ""
    entries = _entries(module, buffers, ignore)
    compared = [e for e in entries if e.compare_values]
    elements = sum(e.tensor.numel() for e in compared)
    if not initialized() or dist.get_world_size(group) == 1:
        return ReplicaReport(1, len(compared), elements, 0.0)
    world = dist.get_world_size(group)
    ranks = [global_rank(group, r) for r in range(world)]
    ctrl = control_device(group)

    # 1. structure: names, shapes and dtypes
    signatures = [e.signature for e in entries]
    digest = hashlib.sha256(repr(signatures).encode()).digest()[:8]
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], device=ctrl)
    hashes = all_gather_vector(mine, group).reshape(-1).tolist()
    if len(set(hashes)) > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, signatures, group=group)
        raise _structure_error(gathered, ranks, context)

    # 2. values: broadcast the reference's, measure per-tensor differences locally
    me = dist.get_rank(group)
    diffs: list[Tensor] = []
    order: list[int] = []
    tensors = [e.tensor for e in compared]
    for i, ref in rank0_values(tensors, group):
        if me == 0:
            diffs.append(torch.zeros((), dtype=torch.float64, device=ctrl))
        else:
            diffs.append(_max_abs_diff(wire(tensors[i]).to(ref.device), ref).to(ctrl))
        order.append(i)
    local = torch.zeros(len(compared), dtype=torch.float64, device=ctrl)
    if diffs:
        local[torch.tensor(order, device=ctrl)] = torch.stack(diffs)

    # 3. verdict, identical on every rank
    table = all_gather_vector(local, group).cpu()  # [world, tensors]: one float per tensor
    bad = (table > atol).nonzero().tolist()
    if bad:
        r, i = min(bad, key=lambda rc: (rc[1], rc[0]))
        e = compared[i]
        diverged = int((table > atol).any(dim=0).sum())
        raise GrowthError(
            f"replicas diverged{context}: {e.kind} {e.name!r} on rank {ranks[r]} differs "
            f"from rank {ranks[0]} by up to {float(table[r, i]):.3g} (atol {atol:g}); "
            f"{diverged} of {len(compared)} tensors differ. Grow every rank with the same "
            f"operation and a generator from net2grow.growth.distributed.shared_generator(), and "
            f"keep rank-local state out of the replicated parameters"
        )
    return ReplicaReport(world, len(compared), elements, float(table.max()) if elements else 0.0)
