"""GrowthPlugin inside Avalanche strategies on the class-incremental split-digits stream.

Every run trains tiny MLPs for one epoch per experience and checks measured behaviour: the
widths the policy asked for, accuracy on each experience right after training on it (chance is
0.1 over ten classes), optimizer step counts, parameter budgets.
"""

from __future__ import annotations

import pytest
import torch
from _avalanche import STRATEGIES, digits_stream, mlp_net
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import (
    EvaluationPlugin,
    EWCPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.supervised import Naive
from torch import nn

from net2grow.growth import GrowthError
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.plugin import check_optimizer
from net2grow.strategies.policies import EveryExperience, GrowthPolicy, OnPlateau, Widen


@pytest.fixture(scope="module")
def stream():
    return digits_stream()


def sgd(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True))


def run(strategy, stream, n: int = 5) -> list[float]:
    """Train on the first ``n`` experiences; accuracy on each right after training on it."""
    accs = []
    for i, exp in enumerate(stream.train_stream[:n]):
        strategy.train(exp)
        res = strategy.eval([stream.test_stream[i]])
        accs.append(res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{i:03d}"])
    return accs


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_class_incremental_run_grows_as_asked_and_learns(name, stream):
    cls, kwargs = STRATEGIES[name]
    net = mlp_net()
    plugin = GrowthPlugin(EveryExperience(factor=1.5), generator=0)
    strategy = cls(
        model=net, optimizer=sgd(net), criterion=nn.CrossEntropyLoss(), train_mb_size=8,
        eval_mb_size=512, plugins=[plugin], evaluator=evaluator(), **kwargs,
    )
    widths = []
    accs = []
    for i, exp in enumerate(stream.train_stream):
        strategy.train(exp)
        widths.append([net.width(n) for n in ("0", "2")])
        res = strategy.eval([stream.test_stream[i]])
        accs.append(res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{i:03d}"])
    # EveryExperience: nothing before the first experience, then x1.5 before each one.
    assert widths == [[32, 32], [48, 48], [72, 72], [108, 108], [162, 162]]
    grown = [e for e in plugin.events if e.status == "grown"]
    assert [(e.experience, e.layer) for e in grown] == [(i, n) for i in range(1, 5) for n in "02"]
    assert all(e.max_abs_error is not None and e.max_abs_error < 1e-4 for e in grown)
    assert net.num_parameters() == grown[-1].params_after
    # Plasticity: the grown network learns each new pair of classes (chance: 0.1).
    assert sum(accs) / len(accs) > 0.8, accs
    if name == "replay":
        final = strategy.eval(stream.test_stream)
        # the whole stream after the last experience: about 0.75 to 0.85 across model seeds;
        # without replay, forgetting leaves about 0.2 (chance: 0.1)
        assert final["Top1_Acc_Stream/eval_phase/test_stream/Task000"] > 0.5


class _StateProbe(SupervisedPlugin):
    """Records Adam's state at ``before_training_exp`` (after Avalanche rebuilt the optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots: list[dict[str, dict]] = []

    def before_training_exp(self, strategy, **kwargs):
        opt = strategy.optimizer
        self.snapshots.append({
            n: {k: v.clone() for k, v in opt.state[p].items()}
            for n, p in strategy.model.named_parameters() if opt.state.get(p)
        })


def test_adam_state_is_carried_and_step_counts_keep_counting(stream):
    net = mlp_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    probe = _StateProbe()
    strategy = Naive(
        model=net, optimizer=opt, train_mb_size=8, eval_mb_size=512, evaluator=evaluator(),
        plugins=[GrowthPlugin(EveryExperience(factor=1.5), generator=0), probe],
    )
    strategy.train(stream.train_stream[0])
    iters0 = strategy.clock.train_iterations
    before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters()}
    strategy.train(stream.train_stream[1])
    # Right after growth and Avalanche's optimizer rebuild: nothing was reset.
    after = probe.snapshots[1]
    assert set(after) == {n for n, _ in net.named_parameters()}
    for n, p in net.named_parameters():
        assert float(after[n]["step"]) == iters0, n
        assert after[n]["exp_avg"].shape == p.shape
    # A consumer's columns of the old units keep their moments exactly ("4" read 32 units).
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(after["4.weight"][key][:, :32], before["4.weight"][key])
        assert after["4.weight"][key][:, 32:].abs().sum() > 0  # copies start from their source
    for exp in stream.train_stream[2:4]:
        strategy.train(exp)
    total = strategy.clock.train_iterations
    assert all(float(opt.state[p]["step"]) == total for p in net.parameters())
    assert net.width("0") == 108
    check_optimizer(opt, net)


def test_optimizer_state_reset_restarts_only_grown_parameters(stream):
    net = mlp_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    plugin = GrowthPlugin(EveryExperience(factor=1.5, layers=["2"]), optimizer_state="reset")
    strategy = Naive(model=net, optimizer=opt, train_mb_size=8, evaluator=evaluator(),
                     plugins=[plugin])
    strategy.train(stream.train_stream[0])
    iters0 = strategy.clock.train_iterations
    strategy.train(stream.train_stream[1])
    iters1 = strategy.clock.train_iterations - iters0
    steps = {n: float(opt.state[p]["step"]) for n, p in net.named_parameters()}
    # Widening "2" grows its rows and the columns of "4"; layer "0" is untouched.
    assert steps == {"0.weight": iters0 + iters1, "0.bias": iters0 + iters1,
                     "2.weight": iters1, "2.bias": iters1, "4.weight": iters1,
                     "4.bias": iters0 + iters1}


def test_mid_experience_growth_on_plateau(stream):
    net = mlp_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    # min_delta far above any improvement: the loss "plateaus" after `patience` iterations.
    policy = OnPlateau(patience=5, min_delta=10.0, factor=1.25, max_growths=2)
    plugin = GrowthPlugin(policy, generator=0)
    strategy = Naive(model=net, optimizer=opt, train_mb_size=4, evaluator=evaluator(),
                     plugins=[plugin])
    accs = run(strategy, stream, n=3)
    grown = [e for e in plugin.events if e.status == "grown"]
    assert {e.phase for e in grown} == {"mid_experience"}
    # Two growths per experience, each of both hidden layers, after patience+1 iterations.
    assert len(grown) == 3 * 2 * 2
    assert net.width("0") == round(round(round(round(round(round(32 * 1.25) * 1.25) * 1.25)
                                                       * 1.25) * 1.25) * 1.25)
    first = grown[0]
    assert first.experience == 0 and first.iteration == policy.patience + 1
    total = strategy.clock.train_iterations
    assert all(float(opt.state[p]["step"]) == total for p in net.parameters())
    assert min(accs) > 0.8, accs


def _mlp_params(h1: int, h2: int) -> int:
    return 64 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10


def test_max_params_is_shared_then_skips_growth(stream):
    net = mlp_net()
    budget = _mlp_params(48, 40)  # room for 1.5x on one layer, not on both
    plugin = GrowthPlugin(EveryExperience(factor=1.5), max_params=budget, generator=0)
    strategy = Naive(model=net, optimizer=sgd(net), train_mb_size=8, evaluator=evaluator(),
                     plugins=[plugin])
    run(strategy, stream, n=3)
    by_exp = [(e.experience, e.layer, e.status, e.new_width) for e in plugin.events]
    # Shared: both layers get the same part of the 16 units they asked for (not "0" first).
    assert by_exp[:2] == [(1, "0", "capped", 45), (1, "2", "capped", 45)]
    assert all("max_params" in e.reason for e in plugin.events[:2])
    assert [s for _, _, s, _ in by_exp[2:]] == ["skipped", "skipped"]
    assert net.num_parameters() == _mlp_params(45, 45) <= budget
    # The common width is the largest that fits.
    assert _mlp_params(46, 46) > budget


def test_plain_model_is_rejected_with_a_fix(stream):
    model = nn.Sequential(nn.Linear(64, 10))
    strategy = Naive(model=model, optimizer=sgd(model), evaluator=evaluator(),
                     plugins=[GrowthPlugin(EveryExperience())])
    with pytest.raises(TypeError, match="GrowableNetwork"):
        strategy.train(stream.train_stream[0])


class _WidenOutput(GrowthPolicy):
    def before_experience(self, strategy, net):
        return [Widen("4", width=12)]  # the output layer: refused by the engine


def test_refused_growth_is_recorded_or_raised(stream):
    net = mlp_net()
    plugin = GrowthPlugin(_WidenOutput())
    strategy = Naive(model=net, optimizer=sgd(net), train_mb_size=8, evaluator=evaluator(),
                     plugins=[plugin])
    with pytest.warns(UserWarning, match="growth refused"):
        strategy.train(stream.train_stream[0])
    assert [e.status for e in plugin.events] == ["refused"]
    assert net.width("4") == 10
    strict = Naive(model=net, optimizer=sgd(net), evaluator=evaluator(),
                   plugins=[GrowthPlugin(_WidenOutput(), on_refusal="raise")])
    with pytest.raises(GrowthError, match="output"):
        strict.train(stream.train_stream[0])


def test_deepen_every_experience_keeps_optimizer_state(stream):
    net = mlp_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    plugin = GrowthPlugin(EveryExperience(factor=1.25, deepen=True), generator=0)
    strategy = Naive(model=net, optimizer=opt, train_mb_size=4, evaluator=evaluator(),
                     plugins=[plugin])
    accs, starts = [], []
    for i, exp in enumerate(stream.train_stream[:3]):
        starts.append(strategy.clock.train_iterations)
        strategy.train(exp)
        accs.append(strategy.eval([stream.test_stream[i]])[
            f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{i:03d}"])
    deepened = [e for e in plugin.events if e.op == "deepen" and e.status == "grown"]
    assert [e.experience for e in deepened] == [1, 2]
    new = [n for n, _ in net.named_parameters() if n.startswith("grown.")]
    assert len(new) == 4  # two identity Linear layers, weight and bias
    total = strategy.clock.train_iterations
    steps = {n: float(opt.state[p]["step"]) for n, p in net.named_parameters()}
    assert steps["0.weight"] == total
    # Each new layer's Adam state counts from the experience it was inserted before.
    assert sorted(steps[n] for n in new) == [total - starts[2]] * 2 + [total - starts[1]] * 2
    assert min(accs) > 0.8, accs


def test_growth_follows_the_strategy_device(device, stream):
    net = mlp_net()  # built on the CPU, trained on `device`
    ewc, si = EWCPlugin(ewc_lambda=1.0), SynapticIntelligencePlugin(si_lambda=1.0)
    strategy = Naive(
        model=net, optimizer=sgd(net), train_mb_size=8, eval_mb_size=512, device=device,
        evaluator=evaluator(), plugins=[GrowthPlugin(EveryExperience(1.5), generator=0), ewc, si],
    )
    accs = run(strategy, stream, n=3)
    assert {p.device.type for p in net.parameters()} == {device.type}
    assert net.width("0") == net.width("2") == 72
    for e in (0, 1):
        imp = ewc.importances[e]["2.weight"].data
        assert imp.device.type == device.type and imp.shape == (72, 72)
    assert si.ewc_data[1]["2.weight"].data.shape == (72 * 72,)
    assert min(accs) > 0.8, accs


def test_a_second_growth_plugin_is_refused_before_anything_grows(stream):
    net = mlp_net()
    every, plateau = GrowthPlugin(EveryExperience()), GrowthPlugin(OnPlateau())
    two = Naive(model=net, optimizer=sgd(net), evaluator=evaluator(), plugins=[every, plateau])
    with pytest.raises(GrowthError, match=r"GrowthPlugin\(EveryExperience\) and "
                                          r"GrowthPlugin\(OnPlateau\).*Keep one"):
        two.train(stream.train_stream[0])
    twice = Naive(model=net, optimizer=sgd(net), evaluator=evaluator(), plugins=[every, every])
    with pytest.raises(GrowthError, match=r"GrowthPlugin\(EveryExperience\) is in the "
                                          r"strategy's plugins 2 times.*List it once"):
        twice.train(stream.train_stream[0])
    assert net.width("0") == 32 and not every.events and not plateau.events


def test_max_width_names_are_checked(stream):
    net = mlp_net()
    plugin = GrowthPlugin(EveryExperience(), max_width={"O": 40})  # a letter O, not a zero
    strategy = Naive(model=net, optimizer=sgd(net), evaluator=evaluator(), plugins=[plugin])
    with pytest.raises(GrowthError, match=r"max_width=.*\['O'\].*growable layers: 0, 2"):
        strategy.train(stream.train_stream[0])
