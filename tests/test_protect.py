"""Protected growth (continual learning): frozen old units stay bit-identical through training
with any optimizer, new units learn, the lateral / independent structure holds, protection
survives checkpoints, copies and growth after growth, and refusals change nothing."""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from _models import (
    FunctionalNet,
    GroupedNet,
    TinyDenseNet,
    TinyInception,
    TinyMobileNetV2,
    TinyResNet,
    assert_state_equal,
    gen,
    mlp,
    randomize_batchnorm,
    snapshot,
)
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError, UnsupportedLayerError, load, protect, save

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5),
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
}


# --------------------------------------------------------------------------------------------
# models and helpers
# --------------------------------------------------------------------------------------------


def bn_cnn() -> nn.Module:
    return randomize_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 5),
        )
    )


class Case:
    """A model, its inputs, and where to read its hidden units (module outputs, or the input of
    a module: ``"fc<"``), each with the layer whose units they are."""

    def __init__(
        self,
        name: str,
        make: Callable[[], nn.Module],
        shape: tuple[int, ...],
        probes: dict[str, str],
    ) -> None:
        self.name, self.make, self.shape, self.probes = name, make, shape, probes

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("mlp", lambda: mlp([8, 16, 16, 5]), (8,), {"1": "0", "3": "2"}),
    Case("bn_cnn", bn_cnn, (3, 6, 6), {"1": "0", "2": "0", "4": "3", "5": "3", "8<": "3"}),
    Case(
        "resnet",
        lambda: randomize_batchnorm(TinyResNet()),
        (3, 8, 8),
        {
            "stem.2": "stem.0",
            "layer1.bn1": "layer1.conv1",
            "layer1.bn2": "stem.0",
            "layer2.bn1": "layer2.conv1",
            "layer2.bn2": "layer2.conv2",
            "layer2.conv1<": "stem.0",  # the output of block 1 (residual sum)
            "fc<": "layer2.conv2",  # the pooled output of block 2
        },
    ),
]


def capture(net: nn.Module, x: Tensor, probes: Sequence[str]) -> dict[str, Tensor]:
    """Hidden activations on ``x`` in eval mode (modes restored)."""
    got: dict[str, Tensor] = {}
    handles = []
    for p in probes:
        module = net.get_submodule(p.rstrip("<"))
        if p.endswith("<"):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, i, p=p: got.__setitem__(p, i[0].detach().clone())
                )
            )
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, p=p: got.__setitem__(p, o.detach().clone())
                )
            )
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            net(x)
    finally:
        for m, mode in modes:
            m.training = mode
        for h in handles:
            h.remove()
    return got


def old_part(t: Tensor, width: int) -> Tensor:
    return t[:, :width]


