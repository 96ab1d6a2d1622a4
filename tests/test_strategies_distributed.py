"""GrowthPlugin under ``torch.distributed``: Avalanche's Naive on two Gloo processes (localhost).

Avalanche 0.6 never wraps the strategy's model in DistributedDataParallel itself; its distributed
support is ``DistributedHelper`` (process group, seeds, ``wrap_model``), ``DistributedSampler``
in the strategy's data loaders and main-process-only loggers. So each rank gives ``Naive`` the
wrapper ``DistributedHelper.wrap_model(net)`` (a ``DistributedDataParallel`` with
``find_unused_parameters=True``), as Avalanche expects, and the plugin must replace it in
``strategy.model`` whenever it grows ``net``.

The job (this file started as a script, one process per rank) runs two strategies and writes
what each rank saw; the tests below compare the ranks:

1. ``EveryExperience`` on three split-digits experiences (two growths before experiences):
   widths, the state after every experience, the wrapper swap, the optimizer, and training
   after growth (gradients reach the new units, the loss on the experience falls);
2. a policy with rank-dependent decisions: ``before_experience`` asks each rank for a different
   width (rank 0's must win) and ``OnPlateau`` grows mid-experience from the loss it is shown
   (must be the ranks' mean, the same on both ranks).

The process group is initialised here with a 60 s collective timeout (a rank left alone in a
collective fails rather than waits) instead of ``DistributedHelper.init_distributed`` (same call
with torch's 30 min default); everything after it is Avalanche's own distributed path.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _launch import launch, run_avalanche_rank

WORLD = 2
JOB_TIMEOUT_S = 300  # hang guard only (about 15 s normally; far more on a loaded machine)
COLLECTIVE_TIMEOUT_S = 60
N_EXP = 3
EPOCHS = 3
MB = 16  # per rank

requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed Gloo backend",
)


# --------------------------------------------------------------------------------------------
# the job, on every rank
# --------------------------------------------------------------------------------------------


def _net() -> Any:
    from torch import nn

    from net2grow.growth import GrowableNetwork

    torch.manual_seed(0)  # same weights and probe batch on every rank
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    return GrowableNetwork(model, example_inputs=torch.randn(8, 64))


def _strategy(
    net: Any, policy: Any, plugins: list[Any], *, wrap: bool = True, **growth: Any
) -> Any:
    from avalanche.distributed import DistributedHelper
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    from net2grow.strategies import GrowthPlugin

    plugin = GrowthPlugin(policy, **growth)
    return Naive(
        model=DistributedHelper.wrap_model(net) if wrap else net,
        # Adam's steps stay near lr whatever the loss: stable training on every CPU (SGD with
        # lr 0.1 and momentum 0.9 diverged after growth on some, with their own rounding)
        optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
        train_mb_size=MB,
        train_epochs=EPOCHS,
        eval_mb_size=256,
        plugins=[plugin, *plugins],
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        device="cpu",
    ), plugin


def _rank_main(rank: int) -> dict[str, Any]:
    from avalanche.training.plugins import SupervisedPlugin
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from net2grow.benchmarks.data import make_stream
    from net2grow.growth.distributed import check_replicas
    from net2grow.strategies.plugin import ReplicaGrowthError, check_optimizer
    from net2grow.strategies.policies import EveryExperience, OnPlateau, Widen

    bench, _ = make_stream("split-digits", n_experiences=5, seed=0)
    out: dict[str, Any] = {}

    def unwrapped(model: Any) -> Any:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def experience_loss(strategy: Any) -> float:
        """Loss of this rank's replica on the whole training set of the experience."""
        x, y, _ = next(iter(DataLoader(strategy.experience.dataset, batch_size=100_000)))
        with torch.no_grad():
            return float(F.cross_entropy(unwrapped(strategy.model)(x), y))

    class Recorder(SupervisedPlugin, supports_distributed=True):
        """Local losses per iteration; state and replica check after every experience; loss on
        the experience before (after growth) and after training; gradients of its first step."""

        def __init__(self) -> None:
            super().__init__()
            self.losses: list[list[float]] = []
            self.exp_losses: list[list[float]] = []
            self.first_grads: list[dict[str, torch.Tensor]] = []
            self.states: list[dict[str, torch.Tensor]] = []
            self.reports: list[tuple[int, float]] = []
            self.wrappers: list[Any] = []  # held: ids of freed wrappers could be reused
            self.problems: list[str] = []

        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            # the plugin grew the network earlier, in before_train_dataset_adaptation
            self.losses.append([])
            self.exp_losses.append([experience_loss(strategy)])

        def after_backward(self, strategy: Any, **kwargs: Any) -> None:
            if not self.losses[-1]:  # first iteration: DDP has averaged the gradients
                params = unwrapped(strategy.model).named_parameters()
                self.first_grads.append({n: p.grad.clone() for n, p in params})

        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self.losses[-1].append(float(strategy.loss.detach()))

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            self.exp_losses[-1].append(experience_loss(strategy))
            model = strategy.model
            net = unwrapped(model)
            self.states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
            report = check_replicas(model, context="after the experience")
            self.reports.append((report.world_size, report.max_abs_diff))
            self.wrappers.append(model)
            try:
                check_optimizer(strategy.optimizer, model)
            except Exception as exc:  # reported to the test
                self.problems.append(repr(exc))

    class GradSync(SupervisedPlugin, supports_distributed=True):
        """Synchronises bare replicas by hand: the gradients' mean over the ranks."""

        def after_backward(self, strategy: Any, **kwargs: Any) -> None:
            for p in strategy.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD

    # --- 1. EveryExperience: growth before experiences 1 and 2 --------------------------------
    net = _net()
    rec = Recorder()
    strategy, plugin = _strategy(net, EveryExperience(factor=1.5), [rec], generator=0)
    widths = []
    for exp in bench.train_stream[:N_EXP]:
        strategy.train(exp)
        widths.append([net.width(n) for n in ("0", "2")])
    out["every"] = dict(
        widths=widths,
        exp_losses=rec.exp_losses,
        first_grads=rec.first_grads,
        states=rec.states,
        reports=rec.reports,
        wrappers_distinct=len({id(w) for w in rec.wrappers}),
        problems=rec.problems,
        events=[(e.experience, e.phase, e.layer, e.status, e.new_width) for e in plugin.events],
        ddp_kept=isinstance(strategy.model, DistributedDataParallel),
        module_is_net=strategy.model.module is net,
    )

    # --- 2. rank-local decisions: rank 0's win; the loss a policy sees is the ranks' mean -----
    class RankLocal(OnPlateau):
        def __init__(self) -> None:
            super().__init__(patience=2, min_delta=100.0, factor=1.5, max_growths=1)
            self.seen: list[float] = []

        def before_experience(self, strategy: Any, net: Any) -> list[Any]:
            super().before_experience(strategy, net)
            return [Widen("0", 40 + 8 * rank)]

        def after_iteration(self, strategy: Any, net: Any) -> list[Any]:
            self.seen.append(float(strategy.loss.detach()))
            return super().after_iteration(strategy, net)

    net2 = _net()
    rec2 = Recorder()
    policy = RankLocal()
    strategy2, plugin2 = _strategy(net2, policy, [rec2])  # generator=None: rank 0 seeds
    strategy2.train(bench.train_stream[0])
    out["local"] = dict(
        widths=[net2.width(n) for n in ("0", "2")],
        seen=policy.seen,
        losses=rec2.losses,
        states=rec2.states,
        reports=rec2.reports,
        problems=rec2.problems,
        events=[(e.experience, e.iteration, e.phase, e.layer, e.new_width) for e in plugin2.events],
    )

    # --- 3. bare replicas (no DDP wrapper): grown in place, checked before and after ----------
    net3 = _net()
    rec3 = Recorder()
    strategy3, plugin3 = _strategy(
        net3, EveryExperience(factor=1.5), [rec3, GradSync()], wrap=False, generator=0
    )
    for exp in bench.train_stream[:2]:
        strategy3.train(exp)
    out["bare"] = dict(
        widths=[net3.width(n) for n in ("0", "2")],
        states=rec3.states,
        reports=rec3.reports,
        problems=rec3.problems,
        events=[(e.experience, e.layer, e.status, e.new_width) for e in plugin3.events],
    )
    # ... and without synchronised training the replicas differ before growth: refused loudly
    net4 = _net()
    strategy4, _ = _strategy(net4, EveryExperience(factor=1.5), [], wrap=False)
    strategy4.train(bench.train_stream[0])
    try:
        strategy4.train(bench.train_stream[1])
        out["unsynced_error"] = None
    except ReplicaGrowthError as exc:
        out["unsynced_error"] = str(exc)
    out["unsynced_width"] = net4.width("0")
    return out


