"""``CohortLRPlugin`` under ``torch.distributed``: Avalanche's Naive on two Gloo processes.

Each rank trains a ``DistributedHelper.wrap_model`` wrapper of one ``GrowableNetwork`` (as in
``test_strategies_distributed.py``) with ``GrowthPlugin(EveryExperience(factor=2), init="vt")``
and ``CohortLRPlugin`` (``rule="vt"``, then ``rule="constant"``). At a few optimizer steps after
the growth, a recorder listed after the plugin replays the step on one process, without DDP: a
copy of the network and of the optimizer (taken in ``before_update``, with DDP's averaged
gradients) stepped by a standalone ``growth.cohorts.CohortLR`` holding the plugin's cohorts.
The tests check that every rank ends with the same parameters and cohorts, and that each
recorded update is the one-process update (and not the plain one for the new units).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _launch import launch, run_avalanche_rank

WORLD = 2
JOB_TIMEOUT_S = 300  # hang guard only (seconds normally; far more on a loaded machine)
COLLECTIVE_TIMEOUT_S = 60
RECORDED_STEPS = 3  # per experience after a growth
RULES = {"vt": dict(rule="vt"), "lr3": dict(new_unit_lr=3.0)}

requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed Gloo backend",
)


# --------------------------------------------------------------------------------------------
# the job, on every rank
# --------------------------------------------------------------------------------------------


def _run(rule: dict[str, Any]) -> dict[str, Any]:
    from avalanche.distributed import DistributedHelper
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
    from avalanche.training.supervised import Naive
    from torch import nn

    from net2grow.benchmarks.data import make_stream
    from net2grow.growth import GrowableNetwork
    from net2grow.growth.cohorts import CohortLR
    from net2grow.growth.distributed import check_replicas
    from net2grow.strategies import CohortLRPlugin, GrowthPlugin
    from net2grow.strategies.policies import EveryExperience

    bench, _ = make_stream("split-digits", n_experiences=5, seed=0, train_per_exp=128)
    torch.manual_seed(0)  # same weights and probe batch on every rank
    model = nn.Sequential(
        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    net = GrowableNetwork(model, example_inputs=torch.randn(8, 64))
    cohort_plugin = CohortLRPlugin(**rule)

    class Replay(SupervisedPlugin, supports_distributed=True):
        """At the first steps of every experience after a growth: the update the strategy made
        and the updates one process makes from the same state, with and without cohorts."""

        def __init__(self) -> None:
            super().__init__()
            self.steps: list[dict[str, Any]] = []
            self.in_exp = 0
            self.shadow: Any = None

        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            self.in_exp = 0

        def before_update(self, strategy: Any, **kwargs: Any) -> None:
            self.shadow = None
            if strategy.clock.train_exp_counter == 0 or self.in_exp >= RECORDED_STEPS:
                return
            model = GrowthPlugin.network(strategy)
            # one deepcopy for both: the copied optimizer steps the copied network's parameters
            net_c, opt_c = copy.deepcopy((model, strategy.optimizer))
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            cohorts = cohort_plugin.cohorts
            assert cohorts is not None
            self.shadow = (net_c, opt_c, grads, cohorts.state_dict(), cohorts.factors())

        def after_update(self, strategy: Any, **kwargs: Any) -> None:
            self.in_exp += 1
            if self.shadow is None:
                return
            net_c, opt_c, grads, state, factors = self.shadow
            plain_net, plain_opt = copy.deepcopy((net_c, opt_c))
            before = {n: p.detach().clone() for n, p in net_c.named_parameters()}
            for copy_net, opt, scaled in ((net_c, opt_c, True), (plain_net, plain_opt, False)):
                for n, p in copy_net.named_parameters():
                    p.grad = grads[n].clone()
                if scaled:
                    one = CohortLR(copy_net, **rule)
                    one.load_state_dict(state)
                    one.attach(opt)
                opt.step()
            model = GrowthPlugin.network(strategy)
            self.steps.append(
                dict(
                    experience=strategy.clock.train_exp_counter,
                    factors=factors,
                    cohorts=state["cohorts"],
                    before=before,
                    ddp={n: p.detach().clone() for n, p in model.named_parameters()},
                    one=dict(net_c.named_parameters()),
                    plain=dict(plain_net.named_parameters()),
                )
            )
            self.shadow = None

    recorder = Replay()
    strategy = Naive(
        model=DistributedHelper.wrap_model(net),
        optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
        train_mb_size=16,
        train_epochs=1,
        plugins=[
            GrowthPlugin(EveryExperience(factor=2.0), init="vt", generator=0),
            cohort_plugin,  # before the recorder: its after_update has rescaled when it records
            recorder,
        ],
        evaluator=EvaluationPlugin(loggers=[]),
        device="cpu",
    )
    for exp in bench.train_stream[:3]:
        strategy.train(exp)
    report = check_replicas(strategy.model, context="after training")
    cohorts = cohort_plugin.cohorts
    assert cohorts is not None
    return dict(
        widths=[net.width(n) for n in ("0", "2")],
        params={n: p.detach().clone() for n, p in net.named_parameters()},
        cohorts=cohorts.state_dict(),
        factors=cohorts.factors(),
        report=(report.world_size, report.max_abs_diff),
        steps=[
            {k: {n: t.detach().clone() for n, t in v.items()} if k in TENSORS else v
             for k, v in s.items()}
            for s in recorder.steps
        ],
    )  # fmt: skip


TENSORS = ("before", "ddp", "one", "plain")


def _worker_main(out_dir: str) -> None:
    run_avalanche_rank(
        out_dir,
        lambda rank: {name: _run(rule) for name, rule in RULES.items()},
        timeout_s=COLLECTIVE_TIMEOUT_S,
        seed=1234,
    )


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("cohort_ddp")
    return launch(
        __file__, [str(out_dir)], out_dir, world=WORLD, timeout_s=JOB_TIMEOUT_S,
        label="two-process CohortLRPlugin job",
    )  # fmt: skip


@requires_gloo
@pytest.mark.parametrize("rule", list(RULES))
def test_ranks_end_identical(job: list[dict[str, Any]], rule: str) -> None:
    r0, r1 = job[0][rule], job[1][rule]
    for r in (r0, r1):
        assert r["widths"] == [64, 64]  # 16 -> 32 -> 64: two growths, two cohorts
        assert r["report"] == (WORLD, 0.0)
        assert r["cohorts"]["born"][0] == 0 and len(r["cohorts"]["born"]) == 3
    assert r0["factors"] == r1["factors"]
    assert r0["cohorts"]["born"] == r1["cohorts"]["born"]
    assert r0["cohorts"]["steps"] == r1["cohorts"]["steps"] > 0
    for key in ("params", ("cohorts", "cohorts")):
        a, b = (r0[key], r1[key]) if isinstance(key, str) else (r0["cohorts"]["cohorts"],
                                                                   r1["cohorts"]["cohorts"])
        assert a.keys() == b.keys() and a
        for n in a:
            assert torch.equal(a[n], b[n]), (key, n)
    ids = r0["cohorts"]["cohorts"]["2.weight"]  # rows: "2"'s units, columns: "0"'s
    assert ids[:16, :16].eq(0).all() and ids[32:, :].eq(2).all() and ids[:, 32:].eq(2).all()
    assert ids[16:32, :32].eq(1).all() and ids[:16, 16:32].eq(1).all()


@requires_gloo
@pytest.mark.parametrize("rule", list(RULES))
def test_updates_are_scaled_as_on_one_process(job: list[dict[str, Any]], rule: str) -> None:
    for r in job:
        steps = r[rule]["steps"]
        assert [s["experience"] for s in steps] == [1] * RECORDED_STEPS + [2] * RECORDED_STEPS
        for i, s in enumerate(steps):
            f = s["factors"]
            assert len(f) == s["experience"] + 1 and f[0] == 1.0
            if rule == "lr3":
                assert all(v == 3.0 for c, v in f.items() if c)
            else:  # Variance Transfer's ratio: far enough from 1 to show
                assert all(abs(v - 1.0) > 0.05 for c, v in f.items() if c), f
            moved_new = 0.0
            for n, ddp in s["ddp"].items():
                one, plain, before = s["one"][n], s["plain"][n], s["before"][n]
                # the DDP run's update is the one-process update with the cohorts' rates
                torch.testing.assert_close(ddp, one, rtol=1e-5, atol=1e-7, msg=f"{i} {n}")
                m = torch.ones_like(before)
                if n in s["cohorts"]:
                    ids = s["cohorts"][n].long()
                    m = torch.tensor([f[c] for c in range(len(f))])[ids]
                    new = ids > 0
                    moved_new = max(moved_new, float((plain - before)[new].abs().max()))
                # ... which is the plain update times each entry's factor
                torch.testing.assert_close(
                    ddp - before, m * (plain - before), rtol=1e-4, atol=1e-6, msg=f"{i} {n}"
                )
            assert moved_new > 1e-3  # new units do move: the comparison is not vacuous


if __name__ == "__main__":
    _worker_main(sys.argv[1])
