"""Property tests: random small networks, random sequences of ``widen`` on random growable layers.

For every example: outputs preserved after each operation, parameter count equal to the count
recomputed from the modules' size attributes, history complete and consistent, parameter names
unchanged and unique, grouped/depthwise convolution constraints respected, and a refused width
(not a multiple of the group count) leaves the network untouched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _models import (
    assert_preserved,
    assert_state_equal,
    check_consistent,
    gen,
    mlp,
    mlp_param_formula,
    module_param_count,
    outputs,
    randomize_batchnorm,
    snapshot,
)
from hypothesis import event, given, note
from hypothesis import strategies as st
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError

ACTS = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "leaky": lambda x: F.leaky_relu(x, 0.2),
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}


@dataclass(frozen=True)
class BlockSpec:
    width: int
    residual: str  # "none" | "identity" | "projection"
    concat: int  # 0: no side branch; else width of a branch concatenated on channels
    depthwise: bool  # CNN only: a depthwise 3x3 conv after the main conv


@dataclass(frozen=True)
class NetSpec:
    kind: str  # "mlp" | "cnn"
    blocks: tuple[BlockSpec, ...]
    act: str
    bn: bool
    groups: int  # CNN only: groups of the main conv of every block after the first
    head: str  # CNN only: "mean" (global average) | "flatten" (max-pool 2, flatten)
    seed: int


class RandomNet(nn.Module):
    """A network described by a :class:`NetSpec`, written with functional calls in ``forward``."""

    IN_FEATURES, IN_CHANNELS, SIZE = 5, 3, 4

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        cnn = spec.kind == "cnn"
        prev = self.IN_CHANNELS if cnn else self.IN_FEATURES
        self.main = nn.ModuleList()
        self.norm = nn.ModuleList()
        self.dw = nn.ModuleList()
        self.proj = nn.ModuleList()
        self.side = nn.ModuleList()
        for i, b in enumerate(spec.blocks):
            width = prev if b.residual == "identity" else b.width
            # a true grouped conv (1 < groups < in_channels) where the input allows it
            g = spec.groups if cnn and i > 0 and prev % spec.groups == 0 < prev - spec.groups else 1
            if g > 1 and b.residual != "identity":
                width = g * max(2, round(width / g))
            if cnn:
                self.main.append(nn.Conv2d(prev, width, 3, padding=1, groups=g))
                self.norm.append(nn.BatchNorm2d(width) if spec.bn else nn.Identity())
                dw = nn.Conv2d(width, width, 3, padding=1, groups=width) if b.depthwise else None
                self.dw.append(dw or nn.Identity())
                proj = nn.Conv2d(prev, width, 1) if b.residual == "projection" else nn.Identity()
                side = nn.Conv2d(prev, b.concat, 1) if b.concat else nn.Identity()
            else:
                self.main.append(nn.Linear(prev, width))
                self.norm.append(nn.BatchNorm1d(width) if spec.bn else nn.Identity())
                self.dw.append(nn.Identity())
                proj = nn.Linear(prev, width) if b.residual == "projection" else nn.Identity()
                side = nn.Linear(prev, b.concat) if b.concat else nn.Identity()
            self.proj.append(proj)
            self.side.append(side)
            prev = width + b.concat
        if cnn and spec.head == "flatten":
            self.head = nn.Linear(prev * (self.SIZE // 2) ** 2, 3)
        else:
            self.head = nn.Linear(prev, 3)

    def forward(self, x: Tensor) -> Tensor:
        act = ACTS[self.spec.act]
        for i, b in enumerate(self.spec.blocks):
            h = act(self.norm[i](self.main[i](x)))
            h = self.dw[i](h)
            if b.residual != "none":
                h = h + self.proj[i](x)
            if b.concat:
                h = torch.cat([h, act(self.side[i](x))], 1)
            x = h
        if self.spec.kind == "cnn":
            if self.spec.head == "flatten":
                x = torch.flatten(F.max_pool2d(x, 2), 1)
            else:
                x = x.mean(dim=(2, 3))
        return self.head(x)

    def example(self, n: int, seed: int) -> Tensor:
        g = gen(seed)
        if self.spec.kind == "cnn":
            return torch.randn(n, self.IN_CHANNELS, self.SIZE, self.SIZE, generator=g)
        return torch.randn(n, self.IN_FEATURES, generator=g)


@st.composite
def net_specs(draw, kinds: tuple[str, ...] = ("mlp", "cnn"), groups=(1, 2, 3),
              grouped: bool = False) -> NetSpec:
    """Random architectures; ``grouped``: at least one true grouped conv (depth >= 2, and a
    plain first block so that the second block's grouped conv reads a single producer)."""
    kind = draw(st.sampled_from(kinds))
    g = draw(st.sampled_from(groups)) if kind == "cnn" else 1
    depth = draw(st.integers(2 if grouped else 1, 3))
    blocks = tuple(
        BlockSpec(
            width=g * draw(st.integers(2, 3)) if grouped and i == 0 else draw(st.integers(2, 6)),
            residual=draw(st.sampled_from(
                ["none"] if grouped and i == 0 else ["none", "none", "identity", "projection"]
            )),
            concat=0 if grouped and i == 0 else draw(st.sampled_from([0, 0, 2, 3])),
            depthwise=kind == "cnn" and draw(st.booleans()),
        )
        for i in range(depth)
    )
    return NetSpec(
        kind=kind,
        blocks=blocks,
        act=draw(st.sampled_from(sorted(ACTS))),
        bn=draw(st.booleans()),
        groups=g,
        head=draw(st.sampled_from(["mean", "flatten"])) if kind == "cnn" else "mean",
        seed=draw(st.integers(0, 2**16)),
    )


def build(spec: NetSpec) -> tuple[GrowableNetwork, Tensor]:
    torch.manual_seed(spec.seed)
    model = randomize_batchnorm(RandomNet(spec), seed=spec.seed)
    probe = model.example(8, spec.seed)
    return GrowableNetwork(model, probe), model.example(8, spec.seed + 1)


def conv_groups(net: nn.Module) -> dict[str, tuple[int, bool]]:
    """name -> (groups, depthwise) of every convolution."""
    return {
        n: (m.groups, m.groups == m.in_channels and m.groups > 1)
        for n, m in net.named_modules()
        if isinstance(m, nn.Conv2d)
    }


def _convs(net: nn.Module) -> list[tuple[int, nn.Conv2d]]:
    return [(m.groups, m) for m in net.modules() if isinstance(m, nn.Conv2d)]


GROUP_REFUSAL = re.compile(r"grouped convolution: width must be a multiple of (\d+)")

MODES = [{}, {"split": "equal"}, {"init": "zero"}, {"init": "zero", "split": "equal"}]
widen_ops = st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(1, 4), st.booleans(),
              st.sampled_from(range(len(MODES)))),
    min_size=1,
    max_size=4,
)


