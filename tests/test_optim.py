"""Optimizer state across growth: ``widen/deepen(..., optimizer=opt)`` and the standalone tools.

What an optimizer must look like after growth:

- its param groups hold exactly ``net.parameters()`` (same objects, nothing stale, nothing twice),
  each group keeping its hyperparameters;
- parameters the operation did not touch keep their state bit for bit;
- a grown parameter's state follows its gradient (``growth.transform.grow_state``): a consumer's
  columns (role ``"in"``) copy their source unscaled; a producer's rows and per-channel tensors
  (roles ``"out"``/``"channel"``) take their source's state times ``share ** power``, where
  ``power`` is the power of the gradient the key accumulates (momentum 1, second moments 2,
  RMSprop's momentum of normalised steps 0). Every copy of a replicated unit, the original
  included, carries its share of the outgoing weights, so the original's rows are scaled too;
  units that were not replicated (share 1) and columns keep their state exactly. Fresh units
  (``init="zero"``/``"random"``) start from zero state;
- scalar state (step counts) is kept.

The powers are checked against an independent table (``EXPECTED_POWER``) and against what the
gradients actually do (``test_gradient_after_widening_is_the_remapped_gradient`` and
``test_state_commutes_with_growth``), not only against the engine's own table.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import assert_state_equal, gen, snapshot
from torch import Tensor, nn

import net2grow.growth.optim as gopt
from net2grow.growth import FunctionNotPreservedError, GrowableNetwork, GrowthError
from net2grow.growth.transform import AxisStep

# --------------------------------------------------------------------------------------------
# optimizers, models, data
# --------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True),
    "sgd-weight-decay": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.5, weight_decay=1e-3),
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2),
    "adam-amsgrad": lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.05),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=0.03),
}
#: Optimizers whose state is a linear recurrence in (powers of) the gradient: growth commutes with
#: a step exactly. SGD's weight decay adds ``wd * p`` to the gradient, and ``p`` is not scaled by
#: the share, so it is left out of that test.
COMMUTING = [k for k in OPTIMIZERS if k != "sgd-weight-decay"]


def expected_power(optimizer: torch.optim.Optimizer, key: str) -> int:
    """Power of the gradient each state key accumulates (written out here, not read from
    growth.optim, so that a wrong entry there is caught)."""
    if isinstance(optimizer, torch.optim.RMSprop) and key == "momentum_buffer":
        return 0  # momentum of g / sqrt(E[g^2]): invariant under g -> s * g
    return EXPECTED_POWER[key]


EXPECTED_POWER = {
    "momentum_buffer": 1,
    "exp_avg": 1,
    "exp_avg_sq": 2,
    "max_exp_avg_sq": 2,
    "square_avg": 2,
    "grad_avg": 1,
    "sum": 2,
}


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def cnn() -> nn.Sequential:
    """conv (no bias: a bias before BatchNorm gets no gradient) -> BN -> ReLU -> conv -> ReLU ->
    flatten -> Linear: widening conv "0" grows rows, BatchNorm channels and columns."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 2),
    )


MODELS = {
    # factory, input shape, layer to widen, new width (not every unit gets replicated)
    "mlp": (mlp, (32, 6), "0", 11),
    "cnn": (cnn, (32, 2, 4, 4), "0", 7),
}


def data(shape, seed: int = 1, device=None) -> tuple[Tensor, Tensor]:
    x = torch.randn(*shape, generator=gen(seed))
    y = torch.randn(shape[0], 2, generator=gen(seed + 1))
    return x.to(device or "cpu"), y.to(device or "cpu")


def make(model: str, opt_name: str, *, seed: int = 0, groups: bool = True, device=None):
    """A network, its optimizer (two param groups with different hyperparameters), and data."""
    factory, shape, _, _ = MODELS[model]
    torch.manual_seed(seed)
    x, y = data(shape, device=device)
    net = GrowableNetwork(factory().to(device or "cpu"), x)
    params = list(net.parameters())
    if groups:
        first = [p for n, p in net.named_parameters() if n.startswith("0.")]
        rest = [p for n, p in net.named_parameters() if not n.startswith("0.")]
        opt = OPTIMIZERS[opt_name]([{"params": first, "lr": 3e-3}, {"params": rest}])
    else:
        opt = OPTIMIZERS[opt_name](params)
    return net, opt, x, y