def assert_old_units_identical(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    for p, b in before.items():
        a = old_part(after[p], b.shape[1])
        assert torch.equal(a, b), f"{p}: old units changed by {(a - b).abs().max().item():.3g}"


def train(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    shape: tuple[int, ...],
    steps: int = 15,
    seed: int = 0,
    clip: float | None = None,
) -> None:
    g = gen(seed)
    net.train()
    for _ in range(steps):
        x = torch.randn(16, *shape, generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()


def grow_step(net: GrowableNetwork, mode: str, extra: int = 3, seed: int = 1) -> dict[str, int]:
    """One continual-learning growth step: protect, then widen every group in growth order."""
    net.protect(mode)
    widths = {}
    done: set[frozenset[str]] = set()
    for i, name in enumerate(protect.growth_order(net, net.layers)):
        coupled = frozenset(net.coupled_layers(name))
        if coupled in done:
            continue
        done.add(coupled)
        widths[name] = net.width(name)
        net.widen(name, net.width(name) + extra, generator=gen(seed + i))
    return widths


def make(case: Case, seed: int = 0) -> tuple[GrowableNetwork, Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(12, *case.shape, generator=gen(100 + seed))
    return GrowableNetwork(case.make(), x), x


def producer_weights(net: GrowableNetwork) -> dict[str, Tensor]:
    return {n: net.get_submodule(n).weight.detach().clone() for n in net.layers}


# --------------------------------------------------------------------------------------------
# old units are bit-identical through training; new units learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", protect.MODES)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_old_units_bit_identical_through_training(case: Case, mode: str, opt_name: str) -> None:
    net, x = make(case)
    before = capture(net, x, list(case.probes))
    old_widths = {n: net.width(n) for n in net.layers}
    grow_step(net, mode)
    assert_old_units_identical(before, capture(net, x, list(case.probes)))
    weights = producer_weights(net)
    head = net.get_submodule(list(net.analysis.module_nodes)[-1])
    head_before = head.weight.detach().clone()

    train(net, OPTIMIZERS[opt_name](list(net.parameters())), case.shape)

    assert_old_units_identical(before, capture(net, x, list(case.probes)))
    assert protect.violations(net) == []
    for name, w in weights.items():  # new units learn (their incoming weights move)
        now = net.get_submodule(name).weight
        assert not torch.equal(now[old_widths[name] :], w[old_widths[name] :]), name
        assert torch.equal(now[: old_widths[name]], w[: old_widths[name]]), name
    # the output layer stays trainable, on its columns of old and of new units
    k = head_before.shape[1] - 3
    assert not torch.equal(head.weight[:, :k], head_before[:, :k])
    assert not torch.equal(head.weight[:, k:], head_before[:, k:])


PATTERNS = {
    "grouped": (GroupedNet, (3, 8, 8)),
    "depthwise": (TinyMobileNetV2, (3, 16, 16)),
    "concat": (TinyDenseNet, (3, 8, 8)),
    "inception": (TinyInception, (3, 8, 8)),
    "functional": (FunctionalNet, (3, 16, 16)),
}


@pytest.mark.parametrize("mode", protect.MODES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_frozen_units_hold_in_every_graph_pattern(pattern: str, mode: str) -> None:
    """Grouped and depthwise convolutions (new units in every group), concatenations (new
    channels between old ones), functional calls. The reference is the network right after
    growth: where new zero-weight inputs land between old ones in a sum, growth itself may
    round differently (it is exact to the verification tolerance), training never does."""
    cls, shape = PATTERNS[pattern]
    torch.manual_seed(0)
    x = torch.randn(8, *shape, generator=gen(1))
    net = GrowableNetwork(randomize_batchnorm(cls()), x)
    names = list(net.layers)
    net.protect(mode)
    done: set[frozenset[str]] = set()
    for i, name in enumerate(protect.growth_order(net, names)):
        coupled = frozenset(net.coupled_layers(name))
        if coupled in done:
            continue
        done.add(coupled)
        group, expand = net._group_of(name)
        step = net.analysis.spaces.info(group).groups * expand  # whole groups
        net.widen(name, net.width(name) + 2 * step, generator=gen(10 + i))
    frozen = {n: protect.frozen_units(net, n) for n in names}
    assert all(f.any() and not f.all() for f in frozen.values())
    grown = capture(net, x, names)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.3)
    g = gen(2)
    net.train()
    for _ in range(8):
        out = net(torch.randn(8, *shape, generator=g))
        loss = F.cross_entropy(out, torch.randint(0, out.shape[1], (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = capture(net, x, names)
    for n in names:
        assert torch.equal(after[n][:, frozen[n]], grown[n][:, frozen[n]]), n
        assert not torch.equal(after[n][:, ~frozen[n]], grown[n][:, ~frozen[n]]), n
    assert protect.violations(net) == []


@pytest.mark.parametrize("case", CASES[1:], ids=repr)
def test_batchnorm_statistics_of_old_channels_are_kept(case: Case) -> None:
    net, _ = make(case)
    bns = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    widths = {n: m.num_features for n, m in bns.items()}
    grow_step(net, "lateral")
    grown = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    train(net, torch.optim.SGD(net.parameters(), lr=0.01), case.shape, steps=5)
    for n, (mean, var) in grown.items():
        m, k = bns[n], widths[n]
        assert torch.equal(m.running_mean[:k], mean[:k]), n
        assert torch.equal(m.running_var[:k], var[:k]), n
        assert not torch.equal(m.running_var[k:], var[k:]), f"{n}: new channels do not track"


# --------------------------------------------------------------------------------------------
# structure of the two modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", protect.MODES)
def test_mlp_block_structure(mode: str) -> None:
    net, _ = make(CASES[0])
    grow_step(net, mode, extra=8)
    w2 = net.get_submodule("2").weight
    assert torch.equal(w2[:16, 16:], torch.zeros(16, 8)), "old units read new units"
    new_reads_old = w2[16:, :16]
    if mode == "lateral":
        assert new_reads_old.abs().min() > 0, "lateral: new units read the old ones"
    else:
        assert torch.equal(new_reads_old, torch.zeros(8, 16)), "independent: block-diagonal"
    w0 = net.get_submodule("0").weight
    assert w0[16:].abs().min() > 0, "the first layer's new units read the network input"
    train(net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.5), (8,))
    w2 = net.get_submodule("2").weight
    assert torch.equal(w2[:16, 16:], torch.zeros(16, 8))  # zeros stay exactly zero
    if mode == "independent":
        assert torch.equal(w2[16:, :16], torch.zeros(8, 16))
    assert not torch.equal(w2[16:, 16:], torch.zeros(8, 8))  # new units read new units
    assert torch.equal(protect.frozen_units(net, "2"), torch.arange(24) < 16)


@pytest.mark.parametrize("mode", protect.MODES)
def test_widen_protect_shorthand_is_protect_then_widen(mode: str) -> None:
    a, _ = make(CASES[0])
    b, _ = make(CASES[0])
    a.protect(mode)
    a.widen("0", 24, generator=gen(1))
    a.widen("2", 24, generator=gen(2))
    b.widen("0", 24, protect=mode, generator=gen(1))
    b.widen("2", 24, protect=mode, generator=gen(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [
        k for k in sa if not torch.equal(sa[k], sb[k])
    ]


def test_independent_convolutions_read_no_frozen_channel() -> None:
    net, _ = make(CASES[2])
    grow_step(net, "independent")
    train(net, torch.optim.Adam(net.parameters(), lr=1e-2), (3, 8, 8))
    for name in ("layer1.conv1", "layer2.conv1", "layer2.shortcut.0"):
        w = net.get_submodule(name).weight  # readers of the stem's group (6 old channels)
        k = w.shape[0] - 3
        assert torch.equal(w[k:, :6], torch.zeros_like(w[k:, :6])), name
        assert torch.equal(w[:k, 6:], torch.zeros_like(w[:k, 6:])), name


def test_gradients_of_frozen_entries_are_masked() -> None:
    net, _ = make(CASES[1])
    grow_step(net, "lateral")
    masks = protect.frozen_masks(net)
    train(net, torch.optim.SGD(net.parameters(), lr=0.1), (3, 6, 6), steps=3)  # new units wake up
    net.zero_grad()
    F.cross_entropy(net(torch.randn(4, 3, 6, 6)), torch.tensor([0, 1, 2, 3])).backward()
    params = dict(net.named_parameters())
    for name, mask in masks.items():
        if name in params:
            assert params[name].grad is not None
            assert torch.equal(params[name].grad[mask], torch.zeros(int(mask.sum()))), name
            if name.endswith("weight"):  # (a conv bias before BatchNorm has no gradient)
                assert (params[name].grad[~mask] != 0).any(), name
    # gradient clipping sees the new units' gradients only: old units still never move
    before = capture(net, torch.randn(4, 3, 6, 6, generator=gen(5)), ["4"])
    train(net, torch.optim.SGD(net.parameters(), lr=0.1), (3, 6, 6), clip=0.1)
    after = capture(net, torch.randn(4, 3, 6, 6, generator=gen(5)), ["4"])
    assert torch.equal(after["4"][:, :8], before["4"][:, :8])


def test_optimizer_built_before_growth_and_carried() -> None:
    net, x = make(CASES[0])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train(net, opt, (8,), steps=3)
    before = capture(net, x, ["1", "3"])
    net.protect("lateral")
    net.widen("0", 20, optimizer=opt, generator=gen(1))
    net.widen("2", 20, optimizer=opt, generator=gen(2))
    train(net, opt, (8,))
    assert_old_units_identical(before, capture(net, x, ["1", "3"]))


# --------------------------------------------------------------------------------------------
# growth after growth, checkpoints, copies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", protect.MODES)
def test_growth_after_growth(mode: str) -> None:
    case = CASES[0]
    net, x = make(case)
    gen0 = capture(net, x, ["1", "3"])
    grow_step(net, mode, extra=4)
    train(net, torch.optim.Adam(net.parameters(), lr=1e-2), (8,), seed=1)
    gen1 = capture(net, x, ["1", "3"])  # 20 units, the last 4 trained on "experience 1"
    grow_step(net, mode, extra=4, seed=7)
    assert torch.equal(protect.frozen_units(net, "0"), torch.arange(24) < 20)
    train(net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.3), (8,), seed=2)
    now = capture(net, x, ["1", "3"])
    assert_old_units_identical(gen0, now)
    assert_old_units_identical(gen1, now)
    w2 = net.get_submodule("2").weight
    assert torch.equal(w2[:20, 20:], torch.zeros(20, 4))
    if mode == "independent":
        assert torch.equal(w2[20:, :20], torch.zeros(4, 20))  # reads neither older generation
        assert torch.equal(w2[16:20, :16], torch.zeros(4, 16))
    assert protect.violations(net) == []


@pytest.mark.parametrize("mode", protect.MODES)
def test_protection_survives_save_and_load(mode: str, tmp_path: pathlib.Path) -> None:
    case = CASES[2]
    net, x = make(case)
    before = capture(net, x, list(case.probes))
    grow_step(net, mode)
    train(net, torch.optim.Adam(net.parameters(), lr=1e-2), case.shape, steps=3)
    path = tmp_path / "protected.n2g"
    save(net, path)
    loaded = load(path)
    assert protect.mode(loaded) == mode
    masks, loaded_masks = protect.frozen_masks(net), protect.frozen_masks(loaded)
    assert masks.keys() == loaded_masks.keys() and masks
    assert all(torch.equal(masks[k], loaded_masks[k]) for k in masks)
    assert_state_equal(loaded, snapshot(net))
    # active again: gradient masks and the optimizer hook (a fresh optimizer, as Avalanche builds)
    train(loaded, torch.optim.AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.5), case.shape)
    assert_old_units_identical(before, capture(loaded, x, list(case.probes)))
    assert protect.violations(loaded) == []
    # and growth goes on from the loaded state
    grow_step(loaded, mode, seed=9)
    assert protect.violations(loaded) == []


def test_copies_stay_protected() -> None:
    case = CASES[1]
    net, x = make(case)
    before = capture(net, x, list(case.probes))
    grow_step(net, "independent")
    twin = copy.deepcopy(net)
    train(twin, torch.optim.Adam(twin.parameters(), lr=1e-2), case.shape)
    assert_old_units_identical(before, capture(twin, x, list(case.probes)))
    assert protect.violations(twin) == []


def test_release_lets_every_unit_train() -> None:
    net, x = make(CASES[0])
    grow_step(net, "lateral")
    protect.release(net)
    assert not protect.is_protected(net) and "protection" not in dict(net.named_children())
    before = capture(net, x, ["1"])
    train(net, torch.optim.Adam(net.parameters(), lr=1e-2), (8,), steps=3)
    assert not torch.equal(capture(net, x, ["1"])["1"][:, :16], before["1"][:, :16])
    net.widen("0", 24, generator=gen(3))  # net2net again
    assert net.history[-1].details["init"] == "net2net"


# --------------------------------------------------------------------------------------------
# refusals leave everything unchanged
# --------------------------------------------------------------------------------------------


def grad_masks(net: nn.Module) -> int:
    """Number of protection gradient hooks on ``net``'s parameters."""
    return sum(
        isinstance(h, protect._GradMask)
        for p in net.parameters()
        for h in (p._backward_hooks or {}).values()
    )


class Unchanged:
    def __init__(self, net: GrowableNetwork, x: Tensor) -> None:
        self.net, self.x = net, x
        self.hooks = grad_masks(net)
        self.state = snapshot(net)
        self.history = list(net.history)
        self.children = list(dict(net.named_children()))
        self.y = capture(net, x, [list(net.analysis.module_nodes)[-1]])

    def check(self) -> None:
        assert grad_masks(self.net) == self.hooks
        assert_state_equal(self.net, self.state)
        assert self.net.history == self.history
        assert list(dict(self.net.named_children())) == self.children
        last = list(self.net.analysis.module_nodes)[-1]
        assert torch.equal(capture(self.net, self.x, [last])[last], self.y[last])


def test_layer_whose_state_cannot_be_frozen_per_unit_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(), nn.Linear(16, 5))  # one shared slope
    x = torch.randn(6, 8)
    net = GrowableNetwork(model, x)
    still = Unchanged(net, x)
    with pytest.raises(UnsupportedLayerError, match="PReLU"):
        net.protect("lateral")
    still.check()
    with pytest.raises(UnsupportedLayerError, match="PReLU"):
        net.widen("0", 20, protect="lateral")
    still.check()
    assert not protect.is_protected(net)


def test_bad_protect_requests_are_refused_unchanged() -> None:
    net, x = make(CASES[0])
    still = Unchanged(net, x)
    with pytest.raises(GrowthError, match="protect must be one of"):
        net.widen("0", 20, protect="frozen")
    with pytest.raises(GrowthError, match="init='zero'"):
        net.widen("0", 20, protect="lateral", init="net2net")
    with pytest.raises(GrowthError, match="output"):
        net.widen("4", 7, protect="lateral")  # the output layer: frozen, then refused: undone
    with pytest.raises(GrowthError, match="unknown layer"):
        net.protect("lateral", ["nope"])
    still.check()
    assert not protect.is_protected(net)


def test_refusals_on_a_protected_network_change_nothing() -> None:
    net, x = make(CASES[0])
    grow_step(net, "lateral")
    still = Unchanged(net, x)
    masks = protect.frozen_masks(net)
    with pytest.raises(GrowthError, match="init='zero'"):
        net.widen("0", 30, init="net2net")
    with pytest.raises(GrowthError, match="init='zero'"):
        net.widen("2", 30, init="random", verify=False)
    with pytest.raises(GrowthError, match="'lateral' mode"):
        net.protect("independent")
    with pytest.raises(GrowthError, match="frozen"):
        net.deepen("0")  # layer "2" reads it and holds frozen units
    still.check()
    now = protect.frozen_masks(net)
    assert now.keys() == masks.keys() and all(torch.equal(now[k], masks[k]) for k in masks)
    net.widen("0", 30)  # init="zero" by default on a protected network
    assert net.history[-1].details["init"] == "zero"
    assert net.history[-1].details["protect"] == "lateral"


# --------------------------------------------------------------------------------------------
# devices, and Avalanche (which rebuilds the optimizer at every experience)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", protect.MODES)
def test_protection_holds_on_every_device(mode: str, device: torch.device) -> None:
    net, x = make(CASES[1])
    net.to(device)
    x = x.to(device)
    grow_step(net, mode)
    grown = capture(net, x, list(CASES[1].probes))  # reference: right after growth
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.5)
    g = torch.Generator(device=device).manual_seed(0)
    net.train()
    for _ in range(10):
        xb = torch.randn(16, 3, 6, 6, device=device, generator=g)
        loss = F.cross_entropy(net(xb), torch.randint(0, 5, (16,), device=device, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = capture(net, x, list(CASES[1].probes))
    for p, ref in grown.items():
        old = {"1": 6, "2": 6, "4": 8, "5": 8, "8<": 8}[p]
        assert torch.equal(after[p][:, :old], ref[:, :old]), p
    assert protect.violations(net) == []


@pytest.mark.parametrize("strategy_name", ["naive", "lwf", "replay"])
def test_old_units_survive_an_avalanche_experience(strategy_name: str) -> None:
    from _avalanche import STRATEGIES, digits_stream, mlp_net
    from avalanche.training.plugins import SupervisedPlugin

    class ProtectedGrowth(SupervisedPlugin):
        """What GrowthPlugin(policy, protect=...) does before an experience."""

        def __init__(self) -> None:
            super().__init__()
            self.reference: dict[str, Tensor] = {}

        def before_train_dataset_adaptation(self, strategy, **kwargs):
            if strategy.clock.train_exp_counter == 0:
                return
            net = strategy.model
            net.protect("lateral")
            for name in protect.growth_order(net, net.layers):
                net.widen(name, net.width(name) + 8, optimizer=strategy.optimizer)
            self.reference = capture(net, probe_x, ["1", "3"])

    stream = digits_stream(5)
    probe_x = torch.randn(32, 64, generator=gen(3))
    net = mlp_net()
    cls, kwargs = STRATEGIES[strategy_name]
    plugin = ProtectedGrowth()
    strategy = cls(
        model=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.1),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=64,
        train_epochs=1,
        evaluator=None,
        plugins=[plugin],
        **kwargs,
    )
    for exp in stream.train_stream[:3]:
        before = capture(net, probe_x, ["1", "3"])
        strategy.train(exp)
        if plugin.reference:
            widths = {"1": before["1"].shape[1], "3": before["3"].shape[1]}
            now = capture(net, probe_x, ["1", "3"])
            for p, w in widths.items():
                assert torch.equal(now[p][:, :w], before[p]), p  # frozen through the experience
                assert not torch.equal(now[p][:, w:], plugin.reference[p][:, w:]), p  # learned
    assert net.width("0") == 48
    assert protect.violations(net) == []
