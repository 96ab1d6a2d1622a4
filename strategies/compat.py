"""Keeping Avalanche's regularisation plugins right across growth.

``EWCPlugin`` and ``SynapticIntelligencePlugin`` keep tensors shaped like each parameter
(anchor values ``θ*`` and importances ``Ω``) and add ``Σ Ω (θ - θ*)²`` to the loss. After a
function-preserving widening they would pad with zeros (EWC asserts when a weight grew in two
dimensions; SI pads a *flattened* vector, which misaligns every column growth silently), and
pull each replicated consumer column back to its unscaled value. Here they are remapped with
the widening's own unit mapping (:class:`growth.hooks.GrowthChanges`) so that the penalty right
after growth equals the penalty right before it, and new units are unpenalised:

- anchors follow the parameter values (copies take their source's anchor, a consumer column's
  anchor is scaled by its share ``s``): then ``θ' - θ*' = S · (θ - θ*)[source]`` where ``S`` is
  the position's value scale (``s`` in a column, 1 elsewhere);
- importances stay on the original positions only, divided by ``S²`` (zero on copies), so
  ``Σ Ω' (θ' - θ*')² = Σ Ω (θ - θ*)²``.

SI's other state follows the same rule: the cumulative importance ``cum_trajectory`` like an
importance, the running path integral ``trajectory`` on the original positions (its ratio to
``(θ - θ*)²`` then scales like the importance), ``old_theta``/``new_theta`` like values, ``grad``
like a gradient. New parameters (``deepen``) are unpenalised: EWC skips names it never saved;
SI gets zero-importance entries at once (it would fail on the unknown name mid-experience).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from avalanche.training.plugins import EWCPlugin, SynapticIntelligencePlugin
from avalanche.training.utils import ParamData
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from growth import GrowableNetwork, GrowthError, GrowthRecord
from growth.mapping import AxisMap
from growth.transform import AxisStep, grow_state, grow_value

Steps = Sequence[AxisStep]


class OutOfSyncError(RuntimeError):
    """A plugin's stored tensors do not match the parameters as they were before a growth
    (a growth happened while nothing remapped them). Raised from the growth hook, after the
    network grew: not a refusal."""


# --- the engine adapter ---------------------------------------------------------------------------
def subscribe(
    net: GrowableNetwork, callback: Callable[[GrowthRecord, Any], None]
) -> RemovableHandle:
    """Call ``callback(record, changes)`` after every growth of ``net``.

    ``changes`` has ``init`` (the widen init mode), ``tensors`` (full parameter/buffer name ->
    list of :class:`~growth.transform.AxisStep`) and ``new_parameters`` (names added by deepen).
    This is the only place that talks to the engine's growth hook.
    """
    register = getattr(net, "register_growth_hook", None)
    if register is None:
        raise GrowthError(
            "this growth engine has no GrowableNetwork.register_growth_hook: EWC/SI state cannot "
            "follow growth. Update net2grow's growth package."
        )
    return register(callback)


# --- tensor remaps --------------------------------------------------------------------------------
def _on(steps: Steps, device: torch.device) -> list[AxisStep]:
    """``steps`` with their index tensors on ``device``."""
    out = []
    for s in steps:
        a = s.amap
        amap = AxisMap(a.source.to(device), a.original.to(device), a.share.to(device))
        out.append(AxisStep(s.dim, amap, s.role, s.groups))
    return out


def _value_init(init: str) -> str:
    # Anchors of fresh units ("zero"/"random") are irrelevant (no importance): use zeros.
    return "net2net" if init == "net2net" else "zero"


def remap_value(t: Tensor, steps: Steps, init: str) -> Tensor:
    """A tensor that follows the parameter's values (anchors ``θ*``)."""
    steps = _on(steps, t.device)
    return grow_value(t, steps, init=_value_init(init), fresh="zeros", noise=0.0, generator=None)


def value_scale(t: Tensor, steps: Steps, init: str) -> Tensor:
    """Per-position factor ``S`` with ``θ'[i] = S[i] · θ[source(i)]`` (0 for fresh units)."""
    return remap_value(torch.ones_like(t), steps, init)