def _worker_main(out_dir: str) -> None:
    run_avalanche_rank(out_dir, _rank_main, timeout_s=COLLECTIVE_TIMEOUT_S, seed=1234)


# --------------------------------------------------------------------------------------------
# launching the job (as tests/test_distributed.py does)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("avalanche_ddp")
    return launch(
        __file__,
        [str(out_dir)],
        out_dir,
        world=WORLD,
        timeout_s=JOB_TIMEOUT_S,
        label="two-process Avalanche job",
    )


def _assert_same_states(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for i, (s0, s1) in enumerate(zip(a, b)):
        assert s0.keys() == s1.keys(), i
        for k in s0:
            assert torch.equal(s0[k], s1[k]), (i, k)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@requires_gloo
def test_every_experience_grows_identically_on_both_ranks(job: list[dict[str, Any]]) -> None:
    r0, r1 = job[0]["every"], job[1]["every"]
    for r in (r0, r1):
        assert r["problems"] == []
        assert r["widths"] == [[32, 32], [48, 48], [72, 72]]
        grown = [(e, p, layer, w) for e, p, layer, s, w in r["events"] if s == "grown"]
        assert grown == [
            (1, "before_experience", "0", 48),
            (1, "before_experience", "2", 48),
            (2, "before_experience", "0", 72),
            (2, "before_experience", "2", 72),
        ]
        # the plugin put a new DistributedDataParallel around the same network at each growth
        assert r["ddp_kept"] and r["module_is_net"] and r["wrappers_distinct"] == N_EXP
        # check_replicas after every experience: all tensors bitwise equal across the ranks
        assert r["reports"] == [(WORLD, 0.0)] * N_EXP
    assert r0["events"] == r1["events"]
    _assert_same_states(r0["states"], r1["states"])  # compared here too, tensor by tensor
    assert [s["0.weight"].shape[0] for s in r0["states"]] == [32, 48, 72]


#: (tensor, axis) where the hidden units sit: layer "0"'s in its weight rows, its bias and the
#: columns of "2.weight"; layer "2"'s in its weight rows and the columns of "4.weight".
UNIT_AXES = (("0.weight", 0), ("0.bias", 0), ("2.weight", 0), ("2.weight", 1), ("4.weight", 1))


@requires_gloo
def test_training_continues_after_growth(job: list[dict[str, Any]]) -> None:
    r0, r1 = job[0]["every"], job[1]["every"]
    # Each rank measures its replica's loss on the whole training set of the experience, right
    # after growth and after training: the same numbers on both ranks. Training on the grown
    # network lowers it far (after a growth the new classes are unknown: a loss of several units).
    assert r0["exp_losses"] == r1["exp_losses"]
    assert len(r0["exp_losses"]) == N_EXP
    for i, (after_growth, trained) in enumerate(r0["exp_losses"]):
        assert trained < 0.5 * after_growth, (i, r0["exp_losses"])
    # Gradients reach the grown units: at the first step after each growth, the units added to
    # the hidden layers get gradients of the old units' size (about 0.5 to 2 times theirs here;
    # zero if they were cut off from the graph or the wrapper), averaged by the new DDP wrapper
    # alike on both ranks.
    assert len(r0["first_grads"]) == len(r1["first_grads"]) == N_EXP
    for i in range(1, N_EXP):
        old, new = r0["widths"][i - 1][0], r0["widths"][i][0]
        g0, g1 = r0["first_grads"][i], r1["first_grads"][i]
        assert g0.keys() == g1.keys()
        for k in g0:
            assert torch.equal(g0[k], g1[k]), (i, k)
        for key, axis in UNIT_AXES:
            g = g0[key].abs()
            assert g.shape[axis] == new, (i, key, tuple(g.shape))
            added = g.narrow(axis, old, new - old).mean().item()
            kept = g.narrow(axis, 0, old).mean().item()
            assert added > 0.1 * kept > 0, (i, key, axis, added, kept)


@requires_gloo
def test_rank_local_decisions_follow_rank0_and_the_mean_loss(job: list[dict[str, Any]]) -> None:
    r0, r1 = job[0]["local"], job[1]["local"]
    for r in (r0, r1):
        assert r["problems"] == []
        assert r["reports"] == [(WORLD, 0.0)]
    # before the experience rank 0 asked for width 40, rank 1 for 48: rank 0's decision won
    assert r0["events"][0][2:] == r1["events"][0][2:] == ("before_experience", "0", 40)
    # OnPlateau (patience 2, min_delta 100) grew both hidden layers once, mid-experience, at the
    # same iteration on both ranks
    mid = [e for e in r0["events"] if e[2] == "mid_experience"]
    assert [(e[3], e[4]) for e in mid] == [("0", 60), ("2", 48)]
    assert r0["events"] == r1["events"]
    assert r0["widths"] == r1["widths"] == [60, 48]
    # the policy saw the mean of the ranks' losses, identical on both ranks
    assert r0["seen"] == r1["seen"]
    mean = torch.tensor([r0["losses"][0], r1["losses"][0]], dtype=torch.float64).mean(0)
    torch.testing.assert_close(
        torch.tensor(r0["seen"], dtype=torch.float64), mean, rtol=1e-6, atol=1e-6
    )
    assert r0["losses"][0] != r1["losses"][0]  # the ranks' own losses do differ
    _assert_same_states(r0["states"], r1["states"])


@requires_gloo
def test_bare_replicas_grow_in_place_and_are_checked(job: list[dict[str, Any]]) -> None:
    r0, r1 = job[0]["bare"], job[1]["bare"]
    for r in (r0, r1):
        assert r["problems"] == []
        assert r["widths"] == [48, 48]
        assert r["events"] == [(1, "0", "grown", 48), (1, "2", "grown", 48)]
        assert r["reports"] == [(WORLD, 0.0)] * 2
    _assert_same_states(r0["states"], r1["states"])
    for r in job:  # unsynchronised training: every rank refuses to grow, nothing grown
        msg = r["unsynced_error"]
        assert msg is not None and msg.startswith("replicas diverged before growth")
        assert "DistributedHelper.wrap_model" in msg
        assert r["unsynced_width"] == 32


if __name__ == "__main__":
    _worker_main(sys.argv[1])
