"""A module's tensors and train/eval flags as resume-file data, and the checks that saved
tensors fit a module."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ...growth import GrowableNetwork
from .errors import ResumeMismatchError

__all__ = [
    "check_state_dict",
    "detached_copy",
    "load_module_state",
    "module_state",
    "tensor_layout",
]


def tensor_layout(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{name: (shape, dtype)}`` of a ``state_dict``: what two architectures must share."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def module_state(model: nn.Module) -> dict[str, Any]:
    """A copy of ``model``'s ``state_dict`` and the ``training`` flag of each of its modules."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [bool(m.training) for m in model.modules()],
    }


def load_module_state(model: nn.Module, saved: dict[str, Any]) -> None:
    """Put :func:`module_state`'s output into ``model`` (checked by :func:`check_state_dict`)."""
    model.load_state_dict(saved["state"])
    for m, flag in zip(model.modules(), saved["training"]):
        m.training = flag


def check_state_dict(model: nn.Module, state: dict[str, Any], where: str) -> None:
    """Raise :class:`ResumeMismatchError` unless ``state`` has ``model``'s tensor names, shapes
    and dtypes."""
    ours = tensor_layout(model.state_dict())
    theirs = tensor_layout(state)
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ResumeMismatchError(
            f"{where}: the resume file's tensors do not fit the strategy's model (another "
            f"architecture); differing: {diff[:8]}"
        )


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its growth hooks (as LwF's own copies behave)."""
    if isinstance(model, GrowableNetwork):
        return model.copy_without_hooks()
    return copy.deepcopy(model)
