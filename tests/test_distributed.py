"""Growing under ``torch.distributed``: two Gloo processes on localhost, checked against one.

The two-process job runs once per backend (this file started as a script, one process per rank,
rendezvous on a free localhost port) and writes what each rank saw; the tests below read it.
The job trains a small MLP with DistributedDataParallel, grows it twice mid-run through
``grow_ddp`` (a widen whose ``op`` passes the optimizer; a deepen plus a widen whose ``op`` does
not, so ``grow_ddp`` keeps the optimizer consistent itself), and keeps training. Then it provokes
every divergence ``check_replicas``/``grow_ddp`` must catch.

Tolerance of the single-process comparison: DDP averages the ranks' gradients, so training on
the concatenated global batch with a mean loss is the same computation up to float32 summation
order; losses must agree to ``LOSS_RTOL = 1e-5`` relative, parameters to ``PARAM_ATOL = 1e-5``.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _launch import launch
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError, GrowthRecord
from net2grow.growth.distributed import ReplicaReport, check_replicas, grow_ddp, shared_generator

WORLD = 2
LOCAL_BATCH = 16
IN, OUT = 20, 5
STEPS = 15
FIRST_GROWTH, SECOND_GROWTH = 5, 10
SEED = 1234
LR = 0.1
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
JOB_TIMEOUT_S = 300  # hang guard only (~20 s normally, far more on a loaded machine)
COLLECTIVE_TIMEOUT_S = 60  # a rank left alone in a stuck collective fails after this

requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed Gloo backend",
)

# --------------------------------------------------------------------------------------------
# the computation, shared by the ranks and the single-process reference
# --------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_net(device: torch.device, *, batchnorm: bool = False) -> GrowableNetwork:
    """The same small MLP (same weights, same probe batch) on every rank."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(IN, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU()]
    if batchnorm:
        layers.insert(1, nn.BatchNorm1d(24))
    model = nn.Sequential(*layers, nn.Linear(24, OUT))
    example = torch.randn(16, IN, generator=_gen(99))
    return GrowableNetwork(model, example_inputs=example).to(device)


def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)


def global_batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(1000 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, IN, generator=g)
    y = torch.randint(0, OUT, (WORLD * LOCAL_BATCH,), generator=g)
    return x.to(device), y.to(device)


def first_growth(
    net: GrowableNetwork, g: torch.Generator, opt: torch.optim.Optimizer | None
) -> GrowthRecord:
    return net.widen("0", 36, generator=g, optimizer=opt)


def second_growth(
    net: GrowableNetwork, g: torch.Generator, opt: torch.optim.Optimizer | None
) -> GrowthRecord:
    net.deepen("2", optimizer=opt)
    return net.widen("2", 32, generator=g, optimizer=opt)


def _step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One SGD step on the mean loss; returns the loss, its (spent) graph attached."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def reference_run(device: torch.device) -> dict[str, Any]:
    """Single process, global batches, the same growth with the optimizer passed explicitly."""
    net = make_net(device)
    opt = make_optimizer(net)
    g = _gen(SEED)
    losses = []
    for step in range(STEPS):
        if step == FIRST_GROWTH:
            first_growth(net, g, opt)
        if step == SECOND_GROWTH:
            second_growth(net, g, opt)
        losses.append(_step(net, opt, *global_batch(step, device)).item())
    return {"losses": losses, "state": {k: v.cpu() for k, v in net.state_dict().items()}}


# --------------------------------------------------------------------------------------------
# one rank of the two-process job (this file run as a script)
# --------------------------------------------------------------------------------------------


def _expect_growth_error(fn: Any) -> str:
    try:
        fn()
    except GrowthError as exc:
        return str(exc)
    return "<no GrowthError raised>"


def _ddp(net: nn.Module, device: torch.device, **kwargs: Any) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, **kwargs)


