"""Parameter counts of planned growth, for growth under a budget (nothing is grown).

Widening: the rules are asked how every coupled tensor grows with a unit mapping of ``meta``
tensors (as ``widen``'s memory check does), so the counts are those of the real operation and
nothing is copied or allocated. Deepening: the new layer is built on ``meta`` tensors.

- :func:`growth_group`: the coupled group a layer widens with (its id, units and step);
- :class:`ParameterModel` / :func:`planned_parameters`: parameters after widening several
  groups at once;
- :func:`deepen_parameters`: parameters ``deepen`` would add;
- :func:`params_after_widen` / :func:`params_after_deepen`: parameters after one operation,
  planned, or measured on a copy without growth hooks when a rule cannot plan on ``meta``
  tensors (a refusal then raises the engine's own :class:`~growth.errors.GrowthError`).

Group ids name groups of the network's current analysis: they are valid until it next grows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .arguments import check_deepen_options
from .deepen import find_chain, meta_copy, new_layer, output_item
from .errors import GrowthError
from .mapping import shape_mapping
from .widen import grown_shape, plan_updates, resolve

if TYPE_CHECKING:
    from .network import GrowableNetwork


@dataclass(frozen=True)
class GrowthGroup:
    """The coupled group of a layer's output units: every layer that widens with it.

    ``id``: the group (a key for :class:`ParameterModel`); ``expand``: output positions of the
    layer per unit of the group (a depthwise multiplier, else 1), so the layer's width is
    ``units * expand``; ``units``: the group's current units; ``step``: units grow by multiples
    of it (the group count of grouped convolutions reading it, else 1).
    """

    id: int
    expand: int
    units: int
    step: int


def growth_group(net: GrowableNetwork, layer: str) -> GrowthGroup:
    """The group layer ``layer``'s output belongs to; ``GrowthError`` for a name that is not a
    layer of ``net`` or a layer without a single growable output."""
    net._layer_rule(layer)  # the engine's refusal of unknown names and of non-layers
    group, expand = net._group_of(layer)
    info = net.analysis.spaces.info(group)
    return GrowthGroup(group, expand, info.width, info.groups)


class ParameterModel:
    """Parameter counts of ``net`` after widening several groups at once, from the planned
    shapes: nothing copied or allocated.

    Built at ``units`` (group id -> new unit count, at least the current one): the change of
    every parameter dimension per group there. :meth:`count` at those units is exact; at other
    unit counts each change is scaled linearly (layouts are sums of segments, so sizes are
    affine in a group's units) and rounded up, so it never undercounts; changes of one dimension
    by several groups (concatenations) add up. Whether the engine accepts the widening (blocked
    groups, widths that are no multiple of a group's step) is not checked. A rule that cannot
    plan on ``meta`` tensors raises (whatever it raises).
    """

    def __init__(self, net: GrowableNetwork, units: Mapping[int, int]) -> None:
        spaces = net.analysis.spaces
        self.base = net.num_parameters()
        self.old = {k: spaces.info(k).width for k in units}
        self.at = dict(units)
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.deltas: dict[int, dict[int, list[int]]] = {}  # param id -> group -> per-dim change
        for k, n in units.items():
            info = spaces.info(k)
            for _, module, update in plan_updates(
                net, net.analysis, k, shape_mapping(info.width, n, info.groups)
            ):
                for tname, growth in update.tensors.items():
                    t = getattr(*resolve(module, tname))
                    if not isinstance(t, nn.Parameter):
                        continue
                    shape = tuple(t.shape)
                    new = grown_shape(shape, growth.steps)
                    self.shapes[id(t)] = shape
                    self.deltas.setdefault(id(t), {})[k] = [a - b for a, b in zip(new, shape)]

    def count(self, units: Mapping[int, int]) -> int:
        """Parameters after widening every group ``k`` to ``units[k]`` units (groups the model
        was built for and ``units`` leaves out keep their width)."""
        total = self.base
        for pid, shape in self.shapes.items():
            dims = list(shape)
            for k, delta in self.deltas[pid].items():
                grown, planned = units.get(k, self.old[k]) - self.old[k], self.at[k] - self.old[k]
                if grown == planned:
                    dims = [a + b for a, b in zip(dims, delta)]
                    continue
                for d, dd in enumerate(delta):
                    if dd:
                        dims[d] += -(-dd * grown // planned)  # rounded up: never undercounts
            total += math.prod(dims) - math.prod(shape)
        return total


def planned_parameters(net: GrowableNetwork, units: Mapping[int, int]) -> int:
    """Parameters of ``net`` after widening every group ``k`` of ``units`` to ``units[k]`` units
    (see :class:`ParameterModel`), counted from the planned shapes."""
    return ParameterModel(net, units).count(units)


def deepen_parameters(net: GrowableNetwork, layer: str, kind: str = "identity") -> int:
    """Parameters ``net.deepen(layer, kind=kind)`` would add, counted without building them
    (the new layer is built on ``meta`` tensors; deepen inserts no BatchNorm). Raises
    ``GrowthError`` where deepen would refuse to build the layer (idempotence of an identity's
    activation is not checked)."""
    module, rule = net._layer_rule(layer)
    width = int(rule.width(module))
    check_deepen_options(layer, kind, None)
    nodes = net.analysis.module_nodes[layer]
    new = new_layer(rule, meta_copy(module), width, kind)
    if new is None or len(nodes) != 1:
        raise GrowthError(f"cannot deepen {layer!r}")
    one = sum(p.numel() for p in new.parameters())
    chain = find_chain(net, output_item(layer, nodes[0]))
    act = 0 if chain.activation is None else sum(p.numel() for p in chain.activation.parameters())
    return (2 * one if kind == "residual" else one) + act


def params_after_widen(
    net: GrowableNetwork, layer: str, width: int, *, init: str | None = None
) -> int:
    """Parameters of ``net`` after ``net.widen(layer, width, init=init)``: planned, or measured
    on :meth:`~growth.GrowableNetwork.copy_without_hooks` when a rule cannot plan on ``meta``
    tensors or the engine refuses (its ``GrowthError`` is then raised)."""
    try:
        g = growth_group(net, layer)
        return planned_parameters(net, {g.id: -(-width // g.expand)})
    except Exception:  # measured below: a refusal raises the engine's own message
        pass
    return net.copy_without_hooks().widen(layer, width, init=init, verify=False).params_after


def params_after_deepen(net: GrowableNetwork, layer: str, kind: str = "identity") -> int:
    """Parameters of ``net`` after ``net.deepen(layer, kind=kind)``: planned, or measured on
    :meth:`~growth.GrowableNetwork.copy_without_hooks` when that fails (a refusal then raises
    the engine's ``GrowthError``)."""
    try:
        return net.num_parameters() + deepen_parameters(net, layer, kind)
    except Exception:  # measured below: a refusal raises the engine's own message
        pass
    return net.copy_without_hooks().deepen(layer, kind=kind, verify=False).params_after
