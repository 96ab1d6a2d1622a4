"""Protected growth for continual learning: old units frozen, new units that learn.

``net.protect(mode)`` freezes every unit the growable layers have now; the units that widening adds
afterwards (``net.widen(..., init="zero")``: small random incoming, zero outgoing weights) are
free. A frozen unit keeps its incoming weights, its bias and its per-channel parameters and
statistics (BatchNorm affine parameters and running statistics, depthwise kernels) exactly:

- the gradient of every frozen entry is masked (a hook on the parameter), and after every step
  of any ``torch.optim`` optimizer holding the parameter its frozen entries are written back
  (a global step post-hook): Adam's moments, momentum and decoupled weight decay cannot move
  them, and optimizers that Avalanche rebuilds are covered without being registered;
- after every forward pass in training mode, the running statistics of frozen BatchNorm
  channels are written back.

Modes (``net.protect(mode)``, or ``net.widen(name, width, protect=mode)`` for one layer):

- ``"lateral"`` (Progressive-Networks-like): new units read old and new units; old units never
  read new ones (their weights from new units exist, are zero, and stay zero), so in eval mode
  every old unit computes, bit for bit and through any training, what it computed right after
  the growth (and, up to float rounding where new zero-weight inputs land between old ones in a
  sum, such as a concatenation, what it computed before it: growth is exact to the tolerance).
- ``"independent"`` (DER-like): in addition, new units read only units that are not frozen
  (block-diagonal growth: their weights from frozen units are zero and stay zero); units that
  read the network's input (or any unit that is not a growable layer's) read it as before.
  Widen producers before consumers (``growth_order``), or the later layers' new units start
  reading nothing but zeros from the layers grown after them.

The output layer is never frozen by default (it is not in ``net.layers``): its weights from old
and new units all train. Growth after growth works: the new units of one step are frozen by the
next ``protect``.

State lives in ``net.protection``, a plain ``nn.Module`` of buffers (so that checkpoints store it
and ``load`` brings it back, active): ``mode`` (0-dim uint8), and three trees of plain modules
that mirror the network's module paths, ``mask.<tensor>`` (bool, True = frozen entry),
``value.<tensor>`` (the frozen values, zeros elsewhere) and ``units.<layer>`` (bool per output
unit of a layer, True = frozen unit).

Cost: one bool mask and one value copy per protected tensor (memory and checkpoint size ~2x for
the frozen layers); per backward, one ``masked_fill`` per protected parameter; per optimizer step,
one in-place ``torch.where`` per protected parameter the optimizer holds, plus a walk over the
protection buffers (a Python loop over the protected tensors); per training-mode forward, the
same for the protected BatchNorm statistics.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import GrowthError, UnsupportedLayerError
from .layout import Layout
from .mapping import identity_mapping
from .transaction import Transaction
from .transform import AxisStep, _bcast, _grouped_mask, _ordered, _select, grow_value

if TYPE_CHECKING:
    from .network import GrowableNetwork
    from .widen import PlannedModule

__all__ = [
    "CONTAINER",
    "MODES",
    "attach",
    "enforce",
    "freeze",
    "frozen_masks",
    "frozen_units",
    "growth_order",
    "is_protected",
    "mode",
    "release",
    "violations",
]

MODES = ("lateral", "independent")
#: Name of the network's submodule that holds the protection buffers.
CONTAINER = "protection"
_CODES = {"lateral": 1, "independent": 2}
_TREES = ("mask", "value", "units")


# --- the container ------------------------------------------------------------------------------
def state(net: nn.Module) -> nn.Module | None:
    """``net.protection`` when it is a protection container, else None."""
    box = net._modules.get(CONTAINER)
    if box is None or not isinstance(box._buffers.get("mode"), Tensor):
        return None
    if any(not isinstance(box._modules.get(t), nn.Module) for t in _TREES):
        return None
    return box


def is_protected(net: nn.Module) -> bool:
    """Whether ``net`` has protection state (``net.protect`` was called)."""
    return state(net) is not None


def mode(net: nn.Module) -> str | None:
    """The protection mode of ``net`` ("lateral", "independent"), None when unprotected."""
    box = state(net)
    if box is None:
        return None
    code = int(box._buffers["mode"].item())
    return next((m for m, c in _CODES.items() if c == code), None)


def check_mode(value: object) -> str:
    if value not in MODES:
        raise GrowthError(f"protect must be one of {MODES} (or None), got {value!r}")
    return str(value)


def _lookup(tree: nn.Module, dotted: str) -> Tensor | None:
    path, _, leaf = dotted.rpartition(".")
    module: nn.Module | None = tree
    for part in path.split(".") if path else ():
        module = module._modules.get(part) if module is not None else None
    return None if module is None else module._buffers.get(leaf)


def _walk(tree: nn.Module, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    for name, b in tree._buffers.items():
        if b is not None:
            yield prefix + name, b
    for name, child in tree._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.")


def _put(tx: Transaction, tree: nn.Module, dotted: str, value: Tensor) -> None:
    """Set buffer ``dotted`` of ``tree`` (creating plain containers on the way), undoably."""
    path, _, leaf = dotted.rpartition(".")
    module = tree
    for part in path.split(".") if path else ():
        child = module._modules.get(part)
        if child is None:
            if part in module._buffers or hasattr(module, part):
                raise GrowthError(f"protection: {dotted!r} collides with another protected name")
            child = nn.Module()
            tx.set_attr(module, part, child)
        module = child
    if leaf in module._buffers:
        tx.set_tensor(module, leaf, value)
    else:
        if leaf in module._modules or hasattr(module, leaf):
            raise GrowthError(f"protection: {dotted!r} collides with another protected name")
        module.register_buffer(leaf, value)
        tx.on_rollback(lambda: module._buffers.pop(leaf, None))


def _container(net: GrowableNetwork, tx: Transaction, new_mode: str) -> nn.Module:
    box = state(net)
    if box is None:
        if CONTAINER in net._modules or hasattr(net, CONTAINER):
            raise GrowthError(
                f"cannot protect: the network already has an attribute {CONTAINER!r} of its own, "
                f"where protection keeps its state; rename it in the model"
            )
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        box = nn.Module()
        code = torch.tensor(_CODES[new_mode], dtype=torch.uint8, device=device)
        box.register_buffer("mode", code)
        for tree in _TREES:
            box.add_module(tree, nn.Module())
        box.train(net.training)
        tx.set_attr(net, CONTAINER, box)
        return box
    current = mode(net)
    if current != new_mode:
        raise GrowthError(
            f"the network is protected in {current!r} mode; it cannot also grow in {new_mode!r} "
            f"mode (release its protection first: net2grow.growth.protect.release(net))"
        )
    return box


def _namer(net: nn.Module) -> Callable[[nn.Module, str], str]:
    """``name(module, tname)``: the full name of a module's tensor, as ``named_parameters`` /
    ``named_buffers`` give it first (one name for tied tensors)."""
    prefix = {id(m): n for n, m in net.named_modules()}
    canonical = {id(t): n for n, t in [*net.named_parameters(), *net.named_buffers()]}

    def name(module: nn.Module, tname: str) -> str:
        owner_path, _, leaf = tname.rpartition(".")
        t = getattr(module.get_submodule(owner_path) if owner_path else module, leaf, None)
        return canonical.get(id(t)) or f"{prefix[id(module)]}.{tname}".lstrip(".")

    return name


def _tensor(net: nn.Module, full: str) -> tuple[nn.Module, str, Tensor | None, bool]:
    path, _, leaf = full.rpartition(".")
    owner = net.get_submodule(path) if path else net
    if leaf in owner._parameters:
        return owner, leaf, owner._parameters[leaf], True
    return owner, leaf, owner._buffers.get(leaf), False


# --- freezing -----------------------------------------------------------------------------------
def _positions(analysis: Any, layout: Layout, group: int, device: torch.device) -> Tensor:
    """Bool per position of ``layout``: True where the position is a unit of ``group``."""
    find = analysis.spaces.find
    parts = [
        torch.full((s.size,), find(s.space) == group, dtype=torch.bool) for s in layout.segments
    ]
    return torch.cat(parts).to(device)


def _along(vec: Tensor, t: Tensor, dim: int) -> Tensor:
    return _bcast(vec, t, dim).expand(t.shape)


def _module_plans(net: GrowableNetwork, group: int) -> list[tuple[str, nn.Module, Any]]:
    from .widen import plan_updates

    analysis = net.analysis
    width = analysis.spaces.info(group).width
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    return plan_updates(net, analysis, group, identity_mapping(width, device))


def _check_maskable(net: GrowableNetwork, group: int, plans: list, label: str) -> None:
    """Refuse when something computing units of ``group`` has state that cannot be frozen per
    unit (a LayerNorm over other dimensions, a PReLU with one shared slope, a custom layer)."""
    analysis = net.analysis
    covered: dict[str, set[str]] = {}
    for mname, _, update in plans:
        covered[mname] = {
            t
            for t, g in update.tensors.items()
            if any(s.role in ("out", "channel") for s in g.steps)
        }
    for mname, nodes in analysis.module_nodes.items():
        layout = analysis.layouts.get(nodes[0])
        if layout is None or not any(
            analysis.spaces.find(s.space) == group for s in layout.segments
        ):
            continue
        module = net.get_submodule(mname)
        tensors = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        tensors += [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        loose = [n for n, _ in tensors if n not in covered.get(mname, set())]
        if loose:
            raise UnsupportedLayerError(
                f"cannot protect the units of {label!r}: layer {mname!r} "
                f"({type(module).__name__}) computes them with {loose}, which are not kept per "
                f"unit, so they cannot be frozen for old units only"
            )
    for node in net.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, attr = str(node.target).rpartition(".")
        value = getattr(net.get_submodule(owner_path) if owner_path else net, attr, None)
        if not (isinstance(value, nn.Parameter) and value.requires_grad):
            continue
        for user in node.users:
            layout = analysis.layouts.get(user)
            if layout is not None and any(
                analysis.spaces.find(s.space) == group for s in layout.segments
            ):
                raise UnsupportedLayerError(
                    f"cannot protect the units of {label!r}: the trainable parameter "
                    f"{node.target!r} acts on them as a whole and cannot be frozen per unit"
                )


def freeze(
    net: GrowableNetwork,
    new_mode: str,
    layers: Iterable[str] | None = None,
    *,
    activate: bool = True,
) -> Transaction:
    """Freeze every current unit of ``layers`` (default: every growable layer) in ``new_mode``.

    Returns the applied transaction (its ``rollback`` undoes the freeze). On a refusal
    (``GrowthError``) nothing has changed. ``activate=False`` leaves :func:`attach` to the
    caller (a freeze that may still be rolled back).
    """
    check_mode(new_mode)
    names = list(net.layers) if layers is None else list(layers)
    tx = Transaction()
    try:
        _freeze(net, new_mode, names, tx)
    except BaseException:
        tx.rollback()
        raise
    if activate:
        attach(net)
    return tx


def _freeze(net: GrowableNetwork, new_mode: str, names: list[str], tx: Transaction) -> None:
    analysis = net.analysis
    groups: dict[int, str] = {}
    for name in names:
        net._layer_rule(name)  # unknown names and non-layers are refused here
        group, _ = net._group_of(name)
        groups.setdefault(group, name)
    for g, label in groups.items():
        blocks = [b for b in analysis.spaces.info(g).blocks if b.priority != 0]
        if blocks:  # the output block (priority 0) is harmless: the output layer can be frozen
            raise blocks[0].error(f"cannot protect the units of {label!r}: {blocks[0].reason}")
    plans = {g: _module_plans(net, g) for g in groups}
    for g, label in groups.items():
        _check_maskable(net, g, plans[g], label)
    box = _container(net, tx, new_mode)
    full_name = _namer(net)
    for g, label in groups.items():
        for mname, module, update in plans[g]:
            node = analysis.module_nodes[mname][0]
            layout = analysis.layouts.get(node)
            for tname, growth in update.tensors.items():
                steps = [s for s in growth.steps if s.role in ("out", "channel")]
                owner_path, _, leaf = tname.rpartition(".")
                t = getattr(module.get_submodule(owner_path) if owner_path else module, leaf)
                if not steps or t is None:
                    continue
                full = full_name(module, tname)
                entry = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
                for step in steps:
                    if layout is None or layout.size != t.shape[step.dim]:
                        raise UnsupportedLayerError(
                            f"cannot protect the units of {label!r}: tensor {full!r} does not "
                            f"hold one entry per channel along dim {step.dim}"
                        )
                    entry |= _along(_positions(analysis, layout, g, t.device), t, step.dim)
                old_mask = _lookup(box.mask, full)
                old_value = _lookup(box.value, full)
                current = t.detach()
                if old_mask is not None and old_value is not None:
                    current = torch.where(old_mask, old_value, current)
                    entry |= old_mask
                value = torch.where(entry, current, torch.zeros((), dtype=t.dtype, device=t.device))
                _put(tx, box.mask, full, entry)
                _put(tx, box.value, full, value)
                if any(s.role == "out" for s in steps):
                    out = next(s for s in steps if s.role == "out")
                    units = torch.ones(out.amap.new_size, dtype=torch.bool, device=t.device)
                    _put(tx, box.units, mname, units)


# --- widening a protected network ----------------------------------------------------------------
@dataclass
class WidenGuard:
    """What a widen of a protected network installs besides the grown tensors."""

    net: GrowableNetwork
    buffers: list[tuple[str, str, Tensor]] = field(default_factory=list)  # (tree, name, value)

    def install(self, tx: Transaction) -> None:
        box = state(self.net)
        assert box is not None
        for tree, name, value in self.buffers:
            _put(tx, box._modules[tree], name, value)


def _grow_mask(mask: Tensor, steps: list[AxisStep], rows: tuple[int, Tensor] | None) -> Tensor:
    """``mask`` after ``steps``: old entries kept; new rows and channels free; the new columns
    of the rows of frozen units frozen (an old unit never reads a new one). ``rows``: the dim of
    the tensor's rows and which rows are frozen units (None: no row is)."""
    for step in _ordered(steps):
        grown = _select(mask, step)
        orig = (
            _bcast(step.amap.original, grown, step.dim)
            if step.groups == 1
            else _grouped_mask(step.amap, grown, step.groups)
        )
        if step.role == "in":
            if rows is None:
                grown = grown & orig
            else:
                grown = torch.where(orig, grown, _bcast(rows[1], grown, rows[0]))
        else:
            grown = grown & orig
        mask = grown
    return mask


