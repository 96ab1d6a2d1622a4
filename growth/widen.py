"""The widen pass (Net2WiderNet): grow one space group and every layer coupled to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from .analysis import ChannelAnalysis
from .mapping import UnitMapping, axis_map, grown_layout
from .random import DeviceGenerators
from .rules import ModuleUpdate, module_rule_for


@dataclass
class PlannedModule:
    """One module's part in a growth operation: its update and the new tensors it gets."""

    name: str
    module: nn.Module
    update: ModuleUpdate
    values: dict[str, Tensor]


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters(recurse=False):
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def resolve(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(owner submodule, attribute name) of a dotted ``path`` relative to ``module``."""
    owner, _, leaf = path.rpartition(".")
    return (module.get_submodule(owner) if owner else module), leaf


def plan_updates(
    root: nn.Module, analysis: ChannelAnalysis, group: int, mapping: UnitMapping
) -> list[tuple[str, nn.Module, ModuleUpdate]]:
    """Ask every module whose input or output channels contain ``group`` how it grows."""
    spaces = analysis.spaces
    new_width = mapping.new_width
    plans = []
    for name, nodes in analysis.module_nodes.items():
        node: fx.Node = nodes[0]  # shared modules: layouts of all calls were joined
        in_layout = analysis.input_layout(node)
        out_layout = analysis.layouts.get(node)
        module = root.get_submodule(name)
        dtype = _dtype_of(module)
        in_map = axis_map(in_layout, spaces, group, mapping, dtype) if in_layout else None
        out_map = axis_map(out_layout, spaces, group, mapping, dtype) if out_layout else None
        if in_map is None and out_map is None:
            continue
        rule = module_rule_for(module)
        assert rule is not None  # modules without rules block their spaces
        in_size = grown_layout(in_layout, spaces, group, new_width).size if in_layout else None
        out_size = grown_layout(out_layout, spaces, group, new_width).size if out_layout else None
        update = rule.grow(module, in_map, out_map, in_size, out_size)
        if update is not None:
            plans.append((name, module, update))
    return plans


def compute_values(
    plans: list[tuple[str, nn.Module, ModuleUpdate]],
    *,
    init: str,
    noise: float,
    generators: DeviceGenerators,
) -> list[PlannedModule]:
    """New values of every grown tensor, computed on the tensors' own device, nothing installed."""
    from .transform import grow_value

    out = []
    for name, module, update in plans:
        values = {}
        for tname, growth in update.tensors.items():
            old = getattr(*resolve(module, tname))
            if old is None:
                continue
            values[tname] = grow_value(
                old.detach(),
                growth.steps,
                init=init,
                fresh=growth.fresh,
                noise=noise,
                generator=generators.on(old.device),
            )
        out.append(PlannedModule(name, module, update, values))
    return out
