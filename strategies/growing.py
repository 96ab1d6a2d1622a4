"""``Growing``: a supervised strategy whose model grows as a policy says."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..growth import GrowableNetwork, GrowthError
from .plugin import GrowthPlugin, describe_plugin, require_growable
from .policies import GrowthPolicy


class Growing(SupervisedTemplate):
    """``SupervisedTemplate`` (plain fine-tuning) with a :class:`GrowthPlugin` installed first.

    Parameters
    ----------
    model : GrowableNetwork
        The network to train and grow.
    optimizer : torch.optim.Optimizer
        Optimizer over ``model``'s parameters (its state is carried across growth).
    criterion : callable
        Loss function.
    policy : GrowthPolicy
        When and how to grow (:mod:`strategies.policies`).
    max_params : int, optional
        Parameter budget, shared by the widenings of each growth step (see
        :class:`GrowthPlugin`).
    max_width : int or dict of str to int, optional
        Per-layer width caps (see :class:`GrowthPlugin`).
    protect : {"lateral", "independent"}, optional
        Protected growth: old units frozen at each growth step after the first experience,
        widenings with ``init="zero"`` (see :class:`GrowthPlugin`).
    growth_options : dict, optional
        Further :class:`GrowthPlugin` keywords (``optimizer_state``, ``generator``, ...).
    **template_kwargs
        ``SupervisedTemplate`` keywords (``train_mb_size``, ``device``, ``plugins``, ...).
        ``plugins`` must not hold another ``GrowthPlugin`` (``GrowthError``): the strategy
        installs its own (``strategy.growth``), and two would grow the network twice per step.
    """

    def __init__(
        self,
        model: GrowableNetwork,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module | Any = None,
        *,
        policy: GrowthPolicy,
        max_params: int | None = None,
        max_width: int | dict[str, int] | None = None,
        protect: str | None = None,
        growth_options: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> None:
        require_growable(model)
        extra = list(template_kwargs.pop("plugins", None) or [])
        growth = GrowthPlugin(
            policy,
            max_params=max_params,
            max_width=max_width,
            protect=protect,
            **(growth_options or {}),
        )
        duplicates = [p for p in extra if isinstance(p, GrowthPlugin)]
        if duplicates:
            raise GrowthError(
                f"Growing(policy={type(policy).__name__}(...)) installs its own GrowthPlugin "
                f"(strategy.growth), and plugins= also holds "
                f"{', '.join(map(describe_plugin, duplicates))}: the network would grow "
                f"{len(duplicates) + 1} times per step. Give the policy to Growing(policy=...) "
                f"(options through max_params=, max_width=, growth_options=) and drop the "
                f"plugin, or use a plain strategy, e.g. Naive(..., plugins=[GrowthPlugin(...)])"
            )
        self.growth = growth
        plugins = [self.growth, *extra]
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            plugins=plugins,
            **template_kwargs,
        )