@given(spec=net_specs(), ops=widen_ops)
def test_random_widen_sequences_preserve_everything(spec: NetSpec, ops) -> None:
    check_widen_sequence(spec, ops)


@given(spec=net_specs(kinds=("cnn",), groups=(2, 3, 4), grouped=True), ops=widen_ops)
def test_grouped_cnn_widen_sequences(spec: NetSpec, ops) -> None:
    """Grouped CNNs only: the group constraint is exercised in most examples."""
    check_widen_sequence(spec, ops)


def check_widen_sequence(spec: NetSpec, ops) -> None:
    """Apply ``ops`` to the network of ``spec``, checking every invariant after each one."""
    net, x = build(spec)
    note(f"layers: {net.layers}")
    if spec.groups > 1:
        event(f"true grouped convs: {sum(1 < g < m.in_channels for g, m in _convs(net))}")
    event(f"{spec.kind}, groups={spec.groups}, bn={spec.bn}")
    y0 = outputs(net, x)
    names0 = [n for n, _ in net.named_parameters()]
    keys0 = list(net.state_dict())
    groups0 = conv_groups(net)
    grouped_sizes = {g for g, dw in groups0.values() if g > 1 and not dw}
    for done, (pick, extra, use_factor, mode) in enumerate(ops, 1):
        layers = net.layers
        if not layers:
            break
        name = layers[pick % len(layers)]
        old = net.width(name)
        target = old + extra
        params = net.num_parameters()
        snap, y_before = snapshot(net), outputs(net, x)
        kw = {"factor": target / old} if use_factor and round(target / old * old) == target else {}
        kw.update(MODES[mode])
        try:
            rec = net.widen(name, None if "factor" in kw else target, generator=gen(pick), **kw)
        except GrowthError as exc:
            m = GROUP_REFUSAL.search(str(exc))
            assert m is not None, f"unexpected refusal of {name!r} -> {target}: {exc}"
            multiple = int(m.group(1))
            note(f"refused {name} -> {target} (multiple of {multiple})")
            event("refused: not a multiple of the groups")
            assert target % multiple != 0
            assert any(multiple % g == 0 for g in grouped_sizes), (multiple, grouped_sizes)
            assert net.width(name) == old and len(net.history) == done - 1
            assert_state_equal(net, snap)
            assert torch.equal(outputs(net, x), y_before)
            target = math.ceil(target / multiple) * multiple
            kw.pop("factor", None)
            rec = net.widen(name, target, generator=gen(pick), **kw)
        note(f"widened {name}: {old} -> {target}")
        event(f"widened a {type(net.get_submodule(name)).__name__}")
        # outputs preserved (errors of successive operations do not pile up)
        assert_preserved(outputs(net, x), y0)
        # record and widths
        assert (rec.op, rec.layer, rec.old_width, rec.new_width) == ("widen", name, old, target)
        assert net.width(name) == target
        assert rec.params_before == params
        assert rec.params_after == net.num_parameters() == module_param_count(net)
        assert rec.params_after == sum(p.numel() for p in net.parameters()) > params
        assert rec.max_abs_error is not None
        assert len(net.history) == done and net.history[-1] is rec
        # names unchanged and unique; tensor shapes agree with module attributes
        names = [n for n, _ in net.named_parameters()]
        assert names == names0 and len(set(names)) == len(names)
        assert list(net.state_dict()) == keys0
        check_consistent(net)
        # grouped convolutions keep their group count, depthwise convolutions stay depthwise
        for n, (g, dw) in conv_groups(net).items():
            m = net.get_submodule(n)
            if groups0[n][1]:
                assert dw and m.in_channels == m.out_channels, n
            else:
                assert g == groups0[n][0], n
    for prev, nxt in zip(net.history, net.history[1:]):
        assert nxt.params_before == prev.params_after