def _frozen_rows(
    net: GrowableNetwork, box: nn.Module, mname: str, tname: str, steps: list[AxisStep]
) -> tuple[int, Tensor] | None:
    """(row dim, frozen rows) of a tensor of layer ``mname`` whose columns grow: its rows are
    the layer's units (the dim its own growth would act on as "out")."""
    units = _lookup(box.units, mname)
    if units is None or not any(s.role == "in" for s in steps):
        return None
    group, _ = net._group_of(mname)
    for name, _, update in _module_plans(net, group):
        growth = update.tensors.get(tname) if name == mname else None
        out = next((s for s in growth.steps if s.role == "out"), None) if growth else None
        if out is not None:
            return out.dim, units
    return None


def _units_by_group(net: GrowableNetwork, box: nn.Module) -> dict[int, Tensor]:
    """Frozen units of each space group, from the ``units`` buffers of its producers."""
    out: dict[int, Tensor] = {}
    for lname, units in _walk(box.units):
        try:
            group, _ = net._group_of(lname)
        except (GrowthError, KeyError):
            continue
        out[group] = units if group not in out else out[group] | units
    return out


def _frozen_columns(net: GrowableNetwork, layout: Layout, frozen: dict[int, Tensor]) -> Tensor:
    find = net.analysis.spaces.find
    parts = []
    for seg in layout.segments:
        units = frozen.get(find(seg.space))
        if units is None or units.numel() != seg.units:
            parts.append(torch.zeros(seg.size, dtype=torch.bool))
        else:
            parts.append(units.cpu().repeat_interleave(seg.expand))
    return torch.cat(parts)


