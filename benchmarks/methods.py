"""The methods of the continual-learning comparison: their names and how each is built.

Names:

- fixed models: ``naive-small``, ``naive-large``, ``ewc``, ``lwf``, ``replay``, ``joint``,
  ``pnn`` (Avalanche's Progressive Neural Network, task-incremental MLPs only);
- growing models: ``grow-<base>`` (``base`` one of naive, replay, ewc) start at ``--small`` and
  follow :func:`schedule.width_schedule` to exactly ``--large``; ``grow-<base>-<variant>`` does
  the same with the growth options of a variant of :data:`variants.VARIANTS` (initialisation,
  optimizer state, learning rate of new units, when to grow);
- expansion methods of :data:`expansion.EXPANSION_METHODS` (protected growth: old units frozen).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..growth import GrowableNetwork
from .models import count_params, make_model
from .schedule import WidthSchedule, width_schedule

FIXED = ("naive-small", "naive-large", "ewc", "lwf", "replay", "joint", "pnn")
GROWING_BASES = ("naive", "replay", "ewc")
GROWING = tuple(f"grow-{b}" for b in GROWING_BASES)


@dataclass(frozen=True)
class Setting:
    """Hyperparameters shared by every method of one run."""

    stream: str
    scenario: str
    model: str
    small: int
    large: int
    epochs: int
    mb_size: int
    lr: float
    mem_size: int
    ewc_lambda: float
    device: str


def variant_names() -> dict[str, str]:
    """Growth variants: name -> one-line description."""
    from .variants import VARIANTS

    return dict(VARIANTS)


def expansion_names() -> dict[str, str]:
    """Expansion methods: name -> one-line description."""
    from .expansion import EXPANSION_METHODS

    return dict(EXPANSION_METHODS)


def all_methods() -> tuple[str, ...]:
    """Every method name the comparison accepts, in table order."""
    variants = [f"grow-{b}-{v}" for b in GROWING_BASES for v in variant_names()]
    return (*FIXED, *GROWING, *variants, *expansion_names())


def split_growing(method: str) -> tuple[str, str | None]:
    """``grow-<base>[-<variant>]`` -> ``(base, variant or None)``."""
    rest = method.removeprefix("grow-")
    base, _, variant = rest.partition("-")
    return base, variant or None


def is_growing(method: str) -> bool:
    """Whether ``method`` starts small and grows (grow-* and the expansion methods)."""
    return method.startswith("grow-") or method in expansion_names()


def hidden_setting(method: str, s: Setting) -> str:
    """The hidden-width column of the table: the setting of ``method``."""
    if is_growing(method):
        return f"{s.small}->{s.large}"
    if method == "pnn":
        return f"{s.small}/column"
    return str(s.small if method == "naive-small" else s.large)


def seed_everything(seed: int) -> None:
    """Seed every RNG, so that a run does not depend on the ones before it."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _common(method: str, s: Setting, tb_dir: str | None) -> dict[str, Any]:
    """The keyword arguments every strategy gets: loss, sizes, device and the evaluator."""
    from avalanche.training.plugins import EvaluationPlugin

    from ..strategies.metrics import growth_metrics, parameter_count_metric, training_flops_metric
    from .run_metrics import metric_classes

    training_loss, widths = metric_classes()
    metrics: list[Any] = [
        parameter_count_metric(),
        training_flops_metric(),
        training_loss(),
        widths(),
    ]
    if is_growing(method):
        metrics.extend(growth_metrics())
    loggers = []
    if tb_dir is not None:
        from avalanche.logging import TensorboardLogger

        loggers.append(TensorboardLogger(tb_log_dir=tb_dir))
    return dict(
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=s.mb_size,
        train_epochs=s.epochs,
        eval_mb_size=512,
        device=s.device,
        evaluator=EvaluationPlugin(*metrics, loggers=loggers),
    )


def make_strategy(method: str, s: Setting, meta: Any, seed: int, tb_dir: str | None):
    """Build ``(strategy, model)`` for ``method``.

    Every method gets the same evaluator metrics (parameter count, training FLOPs, training
    loss, hidden widths; the growth metrics for growing methods), logged to a
    ``TensorboardLogger`` in ``tb_dir`` when given.
    """
    from avalanche.training.supervised import EWC, JointTraining, LwF, Naive, PNNStrategy, Replay

    from .. import strategies  # noqa: F401  (its first import draws from torch's RNG: before seeding)

    if method not in all_methods():
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(all_methods())}")
    seed_everything(seed)
    common = _common(method, s, tb_dir)
    task_aware = s.scenario == "task"

    def model_fn(hidden: int, task_aware: bool = task_aware) -> nn.Module:
        return make_model(s.model, meta.input_shape, hidden, meta.n_classes, task_aware=task_aware)

    if method in expansion_names():
        from .expansion import make_expansion_strategy

        return make_expansion_strategy(
            method, model_fn=model_fn, setting=s, meta=meta, common=common
        )
    if method == "pnn":
        import math

        from avalanche.models import PNN

        if s.model != "mlp":
            raise ValueError("pnn: Avalanche's PNN is an MLP; use --model mlp")
        in_features = math.prod(meta.input_shape)
        model = PNN(num_layers=2, in_features=in_features, hidden_features_per_column=s.small)
        opt = torch.optim.Adam(model.parameters(), lr=s.lr)
        return PNNStrategy(model=model, optimizer=opt, **common), model
    growing = method.startswith("grow-")
    model = model_fn(s.small if method == "naive-small" or growing else s.large)
    if task_aware:  # Avalanche passes task labels only to a MultiTaskModule
        from ..strategies import MultiTaskGrowableNetwork

        example = (torch.zeros(2, *meta.input_shape), torch.zeros(2, dtype=torch.long))
        model = MultiTaskGrowableNetwork(model, example)
    plugins: list[Any] = []
    base = method
    if growing:
        base, variant = split_growing(method)
        if not task_aware:
            model = GrowableNetwork(model, torch.zeros(2, *meta.input_shape))
        widths = width_schedule(s.small, s.large, meta.n_experiences - 1)
        # final-size budget: the large model (task heads are added as tasks arrive: no cap);
        # the schedule ends exactly there, the budget only guards it
        budget = None if task_aware else count_params(model_fn(s.large))
        if variant is None:
            from ..strategies import GrowthPlugin

            plugins.append(GrowthPlugin(WidthSchedule(widths), max_params=budget))
        else:
            from .variants import growth_plugins

            plugins.extend(
                growth_plugins(
                    variant,
                    widths=widths,
                    max_params=budget,
                    n_experiences=meta.n_experiences,
                    epochs=s.epochs,
                )
            )
    model = model.to(s.device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    kwargs = dict(model=model, optimizer=opt, plugins=plugins, **common)
    if base in ("naive", "naive-small", "naive-large"):
        return Naive(**kwargs), model
    if base == "ewc":
        return EWC(ewc_lambda=s.ewc_lambda, **kwargs), model
    if base == "lwf":
        return LwF(alpha=1.0, temperature=2.0, **kwargs), model
    if base == "replay":
        return Replay(mem_size=s.mem_size, **kwargs), model
    if base == "joint":
        return JointTraining(**kwargs), model
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(all_methods())}")
