"""An optimizer's state by parameter name, and putting it back into the optimizer object that
schedulers and plugins already hold."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...growth import GrowthError
from ...growth.optim import param_names
from .errors import ResumeMismatchError

__all__ = ["checked_param_groups", "load_optimizer", "optimizer_state"]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s class name, ``state_dict`` and the ``model``'s names of its parameters
    (for a model that is not a ``GrowableNetwork``, whose checkpoint holds them otherwise)."""
    return {
        "class": type(optimizer).__name__,
        "state_dict": optimizer.state_dict(),
        "param_names": param_names(
            model,
            optimizer,
            " (stale parameters: build the optimizer with make_optimizer(remove_params=True))",
        ),
    }


def checked_param_groups(
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    names: list[list[str]],
    state: dict[str, Any],
    saved_class: str | None,
) -> list[dict[str, Any]]:
    """Param groups for ``optimizer`` over ``params``, checked against the saved state.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The strategy's optimizer (its class must be ``saved_class``).
    params : dict of str to nn.Parameter
        The parameters of the model being restored, by name.
    names : list of list of str
        The saved names of each param group's parameters.
    state : dict
        The saved ``optimizer.state_dict()``.
    saved_class : str or None
        The saved optimizer's class name.
    """
    if saved_class != type(optimizer).__name__:
        raise ResumeMismatchError(
            f"the resume file holds {saved_class} state, the strategy's optimizer is a "
            f"{type(optimizer).__name__}"
        )
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(names):
        raise GrowthError("malformed resume file: optimizer groups and names differ")
    groups, by_index = [], {}
    for names_g, saved in zip(names, saved_groups):
        missing = [n for n in names_g if n not in params]
        if missing:
            raise ResumeMismatchError(
                f"the optimizer's parameters {missing[:5]} are not the model's"
            )
        group = {k: v for k, v in saved.items() if k != "params"}
        group["params"] = [params[n] for n in names_g]
        if len(saved["params"]) != len(names_g):
            raise GrowthError("malformed resume file: optimizer group sizes differ")
        for idx, p in zip(saved["params"], group["params"]):
            by_index[idx] = p
        groups.append(group)
    for idx, per_param in state["state"].items():
        p = by_index.get(idx)
        if p is None:
            raise GrowthError(f"malformed resume file: optimizer state of unknown parameter {idx}")
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise GrowthError(
                    f"malformed resume file: optimizer state {key!r} has shape "
                    f"{tuple(value.shape)}, its parameter {tuple(p.shape)}"
                )
    return groups


def load_optimizer(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], state: dict[str, Any]
) -> None:
    """Put ``groups`` (from :func:`checked_param_groups`) and ``state`` into the existing
    ``optimizer`` object (schedulers and plugins holding it keep working)."""
    optimizer.param_groups.clear()
    optimizer.state.clear()
    for group in groups:
        optimizer.add_param_group(group)
    optimizer.load_state_dict(state)
