"""Parameters keep their identity across growth, and autograd follows their new shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from net2grow.growth import GrowableNetwork


def test_backward_after_widen_with_old_graph_alive(device: torch.device) -> None:
    torch.manual_seed(0)
    net = GrowableNetwork(
        nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(4, 10)
    ).to(device)
    x, y = torch.randn(6, 10, device=device), torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    first = net.get_submodule("0").weight
    old_loss = F.cross_entropy(net(x), y)  # keeps the old graph (and its accumulators) alive
    old_loss.backward()
    net.widen("0", 12)
    new_loss = F.cross_entropy(net(x), y)
    new_loss.backward()
    assert net.get_submodule("0").weight is first
    assert first.grad is not None and first.grad.shape == (12, 10)
    assert torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    assert torch.allclose(new_loss, old_loss, atol=1e-6)


def test_verification_runs_without_tf32_and_restores_the_flags(monkeypatch) -> None:
    """cuDNN's default TF32 convolutions would fail a 1e-5 check on Ampere+ GPUs."""
    from net2grow.growth import tracing

    torch.manual_seed(1)
    net = GrowableNetwork(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), torch.randn(2, 3, 6, 6)
    )
    seen: list[tuple[bool, bool]] = []
    real_run = tracing.ShapeRecorder.run

    def spy(self, *args):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return real_run(self, *args)

    monkeypatch.setattr(tracing.ShapeRecorder, "run", spy)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        net.widen("0", 6)
        assert seen and all(flags == (False, False) for flags in seen)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
