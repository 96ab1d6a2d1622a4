"""Growing a network trained with ``torch.distributed`` (DistributedDataParallel).

Every rank holds a replica of the network, and growth must keep the replicas identical: each rank
runs the same operation on its own replica, drawing the unit mapping from a generator seeded the
same everywhere (:func:`shared_generator`). DistributedDataParallel registers its parameters when
it is built, so after growth the wrapper is rebuilt around the grown module (:func:`grow_ddp`),
and :func:`check_replicas` proves that every parameter and buffer is still the same on all ranks.

Example (on every rank, between two optimizer steps)::

    g = shared_generator(seed=0)                     # rank 0's seed, broadcast
    ddp, rec = grow_ddp(ddp, lambda net: net.widen("fc1", factor=2, generator=g), optimizer=opt)
    ddp, rec = grow_ddp(ddp, lambda net: net.deepen("fc1"), optimizer=opt)

Collectives run on the devices the process group's backend supports: on CUDA tensors with NCCL
(nothing goes through the host), on the CPU with Gloo.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import secrets
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import optim as optim_state
from .errors import GrowthError
from .hooks import GrowthChanges
from .network import GrowableNetwork
from .record import GrowthRecord
from .transform import AxisStep, grow_state

__all__ = ["GrowthOp", "ReplicaReport", "check_replicas", "grow_ddp", "shared_generator"]

GrowthOp = Callable[[GrowableNetwork], GrowthRecord]
"""One growth step: called with the (unwrapped) network on every rank, returns its record."""

_SEED_LIMIT = 2**63  # seeds travel as int64
_BUCKET_BYTES = 32 * 1024 * 1024  # largest flat buffer compared or broadcast at once


# --------------------------------------------------------------------------------------------
# process-group helpers
# --------------------------------------------------------------------------------------------


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _global_rank(group: Any, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group`` (the default group when None)."""
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


def _comm_device(group: Any, preferred: torch.device) -> torch.device:
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


def _control_device(group: Any) -> torch.device:
    """Device of the small control messages (seeds, flags, checksums)."""
    return _comm_device(group, torch.device("cpu"))


def _all_gather_vector(values: Tensor, group: Any) -> Tensor:
    """``[world, n]``: every rank's copy of the 1-D ``values`` (same ``n`` on every rank)."""
    world = dist.get_world_size(group)
    out = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(out, values, group=group)
    return torch.stack(out)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


