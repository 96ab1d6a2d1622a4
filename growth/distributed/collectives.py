"""Collectives of the distributed helpers: where tensors travel, flat buckets, a shared seed.

Collectives run on the devices the process group's backend supports: on CUDA tensors with NCCL
(nothing goes through the host), on the CPU with Gloo.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import GrowthError

_SEED_LIMIT = 2**63  # seeds travel as int64
_BUCKET_BYTES = 32 * 1024 * 1024  # largest flat buffer compared or broadcast at once


def initialized() -> bool:
    """Whether a default process group is up (collectives can run)."""
    return dist.is_available() and dist.is_initialized()


def global_rank(group: Any = None, group_rank: int = 0) -> int:
    """Global rank of the ``group_rank``-th rank of ``group`` (the default group when None).

    The default, rank 0 of the group, is the source of every broadcast the growth helpers make:
    ``dist.broadcast(t, src=global_rank(group), group=group)``.
    """
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _supported_device_types(group: Any) -> set[str]:
    """Device types whose tensors the group's backend(s) can communicate."""
    try:
        config = str(dist.get_backend_config(group))  # e.g. "cpu:gloo,cuda:nccl"
    except (AttributeError, RuntimeError, ValueError):
        config = str(dist.get_backend(group))
    config = config.lower()
    if ":" in config:
        return {part.split(":")[0].strip() for part in config.split(",") if ":" in part}
    if config == "nccl":
        return {"cuda"}
    if config in ("gloo", "mpi"):
        return {"cpu"}
    return {"cpu", "cuda"}


def _accelerator() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    raise GrowthError("the process group's backend needs CUDA tensors, but CUDA is not available")


def comm_device(group: Any, preferred: torch.device) -> torch.device:
    """Where a tensor living on ``preferred`` is communicated: its own device when the backend
    supports it (CUDA tensors stay on the GPU with NCCL), else the CPU, else the current GPU."""
    supported = _supported_device_types(group)
    if preferred.type in supported:
        if preferred.type == "cuda" and preferred.index is None:
            return _accelerator()
        return preferred
    if "cpu" in supported:
        return torch.device("cpu")
    return _accelerator()


def control_device(group: Any = None) -> torch.device:
    """Device for the small control messages of ``group`` (seeds, flags, counts, checksums):
    the CPU when its backend communicates CPU tensors (Gloo), else the current GPU (NCCL)."""
    return comm_device(group, torch.device("cpu"))


def all_gather_vector(values: Tensor, group: Any) -> Tensor:
    """``[world, n]``: every rank's copy of the 1-D ``values`` (same ``n`` on every rank)."""
    world = dist.get_world_size(group)
    out = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(out, values, group=group)
    return torch.stack(out)


def wire(t: Tensor) -> Tensor:
    """``t`` as a flat tensor of a dtype every backend can send."""
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


def _buckets(tensors: Sequence[Tensor], group: Any) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (communication device, wire dtype), each group cut at
    the bucket size (32 MiB)."""
    by_key: dict[tuple[torch.device, torch.dtype], list[list[int]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for i, t in enumerate(tensors):
        w = wire(t)
        key = (comm_device(group, t.device), w.dtype)
        nbytes = w.numel() * w.element_size()
        if key not in by_key or sizes[key] + nbytes > _BUCKET_BYTES:
            by_key.setdefault(key, []).append([])
            sizes[key] = 0
        by_key[key][-1].append(i)
        sizes[key] += nbytes
    return [bucket for groups in by_key.values() for bucket in groups if bucket]


def rank0_values(tensors: Sequence[Tensor], group: Any) -> Iterator[tuple[int, Tensor]]:
    """Rank 0's values of ``tensors``, broadcast in flat buckets of at most 32 MiB: yields
    ``(i, values)``, ``values`` the :func:`wire` form of rank 0's ``tensors[i]``. A collective
    call: every rank must consume it to the end."""
    for bucket in _buckets(tensors, group):
        device = comm_device(group, tensors[bucket[0]].device)
        message = torch.cat([wire(tensors[i]).to(device) for i in bucket])
        dist.broadcast(message, src=global_rank(group), group=group)
        offset = 0
        for i in bucket:
            n = wire(tensors[i]).numel()
            yield i, message[offset : offset + n]
            offset += n


def broadcast_(tensors: Sequence[Tensor], group: Any) -> None:
    """Overwrite ``tensors`` with rank 0's values, in place."""
    for i, values in rank0_values(tensors, group):
        t = tensors[i]
        if t.is_complex():
            values = torch.view_as_complex(values.view(-1, 2))
        t.copy_(values.view(t.shape).to(t.device, t.dtype))


def shared_generator(
    seed: int | None = None,
    group: Any = None,
    *,
    device: torch.device | str = "cpu",
) -> torch.Generator:
    """A ``torch.Generator`` seeded identically on every rank of ``group``.

    Rank 0 of the group picks the seed (``seed`` if given, else a fresh random one) and
    broadcasts it, so every rank draws the same unit mappings when it grows with
    ``generator=shared_generator(...)``. This is a collective call: every rank of the group
    must make it, in the same order as its other collectives. Without an initialised process
    group it simply returns a generator seeded with ``seed`` (or a random seed).

    Parameters
    ----------
    seed : int, optional
        Seed in ``[0, 2**63)``. Only rank 0's value counts; the others may pass anything.
    group : ProcessGroup, optional
        The ranks that grow together (default: the whole world).
    device : torch.device or str
        Device of the returned generator. The default CPU generator gives the same mapping on
        every machine and is fine for CUDA models (mappings are a few integers per unit).

    Returns
    -------
    torch.Generator
        ``generator.initial_seed()`` is the shared seed.
    """
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT
    ):
        raise GrowthError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if initialized():
        chosen = seed if seed is not None else secrets.randbits(63)
        message = torch.tensor([chosen], dtype=torch.int64, device=control_device(group))
        dist.broadcast(message, src=global_rank(group), group=group)
        seed = int(message.item())
    elif seed is None:
        seed = secrets.randbits(63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