def loss_fn(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (net(x) - y).square().mean()


def train(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int) -> list:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(net, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def capture(net: GrowableNetwork) -> list:
    """The ``GrowthChanges`` of every later operation (the AxisSteps of each grown tensor)."""
    changes: list = []
    net.register_growth_hook(lambda record, ch: changes.append(ch))
    return changes


def ref_remap(t: Tensor, steps: list[AxisStep], init: str, power: int) -> Tensor:
    """The documented rule, implemented independently of growth.transform."""
    for s in steps:
        assert s.groups == 1
        t = t.index_select(s.dim, s.amap.source)
        shape = [1] * t.dim()
        shape[s.dim] = -1
        if init != "net2net":
            t = t * s.amap.original.view(shape).to(t.dtype)
        elif s.role != "in":
            t = t * (s.amap.share**power).view(shape).to(t.dtype)
    return t


def state_snapshot(opt: torch.optim.Optimizer, net: nn.Module) -> dict[str, dict]:
    """Deep copy of the optimizer's state, keyed by parameter name."""
    out = {}
    for name, p in net.named_parameters():
        if p in opt.state:
            out[name] = {
                k: (v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v))
                for k, v in opt.state[p].items()
            }
    return out


def groups_snapshot(opt: torch.optim.Optimizer) -> list[tuple[list[int], dict]]:
    return [
        ([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
        for g in opt.param_groups
    ]


def assert_same_value(a, b, what: str) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype, what
        assert torch.equal(a, b), what
    else:
        assert a == b, what


def assert_optimizer_untouched(opt, net, state: dict, groups: list) -> None:
    assert groups_snapshot(opt) == groups
    now = state_snapshot(opt, net)
    assert set(now) == set(state)
    for name, st in state.items():
        assert set(now[name]) == set(st), name
        for k, v in st.items():
            assert_same_value(now[name][k], v, f"{name}.{k}")


def assert_groups_hold_exactly(opt: torch.optim.Optimizer, net: nn.Module) -> None:
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}), "a parameter is in the optimizer twice"
    assert {id(p) for p in held} == {id(p) for p in net.parameters()}
    live = {id(p) for p in net.parameters()}
    assert all(id(p) in live for p in opt.state), "state of a parameter the network lost"
    for p in net.parameters():
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, Tensor) and v.dim() > 0:
                assert v.shape == p.shape, f"state {k} shaped {tuple(v.shape)}, param {p.shape}"


# --------------------------------------------------------------------------------------------
# widen: the remapped state
# --------------------------------------------------------------------------------------------