def _independent_constraints(
    net: GrowableNetwork, mname: str, pm: PlannedModule, frozen: dict[int, Tensor]
) -> dict[str, Tensor]:
    """Entries of ``mname``'s grown tensors that must stay zero: new rows x frozen columns."""
    analysis = net.analysis
    layout = analysis.input_layout(analysis.module_nodes[mname][0])
    if layout is None:
        return {}
    cols = _frozen_columns(net, layout, frozen)
    if not bool(cols.any()):
        return {}
    find = analysis.spaces.find
    h = next(find(s.space) for s in layout.segments if find(s.space) in frozen)
    in_steps = {}
    for name, _, update in _module_plans(net, h):
        if name == mname:
            for tname, growth in update.tensors.items():
                for s in growth.steps:
                    if s.role == "in":
                        in_steps[tname] = s
    out = {}
    for tname, growth in pm.update.tensors.items():
        rows = next((s for s in growth.steps if s.role == "out"), None)
        col = in_steps.get(tname)
        value = pm.values.get(tname)
        if rows is None or col is None or value is None:
            continue
        new_rows = _along(~rows.amap.original, value, rows.dim)
        c = cols.to(value.device)
        if col.groups == 1:
            if c.numel() != value.shape[col.dim]:
                continue
            frozen_cols = _along(c, value, col.dim)
        else:
            if (rows.dim, col.dim) != (0, 1) or c.numel() != value.shape[1] * col.groups:
                raise UnsupportedLayerError(
                    f"cannot keep the new units of {mname!r} independent: unexpected grouped "
                    f"weight layout"
                )
            n_out, g = value.shape[0], col.groups
            per_row = c.view(g, -1)[torch.arange(n_out, device=c.device) // (n_out // g)]
            frozen_cols = per_row.view(n_out, -1, *([1] * (value.dim() - 2))).expand(value.shape)
        out[tname] = new_rows & frozen_cols
    return out


def plan_widen(
    net: GrowableNetwork, name: str, planned: list[PlannedModule], init: str
) -> WidenGuard | None:
    """Adjust the planned values of a widen of a protected ``net`` and plan its buffers.

    Frozen entries keep their stored values, old units get zero (frozen) weights from the new
    units, and in "independent" mode the new units' weights from frozen units are zero (and
    frozen). Refuses (before anything changes) an ``init`` other than "zero" that would touch
    frozen entries. None when ``net`` is not protected.
    """
    box = state(net)
    if box is None:
        return None
    full_name = _namer(net)
    touched = []
    for pm in planned:
        for tname in pm.values:
            full = full_name(pm.module, tname)
            mask = _lookup(box.mask, full)
            if mask is not None and init != "zero" and bool(mask.any()):
                raise GrowthError(
                    f"cannot widen {name!r} with init={init!r}: it changes {full!r}, which holds "
                    f"frozen (protected) units; on a protected network widen with init='zero' "
                    f"(new units get zero outgoing weights, so old units never read them)"
                )
            touched.append((pm, tname, full, mask))
    guard = WidenGuard(net)
    frozen = _units_by_group(net, box) if mode(net) == "independent" else {}
    constraints: dict[tuple[int, str], Tensor] = {}
    if frozen:
        for pm in planned:
            if not any(s.role == "out" for g in pm.update.tensors.values() for s in g.steps):
                continue
            for tname, c in _independent_constraints(net, pm.name, pm, frozen).items():
                if bool(c.any()):
                    constraints[(id(pm), tname)] = c
    for pm, tname, full, mask in touched:
        steps = pm.update.tensors[tname].steps
        planned_value = pm.values[tname]
        zero = torch.zeros((), dtype=planned_value.dtype, device=planned_value.device)
        c = constraints.get((id(pm), tname))
        if mask is None and c is None:
            continue
        if mask is not None:
            old_value = _lookup(box.value, full)
            assert old_value is not None
            new_mask = _grow_mask(mask, steps, _frozen_rows(net, box, pm.name, tname, steps))
            grown = grow_value(
                old_value, steps, init="zero", fresh="zeros", noise=0.0, generator=None
            )
            new_value = torch.where(new_mask, grown, zero)
        else:
            new_mask = torch.zeros(planned_value.shape, dtype=torch.bool, device=zero.device)
            new_value = torch.zeros_like(planned_value)
        if c is not None:
            new_mask = new_mask | c
            new_value = new_value.masked_fill(c, 0)
        pm.values[tname] = torch.where(new_mask, new_value, planned_value)
        guard.buffers.append(("mask", full, new_mask))
        guard.buffers.append(("value", full, new_value))
    for lname, units in _walk(box.units):
        pm = next((p for p in planned if p.name == lname), None)
        if pm is None:
            continue
        out = next(
            (s for g in pm.update.tensors.values() for s in g.steps if s.role == "out"), None
        )
        if out is not None:
            guard.buffers.append(("units", lname, units[out.amap.source] & out.amap.original))
    return guard


def check_deepen(net: GrowableNetwork, name: str) -> None:
    """Refuse inserting a layer after ``name`` when frozen units read its output: they would
    then read a new, trainable layer and change."""
    box = state(net)
    if box is None:
        return
    group, _ = net._group_of(name)
    full_name = _namer(net)
    for mname, module, update in _module_plans(net, group):
        for tname, growth in update.tensors.items():
            if not any(s.role == "in" for s in growth.steps):
                continue
            mask = _lookup(box.mask, full_name(module, tname))
            if mask is not None and bool(mask.any()):
                raise GrowthError(
                    f"cannot deepen {name!r}: layer {mname!r} reads its units and holds frozen "
                    f"(protected) units, which would then read a new trainable layer and change. "
                    f"Deepen layers whose readers are not protected, or deepen before protecting"
                )


# --- enforcement --------------------------------------------------------------------------------
_NETS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOKS: list[Any] = []


class _GradMask:
    """Tensor hook: zero the gradient of the frozen entries of one parameter."""

    def __init__(self, net: nn.Module, name: str) -> None:
        self.net = weakref.ref(net)
        self.name = name

    def __call__(self, grad: Tensor) -> Tensor | None:
        net = self.net()
        box = state(net) if net is not None else None
        mask = _lookup(box.mask, self.name) if box is not None else None
        if mask is None or mask.shape != grad.shape or mask.device != grad.device:
            return None
        return grad.masked_fill(mask, 0)


def _entries(net: nn.Module, parameters: bool) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(tensor, mask, value) of every protected parameter (or buffer) of ``net``."""
    box = state(net)
    if box is None:
        return []
    out = []
    for full, mask in _walk(box.mask):
        value = _lookup(box.value, full)
        try:
            _, _, t, is_param = _tensor(net, full)
        except AttributeError:
            continue
        if t is None or value is None or is_param != parameters or t.shape != mask.shape:
            continue
        out.append((t, mask, value))
    return out


def _restore(t: Tensor, mask: Tensor, value: Tensor) -> None:
    # through .data: running statistics may be saved for a backward pass still to come, and the
    # write must not bump their version counter (training-mode backward does not read them)
    data = t.data
    if value.dtype != data.dtype or value.device != data.device:  # e.g. a parameter cast alone
        value, mask = value.to(data), mask.to(data.device)
    with torch.no_grad():
        torch.where(mask, value, data, out=data)  # in place (out aliases the input exactly)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer step post-hook: write back the frozen entries the optimizer moved."""
    if not _NETS:
        return
    ids: set[int] | None = None
    for net in list(_NETS):
        entries = _entries(net, parameters=True)
        if not entries:
            continue
        if ids is None:
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for t, mask, value in entries:
            if id(t) in ids:
                _restore(t, mask, value)


def after_forward(net: nn.Module) -> None:
    """Write back frozen running statistics (called after a training-mode forward)."""
    for t, mask, value in _entries(net, parameters=False):
        _restore(t, mask, value)


def attach(net: GrowableNetwork) -> None:
    """Make ``net``'s protection active: global optimizer hook, gradient masks. Called by
    ``protect``, ``widen``, ``load`` and copies (``copy.deepcopy``, pickling); idempotent."""
    if state(net) is None:
        return
    if not _HOOKS:
        _HOOKS.append(register_optimizer_step_post_hook(_after_step))
    _NETS.add(net)
    box = state(net)
    assert box is not None
    for full, _ in _walk(box.mask):
        try:
            _, _, p, is_param = _tensor(net, full)
        except AttributeError:
            continue
        if not is_param or p is None:
            continue
        hooks = getattr(p, "_backward_hooks", None) or {}
        if any(
            isinstance(h, _GradMask) and h.net() is net and h.name == full for h in hooks.values()
        ):
            continue
        p.register_hook(_GradMask(net, full))


def enforce(net: GrowableNetwork) -> None:
    """Write every frozen value back now (after updates made outside ``torch.optim``)."""
    for parameters in (True, False):
        for t, mask, value in _entries(net, parameters=parameters):
            _restore(t, mask, value)


def release(net: GrowableNetwork) -> None:
    """Remove ``net``'s protection: every unit trains again, widen may use any ``init``."""
    if state(net) is None:
        return
    for p in net.parameters():
        hooks = getattr(p, "_backward_hooks", None) or {}
        for key, h in list(hooks.items()):
            if isinstance(h, _GradMask) and h.net() is net:
                del hooks[key]
    delattr(net, CONTAINER)
    _NETS.discard(net)


# --- queries ------------------------------------------------------------------------------------
def frozen_masks(net: GrowableNetwork) -> dict[str, Tensor]:
    """Tensor name -> bool mask of its frozen entries (copies)."""
    box = state(net)
    return {} if box is None else {n: m.clone() for n, m in _walk(box.mask)}


def frozen_units(net: GrowableNetwork, layer: str) -> Tensor:
    """Bool per output unit of ``layer``: True for a frozen unit (all False when none is)."""
    width = net.width(layer)
    box = state(net)
    units = _lookup(box.units, layer) if box is not None else None
    if units is None and box is not None:  # a layer that makes no units (depthwise): its group's
        group, expand = net._group_of(layer)
        units = _units_by_group(net, box).get(group)
        units = None if units is None else units.repeat_interleave(expand)
    if units is None or units.numel() != width:
        return torch.zeros(width, dtype=torch.bool)
    return units.clone()


def violations(net: GrowableNetwork) -> list[str]:
    """Names of the tensors whose frozen entries differ from their stored values (empty when
    protection holds)."""
    box = state(net)
    if box is None:
        return []
    bad = []
    for full, mask in _walk(box.mask):
        value = _lookup(box.value, full)
        try:
            _, _, t, _ = _tensor(net, full)
        except AttributeError:
            bad.append(full)
            continue
        intact = t is not None and value is not None and t.shape == mask.shape
        if not (intact and torch.equal(t.detach()[mask], value[mask])):
            bad.append(full)
    return bad


def growth_order(net: GrowableNetwork, layers: Iterable[str]) -> list[str]:
    """``layers`` ordered so that each group of coupled layers grows before the groups that read
    it (by the graph position of the group's first layer); what "independent" mode needs."""
    names = list(layers)
    first: dict[int, int] = {}
    for i, lname in enumerate(net.analysis.module_nodes):
        try:
            group, _ = net._group_of(lname)
        except GrowthError:
            continue
        first.setdefault(group, i)
    order = {n: i for i, n in enumerate(net.analysis.module_nodes)}

    def key(n: str) -> tuple[int, int]:
        group, _ = net._group_of(n)
        return first.get(group, order.get(n, 0)), order.get(n, 0)

    return sorted(names, key=key)