# --------------------------------------------------------------------------------------------
# shared generator
# --------------------------------------------------------------------------------------------


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
    if _initialized():
        chosen = seed if seed is not None else secrets.randbits(63)
        message = torch.tensor([chosen], dtype=torch.int64, device=_control_device(group))
        dist.broadcast(message, src=_global_rank(group, 0), group=group)
        seed = int(message.item())
    elif seed is None:
        seed = secrets.randbits(63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------------------------
# replica check
# --------------------------------------------------------------------------------------------


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


def _wire(t: Tensor) -> Tensor:
    """``t`` as a flat tensor of a dtype every backend can send."""
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


def _buckets(entries: Sequence[_Entry], group: Any) -> list[list[_Entry]]:
    """Entries grouped by (communication device, wire dtype), each group cut at the bucket size."""
    by_key: dict[tuple[torch.device, torch.dtype], list[list[_Entry]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for e in entries:
        wire = _wire(e.tensor)
        key = (_comm_device(group, e.tensor.device), wire.dtype)
        nbytes = wire.numel() * wire.element_size()
        if key not in by_key or sizes[key] + nbytes > _BUCKET_BYTES:
            by_key.setdefault(key, []).append([])
            sizes[key] = 0
        by_key[key][-1].append(e)
        sizes[key] += nbytes
    return [bucket for buckets in by_key.values() for bucket in buckets if bucket]


def _flat(bucket: Sequence[_Entry], group: Any) -> Tensor:
    device = _comm_device(group, bucket[0].tensor.device)
    return torch.cat([_wire(e.tensor).to(device) for e in bucket])


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
        f"same operation and a generator from growth.distributed.shared_generator()"
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
    module = _unwrap(module)
    context = f" {context}" if context else ""
    entries = _entries(module, buffers, ignore)
    compared = [e for e in entries if e.compare_values]
    elements = sum(e.tensor.numel() for e in compared)
    if not _initialized() or dist.get_world_size(group) == 1:
        return ReplicaReport(1, len(compared), elements, 0.0)
    world = dist.get_world_size(group)
    ranks = [_global_rank(group, r) for r in range(world)]
    ctrl = _control_device(group)

    # 1. structure: names, shapes and dtypes
    signatures = [e.signature for e in entries]
    digest = hashlib.sha256(repr(signatures).encode()).digest()[:8]
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], device=ctrl)
    hashes = _all_gather_vector(mine, group).reshape(-1).tolist()
    if len(set(hashes)) > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, signatures, group=group)
        raise _structure_error(gathered, ranks, context)

    # 2. values: broadcast the reference's, measure per-tensor differences locally
    me = dist.get_rank(group)
    diffs: list[Tensor] = []
    order: list[int] = []
    index = {id(e): i for i, e in enumerate(compared)}
    for bucket in _buckets(compared, group):
        flat = _flat(bucket, group)
        dist.broadcast(flat, src=ranks[0], group=group)
        offset = 0
        for e in bucket:
            n = _wire(e.tensor).numel()
            if me == 0:
                diffs.append(torch.zeros((), dtype=torch.float64, device=ctrl))
            else:
                ref = flat[offset : offset + n]
                diffs.append(_max_abs_diff(_wire(e.tensor).to(flat.device), ref).to(ctrl))
            order.append(index[id(e)])
            offset += n
    local = torch.zeros(len(compared), dtype=torch.float64, device=ctrl)
    if diffs:
        local[torch.tensor(order, device=ctrl)] = torch.stack(diffs)

    # 3. verdict, identical on every rank
    table = _all_gather_vector(local, group).cpu()  # [world, tensors]: one float per tensor
    bad = (table > atol).nonzero().tolist()
    if bad:
        r, i = min(bad, key=lambda rc: (rc[1], rc[0]))
        e = compared[i]
        diverged = int((table > atol).any(dim=0).sum())
        raise GrowthError(
            f"replicas diverged{context}: {e.kind} {e.name!r} on rank {ranks[r]} differs "
            f"from rank {ranks[0]} by up to {float(table[r, i]):.3g} (atol {atol:g}); "
            f"{diverged} of {len(compared)} tensors differ. Grow every rank with the same "
            f"operation and a generator from growth.distributed.shared_generator(), and "
            f"keep rank-local state out of the replicated parameters"
        )
    return ReplicaReport(world, len(compared), elements, float(table.max()) if elements else 0.0)


# --------------------------------------------------------------------------------------------
# growing under DistributedDataParallel
# --------------------------------------------------------------------------------------------


def _broadcast_(tensors: Sequence[Tensor], group: Any) -> None:
    """Overwrite ``tensors`` with rank 0's values, in place."""
    entries = [_Entry("buffer", str(i), t, True) for i, t in enumerate(tensors)]
    for bucket in _buckets(entries, group):
        flat = _flat(bucket, group)
        dist.broadcast(flat, src=_global_rank(group, 0), group=group)
        offset = 0
        for e in bucket:
            n = e.tensor.numel() * (2 if e.tensor.is_complex() else 1)
            part = flat[offset : offset + n]
            if e.tensor.is_complex():
                part = torch.view_as_complex(part.view(-1, 2))
            e.tensor.copy_(part.view(e.tensor.shape).to(e.tensor.device, e.tensor.dtype))
            offset += n