REMAP_CASES = [(o, i) for o in OPTIMIZERS for i in ("net2net", "zero")] + [
    ("adam", "random"),  # fresh units start from zero state under init="random" too
    ("sgd-momentum", "random"),
]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(("opt_name", "init"), REMAP_CASES)
def test_widen_remaps_state(opt_name: str, init: str, model: str, device: torch.device) -> None:
    net, opt, x, y = make(model, opt_name, device=device)
    train(net, opt, x, y, 3)
    names = dict(net.named_parameters())
    old_state = state_snapshot(opt, net)
    old_objects = {n: opt.state[p] for n, p in names.items()}
    groups = groups_snapshot(opt)
    members = [
        [n for n, p in names.items() if any(p is q for q in g["params"])] for g in opt.param_groups
    ]
    changes = capture(net)
    _, _, layer, width = MODELS[model]

    net.widen(layer, width, init=init, optimizer=opt, generator=gen(7))

    # param groups: the same parameter objects, the same hyperparameters
    assert_groups_hold_exactly(opt, net)
    assert [ids for ids, _ in groups_snapshot(opt)] == [ids for ids, _ in groups]
    assert [h for _, h in groups_snapshot(opt)] == [h for _, h in groups]
    assert [
        [n for n, p in names.items() if any(p is q for q in g["params"])] for g in opt.param_groups
    ] == members
    (ch,) = changes
    assert ch.init == init
    grown = set(ch.tensors) & set(names)
    assert grown and grown < set(names)
    new_state = state_snapshot(opt, net)
    assert set(new_state) == set(old_state) == set(names)
    for name, p in names.items():
        old, new = old_state[name], new_state[name]
        assert set(old) == set(new), name
        if name not in grown:  # untouched: bit-identical, the very same state dict
            assert opt.state[p] is old_objects[name]
            for k in old:
                assert_same_value(new[k], old[k], f"{name}.{k}")
            continue
        steps = ch.tensors[name]
        for k, v in old.items():
            if not (isinstance(v, Tensor) and v.dim() > 0):
                assert_same_value(new[k], v, f"{name}.{k} (scalar state, e.g. the step count)")
                continue
            power = expected_power(opt, k)
            got = new[k]
            assert got.shape == p.shape
            torch.testing.assert_close(got, ref_remap(v, steps, init, power), rtol=1e-6, atol=0)
            _check_positions(got, v, steps, init, power, f"{name}.{k}")
    # and the optimizer goes on
    before = {n: p.detach().clone() for n, p in names.items()}
    train(net, opt, x, y, 1)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(before[n], p) for n, p in names.items() if n in grown)


def _check_positions(got: Tensor, old: Tensor, steps, init: str, power: int, what: str) -> None:
    """Position by position, for a tensor grown along one dimension."""
    (s,) = steps
    src, orig, share = s.amap.source.cpu(), s.amap.original.cpu(), s.amap.share.cpu()
    got, old = got.cpu(), old.cpu()
    for j in range(src.numel()):
        g = got.select(s.dim, j)
        o = old.select(s.dim, int(src[j]))
        if init != "net2net":
            if orig[j]:
                assert torch.equal(g, o), f"{what}[{j}]: an old unit's state must stay exact"
            else:
                assert torch.count_nonzero(g) == 0, f"{what}[{j}]: a fresh unit has zero state"
        elif s.role == "in" or power == 0 or share[j] == 1:
            # columns, scale-free keys and units that were not replicated: exact copies
            assert torch.equal(g, o), f"{what}[{j}] should equal its source's state exactly"
            if orig[j]:
                assert int(src[j]) == j
        else:
            torch.testing.assert_close(g, o * share[j] ** power, rtol=1e-6, atol=0)
            assert share[j] < 1
    if init == "net2net" and s.role != "in":
        # the shares of each old unit's copies sum to one
        total = torch.zeros(int(src.max()) + 1).index_add_(0, src, share)
        torch.testing.assert_close(total, torch.ones_like(total))
        assert (share < 1).any(), "degenerate test: nothing was replicated"


@pytest.mark.parametrize("model", list(MODELS))
def test_gradient_after_widening_is_the_remapped_gradient(model: str) -> None:
    """The derivation behind the state rule: right after an exact widening, every parameter's
    gradient is its old gradient remapped with power 1 (rows scaled by the share, columns
    copied), and untouched parameters keep theirs. Train mode: BatchNorm uses batch statistics."""
    net, _, x, y = make(model, "sgd-momentum", groups=False)
    net.train()

    def grads() -> dict[str, Tensor]:
        net.zero_grad(set_to_none=True)
        loss_fn(net, x, y).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    g0 = grads()
    changes = capture(net)
    _, _, layer, width = MODELS[model]
    net.widen(layer, width, generator=gen(3))
    g1 = grads()
    (ch,) = changes
    for name, g in g1.items():
        ref = (
            ref_remap(g0[name], ch.tensors[name], "net2net", 1) if name in ch.tensors else g0[name]
        )
        scale = g.abs().max().item()
        assert scale > 0
        assert (g - ref).abs().max().item() <= 1e-5 * scale, name
        if name in ch.tensors:  # and what the hooks hand out agrees
            torch.testing.assert_close(ch.remap_like_gradient(name, g0[name], 1), ref)


