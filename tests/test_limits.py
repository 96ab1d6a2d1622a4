"""Limits and clean errors: every untrusted argument is refused with a ``GrowthError`` that names
the problem and the fix, before anything is allocated or changed.

- growth that would allocate more than ``max_growth_bytes`` / ``growth.limits.MAX_GROWTH_BYTES``
  is refused from the planned shapes alone (nothing big is allocated, the call returns at once);
- bad widths, factors and other arguments of ``widen``/``deepen``;
- bad ``example_inputs`` (dtype mismatch, not tensors, empty batch, meta tensors);
- a layer called more than once (weight sharing) is refused with that reason.

After every refusal the network's parameters, outputs and the optimizer's state are unchanged.
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _models import assert_preserved, assert_state_equal, check_consistent, gen, mlp, outputs
from _models import snapshot as state_snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from net2grow import growth
from net2grow.growth import GrowableNetwork, GrowthError, UnsupportedLayerError
from net2grow.growth.rules.linear import LinearRule
from net2grow.growth.widen import growth_bytes

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _optimizer_snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
        "hyper": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "state": {
            id(p): {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
            for p, s in opt.state.items()
        },
    }


def _assert_optimizer_equal(opt: torch.optim.Optimizer, snap: dict[str, Any]) -> None:
    now = _optimizer_snapshot(opt)
    assert now["groups"] == snap["groups"], "param groups changed"
    assert now["hyper"] == snap["hyper"], "hyperparameters changed"
    assert now["state"].keys() == snap["state"].keys(), "optimizer state keys changed"
    for pid, state in snap["state"].items():
        assert now["state"][pid].keys() == state.keys()
        for k, v in state.items():
            w = now["state"][pid][k]
            if isinstance(v, Tensor):
                assert w.shape == v.shape and torch.equal(w, v), f"optimizer state {k} changed"
            else:
                assert w == v, f"optimizer state {k} changed"


class Frozen:
    """Everything a refusal must leave alone: parameters (objects and values), buffers, outputs,
    history, generated code and the optimizer's groups and state."""

    def __init__(self, net: GrowableNetwork, x: Tensor, opt: torch.optim.Optimizer | None) -> None:
        self.net, self.x, self.opt = net, x, opt
        self.state = state_snapshot(net)
        self.params = dict(net.named_parameters())
        self.y = outputs(net, x)
        self.history = list(net.history)
        self.code = net.code
        self.opt_state = _optimizer_snapshot(opt) if opt is not None else None

    def check(self) -> None:
        net = self.net
        assert_state_equal(net, self.state)
        named = dict(net.named_parameters())
        assert named.keys() == self.params.keys()
        assert all(named[n] is p for n, p in self.params.items()), "parameter objects replaced"
        assert torch.equal(outputs(net, self.x), self.y), "outputs changed"
        assert net.history == self.history
        assert net.code == self.code
        check_consistent(net)
        if self.opt is not None:
            _assert_optimizer_equal(self.opt, self.opt_state)