class _OptimizerFollower:
    """Growth hook keeping ``optimizer`` consistent when ``op`` did not pass it to the network.

    After a widen, state tensors still shaped like the old parameter are remapped exactly as
    ``widen(..., optimizer=...)`` would have done; after a deepen, new parameters missing from
    the optimizer join the param group of the deepened layer's weight (the ``deepen`` rule).
    State that ``op`` already carried over (``optimizer=`` passed) is left alone.
    """

    def __init__(self, net: GrowableNetwork, optimizer: torch.optim.Optimizer) -> None:
        self.net = net
        self.optimizer = optimizer

    def __call__(self, record: GrowthRecord, changes: GrowthChanges) -> None:
        params = dict(self.net.named_parameters())
        for name, steps in changes.tensors.items():
            p = params.get(name)
            state = self.optimizer.state.get(p) if p is not None else None
            if p is None or not state:
                continue
            old_shape = _old_shape(p, steps)
            if old_shape == tuple(p.shape):
                continue
            new_state = dict(state)
            for key, value in state.items():
                if isinstance(value, Tensor) and tuple(value.shape) == old_shape:
                    power = optim_state.state_power(self.optimizer, key)
                    assert power is not None  # check_supported ran before the operation
                    new_state[key] = grow_state(value, steps, init=changes.init, power=power)
            self.optimizer.state[p] = new_state
        new = [params[n] for n in changes.new_parameters if n in params]
        missing = [p for p in new if optim_state.param_group_of(self.optimizer, p) is None]
        if missing:
            like = getattr(self.net.get_submodule(record.layer), "weight", None)
            optim_state.add_params(
                self.optimizer, missing, like if isinstance(like, nn.Parameter) else None
            )


def _old_shape(p: Tensor, steps: Sequence[AxisStep]) -> tuple[int, ...]:
    shape = list(p.shape)
    for step in steps:
        shape[step.dim] = int(step.amap.original.sum())
    return tuple(shape)


def _refuse_unsupported(ddp: DistributedDataParallel) -> None:
    if getattr(ddp, "mixed_precision", None) is not None:
        raise GrowthError(
            "grow_ddp does not support DDP's mixed_precision: it keeps low-precision copies of "
            "the parameters; use torch.autocast instead"
        )
    if getattr(ddp, "_delay_all_reduce_params", None):
        raise GrowthError("grow_ddp does not support delay_all_reduce_named_params")


def _ddp_kwargs_of(ddp: DistributedDataParallel) -> dict[str, Any]:
    """The constructor arguments that rebuild a wrapper configured like ``ddp``."""
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    kwargs: dict[str, Any] = {
        "device_ids": ddp.device_ids,
        "output_device": ddp.output_device,
        "dim": ddp.dim,
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": bool(getattr(ddp, "static_graph", False)),
    }
    if getattr(ddp, "device_mesh", None) is not None:
        kwargs["device_mesh"] = ddp.device_mesh
    else:
        kwargs["process_group"] = ddp.process_group
    config = getattr(ddp, "_bucket_config", None)
    if config is not None and getattr(config, "bucket_cap_mb", None) is not None:
        kwargs["bucket_cap_mb"] = config.bucket_cap_mb
    elif getattr(ddp, "bucket_bytes_cap", None):
        kwargs["bucket_cap_mb"] = ddp.bucket_bytes_cap / (1024 * 1024)
    for name in ("skip_all_reduce_unused_params", "batched_grad_copy"):
        if hasattr(ddp, name):
            kwargs[name] = getattr(ddp, name)
    if not _syncs_buffers(ddp):
        kwargs["broadcast_buffers"] = False  # rank-local buffers: not synced at init either
    return {k: v for k, v in kwargs.items() if k in accepted}


