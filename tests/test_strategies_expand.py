"""strategies.Expand (DER-style expansion) on split digits: old units bit-identical through
training on an MLP, a BatchNorm CNN and a residual CNN; protection survives checkpoints, the
resume path and growth after growth; refusals change nothing; Replay, LwF and Avalanche's
IncrementalClassifier work beside it; training measurably learns and remembers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _avalanche import digits_stream
from _models import assert_state_equal, capture, gen, randomize_batchnorm, snapshot
from avalanche.models import IncrementalClassifier
from avalanche.training.plugins import EvaluationPlugin, LwFPlugin, ReplayPlugin
from avalanche.training.supervised import Naive
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError, UnsupportedLayerError, load, save
from net2grow.growth import protect as protection
from net2grow.strategies import Expand, GrowthPlugin
from net2grow.strategies.expand import (
    AuxiliaryLoss,
    BalancedHead,
    NewUnits,
    feature_columns,
    feature_reader,
)
from net2grow.strategies.policies import EveryExperience

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def stream():
    return digits_stream(5)


# --------------------------------------------------------------------------------------------
# models: each with the modules whose outputs hold its hidden units (channels on dim 1)
# --------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
    )


def bn_cnn() -> nn.Module:
    return randomize_batchnorm(
        nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )
    )


class ResidualCNN(nn.Module):
    """stem -> one residual block (conv-BN-ReLU-conv-BN + identity) -> pool -> fc."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x.view(-1, 1, 8, 8))
        h = torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.fc(h.mean((2, 3)))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...]]] = {
    "mlp": (mlp, ("1", "3", "4<")),
    "bn_cnn": (bn_cnn, ("2", "3", "5", "6", "9<")),
    "residual_cnn": (lambda: randomize_batchnorm(ResidualCNN()), ("stem.1", "bn1", "bn2", "fc<")),
}


def build(kind: str, seed: int = 0) -> GrowableNetwork:
    torch.manual_seed(seed)
    return GrowableNetwork(MODELS[kind][0](), torch.randn(8, 64, generator=gen(1)))


def probe(stream: Any, n: int = 64) -> Tensor:
    ds = stream.test_stream[0].dataset
    return torch.stack([ds[i][0] for i in range(n)])


