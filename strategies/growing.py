"""``Growing``: a supervised strategy whose model grows as a policy says."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..growth import GrowableNetwork
from .plugin import GrowthPlugin, require_growable
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
        Parameter budget (see :class:`GrowthPlugin`).
    growth_options : dict, optional
        Further :class:`GrowthPlugin` keywords (``optimizer_state``, ``generator``, ...).
    **template_kwargs
        ``SupervisedTemplate`` keywords (``train_mb_size``, ``device``, ``plugins``, ...).
    """

    def __init__(
        self,
        model: GrowableNetwork,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module | Any = None,
        *,
        policy: GrowthPolicy,
        max_params: int | None = None,
        growth_options: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> None:
        require_growable(model)
        self.growth = GrowthPlugin(policy, max_params=max_params, **(growth_options or {}))
        plugins = [self.growth, *(template_kwargs.pop("plugins", None) or [])]
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            plugins=plugins,
            **template_kwargs,
        )
