"""Applying axis maps to tensors: grown parameter values and grown optimizer state.

A parameter's growth is a list of :class:`AxisStep` s, one per grown dimension, each with a
*role* that fixes how values and gradients follow the unit mapping:

- ``"out"``: the dimension indexes a layer's output units (a weight's rows, its bias). Copies
  take their source's values; under ``init="zero"``/``"random"`` new units are drawn fresh.
- ``"in"``: the dimension indexes the units a layer reads (a weight's columns). Copies carry
  ``share`` of their source's value (Net2WiderNet's division), zero or random for fresh units.
- ``"channel"``: per-channel parameters and buffers (BatchNorm, depthwise kernels): copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .mapping import AxisMap

INITS = ("net2net", "zero", "random")
ROLES = ("out", "in", "channel")


@dataclass(frozen=True)
class AxisStep:
    """Grow dimension ``dim`` of a tensor by ``amap`` in ``role``.

    ``groups > 1`` (only with role ``"in"``) means a grouped convolution's weight: dimension
    ``dim`` holds the inputs of one group, and each output row reads its own group's inputs.
    """

    dim: int
    amap: AxisMap
    role: str
    groups: int = 1


def _bcast(vec: Tensor, t: Tensor, dim: int) -> Tensor:
    shape = [1] * t.dim()
    shape[dim] = -1
    return vec.view(shape)


def _grouped_select(t: Tensor, step: AxisStep, vec: Tensor | None = None) -> Tensor:
    """Select (and scale by ``vec``) a grouped conv weight's input columns group by group."""
    g = step.groups
    a_old = t.shape[1]
    new_in = step.amap.new_size
    a_new = new_in // g
    idx = step.amap.source.view(g, a_new) - torch.arange(g, device=t.device)[:, None] * a_old
    tg = t.reshape(g, t.shape[0] // g, a_old, *t.shape[2:])
    index = idx.view(g, 1, a_new, *([1] * (t.dim() - 2))).expand(
        g, tg.shape[1], a_new, *t.shape[2:]
    )
    out = torch.gather(tg, 2, index)
    if vec is not None:
        out.mul_(vec.view(g, 1, a_new, *([1] * (t.dim() - 2))).to(out.dtype))
    return out.reshape(t.shape[0], new_in // g, *t.shape[2:])


def _select(t: Tensor, step: AxisStep, vec: Tensor | None = None) -> Tensor:
    if step.groups > 1:
        return _grouped_select(t, step, vec)
    keep = step.amap.prefix
    if keep:  # leading old positions are copied as one block; only the rest is gathered
        head = t.narrow(step.dim, 0, keep)
        tail = t.index_select(step.dim, step.amap.source[keep:])
        out = torch.cat([head, tail], dim=step.dim)
    else:
        out = t.index_select(step.dim, step.amap.source)
    if vec is not None:
        out.mul_(_bcast(vec.to(out.dtype), out, step.dim))  # out is a fresh tensor
    return out


def _ordered(steps: list[AxisStep]) -> list[AxisStep]:
    # Columns first, rows last: fresh rows are then drawn at their final width.
    return sorted(steps, key=lambda s: s.role != "in")


def grow_value(
    t: Tensor,
    steps: list[AxisStep],
    *,
    init: str,
    fresh: str,
    noise: float,
    generator: torch.Generator | None,
) -> Tensor:
    """The grown value of parameter or buffer ``t``.

    ``fresh`` says how units with no source are drawn in an ``"out"`` step: ``"random"`` (weights,
    at the scale of the existing values) or ``"zeros"`` (biases).
    """
    needs_scale = init != "net2net" or noise > 0
    scale = _value_scale(t) if needs_scale else 0.0
    for step in _ordered(steps):
        amap = step.amap
        if step.role == "channel":
            t = _select(t, step)
        elif step.role == "in":
            if init == "net2net":
                t = _select(t, step, amap.share)
            else:
                t = _select(t, step, amap.original.to(t.dtype))
                if init == "random":
                    rnd = torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
                    mask = (
                        _bcast(amap.original, t, step.dim)
                        if step.groups == 1
                        else _grouped_mask(amap, t, step.groups)
                    )
                    t = torch.where(mask, t, rnd * scale)
        else:  # "out"
            t = _select(t, step)
            keep = _bcast(amap.original, t, step.dim)
            if init == "net2net":
                if noise > 0 and fresh == "random":
                    rnd = torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
                    t = torch.where(keep, t, t + noise * scale * rnd)
            elif fresh == "random":
                rnd = torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
                t = torch.where(keep, t, rnd * scale)
            else:
                t = torch.where(keep, t, torch.zeros((), device=t.device, dtype=t.dtype))
    return t


def _value_scale(t: Tensor) -> Tensor | float:
    """Scale of fresh random values: the standard deviation of the existing ones (on device)."""
    if t.numel() < 2:
        return 1e-2
    return t.detach().float().std().clamp_min(1e-8).to(t.dtype)


def _grouped_mask(amap: AxisMap, t: Tensor, groups: int) -> Tensor:
    a_new = amap.new_size // groups
    orig = amap.original.view(groups, 1, a_new).expand(groups, t.shape[0] // groups, a_new)
    return orig.reshape(t.shape[0], a_new, *([1] * (t.dim() - 2)))


def grow_state(t: Tensor, steps: list[AxisStep], *, init: str, power: int) -> Tensor:
    """The grown optimizer state tensor ``t`` of a parameter grown by ``steps``.

    The state of a replicated unit follows its gradient. Right after an exact widening every copy
    of a unit computes the same activation, so a consumer's columns see the gradient of the old
    column unchanged, while a producer's rows (and the unit's per-channel parameters) see the old
    gradient times the copy's ``share`` (the unit's outgoing weight was scaled by it, and the
    back-propagated signal with it). A state accumulating ``gradient**power`` (momentum: 1, Adam's
    second moment: 2, RMSprop's momentum of normalised steps: 0) is scaled by ``share**power``.
    Fresh units (``init="zero"``/``"random"``) start from zero state.
    """
    for step in _ordered(steps):
        amap = step.amap
        if init != "net2net":
            t = _select(t, step, amap.original.to(t.dtype))
        elif step.role == "in" or power == 0:
            t = _select(t, step)
        else:
            t = _select(t, step, amap.share**power)
    return t
