"""Checkpoints of networks with Avalanche heads: saved after growth and adaptation, rebuilt
exactly (outputs, head sizes, class masks, task state), and they keep adapting and growing."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from _avalanche import digits_stream, mh_net
from avalanche.models import IncrementalClassifier, MultiHeadClassifier
from avalanche.models.utils import avalanche_model_adaptation
from torch import nn

from net2grow import growth
from net2grow.growth import GrowableNetwork
from net2grow.strategies import MultiTaskGrowableNetwork

REPO = pathlib.Path(__file__).resolve().parents[1]


class ICModel(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, hidden), nn.ReLU())
        self.head = IncrementalClassifier(hidden, initial_out_features=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def class_stream():
    return digits_stream()


@pytest.fixture(scope="module")
def task_stream():
    return digits_stream(task_labels=True)


def _step(net: nn.Module, opt: torch.optim.Optimizer, *inputs: torch.Tensor) -> None:
    opt.zero_grad()
    net(*inputs).logsumexp(1).mean().backward()
    opt.step()


def test_incremental_classifier_round_trip_keeps_adapting(class_stream, tmp_path) -> None:
    torch.manual_seed(0)
    net = GrowableNetwork(ICModel(), torch.randn(8, 64))
    avalanche_model_adaptation(net, class_stream.train_stream[0])
    avalanche_model_adaptation(net, class_stream.train_stream[1])  # 4 classes now
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(32, 64)
    _step(net, opt, x)
    net.widen("features.0", 24, optimizer=opt, generator=torch.Generator().manual_seed(1))
    _step(net, opt, x)
    growth.save(net, tmp_path / "ic.n2g", optimizer=opt)

    loaded, loaded_opt = growth.load(tmp_path / "ic.n2g", optimizer=True)
    head = loaded.get_submodule("head")
    assert type(head) is IncrementalClassifier
    assert head.classifier.weight.shape == (4, 24)
    assert torch.equal(head.active_units, net.get_submodule("head").active_units)
    net.eval()
    loaded.eval()
    assert torch.equal(loaded(x), net(x))
    # both continue identically: one step, then new classes arrive and the head adapts
    net.train()
    loaded.train()
    _step(net, opt, x)
    _step(loaded, loaded_opt, x)
    assert torch.equal(loaded(x), net(x))
    avalanche_model_adaptation(loaded, class_stream.train_stream[2])
    assert head.classifier.weight.shape == (6, 24)
    loaded.widen("features.0", 30)
    assert head.classifier.in_features == 30


def test_multihead_network_round_trip_keeps_its_class_and_task_state(task_stream, tmp_path):
    net = mh_net(hidden=16)
    for exp in task_stream.train_stream[:2]:
        avalanche_model_adaptation(net, exp)
    net.widen("features.2", 20, generator=torch.Generator().manual_seed(0))
    growth.save(net, tmp_path / "mh.n2g")

    loaded = growth.load(tmp_path / "mh.n2g")
    assert type(loaded) is MultiTaskGrowableNetwork
    assert loaded.known_train_tasks_labels == net.known_train_tasks_labels == {0, 1}
    head = loaded.get_submodule("head")
    assert type(head) is MultiHeadClassifier
    assert sorted(head.classifiers) == ["0", "1"] and head.in_features == 20
    assert head.max_class_label == net.get_submodule("head").max_class_label
    x, t = torch.randn(16, 64), torch.tensor([0, 1] * 8)
    net.eval()
    loaded.eval()
    assert torch.equal(loaded(x, t), net(x, t))
    avalanche_model_adaptation(loaded, task_stream.train_stream[2])  # a new task: a new head
    assert head.classifiers["2"].classifier.in_features == 20
    assert torch.equal(head.active_units_T1, net.get_submodule("head").active_units_T1)


def test_head_checkpoint_loads_in_a_fresh_process_that_imports_strategies(
    class_stream, tmp_path
) -> None:
    torch.manual_seed(0)
    net = GrowableNetwork(ICModel(), torch.randn(8, 64))
    avalanche_model_adaptation(net, class_stream.train_stream[0])
    path = tmp_path / "ic.n2g"
    growth.save(net, path)
    torch.save(torch.randn(4, 64), tmp_path / "x.pt")
    net.eval()
    expected = net(torch.load(tmp_path / "x.pt"))
    torch.save(expected, tmp_path / "y.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from net2grow import growth
        try:
            growth.load({str(path)!r})
        except growth.GrowthError as exc:
            print("WITHOUT:", exc)
        from net2grow import strategies  # registers Avalanche's heads
        net = growth.load({str(path)!r}).eval()
        y = net(torch.load({str(tmp_path / "x.pt")!r}))
        print("EQUAL:", torch.equal(y, torch.load({str(tmp_path / "y.pt")!r})))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "WITHOUT:" in proc.stdout and "import net2grow.strategies" in proc.stdout, proc.stdout
    assert "EQUAL: True" in proc.stdout, proc.stdout
