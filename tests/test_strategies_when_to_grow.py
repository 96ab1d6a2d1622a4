"""When to grow: ``Early``, ``PlateauWidths``, ``RankWidths`` reach the same final width."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.strategies.policies import (
    Early,
    PlateauWidths,
    RankWidths,
    Widen,
    effective_rank,
)

WIDTHS = [4, 6, 8, 11, 16]


def net() -> GrowableNetwork:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    return GrowableNetwork(model, torch.zeros(2, 6))


def fake_strategy(k: int, rank: int = 6) -> SimpleNamespace:
    """A strategy at experience ``k`` whose data has inputs of the given rank."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(64, rank, generator=g) @ torch.randn(rank, 6, generator=g)
    data = TensorDataset(x, torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long))
    return SimpleNamespace(
        clock=SimpleNamespace(train_exp_counter=k), experience=SimpleNamespace(dataset=data)
    )


def apply(n: GrowableNetwork, actions) -> None:
    for a in actions:
        assert isinstance(a, Widen)
        n.widen(a.layer, a.width)


def run(policy, n_exp=5, loss=None, rank=6) -> list[int]:
    n, widths = net(), []
    for k in range(n_exp):
        s = fake_strategy(k, rank)
        apply(n, policy.before_experience(s, n))
        widths.append(n.width("0"))
        for i in range(60 if loss else 0):
            s.loss = torch.tensor(loss(i))
            apply(n, policy.after_iteration(s, n))
    assert n.width("2") == n.width("0")
    return widths


def test_early_reaches_the_final_width_within_k_experiences():
    assert run(Early(WIDTHS, 5, k=2)) == [4, 8, 16, 16, 16]
    assert run(Early(WIDTHS, 5, k=1)) == [4, 16, 16, 16, 16]
    assert run(Early(WIDTHS, 5, k=4)) == [4, 6, 8, 11, 16]


def test_plateau_grows_on_flat_loss_and_never_later_than_its_deadline():
    # a flat loss: one step mid-experience in each of the first experiences
    flat = run(PlateauWidths(WIDTHS, 5, patience=5, smoothing=0.0), loss=lambda i: 1.0)
    assert flat == [4, 6, 8, 11, 16]
    # a loss that keeps falling: no plateau, growth only at the deadlines (one step behind)
    falling = run(PlateauWidths(WIDTHS, 5, patience=5), loss=lambda i: 1.0 / (i + 1))
    assert falling == [4, 4, 6, 8, 16]


def test_rank_signal_grows_saturated_layers_first():
    # rich data (rank 6): every layer uses at least a quarter of its units every time (copies
    # made by net2net growth add no rank until they train apart, so utilisation falls)
    p = RankWidths(WIDTHS, 5, threshold=0.25)
    assert run(p, rank=6) == [4, 6, 8, 11, 16]
    assert set(p.utilisation) == {"0", "2"}
    low = RankWidths(WIDTHS, 5, threshold=0.9)
    assert run(low, rank=1) == [4, 4, 6, 8, 16]  # rank-1 data: deadlines only
    assert max(low.utilisation.values()) < 0.9
    assert RankWidths(WIDTHS, 5).state_dict()["step"] == 0


def test_effective_rank_values():
    assert effective_rank(torch.eye(8) - torch.eye(8).mean(0)) == pytest.approx(7.0, rel=1e-6)
    rank1 = torch.randn(50, 1) @ torch.randn(1, 9)
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.zeros(5, 3)) == 1.0


def test_bad_arguments():
    with pytest.raises(GrowthError, match="non-decreasing list of positive ints"):
        Early([8, 4], 5)
    with pytest.raises(GrowthError, match="n_experiences must be an int >= 1"):
        Early(WIDTHS, 0)
    with pytest.raises(GrowthError, match="k must be an int >= 1"):
        Early(WIDTHS, 5, k=0)
    with pytest.raises(GrowthError, match="threshold must be in"):
        RankWidths(WIDTHS, 5, threshold=1.5)
    p = PlateauWidths(WIDTHS, 5)
    p.load_state_dict({"step": 2, "plateau": p.plateau.state_dict()})
    assert p.state_dict()["step"] == 2