def remap_importance(t: Tensor, steps: Steps, init: str) -> Tensor:
    """An importance: kept on original positions divided by ``S²``, zero on new ones."""
    kept = grow_state(t, _on(steps, t.device), init="zero", power=0)  # zero on new positions
    scale = value_scale(t, steps, init)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    return torch.where(scale != 0, kept / safe**2, torch.zeros_like(kept))


def remap_on_originals(t: Tensor, steps: Steps, init: str) -> Tensor:
    """Kept on original positions unscaled, zero on new ones (SI's running path integral)."""
    return grow_state(t, _on(steps, t.device), init="zero", power=0)


def remap_gradient(t: Tensor, steps: Steps, init: str) -> Tensor:
    """A tensor that follows the parameter's gradient."""
    return grow_state(t, _on(steps, t.device), init=init, power=1)


Remap = Callable[[Tensor, Steps, str], Tensor]


def _set(pd: ParamData, value: Tensor) -> None:
    pd.reset_like(value.shape)
    pd.data = value.to(pd.device)


def _check_dims(pd: ParamData, name: str, steps: Steps) -> None:
    for s in steps:
        old = int(s.amap.original.sum()) // s.groups
        if s.dim >= len(pd.shape) or pd.shape[s.dim] != old:
            raise OutOfSyncError(
                f"{pd.name!r} kept for {name!r} has shape {tuple(pd.shape)}, expected {old} "
                f"along dimension {s.dim} before growth: the plugin missed an earlier growth"
            )


# --- EWC ------------------------------------------------------------------------------------------
def remap_ewc(plugin: EWCPlugin, changes: Any) -> int:
    """Remap every stored ``saved_params``/``importances`` entry of ``plugin`` (all experiences,
    separate and online modes). Returns the number of tensors remapped."""
    done: set[int] = set()
    count = 0
    stores = ((plugin.saved_params, remap_value), (plugin.importances, remap_importance))
    for store, remap in stores:
        for per_exp in store.values():
            for name, steps in changes.tensors.items():
                pd = per_exp.get(name)
                if pd is None or id(pd) in done:
                    continue
                _check_dims(pd, name, steps)
                _set(pd, remap(pd.data, steps, changes.init))
                done.add(id(pd))
                count += 1
    return count


def align_online_ewc(plugin: EWCPlugin, model: nn.Module) -> None:
    """Order online EWC's importances like ``model.named_parameters()``, with zero entries for
    parameters it has not seen.

    Online EWC merges old and new importances by *position* (``zip_longest``), which holds only
    while new parameters come last. Deepen puts its layers in a top-level ``grown`` module, so
    a task head added later by ``MultiHeadClassifier`` lands before them and EWC's
    ``update_importances`` fails ("Error in importance computation"). Call before EWC's
    ``after_training_exp`` (the GrowthPlugin does it at ``before_training_exp``).
    """
    if plugin.mode != "online":
        return
    for t, imps in list(plugin.importances.items()):
        if not imps:
            continue
        aligned: dict[str, ParamData] = {}
        for name, p in model.named_parameters():
            pd = imps.get(name)
            aligned[name] = (
                pd if pd is not None else ParamData(f"imp_{name}", p.shape, device=p.device)
            )
        aligned.update((k, v) for k, v in imps.items() if k not in aligned)
        plugin.importances[t] = aligned


# --- SI -------------------------------------------------------------------------------------------
_SI_REMAPS: dict[str, Remap] = {
    "old_theta": remap_value,
    "new_theta": remap_value,
    "grad": remap_gradient,
    "trajectory": remap_on_originals,
    "cum_trajectory": remap_importance,
}


