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
    """Give ``p`` a new value (any shape), keeping its identity (and a fresh gradient accumulator
    when the shape changes: :func:`drop_grad_accumulator`)."""
    if value.shape != p.shape:
        drop_grad_accumulator(p)
    p.data = value


def drop_grad_accumulator(p: nn.Parameter) -> None:
    """Make autograd build a new gradient accumulator for ``p``, whose shape changed.

    Autograd caches one gradient accumulator per parameter, with the parameter's shape, while
    anything holds it (the graph of a ``loss`` from before growth, a DDP wrapper's reducer); it
    would reject the next gradient of the new shape. Autograd drops it when ``.data`` changes
    dtype, so the data take another dtype for an instant (no copy is made).
    """
    data = p.data
    other = torch.float64 if data.dtype != torch.float64 else torch.float32
    p.data = torch.empty(0, dtype=other, device=data.device)
    p.data = data


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
