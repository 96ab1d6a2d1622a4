"""Growing a network inside a DistributedDataParallel wrapper, on every rank alike
(:func:`grow_ddp`)."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import GrowthError
from ..network import GrowableNetwork
from ..optim import check_supported, follow_growth
from ..record import GrowthRecord
from ..transaction import drop_grad_accumulator
from .collectives import all_gather_vector, broadcast_, control_device, global_rank
from .replicas import check_replicas

GrowthOp = Callable[[GrowableNetwork], GrowthRecord]
"""One growth step: called with the (unwrapped) network on every rank, returns its record."""


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


def _agree(failed: bool, grew: bool, group: Any) -> tuple[list[int], list[int]]:
    """(ranks where the operation failed, ranks where it grew the network), global ranks; the
    same on every rank."""
    flags = torch.tensor([int(failed), int(grew)], dtype=torch.int64, device=control_device(group))
    table = all_gather_vector(flags, group).tolist()
    ranks = [global_rank(group, r) for r in range(len(table))]
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
        check_supported(optimizer, list(net.parameters()))
    ignore = set(getattr(ddp_model, "parameters_to_ignore", ()))
    if _syncs_buffers(ddp_model):
        with torch.no_grad():
            broadcast_([b for n, b in net.named_buffers() if n not in ignore], group)

    shapes = {id(p): p.shape for p in net.parameters()}
    follow = partial(follow_growth, optimizer, net)  # as if op passed optimizer=
    handle = net.register_growth_hook(follow) if optimizer is not None else None
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
    for p in net.parameters():
        if id(p) in shapes and p.shape != shapes[id(p)]:
            drop_grad_accumulator(p)  # the old wrapper's reducer held the old one
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
