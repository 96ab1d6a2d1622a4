"""Keeping an optimizer usable and its state meaningful across growth.

``GrowableNetwork.widen/deepen(..., optimizer=opt)`` use this module; it is also usable on its own
(:func:`remapped_state`, :func:`remap_after_growth` or :func:`follow_growth` from a growth hook,
:func:`add_params`, :func:`check_supported`) for code that grows the network first and fixes the
optimizer after.

Parameters keep their identity when they grow (their ``.data`` is replaced), so param groups stay
valid; only the per-parameter state tensors need the unit mapping. How each state key scales
with the gradient is listed in :data:`STATE_POWERS` (the derivation is in
``growth.transform.grow_state``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .changes import GrowthChanges
from .errors import GrowthError
from .record import GrowthRecord
from .transform import AxisStep, grow_state

#: Power of the gradient each known state key accumulates: the key's value is scaled by
#: ``share ** power`` for replicated units. Keys not listed make growth refuse the optimizer.
STATE_POWERS: dict[str, int] = {
    "momentum_buffer": 1,  # SGD: sum of gradients (RMSprop overrides: normalised steps, power 0)
    "exp_avg": 1,  # Adam, AdamW, NAdam, RAdam: first moment
    "exp_avg_sq": 2,  # second moment
    "max_exp_avg_sq": 2,  # AMSGrad
    "exp_inf": 1,  # Adamax: running max of |gradient|
    "square_avg": 2,  # RMSprop
    "grad_avg": 1,  # RMSprop centered
    "sum": 2,  # Adagrad
}
_OVERRIDES: dict[tuple[str, str], int] = {("RMSprop", "momentum_buffer"): 0}

#: What a widening does to the optimizer state of the units it adds (``widen(...,
#: optimizer_state=...)``); old units always keep theirs, step counts keep counting.
#: "scale": a copy of a unit gets its source's state scaled like the copy's gradient
#: (``share ** power``, the state the copy would have accumulated; staged training's choice),
#: fresh units (``init`` other than "net2net") zero state. "copy": copies get their source's
#: state unchanged. "zero": every new unit, copy or fresh, starts from zero state.
NEW_UNIT_STATES = ("scale", "copy", "zero")


def state_power(optimizer: torch.optim.Optimizer, key: str) -> int | None:
    for cls in type(optimizer).__mro__:
        if (cls.__name__, key) in _OVERRIDES:
            return _OVERRIDES[(cls.__name__, key)]
    return STATE_POWERS.get(key)


def check_supported(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Raise :class:`GrowthError` (before anything changes) if some state of ``params`` has no
    known remapping: an unknown key shaped like the parameter, or any state tensor of another
    shape (factored second moments, flattened histories)."""
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue  # step counts and other scalars are kept as they are
            if value.shape != p.shape:
                raise GrowthError(
                    f"{type(optimizer).__name__} keeps per-parameter state {key!r} of shape "
                    f"{tuple(value.shape)} for a parameter of shape {tuple(p.shape)}; net2grow "
                    f"cannot carry such state across growth. Grow without optimizer=... and "
                    f"build a new optimizer."
                )
            if state_power(optimizer, key) is None:
                raise GrowthError(
                    f"{type(optimizer).__name__} keeps per-parameter state {key!r} that "
                    f"net2grow does not know how to carry across growth (known: "
                    f"{sorted(STATE_POWERS)}). Grow without optimizer=... and build a new "
                    f"optimizer, or register the key in net2grow.growth.optim.STATE_POWERS."
                )


