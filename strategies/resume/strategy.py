"""An Avalanche strategy's training state: its model, optimizer, ``optimized_param_id`` and
plugins, captured for a resume file and restored from one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...growth import Checkpoint, GrowableNetwork, GrowthError
from .errors import ResumeMismatchError
from .modules import check_state_dict, load_module_state, module_state
from .objects import qualified_name
from .optimizer import checked_param_groups, load_optimizer, optimizer_state
from .plugins import plugin_state, prepare_plugin
from .steps import apply_fallible, apply_infallible

__all__ = ["placeholder_network", "prepare_strategy", "strategy_state"]


def placeholder_network() -> GrowableNetwork:
    """The network of a resume file whose model is not a GrowableNetwork (its state is in the
    file's plain data)."""
    return GrowableNetwork(nn.Identity(), torch.zeros(1, 1))


def _optimized_param_names(strategy: Any, model: nn.Module) -> list[str] | None:
    """The names in ``strategy.optimized_param_id``, which must all be ``model``'s."""
    opt_ids = getattr(strategy, "optimized_param_id", None)
    if opt_ids is None:
        return None
    current = dict(model.named_parameters())
    stale = [n for n, p in opt_ids.items() if current.get(n) is not p]
    if stale:
        raise GrowthError(
            f"cannot save: strategy.optimized_param_id names parameters {stale[:5]} that are "
            f"no longer the model's; save at an experience boundary (or call "
            f"strategy.make_optimizer() first)"
        )
    return list(opt_ids)


def strategy_state(strategy: Any) -> tuple[GrowableNetwork, Any, dict[str, Any]]:
    """(network for ``growth.save``, optimizer for ``growth.save`` or None, plain strategy
    state).

    A ``GrowableNetwork`` and its optimizer go into the checkpoint itself; any other model goes
    into the plain state with its optimizer, beside a :func:`placeholder_network`.
    """
    model = strategy.model
    if isinstance(model, DistributedDataParallel):
        raise GrowthError(
            "save_run does not support a DistributedDataParallel model yet: save from a "
            "single process"
        )
    optimizer = getattr(strategy, "optimizer", None)
    state: dict[str, Any] = {"class": qualified_name(strategy)}
    if isinstance(model, GrowableNetwork):
        net, net_optimizer = model, optimizer
        state["model"] = {"kind": "network"}
        state["optimizer"] = None
    else:
        net, net_optimizer = placeholder_network(), None
        state["model"] = {"kind": "state_dict", **module_state(model)}
        state["optimizer"] = None if optimizer is None else optimizer_state(model, optimizer)
    state["has_optimizer"] = optimizer is not None
    state["optimized_param_names"] = _optimized_param_names(strategy, model)
    state["plugins"] = [plugin_state(p, strategy, i) for i, p in enumerate(strategy.plugins)]
    return net, net_optimizer, state


def _check_identity(strategy: Any, saved: dict[str, Any] | None, name: str) -> None:
    """Refuse the saved state of another kind of strategy: other class, other plugins, another
    optimizer presence (or a DistributedDataParallel model)."""
    if saved is None:
        raise ResumeMismatchError(f"{name} holds no strategy state (saved with strategy=None)")
    if saved["class"] != qualified_name(strategy):
        raise ResumeMismatchError(
            f"{name} was saved from a {saved['class']} strategy, this one is a "
            f"{qualified_name(strategy)}"
        )
    classes = [p["class"] for p in saved["plugins"]]
    ours = [qualified_name(p) for p in strategy.plugins]
    if classes != ours:
        raise ResumeMismatchError(
            f"{name} was saved by a strategy with plugins {classes}; this strategy has {ours} "
            f"(build it with the same plugins in the same order)"
        )
    if isinstance(strategy.model, DistributedDataParallel):
        raise GrowthError("load_run does not support a DistributedDataParallel model yet")
    has_optimizer = getattr(strategy, "optimizer", None) is not None
    if bool(saved["has_optimizer"]) != has_optimizer:
        raise ResumeMismatchError(f"{name}: saved with and loaded without an optimizer, or back")


def _restored_model(
    model: nn.Module, saved: dict[str, Any], ckpt: Checkpoint, device: torch.device, name: str
) -> tuple[nn.Module, Any, Any, str | None]:
    """(the model after restoring, the saved optimizer's param names, state and class), checked
    against the strategy's ``model``; ``model`` itself does not change."""
    model_state = saved["model"]
    if model_state["kind"] == "network":
        if not isinstance(model, GrowableNetwork):
            raise ResumeMismatchError(
                f"{name} holds a GrowableNetwork; the strategy's model is a {type(model).__name__}"
            )
        return (
            ckpt.network.to(device),
            ckpt.optimizer_param_names,
            ckpt.optimizer_state,
            ckpt.optimizer_class,
        )
    if model_state["kind"] == "state_dict":
        if isinstance(model, GrowableNetwork):
            raise ResumeMismatchError(
                f"{name} holds the state_dict of a plain model; the strategy's model is a "
                f"GrowableNetwork"
            )
        check_state_dict(model, model_state["state"], name)
        if len(model_state["training"]) != len(list(model.modules())):
            raise ResumeMismatchError(f"{name}: the model's module tree differs")
        opt = saved["optimizer"]
        if opt is None:
            return model, None, None, None
        return model, opt["param_names"], opt["state_dict"], opt["class"]
    raise GrowthError(f"malformed resume file {name}: model kind {model_state['kind']!r}")


def prepare_strategy(
    strategy: Any, saved: dict[str, Any] | None, ckpt: Checkpoint, name: str
) -> Callable[[], None]:
    """Read and check :func:`strategy_state`'s ``saved`` output (with its checkpoint ``ckpt``,
    read from the file ``name``) for ``strategy``, which does not change; the returned function
    restores it.

    Restoring applies the plugins' fallible steps first (undone if one fails), then installs
    the model, the optimizer's groups and state and ``optimized_param_id``, then the plugins'
    other steps.
    """
    _check_identity(strategy, saved, name)
    model = strategy.model
    optimizer = getattr(strategy, "optimizer", None)
    new_model, opt_names, opt_state, opt_class = _restored_model(
        model, saved, ckpt, torch.device(strategy.device), name
    )
    params = dict(new_model.named_parameters())
    groups = None
    if optimizer is not None:
        if opt_state is None or opt_names is None:
            raise GrowthError(f"malformed resume file {name}: no optimizer state")
        groups = checked_param_groups(optimizer, params, opt_names, opt_state, opt_class)
    opt_ids = None
    if saved["optimized_param_names"] is not None:
        missing = [n for n in saved["optimized_param_names"] if n not in params]
        if missing:
            raise GrowthError(f"malformed resume file {name}: unknown parameters {missing[:5]}")
        opt_ids = {n: params[n] for n in saved["optimized_param_names"]}
    steps = []
    for i, (plugin, entry) in enumerate(zip(strategy.plugins, saved["plugins"])):
        step = prepare_plugin(plugin, entry, new_model, i)
        if step is not None:
            steps.append(step)

    def restore() -> None:
        apply_fallible(steps)
        if saved["model"]["kind"] == "network":
            strategy.model = new_model
        else:
            load_module_state(model, saved["model"])
        if groups is not None:
            load_optimizer(optimizer, groups, opt_state)
        if hasattr(strategy, "optimized_param_id"):
            strategy.optimized_param_id = opt_ids
        apply_infallible(steps)

    return restore