def _train_step(ddp: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> torch.Tensor:
    x, y = global_batch(step, next(ddp.parameters()).device)
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return _step(ddp, opt, x[part], y[part])


def _rank_main(rank: int, device: torch.device) -> dict[str, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    out: dict[str, Any] = {}
    out["seeds"] = [
        shared_generator().initial_seed(),
        shared_generator(seed=7 + rank).initial_seed(),
    ]

    # --- train, grow twice, keep training ------------------------------------------------------
    net = make_net(device)
    opt = make_optimizer(net)
    ddp = _ddp(net, device, bucket_cap_mb=1)
    ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    g = shared_generator(seed=SEED if rank == 0 else 0)  # rank 0's seed wins
    ids = {n: id(p) for n, p in net.named_parameters()}
    losses, reports, records = [], [], []
    for step in range(STEPS):
        if step in (FIRST_GROWTH, SECOND_GROWTH):
            old = ddp
            if step == FIRST_GROWTH:
                ddp, rec = grow_ddp(ddp, lambda n: first_growth(n, g, opt), optimizer=opt)
            else:  # op leaves the optimizer out: grow_ddp keeps it consistent itself
                ddp, rec = grow_ddp(ddp, lambda n: second_growth(n, g, None), optimizer=opt)
            records.append(rec.to_dict())
            reports.append(check_replicas(ddp))
            out.setdefault(
                "old_wrapper_error", _expect_growth_error(partial(old, torch.zeros(1, IN)))
            )
            out.setdefault("bucket_bytes_cap", ddp.bucket_bytes_cap)
            out.setdefault("comm_hooks", len(ddp._comm_hooks))
        # like most training loops, keep the last loss (and its graph) alive across growth
        loss = _train_step(ddp, opt, step, rank)
        losses.append(loss.item())
    reports.append(check_replicas(ddp, context="after training"))
    params = dict(net.named_parameters())
    out["losses"] = losses
    out["reports"] = [(r.world_size, r.tensors, r.max_abs_diff) for r in reports]
    out["records"] = [(r["op"], r["layer"], r["old_width"], r["new_width"]) for r in records]
    out["ids_kept"] = all(id(params[n]) == i for n, i in ids.items())
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    out["optimizer_covers"] = in_opt == {id(p) for p in net.parameters()}
    out["state_shapes_ok"] = all(
        v.shape == p.shape
        for p, st in opt.state.items()
        for v in st.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    out["state"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    # --- a deliberately diverged replica -------------------------------------------------------
    if rank == 1:
        with torch.no_grad():
            params["4.weight"][0, 0] += 1e-3
    out["perturbed_error"] = _expect_growth_error(lambda: check_replicas(ddp))
    out["perturbed_atol_diff"] = check_replicas(ddp, atol=1e-2).max_abs_diff

    # --- BatchNorm statistics differ per rank after a step: synced before growth ---------------
    bn = make_net(device, batchnorm=True)
    bn_opt = make_optimizer(bn)
    bn_ddp = _ddp(bn, device)
    _train_step(bn_ddp, bn_opt, 0, rank)
    out["bn_diverged_before"] = _expect_growth_error(lambda: check_replicas(bn))
    bn_ddp, _ = grow_ddp(
        bn_ddp, lambda n: n.widen("0", 30, generator=shared_generator(5)), optimizer=bn_opt
    )
    out["bn_report"] = check_replicas(bn_ddp).max_abs_diff
    _train_step(bn_ddp, bn_opt, 1, rank)

    # --- ranks that grow differently -----------------------------------------------------------
    other = _ddp(make_net(device), device)
    out["unshared_generator_error"] = _expect_growth_error(
        lambda: grow_ddp(other, lambda n: n.widen("0", 36, generator=_gen(rank)))
    )
    other = _ddp(make_net(device), device)
    out["different_width_error"] = _expect_growth_error(
        lambda: grow_ddp(other, lambda n: n.widen("0", 30 + 2 * rank))
    )

    # --- refused on every rank: the old wrapper stays usable -----------------------------------
    kept = _ddp(make_net(device), device)
    kept_opt = make_optimizer(kept)
    out["refused_error"] = _expect_growth_error(lambda: grow_ddp(kept, lambda n: n.widen("0", 8)))
    out["kept_loss"] = _train_step(kept, kept_opt, 0, rank).item()

    # --- failed on one rank only ---------------------------------------------------------------
    def fails_on_rank1(n: GrowableNetwork) -> GrowthRecord:
        return n.widen("0", 8 if rank == 1 else 30, generator=_gen(0))

    out["partial_error"] = _expect_growth_error(lambda: grow_ddp(kept, fails_on_rank1))

    # --- refused everywhere, but after a first operation had grown the network ----------------
    def grows_then_fails(n: GrowableNetwork) -> GrowthRecord:
        n.deepen("2")
        return n.widen("2", 8)

    half = _ddp(make_net(device), device)
    out["half_error"] = _expect_growth_error(lambda: grow_ddp(half, grows_then_fails))
    out["half_retired"] = _expect_growth_error(partial(half, torch.zeros(1, IN)))
    return out


def _worker_main(out_dir: str, backend: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = _rank_main(rank, device)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


# --------------------------------------------------------------------------------------------
# launching the job
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gloo_job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _launch("gloo", tmp_path_factory.mktemp("gloo"))


def _launch(backend: str, out_dir: Path) -> list[dict[str, Any]]:
    return launch(
        __file__,
        [str(out_dir), backend],
        out_dir,
        world=WORLD,
        timeout_s=JOB_TIMEOUT_S,
        label=f"two-process {backend} job",
    )


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return reference_run(torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# tests on the two-process job
# --------------------------------------------------------------------------------------------


@requires_gloo
def test_shared_generator_takes_rank0_seed(gloo_job: list[dict[str, Any]]) -> None:
    random0, given0 = gloo_job[0]["seeds"]
    random1, given1 = gloo_job[1]["seeds"]
    assert random0 == random1
    assert given0 == given1 == 7  # rank 0 passed 7, rank 1 passed 8: rank 0's seed wins


@requires_gloo
def test_replicas_identical_after_growth_and_training(gloo_job: list[dict[str, Any]]) -> None:
    for result in gloo_job:
        assert result["records"] == [("widen", "0", 24, 36), ("widen", "2", 24, 32)]
        # after each growth and after the last step: every tensor compared, bitwise equal
        assert [(w, d) for w, _, d in result["reports"]] == [(WORLD, 0.0)] * 3
    s0, s1 = gloo_job[0]["state"], gloo_job[1]["state"]
    assert s0.keys() == s1.keys()
    assert any(k.startswith("grown.") for k in s0)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


@requires_gloo
def test_loss_trajectory_matches_single_process(
    gloo_job: list[dict[str, Any]], reference: dict[str, Any]
) -> None:
    # DDP averages gradients over equal local batches: the global loss is the ranks' mean
    dist_losses = torch.tensor([r["losses"] for r in gloo_job], dtype=torch.float64).mean(0)
    ref_losses = torch.tensor(reference["losses"], dtype=torch.float64)
    torch.testing.assert_close(dist_losses, ref_losses, rtol=LOSS_RTOL, atol=0.0)
    state = gloo_job[0]["state"]
    assert state.keys() == reference["state"].keys()
    for k, v in reference["state"].items():
        torch.testing.assert_close(state[k], v, rtol=0.0, atol=PARAM_ATOL, msg=k)


@requires_gloo
def test_parameters_keep_identity_and_optimizer_follows(gloo_job: list[dict[str, Any]]) -> None:
    for result in gloo_job:
        assert result["ids_kept"]
        assert result["optimizer_covers"]  # deepen's new parameters joined without optimizer=
        assert result["state_shapes_ok"]  # momentum remapped though op did not pass it


@requires_gloo
def test_new_wrapper_keeps_configuration_and_old_one_is_retired(
    gloo_job: list[dict[str, Any]],
) -> None:
    for result in gloo_job:
        assert result["bucket_bytes_cap"] == 1024 * 1024
        assert result["comm_hooks"] == 1
        assert "replaced by grow_ddp" in result["old_wrapper_error"]


@requires_gloo
def test_perturbed_replica_raises_on_every_rank(gloo_job: list[dict[str, Any]]) -> None:
    for result in gloo_job:
        msg = result["perturbed_error"]
        assert msg.startswith("replicas diverged after growth: parameter '4.weight' on rank 1")
        assert "differs from rank 0 by up to 0.001" in msg
        assert 0 < result["perturbed_atol_diff"] < 1e-2  # within atol: accepted, reported


@requires_gloo
def test_buffers_synced_before_growth(gloo_job: list[dict[str, Any]]) -> None:
    for result in gloo_job:
        assert "buffer '1.running_mean' on rank 1" in result["bn_diverged_before"]
        assert result["bn_report"] == 0.0


@requires_gloo
def test_ranks_growing_differently_are_caught(gloo_job: list[dict[str, Any]]) -> None:
    for result in gloo_job:
        msg = result["unshared_generator_error"]
        assert msg.startswith("replicas diverged after growth: parameter '0.weight' on rank 1")
        assert "shared_generator" in msg
        msg = result["different_width_error"]
        assert msg.startswith("replicas diverged after growth: parameter '0.weight' has shape")
        assert "(32, 20)" in msg and "(30, 20)" in msg


@requires_gloo
def test_refusals_are_agreed_on(gloo_job: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(gloo_job):
        assert "cannot shrink '0'" in result["refused_error"]
        assert result["kept_loss"] > 0  # the old wrapper still trains after a refused growth
        msg = result["partial_error"]
        assert msg.startswith("growth failed on rank(s) [1] only")
        assert ("cannot shrink" in msg) == (rank == 1)
        msg = result["half_error"]
        assert msg.startswith("op raised after it had grown the network on rank(s) [0, 1]")
        assert "replaced by grow_ddp" in result["half_retired"]  # never trains unsynchronised


@pytest.mark.cuda
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2),
    reason="the NCCL variant needs torch.distributed with NCCL and at least 2 CUDA devices",
)
def test_nccl_job_matches_single_process(tmp_path: Path) -> None:
    job = _launch("nccl", tmp_path)
    ref = reference_run(torch.device("cuda", 0))
    losses = torch.tensor([r["losses"] for r in job], dtype=torch.float64).mean(0)
    torch.testing.assert_close(losses, torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-4)
    for k in job[0]["state"]:
        assert torch.equal(job[0]["state"][k], job[1]["state"][k]), k
    assert job[1]["perturbed_error"].startswith("replicas diverged after growth: parameter")


# --------------------------------------------------------------------------------------------
# without a process group
# --------------------------------------------------------------------------------------------


def test_single_process_behaviour() -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this pytest process")
    net = make_net(torch.device("cpu"))
    report = check_replicas(net)
    assert isinstance(report, ReplicaReport) and report.world_size == 1
    assert shared_generator(seed=3).initial_seed() == 3
    with pytest.raises(GrowthError, match="seed must be an int"):
        shared_generator(seed=-1)
    with pytest.raises(GrowthError, match="expects a DistributedDataParallel wrapper"):
        grow_ddp(net, lambda n: n.widen("0", 30))  # type: ignore[arg-type]
    with pytest.raises(GrowthError, match="atol must be"):
        check_replicas(net, atol=-1.0)


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
