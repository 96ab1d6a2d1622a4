"""The widen pass (Net2WiderNet): grow one space group and every layer coupled to it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from . import initializers, limits, protect, tied
from .analysis import ChannelAnalysis
from .changes import GrowthChanges
from .errors import GrowthError
from .generators import DeviceGenerators
from .heads import (
    check_head_growth,
    check_only_linear_paths,
    head_literal_values,
    head_mappings,
    head_shape,
    new_sizes,
    scale_producers,
)
from .limits import MAPPING_BYTES_PER_UNIT
from .mapping import AxisMap, UnitMapping, axis_map, build_unit_mapping, grown_layout, shape_mapping
from .optim import check_supported, remapped_state
from .rules import ModuleUpdate, TensorGrowth, module_rule_for
from .rules.residual_norm import check_normalised_widen
from .transform import AxisStep, grow_value
from .verify import check_preserved, reference_output

if TYPE_CHECKING:
    from .network import GrowableNetwork


def widen(
    net: GrowableNetwork,
    name: str,
    new_width: int,
    *,
    init: str,
    split: str,
    noise: float,
    generator: torch.Generator | None,
    optimizer: torch.optim.Optimizer | None,
    verify: bool,
    limit: float,
    optimizer_state: str = "scale",
    batch: Any = None,
    loss_fn: Any = None,
    heads: str = "heads",
) -> tuple[float | None, dict[str, Any], GrowthChanges]:
    """Give layer ``name`` of ``net`` ``new_width`` outputs; every coupled layer follows.

    The arguments have been checked (``GrowableNetwork.widen``). Returns the largest output
    change on the probe batch (None when not verified), the record's details and the changes,
    which the caller records. A refusal raises :class:`GrowthError` with ``net`` and
    ``optimizer`` as they were. Inits of :mod:`growth.initializers` (``"gradmax"``, ``"vt"``)
    start from ``"zero"``'s values, are adjusted before anything is installed, and are always
    verified.
    """
    base = initializers.base_init(init)
    old_width = net.width(name)
    blocked = net._blocked_reason(name)
    if blocked is not None:
        reason, error = blocked
        raise error(f"cannot widen {name!r}: {reason}")
    group, expand = net._group_of(name)
    info = net.analysis.spaces.info(group)
    if new_width % expand:
        raise GrowthError(
            f"{name!r} has {expand} output channels per input channel (depthwise multiplier): "
            f"width must be a multiple of {expand}"
        )
    new_units = new_width // expand
    if new_units % info.groups and not info.heads:  # heads: check_head_growth below
        raise GrowthError(
            f"{name!r} is coupled to a grouped convolution: width must be a multiple of "
            f"{info.groups * expand} (it grows by whole groups), got {new_width}"
        )
    check_normalised_widen(name, info, old_width, new_width, init, noise)
    head_sizes = None
    if info.heads:  # attention heads (growth.heads): whole heads or wider heads
        check_head_growth(name, info, new_units, heads, init, noise)
        if heads == "head_dim":
            check_only_linear_paths(net, net.analysis, group, name)
        head_sizes = new_sizes(info, new_units, heads)
    limits.check_growth_bytes(
        growth_bytes(net, net.analysis, group, new_units, optimizer),
        limit,
        f"widen({name!r}) from {old_width} to {new_width} units",
    )
    gens = DeviceGenerators(generator)
    device = next(net.get_submodule(name).parameters()).device
    producer = None
    if head_sizes is not None:
        mapping, producer = head_mappings(
            info, new_units, heads, split=split, generator=gens.mapping, device=device
        )
    else:
        mapping = build_unit_mapping(
            info.width,
            new_units,
            groups=info.groups,
            split=split,
            generator=gens.mapping,
            device=device,
        )
    plans = plan_updates(net, net.analysis, group, mapping)
    if producer is not None:
        scale_producers(plans, net.analysis, group, producer)
    if optimizer is not None:
        params = [getattr(*resolve(m, t)) for _, m, u in plans for t in u.tensors]
        check_supported(optimizer, [p for p in params if isinstance(p, nn.Parameter)])
    custom = base != init
    if custom:  # checked and its statistics gathered before anything changes
        prepared = initializers.prepare(
            net, name, init, plans, batch=batch, loss_fn=loss_fn
        )
    before = reference_output(net) if (verify or custom) and init != "random" else None
    planned = compute_values(plans, init=base, noise=noise, generators=gens)
    extra = initializers.adjust(prepared, planned, generators=gens) if custom else []
    # protected networks: frozen entries kept, new units' constraints (may refuse; nothing changed)
    guard = protect.plan_widen(net, name, planned, init)
    prefix = {id(m): n for n, m in net.named_modules()}
    # a tied tensor is reported under the name net.named_parameters()/state_dict() give it first
    canonical = {id(t): n for n, t in [*net.named_parameters(), *net.named_buffers()]}
    changes = GrowthChanges(init=base)
    with net._atomic() as tx:
        for pm in planned:
            for tname, value in pm.values.items():
                owner, leaf = resolve(pm.module, tname)
                p = getattr(owner, leaf)
                full = canonical.get(id(p)) or f"{prefix[id(pm.module)]}.{tname}".lstrip(".")
                steps = pm.update.tensors[tname].steps
                changes.tensors[full] = steps
                changes.old_shapes[full] = tuple(p.shape)
                if optimizer is not None and isinstance(p, nn.Parameter):
                    new_state = remapped_state(optimizer, p, steps, base, mode=optimizer_state)
                    if new_state is not None:
                        tx.set_state(optimizer, p, new_state)
                tx.set_tensor(owner, leaf, value)
            for attr, value in pm.update.attrs.items():
                tx.set_attr(*resolve(pm.module, attr), value)
        for owner, leaf, value in extra:  # tensors that change without growing (a bias)
            tx.set_tensor(owner, leaf, value)
        if guard is not None:
            guard.install(tx)
        rewrite_literals(net, tx, group, new_units, head_sizes)
        if before is None:  # not verified: shapes follow from the layouts, no forward
            _grow_recorded_shapes(net.analysis, group, new_units, head_sizes)
            err = None
        else:
            err = check_preserved(net, before, noise, name)
    details = {
        "init": init,
        "optimizer_state": optimizer_state,
        "split": split,
        "noise": noise,
        "coupled": [pm.name for pm in planned],
    }
    if head_sizes is not None:
        details["heads"], details["head_dim"] = head_sizes
    return err, details, changes


def rewrite_literals(
    net: GrowableNetwork,
    tx: Any,
    group: int,
    new_units: int,
    head_sizes: tuple[int, int] | None = None,
) -> None:
    """Rewrite the channel counts the graph holds as numbers (``analysis.literals``) for
    ``group`` grown to ``new_units`` units (and head counts and widths, for attention heads
    grown to ``head_sizes``), and recompile; the transaction undoes it."""
    analysis = net.analysis
    writes = []
    if head_sizes is not None:
        writes += head_literal_values(analysis, group, head_sizes)
    for node, where, layout in analysis.literals:
        new = grown_layout(layout, analysis.spaces, group, new_units).size
        if new != layout.size:
            writes.append((node, where, new))
    changed = False
    for node, (arg, item), new in writes:
        old_args = node.args
        args = list(old_args)
        if item is None:
            args[arg] = new
        else:
            args[arg] = type(args[arg])(new if i == item else v for i, v in enumerate(args[arg]))
        if tuple(args) != old_args:
            node.args = tuple(args)
            tx.on_rollback(lambda node=node, old_args=old_args: setattr(node, "args", old_args))
            changed = True
    if changed:
        net._recompile()


def _grow_recorded_shapes(
    analysis: ChannelAnalysis,
    group: int,
    new_units: int,
    head_sizes: tuple[int, int] | None = None,
) -> None:
    """Update every shape recorded in the graph after ``group`` grew to ``new_units`` units.

    Widening changes only the channel dimension of the tensors that carry the group, by an
    amount the analysis knows; the next analysis then runs without a forward pass.
    """
    for node, layout in analysis.layouts.items():
        if layout is None or node.meta.get("shape") is None:
            continue
        new = grown_layout(layout, analysis.spaces, group, new_units).size
        if new != layout.size:
            shape = list(node.meta["shape"])
            if layout.inner is not None and head_sizes is not None:
                shape = head_shape(layout, shape, head_sizes)
            else:
                shape[layout.dim] = new
            node.meta["shape"] = tuple(shape)


@dataclass
class PlannedModule:
    """One module's part in a growth operation: its update and the new tensors it gets."""

    name: str
    module: nn.Module
    update: ModuleUpdate
    values: dict[str, Tensor]


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of the maps ``module``'s rule gets: its own parameters', else its children's
    (a leaf layer holding only submodules, such as Swin's patch merging)."""
    for p in [*module.parameters(recurse=False), *module.parameters()]:
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
    for target, layout in analysis.attr_layouts.items():  # tensors read by get_attr: copied
        owner, leaf = resolve(root, target)
        amap = axis_map(layout, spaces, group, mapping, getattr(owner, leaf).dtype)
        if amap is not None:
            step = AxisStep(layout.dim, amap, "channel")
            plans.append((target, owner, ModuleUpdate(tensors={leaf: TensorGrowth([step])})))
    _grow_tied_once(root, analysis, plans)
    return plans


def _grow_tied_once(
    root: nn.Module, analysis: ChannelAnalysis, plans: list[tuple[str, nn.Module, ModuleUpdate]]
) -> None:
    """A tensor shared by several planned modules (tied weights, joined by the analysis) is
    grown once: the others' plans drop it after checking that they would grow it alike, or,
    for an embedding tied to its head, after moving the head's split (``growth.tied``)."""
    seen: dict[int, tuple[str, str, TensorGrowth]] = {}
    for name, module, update in plans:
        for tname in list(update.tensors):
            t = getattr(*resolve(module, tname))
            if t is None:
                continue
            first = seen.get(id(t))
            here = (name, tname, update.tensors[tname])
            if first is None:
                seen[id(t)] = here
                continue
            if not _same_growth(first[2], here[2]):
                if not tied.move_split_to_norm(root, analysis, plans, first, here):
                    raise GrowthError(
                        f"{first[0]}.{first[1]} is {name}.{tname} (one tensor, tied weights), "
                        f"and the two layers would grow it differently; untie them (give each "
                        f"layer its own copy) or grow layers that are not coupled to them"
                    )
                copied = first[2] if first[2].steps[0].role == "out" else here[2]
                first[2].steps = copied.steps  # the table keeps the embedding's copies
            del update.tensors[tname]


def _same_growth(a: TensorGrowth, b: TensorGrowth) -> bool:
    if a.fresh != b.fresh or len(a.steps) != len(b.steps):
        return False
    for x, y in zip(a.steps, b.steps):
        if (x.dim, x.role, x.groups) != (y.dim, y.role, y.groups):
            return False
        for u, v in ((x.amap.source, y.amap.source), (x.amap.original, y.amap.original)):
            if u.shape != v.shape or (u.device.type != "meta" and not torch.equal(u, v)):
                return False
        if x.amap.share.shape != y.amap.share.shape:
            return False
        if x.amap.share.device.type != "meta" and not torch.equal(x.amap.share, y.amap.share):
            return False
    return True


def compute_values(
    plans: list[tuple[str, nn.Module, ModuleUpdate]],
    *,
    init: str,
    noise: float,
    generators: DeviceGenerators,
) -> list[PlannedModule]:
    """New values of every grown tensor, computed on the tensors' own device, nothing installed."""
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


def grown_shape(shape: tuple[int, ...], steps: list[AxisStep]) -> tuple[int, ...]:
    """The shape of a tensor of ``shape`` after ``steps`` (as ``transform.grow_value`` makes it)."""
    new = list(shape)
    for step in steps:
        new[step.dim] = step.amap.new_size // step.groups
    return tuple(new)


def _state_tensors(optimizer: torch.optim.Optimizer | None, p: Tensor) -> list[Tensor]:
    """The optimizer state tensors of ``p`` that grow with it (shaped like it)."""
    if optimizer is None or not isinstance(p, nn.Parameter):
        return []
    state = optimizer.state.get(p) or {}
    return [
        v for v in state.values() if isinstance(v, Tensor) and v.dim() > 0 and v.shape == p.shape
    ]


def growth_bytes(
    root: nn.Module,
    analysis: ChannelAnalysis,
    group: int,
    new_units: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Bytes that growing ``group`` to ``new_units`` units would allocate; nothing is allocated.

    The count covers the new value of every tensor that grows, the optimizer state that follows
    it and the index maps of the mapping. The rules are asked with a mapping of ``meta`` tensors,
    so the shapes are exactly those of the real operation. A rule that cannot work on ``meta``
    tensors (it reads the mapping's values) gets a bound instead: every tensor of a coupled module
    scaled by the growth of the dimensions it reads and writes.
    """
    info = analysis.spaces.info(group)
    total = new_units * MAPPING_BYTES_PER_UNIT
    try:
        plans = plan_updates(
            root, analysis, group, shape_mapping(info.width, new_units, info.groups)
        )
    except GrowthError:
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError):
        return total + _bound_bytes(root, analysis, group, new_units, optimizer)
    maps: dict[int, AxisMap] = {}
    for _, module, update in plans:
        for tname, tgrowth in update.tensors.items():
            old = getattr(*resolve(module, tname))
            if old is None:
                continue
            numel = math.prod(grown_shape(tuple(old.shape), tgrowth.steps))
            total += numel * old.element_size()
            total += sum(numel * s.element_size() for s in _state_tensors(optimizer, old))
            for step in tgrowth.steps:
                maps[id(step.amap)] = step.amap
    for amap in maps.values():
        total += amap.new_size * (8 + 1 + amap.share.element_size())
    return total


def _bound_bytes(
    root: nn.Module,
    analysis: ChannelAnalysis,
    group: int,
    new_units: int,
    optimizer: torch.optim.Optimizer | None,
) -> int:
    """Upper estimate of :func:`growth_bytes` from the layouts alone (no rule is asked)."""
    spaces = analysis.spaces
    total = 0
    for name, nodes in analysis.module_nodes.items():
        ratio = 1.0
        for layout in (analysis.input_layout(nodes[0]), analysis.layouts.get(nodes[0])):
            if layout is None or not any(spaces.find(s.space) == group for s in layout.segments):
                continue
            ratio *= grown_layout(layout, spaces, group, new_units).size / max(layout.size, 1)
        if ratio == 1.0:
            continue
        module = root.get_submodule(name)
        for t in [*module.parameters(), *module.buffers()]:
            per = t.element_size() + sum(s.element_size() for s in _state_tensors(optimizer, t))
            total += math.ceil(t.numel() * ratio) * per
    return total