def assert_old_identical(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    for p, b in before.items():
        a = after[p][:, : b.shape[1]]
        assert torch.equal(a, b), f"{p}: old units moved by {(a - b).abs().max().item():.3g}"


def expand(net: GrowableNetwork, **kw: Any) -> Expand:
    options: dict[str, Any] = dict(
        growth=4, mem_size=60, train_mb_size=32, train_epochs=1, evaluator=None
    )
    options.update(kw)
    return Expand(net, torch.optim.Adam(net.parameters(), lr=0.01), **options)


@torch.no_grad()
def accuracy(net: nn.Module, exp: Any) -> float:
    x, y = zip(*[(s[0], s[1]) for s in exp.dataset])
    was = net.training
    net.eval()
    try:
        pred = net(torch.stack(x)).argmax(1)
    finally:
        net.train(was)
    return float((pred == torch.tensor(y)).float().mean())


# --------------------------------------------------------------------------------------------
# old units are bit-identical through training, growth after growth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_old_units_bit_identical_through_expand_training(stream, kind: str) -> None:
    net = build(kind)
    probes = MODELS[kind][1]
    x = probe(stream)
    strategy = expand(net)
    strategy.train(stream.train_stream[0])
    assert not protection.is_protected(net)  # nothing frozen before the first growth
    gen0 = capture(net, x, probes)
    head = feature_reader(net)
    widths0 = {n: net.width(n) for n in net.layers}
    strategy.train(stream.train_stream[1])
    assert protection.mode(net) == "independent"
    assert {n: net.width(n) for n in net.layers} == {n: w + 4 for n, w in widths0.items()}
    gen1 = capture(net, x, probes)
    assert_old_identical(gen0, gen1)
    for p, before in gen0.items():  # the new units learned something (they are not all zero)
        assert gen1[p][:, before.shape[1] :].abs().sum() > 0, p
    strategy.train(stream.train_stream[2])  # growth after growth
    now = capture(net, x, probes)
    assert_old_identical(gen0, now)
    assert_old_identical(gen1, now)
    assert protection.violations(net) == []
    # the feature reader (the classifier) is not frozen and reads old and new features
    assert head == MODELS[kind][1][-1].rstrip("<")
    dim, new, old = feature_columns(net, head)
    assert dim == 1 and bool(new.any()) and bool(old.any())
    assert int(new.sum()) == 4  # only the units of the last growth are "new"
    assert len(strategy.aux.losses) > 0  # the auxiliary loss ran in experiences 1 and 2


def test_independent_blocks_stay_block_diagonal(stream) -> None:
    net = build("mlp")
    strategy = expand(net)
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
    w = net.get_submodule("2").weight  # 24 x 24: blocks of 16, 4 and 4 units
    blocks = [(0, 16), (16, 20), (20, 24)]
    for i, (r0, r1) in enumerate(blocks):
        for j, (c0, c1) in enumerate(blocks):
            part = w[r0:r1, c0:c1]
            if i == j:
                assert part.abs().sum() > 0, (i, j)
            else:
                assert torch.equal(part, torch.zeros_like(part)), (i, j)


# --------------------------------------------------------------------------------------------
# learning: the loss falls, old classes are remembered
# --------------------------------------------------------------------------------------------


def test_expand_learns_and_remembers_where_fine_tuning_forgets(stream) -> None:
    net = build("mlp")
    strategy = expand(net, train_epochs=6)
    naive_net = build("mlp")
    naive = Naive(
        model=naive_net, optimizer=torch.optim.Adam(naive_net.parameters(), lr=0.01),
        train_mb_size=32, train_epochs=6, evaluator=None,
    )  # fmt: skip
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
        naive.train(exp)
    accs = [accuracy(net, e) for e in stream.test_stream[:3]]
    naive_accs = [accuracy(naive_net, e) for e in stream.test_stream[:3]]
    assert naive_accs[0] < 0.2  # fine-tuning forgets the first classes (class-incremental)
    assert min(accs) > 0.6, accs  # Expand keeps every experience's classes
    assert sum(accs) / 3 > sum(naive_accs) / 3 + 0.25, (accs, naive_accs)
    # the auxiliary loss falls over the last experience (its head learns the new classes)
    losses = strategy.aux.losses
    k = max(len(losses) // 4, 1)
    assert sum(losses[-k:]) / k < 0.7 * sum(losses[:k]) / k, losses


def test_balanced_classifier_stage_trains_only_the_classifier(stream) -> None:
    net = build("mlp")
    strategy = expand(net, balance_epochs=0, train_epochs=6, growth={"0": 4, "2": 4})
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
    before = [accuracy(net, e) for e in stream.test_stream[:3]]
    trunk = {k: v for k, v in snapshot(net).items() if not k.startswith("4.")}
    head = net.get_submodule("4").weight.detach().clone()
    BalancedHead(strategy.replay, 10).after_training_exp(strategy)  # on the same buffer
    now = snapshot(net)
    for k, v in trunk.items():  # only the classifier trained (BatchNorm-free trunk: all equal)
        assert torch.equal(now[k], v), k
    assert not torch.equal(net.get_submodule("4").weight, head)
    after = [accuracy(net, e) for e in stream.test_stream[:3]]
    # held-out accuracy: the classifier still separates every experience's classes
    assert min(after) > 0.8 and sum(after) > sum(before) - 0.06, (before, after)


# --------------------------------------------------------------------------------------------
# checkpoints, the resume path
# --------------------------------------------------------------------------------------------


def test_masks_survive_save_load_and_growth_continues(stream, tmp_path: Path) -> None:
    net = build("residual_cnn")  # BatchNorm, a residual sum (Unflatten has no checkpoint spec)
    probes = MODELS["residual_cnn"][1]
    x = probe(stream)
    strategy = expand(net)
    strategy.train(stream.train_stream[0])
    gen0 = capture(net, x, probes)
    strategy.train(stream.train_stream[1])
    gen1 = capture(net, x, probes)
    save(net, tmp_path / "expand.n2g")
    loaded = load(tmp_path / "expand.n2g")
    masks, loaded_masks = protection.frozen_masks(net), protection.frozen_masks(loaded)
    assert masks and masks.keys() == loaded_masks.keys()
    assert all(torch.equal(masks[k], loaded_masks[k]) for k in masks)
    assert protection.mode(loaded) == "independent"
    assert_state_equal(loaded, snapshot(net))
    # a new Expand on the loaded network (fresh optimizer): growth after growth, still exact
    again = expand(loaded)
    again.clock.train_exp_counter = 2  # as if experiences 0 and 1 were trained by it
    again.train(stream.train_stream[2])
    assert loaded.width("conv1") == net.width("conv1") + 4
    now = capture(loaded, x, probes)
    assert_old_identical(gen0, now)
    assert_old_identical(gen1, now)
    assert protection.violations(loaded) == []


@pytest.mark.parametrize(
    "options",
    [{}, {"protect": "lateral", "inherit": True, "align": True, "balance_temperature": 2.0}],
    ids=["default", "inherit-align"],
)
def test_resume_run_continues_bit_identically(
    stream, tmp_path: Path, options: dict[str, Any]
) -> None:
    from net2grow.strategies.resume import load_run, save_run

    def fresh() -> Expand:
        return expand(
            build("mlp"), train_epochs=1, evaluator=EvaluationPlugin(loggers=[]), **options
        )

    torch.manual_seed(5)
    whole = fresh()
    for exp in stream.train_stream[:3]:
        whole.train(exp)
    torch.manual_seed(5)
    first = fresh()
    for exp in stream.train_stream[:2]:
        first.train(exp)
    save_run(tmp_path / "run.n2g", first, position=2, config="expand")
    torch.manual_seed(99)  # the file's RNG state must win
    resumed = fresh()
    state = load_run(tmp_path / "run.n2g", resumed, config="expand")
    assert state is not None and state.position == 2
    net = resumed.model
    assert protection.mode(net) == options.get("protect", "independent")
    masks = protection.frozen_masks(first.model)
    assert all(torch.equal(m, protection.frozen_masks(net)[k]) for k, m in masks.items())
    resumed.train(stream.train_stream[2])
    assert_state_equal(resumed.model, snapshot(whole.model))
    assert resumed.aux.losses == whole.aux.losses
    assert protection.violations(resumed.model) == []
    if options.get("align"):
        assert resumed.align is not None and whole.align is not None
        assert resumed.align.gammas == whole.align.gammas and len(whole.align.gammas) == 2


# --------------------------------------------------------------------------------------------
# refusals change nothing
# --------------------------------------------------------------------------------------------


def test_unmaskable_layer_is_refused_before_anything_changes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.PReLU(), nn.Linear(16, 10))  # one shared slope
    net = GrowableNetwork(model, torch.randn(8, 64))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net(torch.randn(8, 64)).sum().backward()
    opt.step()  # an optimizer with state
    state, opt_state = snapshot(net), copy.deepcopy(opt.state_dict())
    children = list(dict(net.named_children()))
    with pytest.raises(UnsupportedLayerError, match="PReLU"):
        Expand(net, opt, growth=4, evaluator=None)
    assert_state_equal(net, state)
    assert list(dict(net.named_children())) == children and not protection.is_protected(net)
    now = opt.state_dict()
    assert now["param_groups"] == opt_state["param_groups"]
    for i, s in opt_state["state"].items():
        for k, v in s.items():
            assert torch.equal(now["state"][i][k], v), (i, k)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protect": None}, "protect must be one of"),
        ({"protect": "frozen"}, "protect must be one of"),
        ({"mem_size": -1}, "mem_size must be an int >= 0"),
        ({"aux_weight": -0.5}, "aux_weight must be a number >= 0"),
        ({"balance_epochs": 1.5}, "balance_epochs must be an int >= 0"),
        ({"growth": 0}, "growth must be a positive int"),
        ({"growth": {"nope": 3}}, r"growth names \['nope'\]"),
        ({"head": "nope"}, "not a module that the network calls"),
        ({"plugins": [ReplayPlugin(10)]}, "replayed twice"),
        ({"plugins": [GrowthPlugin(EveryExperience())]}, "own GrowthPlugin"),
    ],
)
def test_bad_arguments_are_refused_unchanged(kwargs: dict[str, Any], message: str) -> None:
    net = build("mlp")
    state = snapshot(net)
    with pytest.raises(GrowthError, match=message):
        expand(net, **kwargs)
    assert_state_equal(net, state)
    assert not protection.is_protected(net)


