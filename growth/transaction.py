"""All-or-nothing changes to a network and its optimizer: every change can be rolled back."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_MISSING = object()


class Transaction:
    """Records every change made through it so that :meth:`rollback` restores the exact state.

    Parameters keep their identity: their ``.data`` is swapped (optimizers, Avalanche's name-based
    optimizer update and user references stay valid), and gradients of grown parameters are
    cleared (their shape changed).
    """

    def __init__(self) -> None:
        self._undo: list[Any] = []

    def set_tensor(self, module: nn.Module, name: str, value: Tensor) -> None:
        if name in module._parameters:
            p = module._parameters[name]
            assert p is not None
            old_data, old_grad = p.data, p.grad
            self._undo.append(lambda: _restore_param(p, old_data, old_grad))
            swap_data(p, value)
            p.grad = None
        else:
            old = module._buffers[name]
            self._undo.append(lambda: module._buffers.__setitem__(name, old))
            module._buffers[name] = value

    def set_attr(self, module: Any, name: str, value: Any) -> None:
        old = getattr(module, name, _MISSING)
        self._undo.append(lambda: _restore_attr(module, name, old))
        setattr(module, name, value)

    def set_state(self, optimizer: torch.optim.Optimizer, p: nn.Parameter, state: dict) -> None:
        old = optimizer.state.get(p, _MISSING)
        self._undo.append(lambda: _restore_state(optimizer, p, old))
        optimizer.state[p] = state

    def on_rollback(self, fn: Any) -> None:
        """Register a custom undo step (run in reverse order of registration)."""
        self._undo.append(fn)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def swap_data(p: nn.Parameter, value: Tensor) -> None:
    """Give ``p`` a new value (any shape), keeping its identity.

    Autograd caches one gradient accumulator per parameter, with the parameter's shape; it is
    kept alive by any graph still referenced (a ``loss`` from before growth) and would reject the
    next gradient of the new shape. Setting data of another dtype first makes autograd drop it.
    """
    if value.shape != p.shape:
        other = torch.float64 if p.dtype != torch.float64 else torch.float32
        p.data = torch.empty(0, dtype=other, device=p.device)
    p.data = value


def _restore_param(p: nn.Parameter, data: Tensor, grad: Tensor | None) -> None:
    swap_data(p, data)
    p.grad = grad


def _restore_attr(obj: Any, name: str, old: Any) -> None:
    if old is _MISSING:
        delattr(obj, name)
    else:
        setattr(obj, name, old)


def _restore_state(optimizer: torch.optim.Optimizer, p: nn.Parameter, old: Any) -> None:
    if old is _MISSING:
        optimizer.state.pop(p, None)
    else:
        optimizer.state[p] = old
