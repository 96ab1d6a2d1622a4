"""Grow a network mid-training under DistributedDataParallel.

Run on the CPU with two processes (Gloo)::

    torchrun --nproc_per_node=2 examples/ddp_grow.py

(on GPUs, one process per GPU, it picks NCCL). Every rank trains a small MLP on scikit-learn's
digits with a ``DistributedSampler``; after epoch 2 the first hidden layer is widened (the unit
mapping drawn from a generator rank 0 seeds for all), after epoch 4 a layer is inserted and the
layer before it widened. ``grow_ddp`` grows every replica alike, keeps Adam's state, rebuilds
the DistributedDataParallel wrapper and checks that the replicas are still identical.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from net2grow.growth import GrowableNetwork, GrowthRecord
from net2grow.growth.distributed import check_replicas, grow_ddp, shared_generator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    return parser.parse_args()


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits (bundled, offline), scaled to [0, 1]; 80/20 split."""
    x, y = load_digits(return_X_y=True)
    x_t = torch.tensor(x, dtype=torch.float32) / 16.0
    y_t = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x_t), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(order))
    train, test = order[:n_train], order[n_train:]
    return TensorDataset(x_t[train], y_t[train]), TensorDataset(x_t[test], y_t[test])


def all_ranks(value: float, device: torch.device) -> list[float]:
    """``value`` from every rank, in rank order (a collective)."""
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [float(t) for t in out]


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    model.eval()
    x, y = (t.to(device) for t in data.tensors)
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def describe(rec: GrowthRecord) -> str:
    err = (
        "unverified" if rec.max_abs_error is None else f"max output change {rec.max_abs_error:.1e}"
    )
    return (
        f"{rec.op} {rec.layer}: width {rec.old_width} -> {rec.new_width}, params "
        f"{rec.params_before:,} -> {rec.params_after:,}, {err}"
    )


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", "1")
    )
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} ranks, backend {backend}, device {device.type}")

    train, test = digits(args.seed)
    sampler = DistributedSampler(train, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts them)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    # The probe batch used to verify growth must be the same on every rank.
    net = GrowableNetwork(model, example_inputs=train.tensors[0][:32]).to(device)
    ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = shared_generator(args.seed)  # rank 0's seed: the same unit mapping on every rank
    say(f"shared growth seed {gen.initial_seed()}, {net.num_parameters():,} parameters")

    def widen_first(n: GrowableNetwork) -> GrowthRecord:
        return n.widen("0", factor=2.0, generator=gen, optimizer=optimizer)

    def deepen_and_widen(n: GrowableNetwork) -> GrowthRecord:
        n.deepen("2", optimizer=optimizer)
        return n.widen("2", 48, generator=gen, optimizer=optimizer)

    schedule = {2: widen_first, 4: deepen_and_widen}
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        total, batches = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss: Tensor = F.cross_entropy(ddp(x), y)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        losses = all_ranks(total / batches, device)
        per_rank = "  ".join(f"rank {r}: {v:.4f}" for r, v in enumerate(losses))
        say(f"epoch {epoch}  loss  {per_rank}  test acc {accuracy(net, test, device):.3f}")

        if epoch in schedule:
            before, grown_so_far = accuracy(net, test, device), len(net.history)
            ddp, _ = grow_ddp(ddp, schedule[epoch], optimizer=optimizer)
            for rec in net.history[grown_so_far:]:
                say(f"  grew  {describe(rec)}")
            say(f"  test acc {before:.3f} -> {accuracy(net, test, device):.3f} (function kept)")
            say(f"  {check_replicas(ddp)}")

    say(f"after training: {check_replicas(ddp, context='after training')}")
    say(net.summary())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