@pytest.mark.parametrize("opt_name", COMMUTING)
def test_state_commutes_with_growth(opt_name: str) -> None:
    """Growing and then stepping gives the state that stepping and then growing gives (same unit
    mapping): the carried state is the state the grown network would have accumulated."""
    results = []
    for order in ("step-then-grow", "grow-then-step"):
        net, opt, x, y = make("cnn", opt_name, groups=False)
        net.train()
        train(net, opt, x, y, 3)
        if order == "step-then-grow":
            train(net, opt, x, y, 1)
            net.widen("0", 7, optimizer=opt, generator=gen(3))
        else:
            net.widen("0", 7, optimizer=opt, generator=gen(3))
            train(net, opt, x, y, 1)
        results.append(state_snapshot(opt, net))
    a, b = results
    assert set(a) == set(b)
    for name in a:
        for k, v in a[name].items():
            if isinstance(v, Tensor) and v.dim() > 0:
                err = (v - b[name][k]).abs().max().item()
                # RMSprop's momentum holds g / (sqrt(v) + eps): scale-free only up to eps
                rel = 1e-3 if (opt_name.startswith("rmsprop") and k == "momentum_buffer") else 1e-5
                assert err <= rel * v.abs().max().item(), f"{name}.{k}: {err:.3g}"
            else:
                assert_same_value(b[name][k], v, f"{name}.{k}")


# --------------------------------------------------------------------------------------------
# training goes on
# --------------------------------------------------------------------------------------------


def teacher_data() -> tuple[Tensor, Tensor]:
    x = torch.randn(128, 6, generator=gen(1))
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    with torch.no_grad():
        return x, teacher(x)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_training_continues_after_growth(opt_name: str) -> None:
    x, y = teacher_data()
    torch.manual_seed(0)
    net = GrowableNetwork(mlp(), x)
    opt = OPTIMIZERS[opt_name](net.parameters())
    first = train(net, opt, x, y, 15)
    with torch.no_grad():
        before = loss_fn(net, x, y).item()
    assert before < first[0]

    net.widen("0", 12, optimizer=opt, generator=gen(2))
    rec = net.deepen("2", optimizer=opt)
    net.widen("2", 11, optimizer=opt, generator=gen(3))
    new_layer = net.get_submodule(rec.details["inserted"][0])
    identity = new_layer.weight.detach().clone()
    assert_groups_hold_exactly(opt, net)

    with torch.no_grad():
        at_growth = loss_fn(net, x, y).item()
    assert abs(at_growth - before) <= 1e-5 * before  # growth preserved the function
    after = train(net, opt, x, y, 30)
    assert all(torch.isfinite(torch.tensor(after)))
    assert after[-1] < 0.9 * at_growth, f"loss {at_growth:.4g} -> {after[-1]:.4g}"
    assert sum(after[-5:]) < sum(after[:5])
    # the inserted layer was trained through the optimizer it joined
    assert not torch.equal(new_layer.weight.detach(), identity)


SPIKY = {
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=3e-3, momentum=0.5, centered=True),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=0.1),
}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("opt_name", list(SPIKY))
def test_carried_state_avoids_the_restart_spike(opt_name: str, seed: int) -> None:
    """Adaptive optimizers take full-size normalised steps on state-less parameters: rebuilding
    the optimizer after growth makes the loss jump; carrying the state keeps it near."""
    x, y = teacher_data()
    peaks = {}
    for how in ("carried", "rebuilt"):
        torch.manual_seed(seed)
        net = GrowableNetwork(mlp(), x)
        opt = SPIKY[opt_name](net.parameters())
        train(net, opt, x, y, 30)
        if how == "carried":
            net.widen("0", 12, optimizer=opt, generator=gen(2))
        else:
            net.widen("0", 12, generator=gen(2))
            opt = SPIKY[opt_name](net.parameters())
        with torch.no_grad():
            at_growth = loss_fn(net, x, y).item()
        peaks[how] = max(train(net, opt, x, y, 30)) / at_growth
    # measured (seeds 0-5): carried 1.0-2.8x, rebuilt 4-330x the loss at growth
    assert peaks["carried"] < 3.0
    assert peaks["rebuilt"] > 3 * peaks["carried"]


