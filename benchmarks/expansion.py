"""Expansion methods of the continual comparison (``strategies.Expand``), built for
``benchmarks.continual``.

- ``expand`` (class-incremental): DER-style. Starts at ``--small`` hidden units per layer and,
  before each experience but the first, freezes every unit and adds a block-diagonal slice
  (``protect="independent"``: a new feature extractor inside the network) so that each layer
  ends at its ``--large`` width (equal steps); replay and DER's auxiliary loss. Memory is
  counted MEMO-style, parameters (4 bytes each) plus the replay buffer (1 byte per input value:
  784 per Fashion-MNIST image, 64 per digits image), and the buffer is sized so that the
  total equals fixed ``--large`` Replay's with ``mem_size`` samples (:func:`expand_mem_size`).
  Trained with the logit-adjusted loss (``Expand(adjust_logits=LOGIT_TAU)``: the replayed
  classes are a small part of every minibatch, and the plain loss learns that imbalance into
  the classifier and the new features).
- ``expand-lateral`` (task-incremental): PNN-like. Same growth with ``protect="lateral"`` (new
  units read old ones, old units never read new ones), one head per task
  (``MultiTaskGrowableNetwork``), no replay and no auxiliary loss: the outputs of old tasks
  are bit-identical after later training, so forgetting is exactly 0. New units start as
  noisy copies of frozen units (``Expand(inherit=True)``): freshly drawn first-layer units
  could all die in a task's first epoch (ReLU, Adam), which left the task to the frozen
  features alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..growth import GrowableNetwork
from .models import count_params, memory_bytes

EXPANSION_METHODS: dict[str, str] = {
    "expand": "class-IL, DER-style: protect='independent' growth --small -> --large, replay "
    "at the total memory of fixed --large Replay (params x 4 B + buffer), auxiliary loss, "
    "logit-adjusted loss",
    "expand-lateral": "task-IL, PNN-like: protect='lateral' growth --small -> --large, one "
    "head per task (MultiTaskGrowableNetwork), no replay: forgetting exactly 0; new units "
    "start as copies of frozen ones (inherit=True)",
}


#: ``tau`` of ``expand``'s logit-adjusted loss (split-fmnist, seeds 0-2: 1 -> 0.803, 2 -> 0.809,
#: 3 -> 0.809 final accuracy; the plain loss 0.792).
LOGIT_TAU = 2.0


def image_bytes(meta: Any) -> int:
    """Bytes of one stored input (one uint8 per value)."""
    return int(math.prod(meta.input_shape))


def _network(model: nn.Module, meta: Any, task_aware: bool) -> GrowableNetwork:
    x = torch.zeros(2, *meta.input_shape)
    if task_aware:
        from ..strategies import MultiTaskGrowableNetwork

        return MultiTaskGrowableNetwork(model, (x, torch.zeros(2, dtype=torch.long)))
    return GrowableNetwork(model, x)


def growth_per_experience(
    model_fn: Callable[[int, bool], nn.Module], setting: Any, meta: Any, task_aware: bool
) -> dict[str, int]:
    """New units per layer and experience: each layer of ``model_fn(small)`` grows in equal
    steps towards its width in ``model_fn(large)`` (rounded down, at least 1 unit)."""
    from .. import strategies  # noqa: F401  (the Avalanche head rules, before tracing)

    small = _network(model_fn(setting.small, task_aware), meta, task_aware)
    large = _network(model_fn(setting.large, task_aware), meta, task_aware)
    steps = max(meta.n_experiences - 1, 1)
    return {
        n: max((large.width(n) - small.width(n)) // steps, 1)
        for n in small.layers
        if n in large.layers
    }


def final_params(
    model_fn: Callable[[int, bool], nn.Module],
    setting: Any,
    meta: Any,
    growth: dict[str, int],
) -> int:
    """Parameters of the class-incremental ``expand`` network after its last growth (grown on
    a throwaway copy)."""
    from ..strategies.policies import coupled_groups

    net = _network(model_fn(setting.small, False), meta, False)
    for _ in range(meta.n_experiences - 1):
        for group in coupled_groups(net):
            add = max(growth.get(n, 0) for n in group)
            if add:
                net.widen(group[0], net.width(group[0]) + add, init="zero", verify=False)
    return count_params(net)


def expand_mem_size(
    model_fn: Callable[[int, bool], nn.Module], setting: Any, meta: Any, growth: dict[str, int]
) -> int:
    """Replay buffer of ``expand``: the samples that fit in fixed ``--large`` Replay's total
    memory (``memory_bytes(params(model_fn(large)), setting.mem_size)``) beside ``expand``'s
    final parameters. ``ValueError`` when its parameters alone exceed that memory."""
    budget = memory_bytes(model_fn(setting.large, False), setting.mem_size, meta.input_shape)
    left = budget - 4 * final_params(model_fn, setting, meta, growth)
    if left < 0:
        raise ValueError(
            f"expand's final network needs {-left} bytes more than fixed --large Replay's whole "
            f"memory ({budget} bytes): lower --large or raise the replay memory"
        )
    return left // image_bytes(meta)


def make_expansion_strategy(
    method: str,
    *,
    model_fn: Callable[[int, bool], nn.Module],
    setting: Any,
    meta: Any,
    common: dict[str, Any],
) -> tuple[Any, GrowableNetwork]:
    """Build ``(strategy, model)`` for an :data:`EXPANSION_METHODS` entry.

    ``model_fn(hidden, task_aware)`` builds the benchmark's model at a hidden width;
    ``setting`` is ``continual.Setting``; ``meta`` has ``input_shape``, ``n_classes`` and
    ``n_experiences``; ``common`` holds the strategy keywords every method shares (criterion,
    minibatch sizes, epochs, device, evaluator). The strategy's ``memory`` attribute holds
    ``{"params_final", "mem_size", "bytes"}`` (class-incremental ``expand``).
    """
    from ..strategies.expand import Expand

    if method not in EXPANSION_METHODS:
        raise ValueError(f"unknown expansion method {method!r}; choose from "
                         f"{', '.join(EXPANSION_METHODS)}")
    task_aware = method == "expand-lateral"
    if task_aware and setting.scenario != "task":
        raise ValueError("expand-lateral is task-incremental: run it with --scenario task")
    if not task_aware and setting.scenario == "task":
        raise ValueError("expand is class-incremental: use expand-lateral with --scenario task")
    growth = growth_per_experience(model_fn, setting, meta, task_aware)
    net = _network(model_fn(setting.small, task_aware), meta, task_aware).to(setting.device)
    opt = torch.optim.Adam(net.parameters(), lr=setting.lr)
    if task_aware:
        strategy = Expand(
            net, opt, growth=growth, protect="lateral", mem_size=0, aux_weight=0.0,
            inherit=True, **common,
        )  # fmt: skip
        strategy.memory = {"params_final": None, "mem_size": 0, "bytes": None}
        return strategy, net
    mem = expand_mem_size(model_fn, setting, meta, growth)
    plain = {k: v for k, v in common.items() if k != "criterion"}  # its own loss
    strategy = Expand(
        net, opt, growth=growth, protect="independent", mem_size=mem, adjust_logits=LOGIT_TAU,
        **plain,
    )  # fmt: skip
    params = final_params(model_fn, setting, meta, growth)
    strategy.memory = {
        "params_final": params,
        "mem_size": mem,
        "bytes": 4 * params + mem * image_bytes(meta),
    }
    return strategy, net