def trained_mlp(seed: int = 0) -> tuple[GrowableNetwork, Tensor, torch.optim.Optimizer]:
    """A tiny MLP (4 -> 8 -> 8 -> 3) and an Adam with state after one step."""
    torch.manual_seed(seed)
    x = torch.randn(16, 4)
    net = GrowableNetwork(mlp([4, 8, 8, 3]), x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return net, x, opt


def refused(
    net: GrowableNetwork,
    x: Tensor,
    opt: torch.optim.Optimizer | None,
    call: Any,
    words: list[str],
    error: type[GrowthError] = GrowthError,
) -> GrowthError:
    """``call(net)`` raises exactly ``error`` whose message contains every one of ``words``,
    and nothing observable changed."""
    frozen = Frozen(net, x, opt)
    with pytest.raises(GrowthError) as info:
        call(net)
    assert type(info.value) is error, f"expected {error.__name__}, got {info.value!r}"
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in message: {msg}"
    frozen.check()
    return info.value


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any torch op produces with real storage (not ``meta``)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


# --------------------------------------------------------------------------------------------
# memory limit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"width": 10**9}, {"width": 2**40}, {"factor": 1e8}],
    ids=["width=1e9", "width=2**40", "factor=1e8"],
)
def test_huge_widen_is_refused_before_allocating(kwargs: dict[str, Any]) -> None:
    net, x, opt = trained_mlp()
    spy = LargestAllocation()
    tracemalloc.start()
    try:
        with spy:
            err = refused(
                net,
                x,
                opt,
                lambda n: n.widen("0", optimizer=opt, **kwargs),
                [
                    "widen('0') from 8 to",
                    "would allocate",
                    "more than the limit of 8 GiB",
                    "nothing was allocated or changed",
                    "max_growth_bytes=",
                    "growth.limits.MAX_GROWTH_BYTES",
                ],
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert spy.largest < 2**20, f"a {spy.largest}-byte tensor was allocated"
    assert peak < 50 * 2**20, f"python allocations peaked at {peak} bytes"
    assert "GiB" in str(err) or "TiB" in str(err)


def test_astronomical_widths_are_refused() -> None:
    net, x, opt = trained_mlp()
    for kwargs in ({"width": 10**400}, {"width": 2**63}, {"factor": 1e300}, {"factor": 1e308}):
        refused(
            net,
            x,
            opt,
            lambda n, kw=kwargs: n.widen("0", optimizer=opt, **kw),
            ["no tensor dimension can be that long", "smaller"],
        )


def _grown_bytes(net: GrowableNetwork, before: dict[str, torch.Size], opt) -> int:
    """Bytes of the tensors (and their optimizer state) whose shape changed."""
    total = 0
    for n, t in [*net.named_parameters(), *net.named_buffers()]:
        if n in before and t.shape != before[n]:
            per = t.element_size()
            state = opt.state.get(t, {}) if isinstance(t, nn.Parameter) else {}
            per += sum(
                v.element_size() for v in state.values() if isinstance(v, Tensor) and v.dim()
            )
            total += t.numel() * per
    return total


def test_byte_count_is_exact_for_the_grown_tensors() -> None:
    """The count is the grown tensors + their optimizer state + the index maps, no more."""
    net, x, opt = trained_mlp()
    group, _ = net._group_of("2")
    needed = growth_bytes(net, net.analysis, group, 1000, opt)
    before = {n: t.shape for n, t in [*net.named_parameters(), *net.named_buffers()]}
    # exactly at the limit passes, one byte less is refused
    refused(
        net,
        x,
        opt,
        lambda n: n.widen("2", 1000, optimizer=opt, max_growth_bytes=needed - 1),
        [f"{needed:,} bytes", f"{needed - 1:,} bytes"],
    )
    y = outputs(net, x)
    net.widen("2", 1000, optimizer=opt, max_growth_bytes=needed)
    assert_preserved(outputs(net, x), y)
    tensors = _grown_bytes(net, before, opt)
    maps = 1000 * 17 + 2 * 1000 * (8 + 1 + 4)  # unit mapping + one axis map per coupled layer
    assert needed == tensors + maps


def test_raising_the_limit_lets_a_large_growth_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    net, x, opt = trained_mlp()
    # a growth of a few MiB against a 1 MiB process-wide limit: refused, then allowed per call
    monkeypatch.setattr(growth.limits, "MAX_GROWTH_BYTES", 2**20)
    refused(
        net,
        x,
        opt,
        lambda n: n.widen("0", 50_000, optimizer=opt),
        ["would allocate", "limit of 1 MiB"],
    )
    y = outputs(net, x)
    rec = net.widen("0", 50_000, optimizer=opt, max_growth_bytes=64 * 2**20)
    assert net.width("0") == 50_000 and rec.new_width == 50_000
    assert_preserved(outputs(net, x), y)
    # raising the module default works too, and math.inf disables the check
    monkeypatch.setattr(growth.limits, "MAX_GROWTH_BYTES", 64 * 2**20)
    net.widen("2", 64, optimizer=opt)  # 64 x 50,000 weights with Adam state: ~37 MiB
    net.widen("0", 60_000, optimizer=opt, max_growth_bytes=math.inf)
    assert_preserved(outputs(net, x), y)
    # training still works at the new size
    net(x).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("limit", [-1, float("nan"), "8GB", True, [1]])
def test_bad_limit_is_refused(limit: Any) -> None:
    net, x, opt = trained_mlp()
    refused(
        net,
        x,
        opt,
        lambda n: n.widen("0", 12, optimizer=opt, max_growth_bytes=limit),
        ["max_growth_bytes must be a number of bytes >= 0", "math.inf"],
    )
    refused(
        net,
        x,
        opt,
        lambda n: n.deepen("0", optimizer=opt, max_growth_bytes=limit),
        ["max_growth_bytes must be a number of bytes >= 0"],
    )


def test_bad_module_default_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    net, x, opt = trained_mlp()
    monkeypatch.setattr(growth.limits, "MAX_GROWTH_BYTES", "lots")
    refused(
        net,
        x,
        opt,
        lambda n: n.widen("0", 12, optimizer=opt),
        ["growth.limits.MAX_GROWTH_BYTES must be a number of bytes", "8 * 2**30"],
    )


def test_deepen_of_a_wide_layer_is_refused_before_building_it() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 4)
    net = GrowableNetwork(mlp([4, 3000, 3]), x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(x).sum().backward()
    opt.step()
    spy = LargestAllocation()
    for kind, needed in (("identity", 3000 * 3001 * 4), ("residual", 2 * 3000 * 3001 * 4)):
        with spy:
            err = refused(
                net,
                x,
                opt,
                lambda n, k=kind: n.deepen("0", kind=k, optimizer=opt, max_growth_bytes=2**20),
                [
                    "deepen('0') at width 3000 would allocate",
                    f"({needed:,} bytes)",
                    "limit of 1 MiB",
                ],
            )
        assert "max_growth_bytes=" in str(err)
    assert spy.largest < 2**20, f"a {spy.largest}-byte tensor was allocated"
    y = outputs(net, x)
    net.deepen("0", kind="residual", optimizer=opt, max_growth_bytes=2 * 3000 * 3001 * 4)
    assert_preserved(outputs(net, x), y)


# --------------------------------------------------------------------------------------------
# bad widths and factors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"factor": float("nan")}, ["factor must be a number > 1, got nan", "factor=2.0"]),
        ({"factor": float("inf")}, ["factor must be a number > 1, got inf", "finite"]),
        ({"factor": float("-inf")}, ["factor must be a number > 1, got -inf"]),
        ({"factor": -2.0}, ["factor must be a number > 1, got -2.0"]),
        ({"factor": 0}, ["factor must be a number > 1, got 0", "width=<units>"]),
        ({"factor": 1}, ["factor must be a number > 1, got 1"]),
        ({"factor": "2"}, ["factor must be a number > 1, got '2'"]),
        ({"factor": True}, ["factor must be a number > 1, got True"]),
        ({"factor": 2 + 0j}, ["factor must be a number > 1"]),
        ({"factor": [2]}, ["factor must be a number > 1"]),
        ({"width": True}, ["width must be an int, got True (bool)", "e.g. width=16"]),
        ({"width": 3.0}, ["width must be an int, got 3.0 (float)", "factor=2.0"]),
        ({"width": 12.5}, ["width must be an int, got 12.5"]),
        ({"width": float("nan")}, ["width must be an int, got nan"]),
        ({"width": "12"}, ["width must be an int, got '12' (str)"]),
        ({"width": torch.tensor(12)}, ["width must be an int"]),
        ({"width": -5}, ["cannot shrink '0' from 8 to -5 units", "more than 8 units"]),
        ({"width": 0}, ["cannot shrink '0' from 8 to 0 units"]),
        ({"width": 8}, ["'0' already has width 8"]),
        ({}, ["give exactly one of width= and factor="]),
        ({"width": 12, "factor": 1.5}, ["give exactly one of width= and factor="]),
        ({"width": 12, "noise": float("inf")}, ["noise must be a non-negative number, got inf"]),
        ({"width": 12, "noise": True}, ["noise must be a non-negative number, got True"]),
        ({"width": 12, "init": ["net2net"]}, ["init must be one of"]),
        ({"width": 12, "split": None}, ["split must be one of"]),
        ({"width": 12, "verify": "no"}, ["verify must be True or False, got 'no'"]),
        ({"width": 12, "optimizer": "adam"}, ["optimizer must be a torch.optim.Optimizer"]),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_bad_width_or_factor(kwargs: dict[str, Any], words: list[str]) -> None:
    net, x, opt = trained_mlp()
    kwargs = dict(kwargs)
    kwargs.setdefault("optimizer", opt)
    refused(net, x, opt, lambda n: n.widen("0", **kwargs), words)
    y = outputs(net, x)
    net.widen("0", 12, optimizer=opt)  # still grows normally afterwards
    assert_preserved(outputs(net, x), y)


def test_numpy_style_integers_are_accepted() -> None:
    """Integral and real types other than int/float (here: fractions) are fine."""
    from fractions import Fraction

    net, x, opt = trained_mlp()
    y = outputs(net, x)
    net.widen("0", factor=Fraction(3, 2), optimizer=opt)
    assert net.width("0") == 12
    assert_preserved(outputs(net, x), y)


_NET_CACHE: dict[str, Any] = {}


def _cached_net() -> tuple[GrowableNetwork, Tensor, torch.optim.Optimizer]:
    if "net" not in _NET_CACHE:
        _NET_CACHE["net"] = trained_mlp(3)
    return _NET_CACHE["net"]


_bad_widths = st.one_of(
    st.integers(max_value=8),
    st.integers(min_value=2**40, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
)
_bad_factors = st.one_of(
    st.floats(max_value=1.0, allow_nan=False),
    st.floats(min_value=1e9, allow_infinity=True),
    st.just(float("nan")),
    st.integers(max_value=1),
    st.integers(min_value=10**10),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)


@given(width=_bad_widths)
def test_property_bad_widths_are_clean_refusals(width: Any) -> None:
    net, x, opt = _cached_net()
    frozen = Frozen(net, x, opt)
    with pytest.raises(GrowthError) as info:
        net.widen("0", width, optimizer=opt)
    assert type(info.value) is GrowthError
    assert "'0'" in str(info.value) or "width" in str(info.value)
    frozen.check()


@given(factor=_bad_factors)
def test_property_bad_factors_are_clean_refusals(factor: Any) -> None:
    net, x, opt = _cached_net()
    frozen = Frozen(net, x, opt)
    with pytest.raises(GrowthError) as info:
        net.widen("0", factor=factor, optimizer=opt)
    assert type(info.value) is GrowthError
    frozen.check()


# --------------------------------------------------------------------------------------------
# deepen arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"kind": "wide"}, ["kind must be one of ('identity', 'residual', 'block'), got 'wide'"]),
        ({"kind": ["identity"]}, ["kind must be one of"]),
        ({"kind": None}, ["kind must be one of"]),
        ({"activation": nn.ReLU}, ["got the class ReLU", "activation=ReLU()"]),
        ({"activation": F.relu}, ["activation must be an nn.Module instance", "nn.ReLU()"]),
        ({"activation": "relu"}, ["activation must be an nn.Module instance"]),
        ({"verify": 1}, ["verify must be True or False, got 1"]),
        ({"optimizer": object()}, ["optimizer must be a torch.optim.Optimizer"]),
        ({"max_growth_bytes": 10}, ["would allocate", "limit of 10 bytes"]),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_bad_deepen_arguments(kwargs: dict[str, Any], words: list[str]) -> None:
    net, x, opt = trained_mlp()
    kwargs = dict(kwargs)
    kwargs.setdefault("optimizer", opt)
    refused(net, x, opt, lambda n: n.deepen("0", **kwargs), words)
    y = outputs(net, x)
    net.deepen("0", optimizer=opt)
    assert_preserved(outputs(net, x), y)


# --------------------------------------------------------------------------------------------
# example_inputs and constructor arguments
# --------------------------------------------------------------------------------------------


def _built_refused(model: nn.Module, words: list[str], *args: Any, **kwargs: Any) -> None:
    """``GrowableNetwork(model, ...)`` is refused with a GrowthError and leaves ``model`` as it
    was (parameters, modes, outputs)."""
    x = torch.randn(5, 4)
    state = state_snapshot(model)
    modes = [m.training for m in model.modules()]
    y = outputs(model, x)
    with pytest.raises(GrowthError) as info:
        GrowableNetwork(model, *args, **kwargs)
    assert type(info.value) is GrowthError, repr(info.value)
    for w in words:
        assert w in str(info.value), f"{w!r} not in message: {info.value}"
    assert_state_equal(model, state)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(outputs(model, x), y)


def test_float64_inputs_to_a_float32_model() -> None:
    torch.manual_seed(0)
    _built_refused(
        mlp([4, 8, 3]),
        [
            "failed on example_inputs",
            "example_inputs is torch.float64 but the model's parameters are torch.float32",
            "x.to(torch.float32)",
            "model.to(torch.float64)",
        ],
        torch.randn(16, 4, dtype=torch.float64),
    )


def test_integer_inputs_to_a_float_model() -> None:
    _built_refused(
        mlp([4, 8, 3]),
        ["example_inputs is torch.int64", "x.to(torch.float32)"],
        torch.randint(0, 5, (16, 4)),
    )


def test_one_of_several_inputs_has_the_wrong_dtype() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

        def forward(self, x: Tensor, z: Tensor) -> Tensor:
            return self.a(x) + self.b(z)

    model = Two()
    state = state_snapshot(model)
    with pytest.raises(GrowthError, match=r"example_inputs\[1\] is torch.float64"):
        GrowableNetwork(model, (torch.randn(8, 4), torch.randn(8, 4, dtype=torch.float64)))
    assert_state_equal(model, state)


def test_wrong_shape_says_what_failed() -> None:
    _built_refused(
        mlp([4, 8, 3]),
        ["failed on example_inputs", "RuntimeError", "right shape, dtype and device"],
        torch.randn(16, 5),
    )


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ("abc", ["got str", "example_inputs=torch.randn(16, 4)"]),
        ({"x": torch.randn(4, 4)}, ["got dict"]),
        ([torch.randn(4, 4), "mask"], ["example_inputs[1] is a str, not a tensor"]),
        ((), ["example_inputs is an empty tuple"]),
        (torch.randn(0, 4), ["empty batch (shape (0, 4))", "at least one sample"]),
        (torch.tensor(1.0), ["0-dim tensor", "batch dimension"]),
        (torch.randn(8, 4, device="meta"), ["meta device", "real tensors"]),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_bad_example_inputs(inputs: Any, words: list[str]) -> None:
    _built_refused(mlp([4, 8, 3]), words, inputs)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"tolerance": float("nan")}, ["tolerance must be a number >= 0"]),
        ({"tolerance": -1e-3}, ["tolerance must be a number >= 0", "default"]),
        ({"tolerance": "tight"}, ["tolerance must be a number >= 0"]),
        ({"probe_size": 0}, ["probe_size must be an int >= 1"]),
        ({"probe_size": 2.5}, ["probe_size must be an int >= 1"]),
        ({"leaf_modules": nn.ReLU}, ["leaf_modules must be a list of module types"]),
        ({"leaf_modules": [nn.ReLU()]}, ["types, not instances"]),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], words: list[str]) -> None:
    _built_refused(mlp([4, 8, 3]), words, torch.randn(8, 4), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_inputs_on_another_device_are_moved_to_the_model() -> None:
    torch.manual_seed(0)
    model = mlp([4, 8, 3])
    net = GrowableNetwork(model, torch.randn(8, 4, device="cuda"))
    assert all(t.device.type == "cpu" for t in net.probe)


# --------------------------------------------------------------------------------------------
# weight sharing
# --------------------------------------------------------------------------------------------


class SharedOnInput(nn.Module):
    """``fc`` applied twice, first to the network's input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.fc(F.relu(self.fc(x)))))


class SharedAcrossBranches(nn.Module):
    """``fc`` reads the input in one branch and ``a``'s output in the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.fc(x)) + F.relu(self.fc(torch.tanh(self.a(x)))))


class SharedInside(nn.Module):
    """``fc`` applied twice in the middle: growable, its input and output units are coupled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(torch.tanh(self.a(x)))))))


@pytest.mark.parametrize(
    ("factory", "layer"),
    [(SharedOnInput, "fc"), (SharedAcrossBranches, "a")],
)
def test_weight_sharing_is_named_as_the_reason(factory: type[nn.Module], layer: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    net = GrowableNetwork(factory(), x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(x).sum().backward()
    opt.step()
    err = refused(
        net,
        x,
        opt,
        lambda n: n.widen(layer, 8, optimizer=opt),
        [
            f"cannot widen {layer!r}",
            "layer 'fc' is called 2 times in forward",
            "weights are shared between the calls",
            "separate module for each call",
            "the network's input, whose width is fixed",
        ],
    )
    assert "register" not in str(err)
    assert layer not in net.layers


def test_separate_modules_fix_the_sharing_refusal() -> None:
    class Unshared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(F.relu(self.fc2(F.relu(self.fc(x)))))

    torch.manual_seed(0)
    x = torch.randn(8, 4)
    net = GrowableNetwork(Unshared(), x)
    y = outputs(net, x)
    net.widen("fc", 8)
    assert_preserved(outputs(net, x), y)


def test_sharing_inside_the_network_still_grows() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    net = GrowableNetwork(SharedInside(), x)
    assert set(net.layers) == {"a", "fc"}
    y = outputs(net, x)
    net.widen("a", 9, generator=gen(0))
    assert net.width("fc") == 9 and net.get_submodule("fc").in_features == 9
    assert_preserved(outputs(net, x), y)


def test_input_coupling_without_sharing_keeps_its_reason() -> None:
    class InputResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.g, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.g(F.relu(self.g(x)))  # g is shared, but fc's coupling comes from x + fc(x)
            return self.out(x + torch.tanh(self.fc(x)) + h)

    x = torch.randn(8, 4)
    net = GrowableNetwork(InputResidual(), x)
    err = refused(
        net,
        x,
        None,
        lambda n: n.widen("fc", 8),
        ["cannot widen 'fc': the network's input, whose width is fixed"],
        UnsupportedLayerError,
    )
    assert "called" not in str(err)


class PickyLinear(nn.Linear):
    """A Linear whose (custom) rule reads the mapping's values: it cannot plan on meta tensors."""


class _PickyRule(LinearRule):
    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        for amap in (in_map, out_map):
            if amap is not None:
                amap.source.tolist()  # data-dependent: fails on meta tensors
        return super().grow(module, in_map, out_map, in_size, out_size)


def test_rule_that_needs_values_gets_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom rule that cannot plan on meta tensors still gets the limit (from a bound on the
    coupled modules' tensors), and ordinary growth through it still works."""
    monkeypatch.setitem(growth.rules._MODULE_RULES, PickyLinear, _PickyRule())
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    net = GrowableNetwork(
        nn.Sequential(PickyLinear(4, 8), nn.ReLU(), PickyLinear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
        x,
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(x).sum().backward()
    opt.step()
    group, _ = net._group_of("0")
    bound = growth_bytes(net, net.analysis, group, 100, opt)
    exact_tensors = (100 * 4 + 100 + 8 * 100) * 4 * 2  # grown weights/biases + momentum
    assert bound >= exact_tensors + 100 * 17
    spy = LargestAllocation()
    with spy:
        refused(
            net,
            x,
            opt,
            lambda n: n.widen("0", 10**9, optimizer=opt),
            ["would allocate", "limit of 8 GiB"],
        )
    assert spy.largest < 2**20
    y = outputs(net, x)
    net.widen("0", 100, optimizer=opt)
    assert_preserved(outputs(net, x), y)