def _syncs_buffers(ddp: DistributedDataParallel) -> bool:
    return bool(getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", True)))


def _retired_forward(*args: Any, **kwargs: Any) -> Any:
    raise GrowthError(
        "this DistributedDataParallel wrapper was replaced by grow_ddp: its module grew and it "
        "no longer synchronises the gradients; use the wrapper grow_ddp returned"
    )


def _retire(ddp: DistributedDataParallel) -> None:
    """Detach the old wrapper from the parameters: no gradient hook of it may fire again.

    Its reducer is dropped, not only unhooked: it holds the parameters' gradient accumulators,
    autograd nodes that remember the old shapes, and while one lives every new backward pass
    through that parameter would reuse it and reject the grown gradient.
    """
    reducer = getattr(ddp, "reducer", None)
    if reducer is not None and hasattr(reducer, "_remove_autograd_hooks"):
        reducer._remove_autograd_hooks()
    for handle in getattr(ddp, "_accum_grad_hooks", []):
        handle.remove()
    for name in ("logger", "reducer"):  # the logger holds the reducer too
        if hasattr(ddp, name):
            setattr(ddp, name, None)
    ddp.forward = _retired_forward  # type: ignore[method-assign]


def _fresh_grad_accumulators(params: Iterable[nn.Parameter]) -> None:
    """Make autograd build new gradient accumulators for ``params`` (whose shapes changed).

    An accumulator is cached per parameter while something holds it (a wrapper's reducer, the
    graph of a loss still referenced by the training loop) and remembers the parameter's shape;
    swapping ``.data`` for a differently shaped tensor keeps it, and the next backward rejects
    the grown gradient. Autograd drops the cached accumulator when ``.data`` changes dtype, so
    the data takes a different dtype for an instant (no copy is made).
    """
    for p in params:
        data = p.data
        other = torch.float64 if data.dtype != torch.float64 else torch.float32
        p.data = torch.empty(0, dtype=other, device=data.device)
        p.data = data


def _agree(failed: bool, grew: bool, group: Any) -> tuple[list[int], list[int]]:
    """(ranks where the operation failed, ranks where it grew the network), global ranks; the
    same on every rank."""
    flags = torch.tensor([int(failed), int(grew)], dtype=torch.int64, device=_control_device(group))
    table = _all_gather_vector(flags, group).tolist()
    ranks = [_global_rank(group, r) for r in range(len(table))]
    return [ranks[r] for r, f in enumerate(table) if f[0]], [
        ranks[r] for r, f in enumerate(table) if f[1]
    ]


def grow_ddp(
    ddp_model: DistributedDataParallel,
    op: GrowthOp,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    ddp_kwargs: dict[str, Any] | None = None,
    check: bool = True,
    atol: float = 0.0,
) -> tuple[DistributedDataParallel, GrowthRecord]:
    """Grow the network inside a DistributedDataParallel wrapper, on every rank alike.

    Call it on every rank, between two optimizer steps (pending gradients are cleared):

    1. buffers are synchronised from rank 0 when the wrapper syncs buffers (BatchNorm statistics
       of the last forward differ per rank until DDP's next forward would broadcast them);
    2. ``op(net)`` runs on the unwrapped :class:`GrowableNetwork`; with ``optimizer``, its state
       is kept consistent as on one process, whether or not ``op`` passes ``optimizer=``;
    3. the ranks agree on the outcome: if ``op`` was refused everywhere before growing
       anything, its error is re-raised and the old wrapper is untouched; if it failed on some
       ranks only, or after it had grown the network, every rank raises ``GrowthError`` (each
       ``widen``/``deepen`` is all or nothing, a sequence of them is not);
    4. the old wrapper is retired (its gradient hooks and reducer dropped; calling it raises),
       the replicas are verified with :func:`check_replicas` (before a new wrapper's initial
       broadcast could hide a divergence; it is skipped when the check found them bitwise
       equal), and a new wrapper with the old one's configuration (device ids, process group,
       bucket size, ``find_unused_parameters``, ``static_graph``, comm hooks, ...) is built
       around the grown network.

    Parameters
    ----------
    ddp_model : DistributedDataParallel
        Wrapper whose ``module`` is a :class:`GrowableNetwork`. Build that network with the same
        ``example_inputs`` on every rank: its verification then reaches the same verdict.
    op : callable
        ``op(net) -> GrowthRecord``, e.g. ``lambda net: net.widen("fc1", 64, generator=g)`` with
        ``g = shared_generator(seed)``. It may grow several times; the last record is returned.
    optimizer : torch.optim.Optimizer, optional
        Optimizer over the network's parameters: grown parameters keep their identity and their
        remapped state (momentum, Adam moments), new parameters (deepen) join the param group
        of the deepened layer's weight.
    ddp_kwargs : dict, optional
        Constructor arguments of the new wrapper, overriding those copied from ``ddp_model``.
    check : bool
        Verify the replicas after growth (one broadcast of the model).
    atol : float
        Tolerance of that verification (0.0: bitwise identical).

    Returns
    -------
    (DistributedDataParallel, GrowthRecord)
        The new wrapper (use it from now on; drop the old one) and the record of the growth.

    Raises
    ------
    GrowthError
        When the growth is refused (re-raised on every rank, nothing changed), failed on some
        ranks only, or left the replicas different (see :func:`check_replicas`).
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise GrowthError(
            "grow_ddp expects a DistributedDataParallel wrapper, got "
            f"{type(ddp_model).__name__}; on one process grow the GrowableNetwork directly"
        )
    net = ddp_model.module
    if not isinstance(net, GrowableNetwork):
        raise GrowthError(
            f"the DistributedDataParallel module is a {type(net).__name__}: wrap a "
            "GrowableNetwork (DistributedDataParallel(GrowableNetwork(model, example_inputs)))"
        )
    if not callable(op):
        raise GrowthError(f"op must be callable as op(net) -> GrowthRecord, got {op!r}")
    _refuse_unsupported(ddp_model)
    group = ddp_model.process_group
    if optimizer is not None:
        optim_state.check_supported(optimizer, list(net.parameters()))
    ignore = set(getattr(ddp_model, "parameters_to_ignore", ()))
    if _syncs_buffers(ddp_model):
        with torch.no_grad():
            _broadcast_([b for n, b in net.named_buffers() if n not in ignore], group)

    shapes = {id(p): p.shape for p in net.parameters()}
    handle = net.register_growth_hook(_OptimizerFollower(net, optimizer)) if optimizer else None
    grown_before = len(net.history)
    error: BaseException | None = None
    result: Any = None
    try:
        result = op(net)
        if len(net.history) == grown_before:
            raise GrowthError("op did not grow the network: it must call net.widen/net.deepen")
    except Exception as exc:
        error = exc
    finally:
        if handle is not None:
            handle.remove()
    failed, grew = _agree(error is not None, len(net.history) > grown_before, group)
    if failed:
        if error is not None and len(failed) == dist.get_world_size(group) and not grew:
            raise error  # refused everywhere, nothing changed: the old wrapper stays valid
        _retire(ddp_model)  # its reducer no longer matches the parameters of some rank
        here = f" (here: {type(error).__name__}: {error})" if error is not None else ""
        if len(failed) < dist.get_world_size(group):
            what = f"growth failed on rank(s) {failed} only{here}, so the replicas differ"
        else:
            what = f"op raised after it had grown the network on rank(s) {grew}{here}"
        raise GrowthError(
            f"{what}; the DistributedDataParallel wrapper was retired. Build the "
            "GrowableNetwork with the same example_inputs on every rank, grow with "
            "shared_generator(), give grow_ddp one widen/deepen at a time (each is all or "
            "nothing), and restore the replicas from a checkpoint"
        ) from error
    record = result if isinstance(result, GrowthRecord) else net.history[-1]

    for p in net.parameters():
        p.grad = None
    _retire(ddp_model)
    _fresh_grad_accumulators(
        p for p in net.parameters() if id(p) in shapes and p.shape != shapes[id(p)]
    )
    kwargs = _ddp_kwargs_of(ddp_model)
    if check:
        check_replicas(net, group, atol, buffers=_syncs_buffers(ddp_model), ignore=ignore)
        if atol == 0 and "init_sync" in inspect.signature(DistributedDataParallel).parameters:
            kwargs["init_sync"] = False  # bitwise identical already: skip DDP's re-broadcast
    kwargs.update(ddp_kwargs or {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        new_ddp = DistributedDataParallel(net, **kwargs)
    for hook, state in getattr(ddp_model, "_comm_hooks", []):
        new_ddp.register_comm_hook(state, hook)
    return new_ddp, record
