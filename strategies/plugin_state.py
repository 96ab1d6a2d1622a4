"""Keeping Avalanche plugins' per-parameter state right across growth.

Regularisers (``EWCPlugin``, ``SynapticIntelligencePlugin``, ``MASPlugin``, ``RWalkPlugin``)
keep tensors shaped like each parameter (anchor values ``θ*`` and importances ``Ω``) and add
``Σ Ω (θ - θ*)²`` to the loss. After a function-preserving widening they would pad with zeros
(``ParamData.expand`` asserts when a weight grew in two dimensions; SI pads a *flattened* vector,
which misaligns every column growth silently), and pull each replicated consumer column back to
its unscaled value. Here they are remapped with the widening's own unit mapping
(:class:`growth.changes.GrowthChanges`) so that the penalty right after growth equals the penalty
right before it, and new units are unpenalised:

- anchors follow the parameter values (copies take their source's anchor, a consumer column's
  anchor is scaled by its share ``s``): then ``θ' - θ*' = S · (θ - θ*)[source]`` where ``S`` is
  the position's value scale (``s`` in a column, 1 elsewhere);
- importances stay on the original positions only, divided by ``S²`` (zero on copies), so
  ``Σ Ω' (θ' - θ*')² = Σ Ω (θ - θ*)²``.

Every other per-parameter tensor is one of four kinds (:data:`Remap`): a value
(:func:`remap_value`), an importance (:func:`remap_importance`), a gradient
(:func:`remap_gradient`), or a quantity kept on the original positions unscaled
(:func:`remap_on_originals`: path integrals ``-Σ g·Δθ``, whose products ``g·Δθ`` do not change
with ``S``, and ratios of them to ``Ω (Δθ)²``). Each plugin's tables below say which tensor is
which kind:

- SI: ``cum_trajectory`` an importance, the running path integral ``trajectory`` on the
  originals, ``old_theta``/``new_theta`` values, ``grad`` a gradient;
- MAS: ``params`` values, ``importance`` an importance;
- RWalk: ``*_params`` values, ``iter_importance``/``exp_importance``/``exp_penalties``
  importances (the penalty weight), ``iter_grad`` a gradient, the loss estimate
  ``checkpoint_loss`` and the scores ``checkpoint_scores``/``exp_scores`` (loss over
  ``½ Ω (Δθ)²``) on the originals;
- GEM/AGEM: their reference gradients (one flat vector over all parameters, recomputed every
  iteration) as gradients, segment by segment, so that a growth between their computation and
  their use (mid-experience, GEM/AGEM placed before the GrowthPlugin) does not change their size.

New parameters (``deepen``) are unpenalised: EWC and MAS skip names they never saved; SI gets
zero-importance entries at once (it would fail on the unknown name mid-experience); RWalk gets
zero loss/score entries (its running estimates would fail on the unknown name), so that it
penalises them after the next experience like every other parameter.

Strategies and plugins that cannot follow growth at all are refused before training by
:mod:`strategies.refusals`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from avalanche.training.plugins import (
    AGEMPlugin,
    EWCPlugin,
    GEMPlugin,
    MASPlugin,
    RWalkPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.utils import ParamData
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..growth import GrowableNetwork, GrowthRecord
from ..growth.mapping import AxisMap
from ..growth.transform import AxisStep, grow_state, grow_value

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
    return net.register_growth_hook(callback)


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


# --- plugins keeping dicts of ParamData ---------------------------------------------------------
ParamStore = dict[str, ParamData]


def remap_param_stores(stores: Iterable[tuple[ParamStore | None, Remap]], changes: Any) -> int:
    """Remap every grown entry of each ``{parameter name: ParamData}`` store with its remap.

    A ParamData held by several stores (RWalk hands its running dicts over to its per-experience
    ones) is remapped once. Returns the number of tensors remapped."""
    done: set[int] = set()
    count = 0
    for store, remap in stores:
        if not store:
            continue
        for name, steps in changes.tensors.items():
            pd = store.get(name)
            if pd is None or id(pd) in done:
                continue
            _check_dims(pd, name, steps)
            _set(pd, remap(pd.data, steps, changes.init))
            done.add(id(pd))
            count += 1
    return count


# --- EWC ------------------------------------------------------------------------------------------
def remap_ewc(plugin: EWCPlugin, changes: Any) -> int:
    """Remap every stored ``saved_params``/``importances`` entry of ``plugin`` (all experiences,
    separate and online modes). Returns the number of tensors remapped."""
    stores = [(d, remap_value) for d in plugin.saved_params.values()]
    stores += [(d, remap_importance) for d in plugin.importances.values()]
    return remap_param_stores(stores, changes)


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


def _pre_growth_shape(shape: Sequence[int], steps: Steps) -> list[int]:
    """The shape a tensor now shaped ``shape`` had before it grew by ``steps``."""
    old = list(shape)
    for s in steps:
        old[s.dim] = int(s.amap.original.sum()) // s.groups
    return old


def _unflatten_shape(flat: Tensor, shape: torch.Size, steps: Steps) -> list[int]:
    """The pre-growth shape of a flattened SI tensor of a parameter now shaped ``shape``.

    Dimension 0, when not grown here, may lag behind the parameter (an IncrementalClassifier
    added rows that SI pads later): it is inferred from the vector's length.
    """
    old = _pre_growth_shape(shape, steps)
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


# --- MAS ------------------------------------------------------------------------------------------
def remap_mas(plugin: MASPlugin, changes: Any) -> int:
    """Remap MAS's anchors ``params`` and importances ``importance`` (None before the first
    experience ends). Returns the number of tensors remapped."""
    return remap_param_stores(
        [(plugin.params, remap_value), (plugin.importance, remap_importance)], changes
    )


# --- RWalk ----------------------------------------------------------------------------------------
_RWALK_REMAPS: dict[str, Remap] = {
    "checkpoint_params": remap_value,
    "checkpoint_loss": remap_on_originals,
    "checkpoint_scores": remap_on_originals,
    "iter_grad": remap_gradient,
    "iter_importance": remap_importance,
    "iter_params": remap_value,
    "exp_scores": remap_on_originals,
    "exp_params": remap_value,
    "exp_importance": remap_importance,
    "exp_penalties": remap_importance,
}
# Running estimates RWalk indexes by every parameter name: new parameters need entries.
_RWALK_ZEROS = ("checkpoint_loss", "checkpoint_scores", "exp_scores")
_RWALK_VALUES = ("checkpoint_params",)


def remap_rwalk(plugin: RWalkPlugin, model: nn.Module, changes: Any) -> int:
    """Remap every per-parameter dict of RWalk (running, checkpoint and per-experience ones); give
    new parameters zero loss/score entries and their value as anchor. Returns the number of
    tensors remapped or added."""
    count = remap_param_stores([(getattr(plugin, k), f) for k, f in _RWALK_REMAPS.items()], changes)
    params = dict(model.named_parameters())
    for name in changes.new_parameters:
        p = params.get(name)
        if p is None:
            continue
        for key in (*_RWALK_ZEROS, *_RWALK_VALUES):
            store = getattr(plugin, key)
            if store is None or name in store:
                continue
            init = p.detach().clone() if key in _RWALK_VALUES else None
            store[name] = ParamData(name, p.shape, device=p.device, init_tensor=init)
            count += 1
    return count


# --- GEM / AGEM -----------------------------------------------------------------------------------
def remap_flat_gradient(flat: Tensor, model: nn.Module, changes: Any) -> Tensor | None:
    """A vector of per-parameter gradients concatenated in ``model.parameters()`` order (as
    GEM/AGEM keep them), remapped segment by segment; zero segments for new parameters.

    None when ``flat`` does not match the parameters as they were before this growth: it was
    computed before an earlier change of the parameters (a head added by Avalanche's
    ``adaptation``) and GEM/AGEM recompute it before they use it again."""
    new = set(changes.new_parameters)
    parts: list[Tensor] = []
    at = 0
    for name, p in model.named_parameters():
        if name in new:
            parts.append(flat.new_zeros(p.numel()))
            continue
        steps = changes.tensors.get(name)
        shape = _pre_growth_shape(p.shape, steps) if steps else list(p.shape)
        n = math.prod(shape)
        if at + n > flat.numel():
            return None
        segment = flat[at : at + n]
        at += n
        if steps:
            segment = remap_gradient(segment.reshape(shape), steps, changes.init).flatten()
        parts.append(segment)
    if at != flat.numel():
        return None
    return torch.cat(parts) if parts else flat


def remap_gem(plugin: GEMPlugin, model: nn.Module, changes: Any) -> int:
    """Remap GEM's reference gradients ``G`` (one row per past experience)."""
    if plugin.G.dim() != 2 or plugin.G.numel() == 0:
        return 0
    rows = [remap_flat_gradient(g, model, changes) for g in plugin.G]
    if any(r is None for r in rows):
        return 0
    plugin.G = torch.stack(rows)  # type: ignore[arg-type]
    return 1


