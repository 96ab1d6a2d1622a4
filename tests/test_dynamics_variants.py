"""Timing variants with Variance Transfer's init (``benchmarks.variants``: ``early_vt``,
``plateau_vt``, ``rank_vt``): the timing of ``early``/``plateau``/``rank``, every growth made
of (V,V)/(Z,-Z) pairs, exact, to the same final width."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _avalanche import digits_stream, mlp_net
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.supervised import Naive

from net2grow.benchmarks.variants import VARIANTS, growth_plugins
from net2grow.strategies import Early, GrowthPlugin, PlateauWidths, RankWidths

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WIDTHS = [8, 12, 16, 20, 24]
N_EXP = 5
#: hidden layer -> (its weight, the weight that reads it)
READER = {"0": ("0.weight", "2.weight"), "2": ("2.weight", "4.weight")}


def check_pairs(net: Any, seen: list[tuple[str, int, int]]) -> Any:
    """A growth hook: the units each widening adds are (V,V)/(Z,-Z) pairs."""

    def hook(record: Any, changes: Any) -> None:
        old, new = record.old_width, record.new_width
        half = (new - old) // 2
        assert record.op == "widen" and (new - old) % 2 == 0 and half > 0
        params = dict(net.named_parameters())
        own, reader = (params[n].detach() for n in READER[record.layer])
        first, second = slice(old, old + half), slice(old + half, new)
        assert torch.equal(own[first], own[second])  # the same incoming weights V
        assert torch.equal(reader[:, first], -reader[:, second])  # outgoing Z and -Z
        assert reader[:, first].abs().min() > 0  # not zero: both units get gradients
        assert record.max_abs_error is not None and record.max_abs_error < 1e-5
        seen.append((record.layer, old, new))

    return hook


@pytest.mark.parametrize(
    ("variant", "policy"),
    [("early_vt", Early), ("plateau_vt", PlateauWidths), ("rank_vt", RankWidths)],
)
def test_timing_variants_grow_vt_pairs_to_the_final_width(variant: str, policy: type) -> None:
    assert variant in VARIANTS and "init='vt'" in VARIANTS[variant]
    plugins = growth_plugins(
        variant, widths=WIDTHS, max_params=None, n_experiences=N_EXP, epochs=1
    )
    assert len(plugins) == 1 and isinstance(plugins[0], GrowthPlugin)
    assert isinstance(plugins[0].policy, policy) and plugins[0].init == "vt"
    assert plugins[0].policy.widths == WIDTHS

    stream = digits_stream(N_EXP)
    net = mlp_net(WIDTHS[0])
    seen: list[tuple[str, int, int]] = []
    net.register_growth_hook(check_pairs(net, seen))
    widths: list[int] = []

    class Widths(SupervisedPlugin):
        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            widths.append(net.width("0"))

    strategy = Naive(
        model=net, optimizer=torch.optim.Adam(net.parameters(), lr=0.01), train_mb_size=64,
        train_epochs=1, plugins=[*plugins, Widths()], evaluator=EvaluationPlugin(loggers=[]),
        device="cpu",
    )  # fmt: skip
    for exp in stream.train_stream:
        strategy.train(exp)
    assert widths == sorted(widths) and widths[-1] == WIDTHS[-1]  # the final width, in time
    assert [net.width(n) for n in ("0", "2")] == [WIDTHS[-1]] * 2
    assert {layer for layer, _, _ in seen} == {"0", "2"}
    assert sum(new - old for layer, old, new in seen if layer == "0") == WIDTHS[-1] - WIDTHS[0]
    if variant == "early_vt":  # the final width within the first two experiences
        assert widths[:3] == [8, 16, 24]