def remapped_state(
    optimizer: torch.optim.Optimizer,
    p: nn.Parameter,
    steps: list[AxisStep],
    init: str,
    old_shape: tuple[int, ...] | None = None,
    mode: str = "scale",
) -> dict[str, object] | None:
    """The new state of ``p`` (not yet installed), or None when ``p`` has none.

    ``old_shape`` is the parameter's shape before growth (default: its current shape, for use
    before the parameter itself is grown). ``mode``: one of :data:`NEW_UNIT_STATES`, what the
    new units get.
    """
    if mode not in NEW_UNIT_STATES:
        raise GrowthError(f"optimizer_state must be one of {NEW_UNIT_STATES}, got {mode!r}")
    state = optimizer.state.get(p)
    if not state:
        return None
    shape = torch.Size(old_shape) if old_shape is not None else p.shape
    new: dict[str, object] = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape and value.dim() > 0:
            power = state_power(optimizer, key)
            if power is None:
                raise GrowthError(f"no known remapping for optimizer state {key!r}")
            if mode == "zero":  # old units kept, every new unit zero (as for fresh units)
                new[key] = grow_state(value, steps, init="zero", power=power)
            else:
                power = 0 if mode == "copy" else power  # power 0: the source's state as it is
                new[key] = grow_state(value, steps, init=init, power=power)
        else:
            new[key] = value  # step counts and other scalars are kept
    return new


def remap_after_growth(
    optimizer: torch.optim.Optimizer, network: nn.Module, changes: GrowthChanges
) -> None:
    """Fix ``optimizer`` after a growth it was not passed to (from a growth hook).

    Grown parameters keep their identity, so param groups stay valid; their state is remapped
    with the operation's unit mapping (state already carried over, by a growth passed
    ``optimizer=``, is left as it is). New parameters (``deepen``) are not added: use
    :func:`add_params`, or :func:`follow_growth` which does both.
    """
    params = dict(network.named_parameters())
    for name, steps in changes.tensors.items():
        p = params.get(name)
        if p is None or p not in optimizer.state:
            continue
        new = remapped_state(optimizer, p, steps, changes.init, changes.old_shapes.get(name))
        if new is not None:
            optimizer.state[p] = new


def follow_growth(
    optimizer: torch.optim.Optimizer,
    network: nn.Module,
    record: GrowthRecord,
    changes: GrowthChanges,
) -> None:
    """Do for ``optimizer`` what ``optimizer=`` would have done, after a growth made without it.

    Grown parameters' state is remapped (:func:`remap_after_growth`), and new parameters
    (``deepen``) that ``optimizer`` does not hold yet join the param group of the deepened
    layer's weight. Calling it after a growth that was passed ``optimizer=`` changes nothing. As a
    growth hook: ``net.register_growth_hook(functools.partial(follow_growth, opt, net))``.
    """
    remap_after_growth(optimizer, network, changes)
    params = dict(network.named_parameters())
    new = [params[n] for n in changes.new_parameters if n in params]
    missing = [p for p in new if param_group_of(optimizer, p) is None]
    if missing:
        like = getattr(network.get_submodule(record.layer), "weight", None)
        add_params(optimizer, missing, like if isinstance(like, nn.Parameter) else None)


def param_group_of(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict | None:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    return None


def add_params(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], like: nn.Parameter | None
) -> None:
    """Append new parameters to the param group that holds ``like`` (else the first group)."""
    group = param_group_of(optimizer, like) if like is not None else None
    group = group if group is not None else optimizer.param_groups[0]
    group["params"].extend(params)


def remove_params(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Undo :func:`add_params` (used when a refused operation rolls back)."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [q for q in group["params"] if id(q) not in ids]
    for p in params:
        optimizer.state.pop(p, None)


def param_names(
    model: nn.Module, optimizer: torch.optim.Optimizer, hint: str = ""
) -> list[list[str]]:
    """``model``'s names of the parameters of each of ``optimizer``'s param groups, in order.

    Raises ``GrowthError`` naming the group that holds a parameter ``model`` does not have
    (``hint`` is appended to the message).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise GrowthError(
                f"cannot save the optimizer: its param group {i} holds parameters of shapes "
                f"{missing} that are not part of the model{hint}"
            )
        groups.append([names[id(p)] for p in group["params"]])
    return groups