def remap_agem(plugin: AGEMPlugin, model: nn.Module, changes: Any) -> int:
    """Remap AGEM's reference gradient."""
    if plugin.reference_gradients.numel() == 0:
        return 0
    grown = remap_flat_gradient(plugin.reference_gradients, model, changes)
    if grown is None:
        return 0
    plugin.reference_gradients = grown
    return 1


# --- all plugins ----------------------------------------------------------------------------------
# Plugin type -> remap(plugin, model, changes) of its per-parameter state.
_REMAPS: dict[type, Callable[[Any, nn.Module, Any], int]] = {
    EWCPlugin: lambda p, model, changes: remap_ewc(p, changes),
    SynapticIntelligencePlugin: remap_si,
    MASPlugin: lambda p, model, changes: remap_mas(p, changes),
    RWalkPlugin: remap_rwalk,
    GEMPlugin: remap_gem,
    AGEMPlugin: remap_agem,
}


def _remap_of(plugin: Any) -> Callable[[Any, nn.Module, Any], int] | None:
    for cls, remap in _REMAPS.items():
        if isinstance(plugin, cls):
            return remap
    return None


def remap_regularizers(plugins: Iterable[Any], model: nn.Module, changes: Any) -> list[str]:
    """Remap the per-parameter state of every plugin in ``plugins`` that keeps some (regularisers
    EWC, SI, MAS, RWalk; GEM/AGEM's reference gradients); names of the plugins touched."""
    touched = []
    for p in plugins:
        remap = _remap_of(p)
        if remap is None:
            continue
        remap(p, model, changes)
        touched.append(type(p).__name__)
    return touched


def align_regularizers(plugins: Iterable[Any], model: nn.Module) -> None:
    """Bring the plugins' bookkeeping in line with ``model``'s parameter order (see
    :func:`align_online_ewc`)."""
    for p in plugins:
        if isinstance(p, EWCPlugin):
            align_online_ewc(p, model)


def penalty(
    plugin: EWCPlugin | SynapticIntelligencePlugin | MASPlugin | RWalkPlugin,
    model: nn.Module,
    *,
    exp_counter: int,
    device: str | torch.device = "cpu",
) -> float:
    """The regularisation term ``plugin`` would add to the loss now, computed by the plugin's own
    ``before_backward`` on a stand-in strategy (``exp_counter``: experiences trained so far).

    The stand-in's loss starts at 1 in float64 (MAS refuses a zero loss) and the term is what the
    plugin added to it."""
    device = torch.device(device)
    stand_in = SimpleNamespace(
        model=model,
        device=device,
        clock=SimpleNamespace(train_exp_counter=exp_counter),
        loss=torch.ones((), dtype=torch.float64, device=device),
    )
    plugin.before_backward(stand_in)
    return float(stand_in.loss.detach()) - 1.0
