"""Checkpoints: exact round trips, loading without the model class, resumed training, integrity.

The model classes below live only in this test module; the fresh-process test loads their
checkpoints in a subprocess that never imports it (nor torchvision).
"""

from __future__ import annotations

import copy
import operator
import os
import pathlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from net2grow import growth
from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.growth.checkpoint import Checkpoint, load, load_checkpoint, save
from net2grow.growth.checkpoint.allowlist import function_name, resolve_function
from net2grow.growth.checkpoint.describe import layer_spec
from net2grow.growth.checkpoint.fileformat import read_payload, write_payload
from net2grow.growth.checkpoint.rebuild import build_layer, tensor_shapes
from net2grow.growth.rules import checkpointable_types, module_rule_for

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# models (defined here only)
# --------------------------------------------------------------------------------------------


class CkptMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class CkptCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, momentum=0.2)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12, eps=1e-3)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(48, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.gap(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(self.flatten(x))


class CkptBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv2(F.relu(self.bn1(self.conv1(x)))))


class CkptResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([CkptBlock(8), CkptBlock(8)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        h = x.mean((2, 3))  # call_method with a tuple argument
        return self.head(h.reshape(x.shape[0], -1))  # getattr, getitem, node-valued sizes


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=7)


# name -> (model factory, input shape, widen (layer, width), identity deepen, residual deepen)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[str, int], str, str]] = {
    "mlp": (CkptMLP, (6, 8), ("body.0", 24), "body.0", "body.2"),
    "cnn": (CkptCNN, (4, 3, 12, 12), ("conv1", 13), "conv1", "conv2"),
    "resnet": (CkptResNet, (4, 3, 10, 10), ("stem", 12), "blocks.0.conv1", "blocks.1.conv1"),
    "resnet18": (_resnet18, (2, 3, 16, 16), ("layer1.0.conv1", 72), "layer2.0.conv1", "fc"),
}


def _grown(name: str) -> GrowableNetwork:
    factory, shape, (wide, width), ident, resid = CASES[name]
    torch.manual_seed(0)
    model = _randomize_batchnorm(factory())
    net = GrowableNetwork(model, torch.randn(shape, generator=_gen(1)))
    net.widen(wide, width, generator=_gen(2))
    net.deepen(ident)
    net.deepen(resid, kind="residual")
    _randomize_batchnorm(net)  # the inserted BatchNorms too
    return net


@pytest.fixture(scope="module")
def grown() -> dict[str, GrowableNetwork]:
    """Each case grown once (widen + identity deepen + residual deepen); tests copy them."""
    return {name: _grown(name) for name in CASES}


def _inputs(name: str, seed: int = 5) -> Tensor:
    return torch.randn(CASES[name][1], generator=_gen(seed))


def _eval_out(net: nn.Module, x: Tensor) -> Tensor:
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            return net(x)
    finally:
        for m, mode in modes:
            m.training = mode


def _layer_types(net: nn.Module) -> dict[str, type]:
    known = set(checkpointable_types().values())
    return {n: type(m) for n, m in net.named_modules() if type(m) in known}


def _assert_same_network(a: GrowableNetwork, b: GrowableNetwork) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [(n, p.requires_grad) for n, p in a.named_parameters()] == [
        (n, p.requires_grad) for n, p in b.named_parameters()
    ]
    assert _layer_types(a) == _layer_types(b)
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    assert [r.to_dict() for r in a.history] == [r.to_dict() for r in b.history]
    assert (a.model_class, a.tolerance) == (b.model_class, b.tolerance)
    assert len(a.probe) == len(b.probe)
    assert all(torch.equal(p, q) for p, q in zip(a.probe, b.probe))
    assert a.layers == b.layers
    assert [a.width(n) for n in a.layers] == [b.width(n) for n in b.layers]


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_exact_after_widen_and_deepen(
    name: str, grown: dict[str, GrowableNetwork], tmp_path: pathlib.Path
) -> None:
    net = grown[name]
    kinds = [r.details.get("kind") for r in net.history]
    assert kinds == [None, "identity", "residual"]
    path = tmp_path / "net.n2g"
    save(net, path)
    loaded = load(path)

    assert isinstance(loaded, GrowableNetwork)
    _assert_same_network(net, loaded)
    x = _inputs(name)
    assert torch.equal(_eval_out(net, x), _eval_out(loaded, x))
    # training mode too: BatchNorm batch statistics, momentum and running-stat updates
    ref = copy.deepcopy(net).train()
    loaded.train()
    assert torch.equal(ref(x), loaded(x))
    assert all(torch.equal(u, v) for u, v in zip(ref.buffers(), loaded.buffers()))

    # the loaded network keeps growing, exactly
    layer = loaded.layers[0]
    before = _eval_out(loaded, x)
    loaded.widen(layer, loaded.width(layer) + 4, generator=_gen(9))
    after = _eval_out(loaded, x)
    assert after.shape == before.shape
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_round_trip_keeps_dtype_ties_frozen_parameters_and_attributes(
    tmp_path: pathlib.Path,
) -> None:
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("offset", torch.linspace(-1, 1, 6))
            self.register_buffer("shift", torch.full((6,), 0.25), persistent=False)
            self.mask = torch.tensor([1.0, 0, 1, 1, 0, 1])  # a plain tensor attribute

        def forward(self, x: Tensor) -> Tensor:
            return x * self.mask + self.offset + self.shift

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight
            self.inner = Inner()
            self.scale = nn.Parameter(torch.tensor([1.5]))
            self.out = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.inner(torch.relu(self.a(x)))
            return self.out(torch.relu(self.b(h)) * self.scale)

    torch.manual_seed(0)
    model = Tied().double()
    model.inner.mask = model.inner.mask.double()
    model.out.bias.requires_grad_(False)
    net = GrowableNetwork(model, torch.randn(5, 6, dtype=torch.float64)).eval()
    save(net, tmp_path / "t.n2g")
    loaded = load(tmp_path / "t.n2g")

    assert loaded.b.weight is loaded.a.weight
    assert not loaded.out.bias.requires_grad and loaded.out.weight.requires_grad
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert torch.equal(loaded.inner.shift, net.inner.shift)
    assert "inner.shift" not in loaded.state_dict()  # still non-persistent
    assert not loaded.training
    _assert_same_network(net, loaded)
    x = torch.randn(7, 6, dtype=torch.float64, generator=_gen(4))
    assert torch.equal(_eval_out(net, x), _eval_out(loaded, x))


def test_map_location_moves_the_network(
    device: torch.device, grown: dict[str, GrowableNetwork], tmp_path: pathlib.Path
) -> None:
    net = copy.deepcopy(grown["cnn"]).to(device)
    save(net, tmp_path / "c.n2g")
    on_cpu = load(tmp_path / "c.n2g", map_location="cpu")
    assert all(t.device.type == "cpu" for t in [*on_cpu.parameters(), *on_cpu.probe])
    on_device = load(tmp_path / "c.n2g", map_location=device)
    assert all(t.device == next(net.parameters()).device for t in on_device.parameters())
    x = _inputs("cnn")
    assert torch.equal(_eval_out(net, x.to(device)), _eval_out(on_device, x.to(device)))
    assert torch.allclose(_eval_out(net, x.to(device)).cpu(), _eval_out(on_cpu, x), atol=1e-5)


# --------------------------------------------------------------------------------------------
# a fresh process that never imported the model classes
# --------------------------------------------------------------------------------------------

_FRESH = textwrap.dedent(
    """
    import sys
    import torch
    from net2grow import growth

    torch.set_num_threads(1)  # as in the parent: bitwise-equal reductions
    cases = torch.load(sys.argv[1], weights_only=True)
    results = {}
    for name, case in cases.items():
        net = growth.load(case["path"])
        with torch.no_grad():
            results[name] = net.eval()(case["x"])
        results[name + ":class"] = net.model_class
        results[name + ":params"] = [n for n, _ in net.named_parameters()]
    assert "test_checkpoint" not in sys.modules
    assert "torchvision" not in sys.modules, "loading needs no torchvision"
    assert not any(
        cls in getattr(m, "__dict__", {}) for m in list(sys.modules.values())
        for cls in ("CkptMLP", "CkptCNN", "CkptResNet")
    ), "the model classes are never imported"
    torch.save(results, sys.argv[2])
    """
)


def test_load_in_a_fresh_process_without_the_model_class(
    grown: dict[str, GrowableNetwork], tmp_path: pathlib.Path
) -> None:
    cases, expected = {}, {}
    for name, net in grown.items():
        path = tmp_path / f"{name}.n2g"
        save(net, path)
        x = _inputs(name, seed=11)
        cases[name] = {"path": str(path), "x": x}
        expected[name] = _eval_out(net, x)
    torch.save(cases, tmp_path / "cases.pt")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, net in grown.items():
        assert torch.equal(results[name], expected[name]), name
        assert results[f"{name}:class"] == net.model_class
        assert results[f"{name}:params"] == [n for n, _ in net.named_parameters()]


# --------------------------------------------------------------------------------------------
# resumed training
# --------------------------------------------------------------------------------------------


def _batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = _gen(21)
    return [
        (torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 5, (8,), generator=g))
        for _ in range(n)
    ]