# --------------------------------------------------------------------------------------------
# deepen with an optimizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["identity", "residual"])
@pytest.mark.parametrize("layer", ["0", "3"])
@pytest.mark.parametrize("opt_name", ["adam", "sgd-momentum", "rmsprop"])
def test_deepen_adds_new_params_to_the_layers_group(
    opt_name: str, layer: str, kind: str, device: torch.device
) -> None:
    net, opt, x, y = make("cnn", opt_name, device=device)  # group 0: layer "0"; group 1: rest
    train(net, opt, x, y, 2)
    old_names = [n for n, _ in net.named_parameters()]
    old_state = state_snapshot(opt, net)
    groups = groups_snapshot(opt)
    target = 0 if layer == "0" else 1

    rec = net.deepen(layer, kind=kind, optimizer=opt)

    new = [(n, p) for n, p in net.named_parameters() if n not in old_names]
    expected = {
        ("0", "identity"): 4 * 4 * 9 + 4,  # the conv only: no BatchNorm is inserted
        ("0", "residual"): 2 * (4 * 4 * 9 + 4),
        ("3", "identity"): 5 * 5 * 9 + 5,
        ("3", "residual"): 2 * (5 * 5 * 9 + 5),
    }[(layer, kind)]
    assert sum(p.numel() for _, p in new) == expected == rec.params_after - rec.params_before
    assert all(any(n.startswith(m + ".") for m in rec.details["inserted"]) for n, _ in new)
    # exactly the new parameters, appended to the group of the layer's weight
    now = groups_snapshot(opt)
    assert now[1 - target] == groups[1 - target]
    ids, hyper = now[target]
    assert hyper == groups[target][1]
    assert ids == groups[target][0] + [id(p) for _, p in new]
    assert_groups_hold_exactly(opt, net)
    # old state untouched, new parameters without state until they are stepped
    assert_optimizer_untouched(opt, net, old_state, now)
    assert all(p not in opt.state for _, p in new)
    train(net, opt, x, y, 2)
    for _, p in new:
        assert opt.state.get(p), "a stepped new parameter has state"
        assert torch.isfinite(p).all()
    assert groups_snapshot(opt)[target][1] == groups[target][1]  # lr etc. of that group


def test_deepen_with_unknown_state_optimizer_is_fine() -> None:
    """Deepen changes no existing parameter, so no state needs a remapping rule (widen would
    refuse Adadelta, see below)."""
    net, _, x, y = make("mlp", "adam", groups=False)
    opt = torch.optim.Adadelta(net.parameters())
    train(net, opt, x, y, 2)
    old = state_snapshot(opt, net)
    net.deepen("2", optimizer=opt)
    assert_groups_hold_exactly(opt, net)
    for name, st in old.items():
        for k, v in st.items():
            assert_same_value(state_snapshot(opt, net)[name][k], v, f"{name}.{k}")
    losses = train(net, opt, x, y, 3)
    assert all(torch.isfinite(torch.tensor(losses)))


# --------------------------------------------------------------------------------------------
# refusals: unknown state, failed verification, bad arguments
# --------------------------------------------------------------------------------------------