def test_a_head_that_reads_no_features_is_refused() -> None:
    net = build("mlp")
    with pytest.raises(GrowthError, match="not a module"):
        feature_columns(net, "nope")
    policy = NewUnits({"0": 2})
    assert policy.added("0") == 2 and policy.added("2") == 0


# --------------------------------------------------------------------------------------------
# beside Replay, LwF, and with Avalanche's IncrementalClassifier
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["replay", "lwf"])
def test_works_beside_replay_and_lwf(stream, other: str) -> None:
    net = build("mlp")
    x = probe(stream)
    plugin = ReplayPlugin(60) if other == "replay" else LwFPlugin(alpha=1.0, temperature=2.0)
    strategy = expand(net, mem_size=0, plugins=[plugin], train_epochs=6)
    strategy.train(stream.train_stream[0])
    gen0 = capture(net, x, ("1", "3"))
    for exp in stream.train_stream[1:3]:
        strategy.train(exp)
    assert_old_identical(gen0, capture(net, x, ("1", "3")))
    assert protection.violations(net) == []
    assert accuracy(net, stream.test_stream[2]) > 0.8  # the last experience was learned
    if other == "replay":
        assert len(plugin.storage_policy.buffer) == 60
        assert accuracy(net, stream.test_stream[0]) > 0.5  # replay kept the first classes


class IncrementalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.classifier = IncrementalClassifier(16, initial_out_features=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def test_incremental_classifier_head(stream) -> None:
    torch.manual_seed(0)
    net = GrowableNetwork(IncrementalNet(), torch.randn(8, 64))
    x = probe(stream)
    strategy = expand(net, train_epochs=6)
    assert feature_reader(net) == "classifier"
    strategy.train(stream.train_stream[0])
    gen0 = capture(net, x, ("features.1", "features.3"))
    for exp in stream.train_stream[1:3]:
        strategy.train(exp)
    assert net.get_submodule("classifier").classifier.out_features == 6
    assert_old_identical(gen0, capture(net, x, ("features.1", "features.3")))
    assert len(strategy.aux.losses) > 0
    accs = [accuracy(net, e) for e in stream.test_stream[:3]]
    assert min(accs) > 0.5, accs
    with torch.no_grad():  # unseen classes stay masked by the head
        net.eval()
        out = net(x)
        net.train()
    assert out.shape[1] == 6


def test_aux_labels_mark_other_classes_and_tasks_old() -> None:
    aux = AuxiliaryLoss()
    aux._classes = torch.tensor([4, 7])
    aux._task = 1
    y = torch.tensor([4, 7, 0, 4, 9])
    t = torch.tensor([1, 1, 1, 0, 1])
    assert aux.aux_labels(y, t).tolist() == [1, 2, 0, 0, 0]
    assert aux.aux_labels(y, None).tolist() == [1, 2, 0, 1, 0]