def _train(net: nn.Module, opt: torch.optim.Optimizer, batches: list[Any]) -> list[float]:
    net.train()
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resumed_training_follows_the_uninterrupted_trajectory(tmp_path: pathlib.Path) -> None:
    batches = _batches(10)
    torch.manual_seed(0)
    net = GrowableNetwork(CkptCNN(), batches[0][0])
    head = [net.fc.weight, net.fc.bias]
    body = [p for p in net.parameters() if all(p is not q for q in head)][::-1]  # any order
    opt = torch.optim.Adam([{"params": body}, {"params": head, "lr": 3e-3}], lr=1e-2)
    _train(net, opt, batches[:2])
    net.widen("conv1", 12, generator=_gen(1), optimizer=opt)
    net.deepen("conv2", kind="residual", optimizer=opt)  # new parameters join group 0
    _train(net, opt, batches[2:4])

    save(net, tmp_path / "run.n2g", optimizer=opt)
    reference = _train(net, opt, batches[4:])

    ckpt = load_checkpoint(tmp_path / "run.n2g")
    assert isinstance(ckpt, Checkpoint)
    groups = ckpt.optimizer_param_names
    assert groups is not None and len(groups) == 2
    network_order = [n for n, _ in ckpt.network.named_parameters()]
    assert sorted(groups[0] + groups[1]) == sorted(network_order)
    # the optimizer's order is not the network's: make_optimizer must restore it
    assert groups[0] != [n for n in network_order if n in groups[0]]
    resumed_opt = ckpt.make_optimizer()
    assert isinstance(resumed_opt, torch.optim.Adam)
    assert [g["lr"] for g in resumed_opt.param_groups] == [1e-2, 3e-3]
    resumed = _train(ckpt.network, resumed_opt, batches[4:])

    assert len(resumed) == len(reference) == 6
    assert max(abs(a - b) for a, b in zip(resumed, reference)) <= 1e-6
    for p, q in zip(net.parameters(), ckpt.network.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_optimizer_state_errors(tmp_path: pathlib.Path) -> None:
    net = GrowableNetwork(CkptMLP(), torch.randn(4, 8))
    foreign = torch.optim.SGD([*net.parameters(), nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(GrowthError, match="not part of the model"):
        save(net, tmp_path / "x.n2g", optimizer=foreign)
    assert not (tmp_path / "x.n2g").exists()

    save(net, tmp_path / "plain.n2g")
    with pytest.raises(GrowthError, match="no optimizer state"):
        load_checkpoint(tmp_path / "plain.n2g").make_optimizer()

    save(net, tmp_path / "sgd.n2g", optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    ckpt = load_checkpoint(tmp_path / "sgd.n2g")
    with pytest.raises(GrowthError, match="SGD"):
        ckpt.make_optimizer(torch.optim.Adam)
    assert isinstance(ckpt.make_optimizer(torch.optim.SGD), torch.optim.SGD)


# --------------------------------------------------------------------------------------------
# integrity and atomicity
# --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: pathlib.Path) -> pathlib.Path:
    torch.manual_seed(0)
    path = tmp_path / "net.n2g"
    save(GrowableNetwork(CkptMLP(), torch.randn(4, 8)), path)
    return path


@pytest.mark.parametrize("keep", [0, 10, 40, 100, 0.5, -1])
def test_truncated_file_is_refused(saved: pathlib.Path, keep: float) -> None:
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    saved.write_bytes(data[:n])
    with pytest.raises(GrowthError, match=r"corrupt|not a net2grow checkpoint"):
        load(saved)


@pytest.mark.parametrize("where", [20, 60, 0.5, -1])
def test_tampered_file_is_refused(saved: pathlib.Path, where: float) -> None:
    data = bytearray(saved.read_bytes())
    i = int(len(data) * where) if isinstance(where, float) else where % len(data)
    data[i] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(GrowthError, match="corrupt"):
        load(saved)


def test_trailing_bytes_and_foreign_files_are_refused(
    saved: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(GrowthError, match="corrupt"):
        load(saved)
    other = tmp_path / "weights.pt"
    torch.save(CkptMLP().state_dict(), other)
    with pytest.raises(GrowthError, match="not a net2grow checkpoint"):
        load(other)


class _Boom(RuntimeError):
    pass


def _partial_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"half a checkpoint" * 64)
    raise _Boom("disk full")


@pytest.mark.parametrize("failing", ["torch.save", "os.fsync", "os.replace"])
def test_interrupted_save_keeps_the_previous_file(
    failing: str, saved: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()
    reference = load(saved)
    bigger = _grown("mlp")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise _Boom(failing)

    module, attr = failing.split(".")
    replacement = _partial_then_fail if failing == "torch.save" else fail
    monkeypatch.setattr({"torch": torch, "os": os}[module], attr, replacement)
    with pytest.raises(_Boom):
        save(bigger, saved)
    monkeypatch.undo()

    assert saved.read_bytes() == before
    assert sorted(os.listdir(saved.parent)) == [saved.name]  # no temporary file left behind
    x = torch.randn(3, 8, generator=_gen(0))
    assert torch.equal(_eval_out(load(saved), x), _eval_out(reference, x))

    monkeypatch.setattr({"torch": torch, "os": os}[module], attr, replacement)
    with pytest.raises(_Boom):
        save(bigger, saved.parent / "new.n2g")
    monkeypatch.undo()
    assert sorted(os.listdir(saved.parent)) == [saved.name]


def test_saving_over_an_existing_file_replaces_it(saved: pathlib.Path) -> None:
    old = load(saved)
    net = _grown("mlp")
    save(net, saved)
    new = load(saved)
    assert old.width("body.0") == 16 and new.width("body.0") == 24
    assert len(new.history) == 3
    assert sorted(os.listdir(saved.parent)) == [saved.name]


def test_save_and_load_through_the_package() -> None:
    assert growth.save is save and growth.load is load


# --------------------------------------------------------------------------------------------
# allowlists
# --------------------------------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


class WithMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) @ self.w


def test_unsupported_module_or_function_is_refused_at_save(tmp_path: pathlib.Path) -> None:
    model = nn.Sequential(nn.Linear(4, 6), Scale(6), nn.ReLU(), nn.Linear(6, 2))
    net = GrowableNetwork(model, torch.randn(3, 4), leaf_modules=[Scale])
    with pytest.raises(GrowthError, match=r"'1'.*Scale"):
        save(net, tmp_path / "a.n2g")
    net = GrowableNetwork(WithMatmul(), torch.randn(3, 4))
    with pytest.raises(GrowthError, match="matmul"):
        save(net, tmp_path / "b.n2g")
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("forge") / "r.n2g"
    save(GrowableNetwork(CkptResNet(), torch.randn(2, 3, 8, 8)), path)
    return path.read_bytes()


def _forge(path: pathlib.Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a checkpoint with a valid header and checksum after ``edit``-ing its payload."""
    payload = read_payload(path)
    edit(payload)
    write_payload(payload, path)


def _set_function(payload: dict[str, Any], name: str) -> None:
    node = next(n for n in payload["graph"] if n["op"] == "call_function")
    node["target"] = name


def _set_method(payload: dict[str, Any], name: str) -> None:
    node = next(n for n in payload["graph"] if n["op"] == "call_module")
    node["op"], node["target"] = "call_method", name


def _set_type(payload: dict[str, Any], name: str) -> None:
    entry = next(e for e in payload["modules"] if e["kind"] == "layer")
    entry["type"] = name


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda p: _set_function(p, "builtins.eval"), "builtins.eval"),
        (lambda p: _set_function(p, "os.system"), "os.system"),
        (lambda p: _set_function(p, "torch.load"), "torch.load"),
        (lambda p: _set_function(p, "torch._C._nn.linear"), "torch._C._nn.linear"),
        (lambda p: _set_method(p, "__reduce__"), "__reduce__"),
        (lambda p: _set_type(p, "MyLayer"), "MyLayer"),
        (lambda p: _set_type(p, "TransformerEncoderLayer"), "TransformerEncoderLayer"),
    ],
)
def test_unknown_function_method_or_layer_type_in_a_file_is_refused(
    resnet_file: bytes,
    tmp_path: pathlib.Path,
    edit: Callable[[dict[str, Any]], None],
    named: str,
) -> None:
    path = tmp_path / "r.n2g"
    path.write_bytes(resnet_file)
    load(path)  # loads before the edit
    _forge(path, edit)
    with pytest.raises(GrowthError, match=named.replace(".", r"\.")):
        load(path)


class _Payload:
    """An object whose unpickling would create a marker file (weights_only must refuse it)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def test_payload_is_loaded_with_weights_only(saved: pathlib.Path) -> None:
    marker = saved.parent / "pwned"
    _forge(saved, lambda p: p.update(evil=_Payload(marker)))
    with pytest.raises(GrowthError, match="cannot read the checkpoint payload"):
        load(saved)
    assert not marker.exists()


LAYER_EXAMPLES = [
    nn.Linear(3, 5, bias=False),
    nn.Conv1d(2, 4, 5, padding="same", padding_mode="circular"),
    nn.Conv2d(4, 8, (3, 1), stride=2, padding=1, dilation=2, groups=2, bias=False),
    nn.Conv3d(2, 2, 1, padding_mode="reflect"),
    nn.Embedding(10, 4, padding_idx=1, max_norm=2.0, scale_grad_by_freq=True),
    nn.BatchNorm1d(5, track_running_stats=False),
    nn.BatchNorm2d(6, eps=1e-3, momentum=None, affine=False),
    nn.BatchNorm2d(6, bias=False),
    nn.InstanceNorm2d(3, affine=True),
    nn.LayerNorm([4, 5], eps=1e-4, bias=False),
    nn.GroupNorm(2, 6, eps=1e-3, affine=False),
    nn.PReLU(7),
    nn.LeakyReLU(0.3, inplace=True),
    nn.GELU("tanh"),
    nn.ELU(0.5),
    nn.CELU(0.7),
    nn.Hardtanh(-2.0, 3.0),
    nn.ReLU6(inplace=True),
    nn.Softplus(2, 10),
    nn.Threshold(0.1, 20.0),
    nn.Dropout2d(0.3),
    nn.Identity(),
    nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
    nn.AvgPool1d(2, count_include_pad=False),
    nn.AvgPool2d(3, 2, 1, count_include_pad=False, divisor_override=3),
    nn.AdaptiveMaxPool2d((2, None)),
    nn.LPPool2d(2.0, 3),
    nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=True),
    nn.UpsamplingBilinear2d(scale_factor=2),
    nn.ZeroPad2d((1, 2, 3, 4)),
    nn.ConstantPad1d(2, 3.5),
    nn.ReflectionPad2d(1),
    nn.Flatten(2, 3),
    nn.LogSoftmax(dim=1),
]


@pytest.mark.parametrize("module", LAYER_EXAMPLES, ids=lambda m: repr(m))
def test_layer_spec_rebuilds_every_constructor_argument(
    module: nn.Module, tmp_path: pathlib.Path
) -> None:
    spec = layer_spec(module, "m")
    torch.save(spec, tmp_path / "spec.pt")
    spec = torch.load(tmp_path / "spec.pt", weights_only=True)
    rebuilt = build_layer(spec, "m")
    assert type(rebuilt) is type(module)
    assert repr(rebuilt) == repr(module)
    public = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    assert {k: v for k, v in vars(rebuilt).items() if not k.startswith("_")} == public
    assert tensor_shapes(rebuilt) == tensor_shapes(module)


def test_every_allowed_layer_type_has_a_growth_rule() -> None:
    assert all(module_rule_for(t.__new__(t)) is not None for t in checkpointable_types().values())


def test_every_function_with_a_rule_can_be_named_and_resolved() -> None:
    from net2grow.growth.rules import _FUNCTION_RULES

    for fn in [*_FUNCTION_RULES, getattr, operator.getitem]:
        name = function_name(fn)
        assert resolve_function(name) is fn, name
    with pytest.raises(GrowthError, match="matmul"):
        function_name(torch.matmul)


def test_changed_attribute_that_the_constructor_cannot_reproduce_is_refused() -> None:
    conv = nn.Conv2d(2, 4, 3)
    conv.out_channels = 5  # inconsistent with its weight
    with pytest.raises(GrowthError, match=r"'conv'.*cannot be reproduced"):
        layer_spec(conv, "conv")


# --------------------------------------------------------------------------------------------
# temporary files of writers that died
# --------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_save_removes_temporary_files_of_dead_writers_only(saved: pathlib.Path) -> None:
    dead = saved.parent / f".{saved.name}.{_dead_pid()}.0123abcd.tmp"
    alive = saved.parent / f".{saved.name}.{os.getpid()}.89abcdef.tmp"
    other = saved.parent / f".other.n2g.{_dead_pid()}.0123abcd.tmp"
    for path in (dead, alive, other):
        path.write_bytes(b"half a checkpoint")
    save(load(saved), saved)
    assert not dead.exists()  # its writer is gone
    assert alive.exists()  # a live writer (this process) may still be writing it
    assert other.exists()  # another checkpoint's file
    load(saved)


def test_save_killed_mid_write_leaves_nothing_after_the_next_save(tmp_path: pathlib.Path) -> None:
    """kill -9 a process while it saves a large network over and over; the next save in this
    process removes what it left, and the last complete file still loads."""
    target = tmp_path / "big.n2g"
    code = textwrap.dedent(
        f"""
        import sys, torch
        from torch import nn
        from net2grow import growth
        net = growth.GrowableNetwork(
            nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048)),
            torch.randn(2, 256),
        )
        growth.save(net, {str(target)!r})
        print("ready", flush=True)
        while True:
            growth.save(net, {str(target)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for trial in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.07 * trial)
        proc.kill()
        proc.wait()
    load(target)  # the last complete save
    save(load(target), target)
    assert sorted(os.listdir(tmp_path)) == [target.name]