class SGDWithFoo(torch.optim.SGD):
    """A custom optimizer that keeps a per-parameter tensor net2grow has never heard of."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st["foo"] = st.get("foo", torch.zeros_like(p)) + p.grad.abs()
        return loss


UNKNOWN = {
    "adadelta": (lambda ps: torch.optim.Adadelta(ps), "acc_delta"),
    "rprop": (lambda ps: torch.optim.Rprop(ps), "prev"),
    "asgd": (lambda ps: torch.optim.ASGD(ps), "ax"),
    "custom-foo": (lambda ps: SGDWithFoo(ps, lr=0.01, momentum=0.9), "foo"),
}


@pytest.mark.parametrize("case", list(UNKNOWN))
def test_unknown_state_refused_before_anything_changes(case: str) -> None:
    factory, key = UNKNOWN[case]
    net, _, x, y = make("mlp", "adam", groups=False)
    opt = factory(net.parameters())
    train(net, opt, x, y, 2)
    net_state = snapshot(net)
    shapes = {n: p.shape for n, p in net.named_parameters()}
    opt_state, groups = state_snapshot(opt, net), groups_snapshot(opt)
    with pytest.raises(GrowthError) as info:
        net.widen("0", 12, optimizer=opt)
    msg = str(info.value)
    assert repr(key) in msg and type(opt).__name__ in msg
    assert "STATE_POWERS" in msg or "new optimizer" in msg  # says what to do
    assert_state_equal(net, net_state)
    assert {n: p.shape for n, p in net.named_parameters()} == shapes
    assert net.history == []
    assert_optimizer_untouched(opt, net, opt_state, groups)
    assert all(torch.isfinite(torch.tensor(train(net, opt, x, y, 1))))
    # the standalone check says the same, and is silent for an optimizer it knows
    with pytest.raises(GrowthError, match=repr(key)):
        gopt.check_supported(opt, list(net.parameters()))
    adam = torch.optim.Adam(net.parameters())
    train(net, adam, x, y, 1)
    gopt.check_supported(adam, list(net.parameters()))


def _factored_or_flat_state_case(name: str):
    torch.manual_seed(0)
    x, y = data((32, 6))
    if name == "adafactor":  # no biases: only the factored row/col variances, never p-shaped
        model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))
        net = GrowableNetwork(model, x)
        opt = torch.optim.Adafactor(net.parameters(), lr=1e-2)
    else:  # LBFGS keeps flat vectors over all parameters
        net = GrowableNetwork(mlp(), x)
        opt = torch.optim.LBFGS(net.parameters(), lr=0.1, max_iter=2)
    return net, opt, x, y


@pytest.mark.parametrize("name", ["adafactor", "lbfgs"])
def test_state_of_other_shapes_is_refused_too(name: str) -> None:
    net, opt, x, y = _factored_or_flat_state_case(name)

    def closure():
        opt.zero_grad()
        loss = loss_fn(net, x, y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    with pytest.raises(GrowthError):
        net.widen("0", net.width("0") + 3, optimizer=opt)


def _refuse(case: str, net: GrowableNetwork, opt) -> type[GrowthError]:
    """Attempt a growth that must be refused; returns the expected error type."""
    if case == "widen-not-preserved":
        net.tolerance = -1.0  # forces the verify-and-restore path after everything was changed
        net.widen("0", 12, optimizer=opt, generator=gen(1))
    elif case == "deepen-not-preserved":
        net.tolerance = -1.0
        net.deepen("2", optimizer=opt)
    elif case == "shrink":
        net.widen("0", 5, optimizer=opt)
    elif case == "same-width":
        net.widen("0", 8, optimizer=opt)
    elif case == "bad-init":
        net.widen("0", 12, init="copy", optimizer=opt)
    elif case == "unknown-layer":
        net.deepen("nope", optimizer=opt)
    elif case == "deepen-tanh":
        net.deepen("0", activation=nn.Tanh(), optimizer=opt)
    raise AssertionError("not refused")


REFUSED = [
    "widen-not-preserved",
    "deepen-not-preserved",
    "shrink",
    "same-width",
    "bad-init",
    "unknown-layer",
    "deepen-tanh",
]


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize("opt_name", ["adam", "sgd-momentum", "rmsprop"])
def test_refused_growth_leaves_network_and_optimizer_untouched(opt_name: str, case: str) -> None:
    twins = [make("mlp", opt_name) for _ in range(2)]
    for net, opt, x, y in twins:
        train(net, opt, x, y, 3)
    net, opt, x, y = twins[0]
    net_state, opt_state, groups = snapshot(net), state_snapshot(opt, net), groups_snapshot(opt)
    state_objects = {n: opt.state[p] for n, p in net.named_parameters()}
    with pytest.raises(GrowthError) as info:
        _refuse(case, net, opt)
    if case.endswith("not-preserved"):
        assert isinstance(info.value, FunctionNotPreservedError)
        net.tolerance = 1e-5
    assert_state_equal(net, net_state)
    assert_optimizer_untouched(opt, net, opt_state, groups)
    assert all(opt.state[p] is state_objects[n] for n, p in net.named_parameters())
    assert_groups_hold_exactly(opt, net)
    assert net.history == [] and "grown" not in dict(net.named_children())
    # the refused attempt left no trace: the next steps match a twin that never tried
    other, other_opt, _, _ = twins[1]
    train(net, opt, x, y, 2)
    train(other, other_opt, x, y, 2)
    for (n, p), q in zip(net.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n


# --------------------------------------------------------------------------------------------
# standalone: grow first, fix the optimizer after (hooks, growth.optim)
# --------------------------------------------------------------------------------------------


def _fix_with_hook(net: GrowableNetwork, opt: torch.optim.Optimizer):
    """A growth hook that keeps ``opt`` right, for code that grows without ``optimizer=``."""

    def hook(record, changes) -> None:
        params = dict(net.named_parameters())
        for name, steps in changes.tensors.items():
            p = params.get(name)
            if p is None or p not in opt.state:
                continue
            assert steps
            st = opt.state[p]
            for k, v in list(st.items()):
                if isinstance(v, Tensor) and v.dim() > 0:
                    st[k] = changes.remap_like_gradient(name, v, expected_power(opt, k))
        if changes.new_parameters:
            layer = net.get_submodule(record.layer)
            gopt.add_params(opt, [params[n] for n in changes.new_parameters], layer.weight)

    return net.register_growth_hook(hook)


@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("opt_name", ["adam", "rmsprop", "adagrad", "sgd-nesterov"])
def test_hook_remap_matches_growing_with_the_optimizer(opt_name: str, init: str) -> None:
    (a, opt_a, x, y), (b, opt_b, _, _) = make("cnn", opt_name), make("cnn", opt_name)
    for net, opt in ((a, opt_a), (b, opt_b)):
        train(net, opt, x, y, 3)
    a.widen("0", 7, init=init, optimizer=opt_a, generator=gen(4))
    torch.manual_seed(11)  # the residual block's first layer is drawn from the global RNG
    a.deepen("3", kind="residual", optimizer=opt_a)
    a.widen("3", 8, init=init, optimizer=opt_a, generator=gen(5))
    handle = _fix_with_hook(b, opt_b)
    b.widen("0", 7, init=init, generator=gen(4))
    torch.manual_seed(11)
    b.deepen("3", kind="residual")
    b.widen("3", 8, init=init, generator=gen(5))
    handle.remove()
    assert_groups_hold_exactly(opt_b, b)
    assert [len(g["params"]) for g in opt_b.param_groups] == [
        len(g["params"]) for g in opt_a.param_groups
    ]
    sa, sb = state_snapshot(opt_a, a), state_snapshot(opt_b, b)
    assert set(sa) == set(sb)
    for name in sa:
        for k, v in sa[name].items():
            assert_same_value(sb[name][k], v, f"{name}.{k}")
    train(a, opt_a, x, y, 2)
    train(b, opt_b, x, y, 2)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_remapped_state_computes_without_installing() -> None:
    """``remapped_state(opt, p, steps, init)`` on a parameter that has not grown yet returns the
    new state and leaves the optimizer alone (widen installs it inside its transaction)."""
    (a, opt_a, x, y), (b, opt_b, _, _) = make("mlp", "adam"), make("mlp", "adam")
    train(a, opt_a, x, y, 3)
    train(b, opt_b, x, y, 3)
    changes = capture(b)
    b.widen("0", 11, generator=gen(6))  # the twin tells us the AxisSteps of the same growth
    (ch,) = changes
    p = a.get_parameter("0.weight")
    before = state_snapshot(opt_a, a)
    new = gopt.remapped_state(opt_a, p, ch.tensors["0.weight"], "net2net")
    assert set(new) == set(before["0.weight"])
    assert_same_value(new["step"], before["0.weight"]["step"], "step")
    for k in ("exp_avg", "exp_avg_sq"):
        ref = ref_remap(before["0.weight"][k], ch.tensors["0.weight"], "net2net", EXPECTED_POWER[k])
        torch.testing.assert_close(new[k], ref, rtol=1e-6, atol=0)
    assert_optimizer_untouched(opt_a, a, before, groups_snapshot(opt_a))
    assert (
        gopt.remapped_state(torch.optim.Adam(a.parameters()), p, ch.tensors["0.weight"], "net2net")
        is None
    )  # no state yet: nothing to remap


def test_remapped_state_after_growing_without_optimizer() -> None:
    (a, opt_a, x, y), (b, opt_b, _, _) = make("mlp", "adam"), make("mlp", "adam")
    train(a, opt_a, x, y, 3)
    train(b, opt_b, x, y, 3)
    a.widen("0", 11, optimizer=opt_a, generator=gen(6))
    changes = capture(b)
    b.widen("0", 11, generator=gen(6))  # grow first ...
    (ch,) = changes
    params = dict(b.named_parameters())
    for name, steps in ch.tensors.items():  # ... fix the optimizer after
        new = gopt.remapped_state(opt_b, params[name], steps, ch.init, ch.old_shapes[name])
        if new is not None:
            opt_b.state[params[name]] = new
    assert_groups_hold_exactly(opt_b, b)
    sa, sb = state_snapshot(opt_a, a), state_snapshot(opt_b, b)
    for name in sa:
        for k, v in sa[name].items():
            assert_same_value(sb[name][k], v, f"{name}.{k}")


def test_remap_after_growth_from_a_hook_matches_optimizer_argument() -> None:
    (a, opt_a, x, y), (b, opt_b, _, _) = make("mlp", "adam"), make("mlp", "adam")
    train(a, opt_a, x, y, 3)
    train(b, opt_b, x, y, 3)
    a.widen("0", 11, optimizer=opt_a, generator=gen(6))
    b.register_growth_hook(lambda record, ch: gopt.remap_after_growth(opt_b, b, ch))
    b.widen("0", 11, generator=gen(6))
    sa, sb = state_snapshot(opt_a, a), state_snapshot(opt_b, b)
    for name in sa:
        for k, v in sa[name].items():
            assert_same_value(sb[name][k], v, f"{name}.{k}")
    train(b, opt_b, x, y, 2)  # the optimizer steps with the grown shapes


def test_add_and_remove_params_standalone() -> None:
    net, opt, _, _ = make("mlp", "adam")  # group 0: layer "0"; group 1: the rest
    groups = groups_snapshot(opt)
    extra = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.ones(2))]
    gopt.add_params(opt, extra, net.get_parameter("0.weight"))
    assert groups_snapshot(opt)[0][0] == groups[0][0] + [id(p) for p in extra]
    assert groups_snapshot(opt)[1] == groups[1]
    assert gopt.param_group_of(opt, extra[1]) is opt.param_groups[0]
    gopt.remove_params(opt, extra)
    assert groups_snapshot(opt) == groups
    assert gopt.param_group_of(opt, extra[0]) is None
    gopt.add_params(opt, extra, None)  # no layer given: the first group
    assert groups_snapshot(opt)[0][0][-2:] == [id(p) for p in extra]
