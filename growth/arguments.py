"""Checking the arguments of ``GrowableNetwork(...)``, ``widen`` and ``deepen``.

Every check runs before anything is allocated or changed, and a bad value raises a
:class:`~growth.errors.GrowthError` whose message names the problem and the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .deepen import KINDS
from .errors import GrowthError
from .initializers import CUSTOM_INITS
from .mapping import SPLITS
from .optim import NEW_UNIT_STATES
from .transform import INITS as ENGINE_INITS
from .verify import DEFAULT_TOLERANCE

#: Every ``widen`` init: the engine's and those of :mod:`growth.initializers`.
INITS = (*ENGINE_INITS, *CUSTOM_INITS)

#: Largest width ``widen`` accepts: no tensor dimension can be longer (torch indexes in int64).
MAX_UNITS = 2**62


def _is(value: object, kind: type) -> bool:
    """``value`` is a number of ``kind`` (``numbers.Real``, ``numbers.Integral``), not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


def as_inputs(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``example_inputs`` as a tuple of tensors, each with a non-empty batch dimension."""
    fix = (
        "pass a batch of real inputs like the model's, e.g. example_inputs=torch.randn(16, 4) for "
        "a model taking (batch, 4) tensors, or a tuple of tensors for several inputs"
    )
    if isinstance(example_inputs, Tensor):
        inputs: tuple[Tensor, ...] = (example_inputs,)
    elif isinstance(example_inputs, (list, tuple)):
        if not example_inputs:
            raise GrowthError(f"example_inputs is an empty {type(example_inputs).__name__}: {fix}")
        for i, t in enumerate(example_inputs):
            if not isinstance(t, Tensor):
                raise GrowthError(
                    f"example_inputs[{i}] is a {type(t).__name__}, not a tensor: {fix} "
                    f"(non-tensor arguments cannot be traced as inputs; set them in the model)"
                )
        inputs = tuple(example_inputs)
    else:
        raise GrowthError(
            "example_inputs must be a tensor or a tuple of tensors shaped like the model's inputs "
            f"(with a batch dimension), got {type(example_inputs).__name__}: {fix}"
        )
    for i, t in enumerate(inputs):
        where = "example_inputs" if len(inputs) == 1 else f"example_inputs[{i}]"
        if t.dim() == 0:
            raise GrowthError(
                f"{where} is a 0-dim tensor: inputs need a batch dimension; pass e.g. "
                f"x.unsqueeze(0) or a batch of samples"
            )
        if t.shape[0] == 0:
            raise GrowthError(
                f"{where} has an empty batch (shape {tuple(t.shape)}): pass at least one sample "
                f"(up to probe_size of them are kept to verify every growth)"
            )
        if t.is_meta:
            raise GrowthError(
                f"{where} is on the meta device and holds no values: pass real tensors "
                f"(e.g. torch.randn(...)) on the model's device"
            )
        if t.layout != torch.strided:
            raise GrowthError(f"{where} is a {t.layout} tensor: pass a dense tensor (x.to_dense())")
    return inputs


def check_network_options(
    tolerance: object, probe_size: object, leaf_modules: object
) -> tuple[int, tuple[type[nn.Module], ...]]:
    """Check ``GrowableNetwork``'s keyword arguments; returns ``(probe_size, leaf_modules)``."""
    if not _is(tolerance, numbers.Real) or math.isnan(tolerance) or tolerance < 0:
        raise GrowthError(
            f"tolerance must be a number >= 0 (largest output change accepted, relative to "
            f"the output scale), got {tolerance!r}; the default is {DEFAULT_TOLERANCE:g}"
        )
    if not _is(probe_size, numbers.Integral):
        raise GrowthError(f"probe_size must be an int >= 1, got {probe_size!r}")
    if probe_size < 1:
        raise GrowthError(
            f"probe_size must be an int >= 1 (samples kept to verify growth), got {probe_size}"
        )
    if isinstance(leaf_modules, type) or not isinstance(leaf_modules, Iterable):
        raise GrowthError(
            f"leaf_modules must be a list of module types, got {leaf_modules!r}; "
            f"e.g. leaf_modules=[MyBlock]"
        )
    leaves = tuple(leaf_modules)
    for leaf in leaves:
        if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
            raise GrowthError(
                f"leaf_modules must hold nn.Module subclasses (types, not instances), got {leaf!r}"
            )
    return int(probe_size), leaves


def probe_failure(model: nn.Module, inputs: Sequence[Tensor], exc: Exception) -> str:
    """Why the model failed on ``example_inputs``, and what to do about it."""
    params = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    dtypes = sorted({str(p.dtype) for p in params})
    devices = sorted({str(p.device) for p in params})
    name = type(model).__name__
    what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    hints = []
    if len(dtypes) == 1:
        dtype = params[0].dtype
        for i, t in enumerate(inputs):
            if t.dtype == dtype:
                continue
            where = "example_inputs" if len(inputs) == 1 else f"example_inputs[{i}]"
            if t.is_floating_point():
                hints.append(
                    f"{where} is {t.dtype} but the model's parameters are {dtype}: cast the "
                    f"inputs (x.to({dtype})) or the model (model.to({t.dtype})) so they match"
                )
            else:
                hints.append(
                    f"{where} is {t.dtype} but the model's parameters are {dtype}: if the model "
                    f"expects floating-point inputs, pass x.to({dtype})"
                )
    elif len(dtypes) > 1:
        hints.append(f"the model's parameters mix dtypes ({', '.join(dtypes)})")
    if len(devices) > 1:
        hints.append(
            f"the model's parameters are on several devices ({', '.join(devices)}); the probe "
            f"batch is kept on the first one: put the model on one device"
        )
    advice = "; ".join(hints) or (
        "pass example_inputs the model accepts (right shape, dtype and device for its forward)"
    )
    return f"{name} failed on example_inputs ({what}). {advice}. Nothing was changed."


def check_common(optimizer: object, verify: object) -> None:
    """The arguments ``widen`` and ``deepen`` share: ``optimizer`` and ``verify``."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GrowthError(
            f"optimizer must be a torch.optim.Optimizer over this network's parameters (or "
            f"None), got {type(optimizer).__name__}"
        )
    if not isinstance(verify, bool):
        raise GrowthError(f"verify must be True or False, got {verify!r}")


def _big(n: int) -> str:
    """A huge int in a few characters (``1.2e+300``)."""
    digits = str(n)
    return digits if len(digits) <= 12 else f"{digits[0]}.{digits[1:3]}e+{len(digits) - 1}"


def target_width(name: str, old: int, width: object, factor: object) -> int:
    """The width ``widen(name, width, factor=factor)`` asks for, from layer ``name``'s ``old``."""
    if (width is None) == (factor is None):
        raise GrowthError(f"widen({name!r}): give exactly one of width= and factor=")
    if width is not None:
        if not _is(width, numbers.Integral):
            raise GrowthError(
                f"width must be an int, got {width!r} ({type(width).__name__}): give the new "
                f"number of output units of {name!r} (now {old}), e.g. width={2 * old}, or "
                f"factor=2.0"
            )
        new = int(width)
    else:
        if not _is(factor, numbers.Real) or not math.isfinite(factor) or factor <= 1:
            raise GrowthError(
                f"factor must be a number > 1, got {factor!r}: a finite ratio of new to "
                f"current width of {name!r} (now {old}), e.g. factor=2.0 for {2 * old} units, "
                f"or width=<units>"
            )
        product = old * float(factor)
        if not product <= MAX_UNITS:  # also inf
            raise GrowthError(
                f"factor={float(factor):g} would give {name!r} {old} x {float(factor):g} "
                f"units: no tensor dimension can be that long (at most 2**62); ask for a "
                f"smaller factor"
            )
        new = int(round(product))
    if new < old:
        raise GrowthError(
            f"cannot shrink {name!r} from {old} to {new} units: net2grow only grows; ask for "
            f"more than {old} units"
        )
    if new == old:
        raise GrowthError(f"{name!r} already has width {old}: ask for more units")
    if new > MAX_UNITS:
        raise GrowthError(
            f"cannot widen {name!r} to {_big(new)} units: no tensor dimension can be that long "
            f"(at most 2**62 here); ask for a smaller width"
        )
    return new


def check_widen_options(init: object, split: object, noise: object, generator: object) -> None:
    """``widen``'s ``init``, ``split``, ``noise`` and ``generator``."""
    if not isinstance(init, str) or init not in INITS:
        raise GrowthError(
            f"init must be one of {ENGINE_INITS} (Net2Net's) or {CUSTOM_INITS} "
            f"(growth.initializers), got {init!r}"
        )
    if not isinstance(split, str) or split not in SPLITS:
        raise GrowthError(f"split must be one of {SPLITS}, got {split!r}")
    if not _is(noise, numbers.Real) or not math.isfinite(noise) or noise < 0:
        raise GrowthError(
            f"noise must be a non-negative number, got {noise!r}: a finite scale relative to "
            f"the weights' spread, e.g. noise=0.01, or 0 for none"
        )
    if noise and init != "net2net":
        raise GrowthError(
            "noise breaks the symmetry of replicated units: use it with init='net2net'"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise GrowthError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def check_new_unit_options(init: str, optimizer_state: object, batch: object) -> None:
    """``widen``'s ``optimizer_state`` and ``batch`` (``batch`` only with ``init="gradmax"``,
    which needs one)."""
    if not isinstance(optimizer_state, str) or optimizer_state not in NEW_UNIT_STATES:
        raise GrowthError(
            f"optimizer_state must be one of {NEW_UNIT_STATES}, got {optimizer_state!r}"
        )
    if init == "gradmax" and batch is None:
        raise GrowthError(
            "init='gradmax' needs a batch of training data: widen(name, width, "
            "init='gradmax', batch=(inputs, targets), loss_fn=...)"
        )
    if init != "gradmax" and batch is not None:
        raise GrowthError(f"batch= is for init='gradmax' (it chooses the new units' "
                          f"weights from its gradients), not init={init!r}")


def check_deepen_options(name: str, kind: object, activation: object) -> None:
    """``deepen``'s ``kind`` and ``activation``."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise GrowthError(f"deepen({name!r}): kind must be one of {KINDS}, got {kind!r}")
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        raise GrowthError(
            f"deepen({name!r}): activation must be an nn.Module instance, got the class "
            f"{activation.__name__}: pass activation={activation.__name__}() instead"
        )
    if activation is not None and not isinstance(activation, nn.Module):
        raise GrowthError(
            f"deepen({name!r}): activation must be an nn.Module instance (e.g. nn.ReLU()), "
            f"got {activation!r}"
        )
