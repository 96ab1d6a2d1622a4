"""benchmarks.expansion: the expansion methods of the continual comparison are built at equal
memory (parameters x 4 B + replay buffer) with fixed --large Replay, and refuse the wrong
scenario."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from net2grow.benchmarks.expansion import (
    EXPANSION_METHODS,
    LOGIT_TAU,
    expand_mem_size,
    final_params,
    growth_per_experience,
    make_expansion_strategy,
)
from net2grow.benchmarks.methods import Setting
from net2grow.benchmarks.models import count_params, make_model
from net2grow.strategies.expand_loss import LogitAdjustedLoss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Meta:
    input_shape = (64,)
    n_classes = 10
    n_experiences = 5


def setting(scenario: str = "class", model: str = "mlp", mem_size: int = 200) -> Setting:
    return Setting(
        stream="split-digits", scenario=scenario, model=model, small=16, large=64, epochs=1,
        mb_size=32, lr=1e-3, mem_size=mem_size, ewc_lambda=1.0, device="cpu",
    )  # fmt: skip


def common() -> dict:
    return dict(criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1,
                eval_mb_size=256, device="cpu", evaluator=None)  # fmt: skip


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_expand_has_the_memory_of_fixed_large_replay(family: str) -> None:
    s = setting(model=family)

    def model_fn(hidden: int, task_aware: bool = False) -> nn.Module:
        return make_model(family, Meta.input_shape, hidden, 10, task_aware=task_aware)

    growth = growth_per_experience(model_fn, s, Meta, False)
    assert set(growth.values()) == {12}  # 16 -> 64 in 4 equal steps
    params = final_params(model_fn, s, Meta, growth)
    assert params == count_params(model_fn(64))  # the same shapes as the large model
    budget = 4 * count_params(model_fn(64)) + 200 * 64
    mem = expand_mem_size(model_fn, s, Meta, growth)
    assert mem == 200 and 4 * params + mem * 64 <= budget < 4 * params + (mem + 1) * 64
    strategy, net = make_expansion_strategy(
        "expand", model_fn=model_fn, setting=s, meta=Meta, common=common()
    )
    assert strategy.memory == {"params_final": params, "mem_size": 200, "bytes": budget}
    assert strategy.replay.mem_size == 200 and strategy.growth.protect == "independent"
    loss = strategy._criterion  # the logit-adjusted loss, not common()'s plain one
    assert isinstance(loss, LogitAdjustedLoss) and loss.tau == LOGIT_TAU
    assert net.width(net.layers[0]) == 16
    # a wider growth pays for its parameters with replay samples (64 B each here)
    wide = {n: 13 for n in growth}  # 16 -> 68 units
    p68 = final_params(model_fn, s, Meta, wide)
    assert p68 == count_params(model_fn(68))
    if family == "mlp":
        mem68 = expand_mem_size(model_fn, s, Meta, wide)
        assert mem68 == (budget - 4 * p68) // 64 and 0 < mem68 < 200
    else:  # 9 x 68^2 weights: more than the whole buffer's bytes
        with pytest.raises(ValueError, match="bytes more than fixed --large Replay"):
            expand_mem_size(model_fn, s, Meta, wide)


def test_expand_lateral_is_task_incremental_and_bad_requests_are_refused() -> None:
    assert set(EXPANSION_METHODS) == {"expand", "expand-lateral"}
    s = setting("task")

    def model_fn(hidden: int, task_aware: bool = True) -> nn.Module:
        return make_model("mlp", Meta.input_shape, hidden, 2, task_aware=task_aware)

    strategy, net = make_expansion_strategy(
        "expand-lateral", model_fn=model_fn, setting=s, meta=Meta, common=common()
    )
    assert strategy.growth.protect == "lateral" and strategy.replay is None
    assert strategy.aux.weight == 0.0
    assert strategy.inherit is not None  # new units start as copies of frozen ones
    out = net(torch.zeros(3, 64), torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 2)
    with pytest.raises(ValueError, match="--scenario task"):
        make_expansion_strategy("expand-lateral", model_fn=model_fn, setting=setting("class"),
                                meta=Meta, common=common())  # fmt: skip
    with pytest.raises(ValueError, match="expand-lateral"):
        make_expansion_strategy("expand", model_fn=model_fn, setting=s, meta=Meta,
                                common=common())  # fmt: skip
    with pytest.raises(ValueError, match="unknown expansion method"):
        make_expansion_strategy("der", model_fn=model_fn, setting=s, meta=Meta, common=common())
    tiny = Setting(**{**setting().__dict__, "mem_size": 0, "large": 200})
    with pytest.raises(ValueError, match="bytes more"):

        def fn(hidden: int, task_aware: bool = False) -> nn.Module:
            return make_model("mlp", Meta.input_shape, hidden, 10, task_aware=task_aware)

        g = {n: 1000 for n in growth_per_experience(fn, tiny, Meta, False)}
        expand_mem_size(fn, tiny, Meta, g)
    assert math.prod(Meta.input_shape) == 64