@given(spec=net_specs(kinds=("cnn",), groups=(2, 3, 4), grouped=True), ops=widen_ops)
def test_non_multiple_of_groups_is_refused_untouched(spec: NetSpec, ops) -> None:
    """Every width refused for the group constraint leaves the network bitwise unchanged."""
    net, x = build(spec)
    for pick, extra, _, _ in ops:
        if not net.layers:
            break
        name = net.layers[pick % len(net.layers)]
        target = net.width(name) + extra
        snap, y, n_hist = snapshot(net), outputs(net, x), len(net.history)
        try:
            net.widen(name, target, generator=gen(pick))
        except GrowthError as exc:
            assert GROUP_REFUSAL.search(str(exc)), str(exc)
            event("refused")
            assert_state_equal(net, snap)
            assert torch.equal(outputs(net, x), y)
            assert len(net.history) == n_hist
            assert net.layers  # the analysis still works after a refusal


@given(
    sizes=st.lists(st.integers(1, 7), min_size=3, max_size=5),
    ops=st.lists(st.tuples(st.integers(0, 100), st.integers(1, 5)), min_size=1, max_size=5),
    split=st.sampled_from(["random", "equal"]),
    init=st.sampled_from(["net2net", "zero"]),
)
def test_mlp_closed_form_parameter_count(sizes, ops, split, init) -> None:
    torch.manual_seed(sum(sizes))
    net = GrowableNetwork(mlp(sizes, nn.Tanh), torch.randn(8, sizes[0]))
    x = torch.randn(8, sizes[0])
    y0 = outputs(net, x)
    hidden = net.layers
    assert hidden == [str(2 * i) for i in range(len(sizes) - 2)]
    for pick, extra in ops:
        i = pick % len(hidden)
        sizes[i + 1] += extra
        rec = net.widen(hidden[i], sizes[i + 1], split=split, init=init, generator=gen(pick))
        assert rec.params_after == mlp_param_formula(sizes) == net.num_parameters()
        assert_preserved(outputs(net, x), y0)
    assert [r.layer for r in net.history] == [hidden[p % len(hidden)] for p, _ in ops]


@given(spec=net_specs(), seed=st.integers(0, 2**16), extra=st.integers(1, 3))
def test_same_generator_seed_same_result(spec: NetSpec, seed: int, extra: int) -> None:
    a, _ = build(spec)
    b, _ = build(spec)
    if not a.layers:
        return
    name = a.layers[seed % len(a.layers)]
    for net in (a, b):
        target = net.width(name) + extra
        try:
            net.widen(name, target, generator=gen(seed))
        except GrowthError as exc:
            m = GROUP_REFUSAL.search(str(exc))
            assert m is not None, str(exc)
            net.widen(name, math.ceil(target / int(m.group(1))) * int(m.group(1)),
                      generator=gen(seed))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