def _unflatten_shape(flat: Tensor, shape: torch.Size, steps: Steps) -> list[int]:
    """The pre-growth shape of a flattened SI tensor of a parameter now shaped ``shape``.

    Dimension 0, when not grown here, may lag behind the parameter (an IncrementalClassifier
    added rows that SI pads later): it is inferred from the vector's length.
    """
    old = list(shape)
    for s in steps:
        old[s.dim] = int(s.amap.original.sum()) // s.groups
    grown = {s.dim for s in steps}
    if old and 0 not in grown:
        rest = math.prod(old[1:])
        old[0] = flat.numel() // rest if rest else old[0]
    if math.prod(old) != flat.numel():
        raise OutOfSyncError(
            f"SI keeps {flat.numel()} values for a parameter shaped {tuple(shape)} whose "
            f"pre-growth shape should be {tuple(old)}: the plugin missed an earlier growth"
        )
    return old


def remap_si(plugin: SynapticIntelligencePlugin, model: nn.Module, changes: Any) -> int:
    """Remap SI's flattened anchors, importances and trajectories; add zero-importance entries
    for new parameters. Returns the number of tensors remapped or added."""
    params = dict(model.named_parameters())
    anchors, importances = plugin.ewc_data
    stores: list[tuple[dict[str, ParamData], Remap]] = [
        (anchors, remap_value),
        (importances, remap_importance),
    ] + [(plugin.syn_data[k], f) for k, f in _SI_REMAPS.items()]
    count = 0
    for name, steps in changes.tensors.items():
        if name not in anchors or name not in params:
            continue
        for store, remap in stores:
            pd = store[name]
            old_shape = _unflatten_shape(pd.data, params[name].shape, steps)
            grown = remap(pd.data.reshape(old_shape), steps, changes.init)
            _set(pd, grown.flatten())
            count += 1
    allowed = dict(plugin.allowed_parameters(model, plugin.excluded_parameters))
    for name in changes.new_parameters:
        if name in allowed and name not in anchors:
            count += _si_add(plugin, name, allowed[name])
    return count


def _si_add(plugin: SynapticIntelligencePlugin, name: str, p: Tensor) -> int:
    """Entries for a parameter SI has never seen: anchored at its value, zero importance."""
    value = p.detach().cpu().flatten()
    anchors, importances = plugin.ewc_data
    anchors[name] = ParamData(name, init_tensor=value.clone())
    importances[name] = ParamData(f"imp_{name}", value.shape)
    for key in ("old_theta", "new_theta"):
        plugin.syn_data[key][name] = ParamData(f"{key}_{name}", init_tensor=value.clone())
    for key in ("grad", "trajectory", "cum_trajectory"):
        plugin.syn_data[key][name] = ParamData(f"{key}_{name}", value.shape)
    return 1


# --- all plugins ----------------------------------------------------------------------------------
def remap_regularizers(plugins: Iterable[Any], model: nn.Module, changes: Any) -> list[str]:
    """Remap the state of every EWC/SI plugin in ``plugins``; names of the plugins touched."""
    touched = []
    for p in plugins:
        if isinstance(p, EWCPlugin):
            remap_ewc(p, changes)
        elif isinstance(p, SynapticIntelligencePlugin):
            remap_si(p, model, changes)
        else:
            continue
        touched.append(type(p).__name__)
    return touched


def align_regularizers(plugins: Iterable[Any], model: nn.Module) -> None:
    """Bring the plugins' bookkeeping in line with ``model``'s parameter order (see
    :func:`align_online_ewc`)."""
    for p in plugins:
        if isinstance(p, EWCPlugin):
            align_online_ewc(p, model)


def needs_remap(plugins: Iterable[Any]) -> bool:
    """True when some plugin keeps per-parameter state that growth must remap."""
    return any(isinstance(p, (EWCPlugin, SynapticIntelligencePlugin)) for p in plugins)


def penalty(
    plugin: EWCPlugin | SynapticIntelligencePlugin,
    model: nn.Module,
    *,
    exp_counter: int,
    device: str | torch.device = "cpu",
) -> float:
    """The regularisation term ``plugin`` would add to the loss now, computed by the plugin's own
    ``before_backward`` on a stand-in strategy (``exp_counter``: experiences trained so far)."""
    device = torch.device(device)
    stand_in = SimpleNamespace(
        model=model,
        device=device,
        clock=SimpleNamespace(train_exp_counter=exp_counter),
        loss=torch.zeros((), device=device),
    )
    plugin.before_backward(stand_in)
    return float(stand_in.loss.detach())
