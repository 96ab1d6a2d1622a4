"""Expand's options ``inherit`` (new units start as copies of frozen ones), ``align`` (weight
aligning of the classifier) and ``balance_temperature`` (the classifier stage's softmax
temperature), on split digits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _avalanche import digits_stream, mh_net
from _models import snapshot
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.growth import protect as protection
from net2grow.strategies import Expand
from net2grow.strategies.expand import BalancedHead
from net2grow.strategies.expand_loss import LogitAdjustedLoss
from net2grow.strategies.expand_units import InheritUnits, WeightAlign, align

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def stream():
    return digits_stream(5)


def build(seed: int = 0) -> GrowableNetwork:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    return GrowableNetwork(model, torch.zeros(2, 64))


def probe(stream: Any, n: int = 64) -> Tensor:
    ds = stream.test_stream[0].dataset
    return torch.stack([ds[i][0] for i in range(n)])


def expand(net: GrowableNetwork, **kw: Any) -> Expand:
    options: dict[str, Any] = dict(
        growth=4, mem_size=60, train_mb_size=32, train_epochs=2, evaluator=None
    )
    options.update(kw)
    return Expand(net, torch.optim.Adam(net.parameters(), lr=0.01), **options)


def grown(mode: str, stream: Any) -> GrowableNetwork:
    """A network trained on one experience, protected in ``mode`` and widened by 4 units."""
    net = build()
    expand(net, train_epochs=3).train(stream.train_stream[0])
    net.protect(mode)
    net.widen("0", 20, init="zero")
    net.widen("2", 20, init="zero")
    return net


@torch.no_grad()
def outputs(net: nn.Module, x: Tensor) -> Tensor:
    net.eval()
    try:
        return net(x)
    finally:
        net.train()


# --------------------------------------------------------------------------------------------
# inherit: new units start as copies of frozen ones
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lateral", "independent"])
def test_inherit_copies_frozen_units_and_keeps_the_function(stream, mode: str) -> None:
    net = grown(mode, stream)
    x = probe(stream)
    before_out = outputs(net, x)
    before = snapshot(net)
    copied = InheritUnits(noise=0.0).inherit(net)
    # independent: layer "2" reads only new units, so nothing of a frozen unit fits there
    assert set(copied) == ({"0", "2"} if mode == "lateral" else {"0"})
    for sources in copied.values():
        assert len(sources) == 4 and len(set(sources)) == 4  # distinct frozen sources
        assert all(0 <= s < 16 for s in sources)
    # the function is unchanged: the new units' outgoing weights are still zero
    assert torch.equal(outputs(net, x), before_out)
    w0, b0 = net.get_submodule("0").weight, net.get_submodule("0").bias
    src = torch.tensor(copied["0"])
    assert torch.equal(w0[16:], w0[src]) and torch.equal(b0[16:], b0[src])
    # so the new first-layer units compute exactly what their sources compute
    h = torch.relu(x @ w0.T + b0)
    assert torch.equal(h[:, 16:], h[:, src])
    w2, w2_before = net.get_submodule("2").weight, before["2.weight"]
    if mode == "lateral":  # columns of frozen units copied, new units' columns as grown
        src2 = torch.tensor(copied["2"])
        assert torch.equal(w2[16:, :16], w2[src2, :16])
        assert torch.equal(net.get_submodule("2").bias[16:], before["2.bias"][src2])
    else:  # independent: untouched (new units never read frozen ones)
        assert torch.equal(w2[16:, :16], torch.zeros(4, 16))
        assert torch.equal(net.get_submodule("2").bias, before["2.bias"])
    assert torch.equal(w2[16:, 16:], w2_before[16:, 16:])
    assert torch.equal(w2[:16], w2_before[:16])  # frozen units untouched
    assert protection.violations(net) == []


def test_inherit_noise_and_a_second_call_leaves_inherited_units_alone(stream) -> None:
    net = grown("lateral", stream)
    plugin = InheritUnits(noise=0.1, seed=3)
    copied = plugin.inherit(net)
    w0 = net.get_submodule("0").weight
    diff = w0[16:] - w0[torch.tensor(copied["0"])]
    rel = float(diff.std() / w0[:16].std())
    assert 0.03 < rel < 0.3, rel  # noisy copies: near their sources, not equal to them
    after = snapshot(net)
    assert plugin.inherit(net) == {}  # nothing grown since: nothing copied again
    assert all(torch.equal(v, snapshot(net)[k]) for k, v in after.items())


def test_expand_inherit_keeps_old_units_and_trains_the_copies(stream) -> None:
    net = build()
    x = probe(stream)
    strategy = expand(net, protect="lateral", inherit=True)
    strategy.train(stream.train_stream[0])
    old = outputs(net, x)
    w_first = net.get_submodule("0").weight.detach().clone()
    strategy.train(stream.train_stream[1])
    assert strategy.inherit is not None and set(strategy.inherit.copied) == {"0", "2"}
    w = net.get_submodule("0").weight
    assert torch.equal(w[:16], w_first)  # frozen
    src = torch.tensor(strategy.inherit.copied["0"])
    moved = (w[16:] - w_first[src]).abs().amax(1)
    assert bool((moved > 0).all())  # the copies trained away from their sources
    assert protection.violations(net) == []
    # old classes' logits of the first experience's units: computed as before on old units
    assert outputs(net, x).shape == old.shape


def test_task_incremental_inherit_keeps_old_tasks_bit_identical() -> None:
    tasks = digits_stream(5, task_labels=True)
    net = mh_net(16)
    strategy = Expand(
        net, torch.optim.Adam(net.parameters(), lr=0.01), growth=4, protect="lateral",
        mem_size=0, aux_weight=0.0, inherit=True, train_mb_size=32, train_epochs=2,
        evaluator=None,
    )  # fmt: skip
    x = probe(tasks)
    t0 = torch.zeros(len(x), dtype=torch.long)
    strategy.train(tasks.train_stream[0])
    net.eval()
    with torch.no_grad():
        first = net(x, t0)
    for exp in tasks.train_stream[1:3]:
        strategy.train(exp)
        assert strategy.inherit is not None and strategy.inherit.copied  # copies were made
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, t0), first)  # task 0's outputs never change


def test_inherit_refuses_negative_noise() -> None:
    with pytest.raises(GrowthError, match="noise must be a number >= 0"):
        InheritUnits(noise=-1.0)


# --------------------------------------------------------------------------------------------
# align: weight aligning of the classifier
# --------------------------------------------------------------------------------------------


def test_align_rescales_new_rows_to_the_old_mean_norm() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 5.0], [0.0, 1.0], [1.0, 0.0], [7.0, 7.0]])
    gamma = align(w, old=[0, 1], new=[2, 3])
    assert gamma == pytest.approx(5.0)
    assert torch.allclose(w[2:4].norm(dim=1), torch.tensor([5.0, 5.0]))
    assert torch.equal(w[4], torch.tensor([7.0, 7.0]))  # rows of neither: untouched
    assert torch.equal(w[0], torch.tensor([3.0, 4.0]))


def test_expand_align_equalises_norms_after_each_experience(stream) -> None:
    net = build()
    strategy = expand(net, align=True, balance_epochs=0)
    seen: list[int] = []
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
        new = sorted(int(c) for c in exp.classes_in_this_experience)
        norms = net.get_submodule("4").weight.norm(dim=1)
        if seen:
            assert float(norms[new].mean()) == pytest.approx(float(norms[seen].mean()), rel=1e-5)
        seen += new
    assert strategy.align is not None and len(strategy.align.gammas) == 2
    assert all(g != 1.0 for g in strategy.align.gammas)  # the norms differed before


def test_align_skips_a_head_that_is_not_a_linear_over_classes(stream) -> None:
    plugin = WeightAlign(head="1")  # a ReLU: nothing to align

    class Fake:
        model = grown("independent", stream)
        experience = stream.train_stream[1]

    plugin.after_training_exp(Fake())
    assert plugin.gammas == []


# --------------------------------------------------------------------------------------------
# balance_temperature
# --------------------------------------------------------------------------------------------


def test_classifier_stage_temperature_changes_what_the_stage_minimises(stream) -> None:
    net = build()
    strategy = expand(net, balance_epochs=0)
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
    state = snapshot(net)
    buffer = strategy.replay.storage_policy.buffer
    x = torch.stack([buffer[i][0] for i in range(len(buffer))])
    y = torch.tensor([int(buffer[i][1]) for i in range(len(buffer))])
    logits = {}
    for t in (1.0, 4.0):
        net.load_state_dict(state)
        torch.manual_seed(0)  # the same shuffling of the buffer
        BalancedHead(strategy.replay, 10, temperature=t).after_training_exp(strategy)
        logits[t] = outputs(net, x)
    net.load_state_dict(state)

    def loss(z: Tensor, t: float) -> float:
        return float(nn.functional.cross_entropy(z / t, y))

    # each stage fits its own objective better than the other stage does
    assert loss(logits[4.0], 4.0) < loss(logits[1.0], 4.0)
    assert loss(logits[1.0], 1.0) < loss(logits[4.0], 1.0)


@pytest.mark.parametrize("value", [0, -1.0, True, "2"])
def test_bad_temperature_is_refused(value: Any) -> None:
    with pytest.raises(GrowthError, match="balance_temperature must be a number > 0"):
        expand(build(), balance_temperature=value)


# --------------------------------------------------------------------------------------------
# adjust_logits: the logit-adjusted loss
# --------------------------------------------------------------------------------------------


def test_logit_adjusted_loss_counts_the_prior_and_shifts_the_logits() -> None:
    loss = LogitAdjustedLoss(1.0)
    logits = torch.zeros(4, 3)
    y = torch.tensor([0, 0, 0, 1])  # prior 3/4, 1/4, 0 (floored)
    got = loss(logits, y)
    prior = torch.tensor([0.75, 0.25, 1e-4])
    assert torch.allclose(loss.prior(3, torch.device("cpu")), prior)
    want = nn.functional.cross_entropy(logits + prior.log(), y)
    assert float(got) == pytest.approx(float(want))
    # the frequent class's logit was raised: its samples cost less than under plain CE
    assert float(got) < float(nn.functional.cross_entropy(logits, y))
    loss(logits, torch.tensor([1, 1, 1, 1]))  # counts accumulate: 3 and 5 of 8
    assert torch.allclose(loss.prior(3, torch.device("cpu"))[:2], torch.tensor([3 / 8, 5 / 8]))
    loss.reset()
    assert torch.allclose(loss.prior(3, torch.device("cpu")), torch.full((3,), 1 / 3))


def test_adjusted_training_favours_the_rare_classes(stream) -> None:
    """Trained on a 9:1 imbalanced pair, the plain loss learns the imbalance into the logits
    (the rare class's logit is low on every input); the adjusted loss much less."""
    exp = stream.train_stream[0]
    x = torch.stack([s[0] for s in exp.dataset])
    y = torch.tensor([int(s[1]) for s in exp.dataset])
    common, rare = sorted(set(y.tolist()))
    keep = torch.cat([(y == common).nonzero().flatten(), (y == rare).nonzero().flatten()[:15]])
    x, y = x[keep], y[keep]
    gap = {}
    for name, criterion in (("plain", nn.CrossEntropyLoss()), ("adjusted", LogitAdjustedLoss())):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(30):
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            z = model(x)
            gap[name] = float((z[:, rare] - z[:, common]).mean())
    # the imbalance's log-odds is log(1/9) = -2.2: the adjusted logits are shifted by about that
    assert gap["adjusted"] > gap["plain"] + 1.0, gap


def test_expand_adjust_logits_installs_the_loss_and_refuses_a_criterion(stream) -> None:
    net = build()
    strategy = expand(net, adjust_logits=1.0)
    assert isinstance(strategy._criterion, LogitAdjustedLoss)
    strategy.train(stream.train_stream[0])
    strategy.train(stream.train_stream[1])
    counts = strategy._criterion.counts
    assert counts is not None
    # counted in experience 1 only (reset at its start): its classes and the replayed ones
    classes = {int(c) for c in stream.train_stream[1].classes_in_this_experience}
    replayed = {int(c) for c in stream.train_stream[0].classes_in_this_experience}
    assert {int(i) for i in counts.nonzero().flatten()} == classes | replayed
    with pytest.raises(GrowthError, match="builds its own loss"):
        expand(build(), adjust_logits=1.0, criterion=nn.CrossEntropyLoss())
    with pytest.raises(GrowthError, match="adjust_logits must be a number > 0"):
        expand(build(), adjust_logits=-1.0)
