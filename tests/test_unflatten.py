"""``nn.Unflatten`` of the input (flat digits made an image): growable around it, saved and
rebuilt by checkpoints; on growable units it is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from net2grow.benchmarks.models import cnn
from net2grow.growth import GrowableNetwork, UnsupportedLayerError, load, save


def test_unflattened_input_network_grows_saves_and_loads_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    net = GrowableNetwork(cnn((64,), 4, 10), torch.rand(2, 64))
    x = torch.rand(5, 64)
    before = net(x)
    rec = net.widen(net.layers[0], 8)
    assert rec.max_abs_error is not None and rec.max_abs_error < 1e-5
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    save(net, tmp_path / "cnn.n2g")
    loaded = load(tmp_path / "cnn.n2g")
    assert torch.equal(loaded(x), net(x))
    assert isinstance(loaded.get_submodule("0"), nn.Unflatten)


def test_unflatten_of_growable_units_is_refused_and_nothing_changes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.ReLU(), nn.Unflatten(1, (4, 4)), nn.Flatten(), nn.Linear(16, 3)
    )
    net = GrowableNetwork(model, torch.rand(2, 16))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match="splits the dimension of growable units"):
        net.widen("0", 32)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
