"""Every Avalanche 0.6 strategy and plugin that keeps per-parameter or per-model state, with growth.

Each row trains experience 0, lets a ``GrowthPlugin`` widen both hidden layers (16 -> 24 units:
the middle weight grows in two dimensions) before experience 1, and trains experience 1; or it
is refused before anything trains.

===================  ===========================================================================
strategy/plugin      with GrowthPlugin
===================  ===========================================================================
EWC (separate)       works: anchors/importances remapped, penalty unchanged by growth
EWC (online)         works: same
SI                   works: flat state remapped to the grown sizes (its penalty equality is tested
                     in test_strategies_plugin_state.py: Avalanche's SI importance is 0 on CPU)
MAS                  works: anchors/importances remapped, penalty unchanged by growth
RWalk                works: every per-parameter dict remapped, penalty unchanged by growth
LwF                  works: the teacher is a pre-growth copy, distillation unchanged by growth
LFL                  refused (GrowthError): LFLPlugin needs an avalanche BaseModel (get_features)
GEM                  works: pattern memory; reference gradients recomputed every iteration (and
                     remapped when growth falls between their computation and use)
AGEM                 works: same
GDumb                refused (GrowthError): it resets the model before every experience
Replay               works: data only
GSS_greedy           works: data and scores only (mem_size must exceed 2 x train_mb_size: from
                     experience 1 on, Avalanche's GSS fails on its own otherwise)
CoPE                 works for layers that do not feed its embedding layer; widening the layer
                     that feeds it is refused by the engine (warning: CoPE swapped that layer for
                     a Sequential without a growth rule)
DER                  works: stores logits (outputs do not change with growth)
Cumulative           works: data only
ICaRL                refused (GrowthError): the strategy builds its own TrainEvalModel
FromScratchTraining  refused (GrowthError): it resets only the weights whose shape did not change
GenerativeReplay     works: the solver grows; the generator (own strategy) must sample inputs
                     shaped like the solver's (here a VAE whose samples are flattened)
===================  ===========================================================================

"Unchanged by growth": the regularisation term measured by the plugin itself right before the
growth and right after it (weights perturbed first, so that it is not zero) agrees to 1e-6.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _avalanche import digits_stream, mlp_net
from _models import outputs, rel_error
from avalanche.models import MlpVAE
from avalanche.models.generator import VAE_loss
from avalanche.training.plugins import (
    EvaluationPlugin,
    EWCPlugin,
    FromScratchTrainingPlugin,
    GenerativeReplayPlugin,
    LwFPlugin,
    MASPlugin,
    RWalkPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.supervised import (
    AGEM,
    DER,
    EWC,
    GEM,
    LFL,
    MAS,
    CoPE,
    Cumulative,
    GDumb,
    GenerativeReplay,
    GSS_greedy,
    ICaRL,
    LwF,
    Naive,
    Replay,
    SynapticIntelligence,
    VAETraining,
)
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.plugin_state import _RWALK_REMAPS, penalty
from net2grow.strategies.policies import EveryExperience

HIDDEN, GROWN = 16, 24
PROBE = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def stream():
    return digits_stream()


def common(net: nn.Module, plugins: list) -> dict[str, Any]:
    """Arguments every strategy of the table gets."""
    return dict(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=32,
        train_epochs=1,
        eval_mb_size=256,
        plugins=plugins,
        evaluator=EvaluationPlugin(),
    )


def plugin_of(strategy, cls) -> Any:
    (found,) = [p for p in strategy.plugins if isinstance(p, cls)]
    return found


def perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# --- regularisation terms claimed unchanged by growth -------------------------------------------
def plugin_penalty(cls) -> Callable[[Any], float]:
    """The term ``cls`` adds to the loss now, computed by the plugin itself."""

    def term(strategy) -> float:
        n = strategy.clock.train_exp_counter
        return penalty(plugin_of(strategy, cls), strategy.model, exp_counter=n)

    return term


def lwf_distillation(strategy) -> float:
    lwf = plugin_of(strategy, LwFPlugin).lwf
    return float(lwf(PROBE, strategy.model(PROBE), strategy.model))


# --- per-parameter state: (shape kept, shape expected) ------------------------------------------
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


def _shapes(stores: dict[str, dict], params: dict[str, torch.Tensor], flat: bool = False) -> Shapes:
    out: Shapes = {}
    for label, store in stores.items():
        for name, pd in (store or {}).items():
            want = (params[name].numel(),) if flat else tuple(params[name].shape)
            out[f"{label}[{name}]"] = (tuple(pd.data.shape), want)
    return out


def ewc_state(strategy) -> Shapes:
    ewc = plugin_of(strategy, EWCPlugin)
    stores = {f"saved_params[{e}]": d for e, d in ewc.saved_params.items()}
    stores |= {f"importances[{e}]": d for e, d in ewc.importances.items()}
    return _shapes(stores, dict(strategy.model.named_parameters()))


def si_state(strategy) -> Shapes:
    si = plugin_of(strategy, SynapticIntelligencePlugin)
    stores = {"anchors": si.ewc_data[0], "importances": si.ewc_data[1], **si.syn_data}
    return _shapes(stores, dict(strategy.model.named_parameters()), flat=True)


def mas_state(strategy) -> Shapes:
    mas = plugin_of(strategy, MASPlugin)
    stores = {"params": mas.params, "importance": mas.importance}
    return _shapes(stores, dict(strategy.model.named_parameters()))


def rwalk_state(strategy) -> Shapes:
    rwalk = plugin_of(strategy, RWalkPlugin)
    stores = {k: getattr(rwalk, k) for k in _RWALK_REMAPS}
    return _shapes(stores, dict(strategy.model.named_parameters()))


# --- generative replay on flat inputs -----------------------------------------------------------
class FlatVAE(MlpVAE):
    """Avalanche's MLP VAE on 1x8x8 images, sampling flat 64-vectors like the digits stream."""

    def generate(self, batch_size=None):
        return super().generate(batch_size).flatten(1)


def flat_vae_loss(x, out):
    return VAE_loss(x.view_as(out[0]), out)


def generative_replay(net, plugins):
    torch.manual_seed(0)
    vae = FlatVAE((1, 8, 8), nhid=2)
    generator = VAETraining(
        model=vae,
        optimizer=torch.optim.Adam(vae.parameters(), lr=1e-3),
        criterion=flat_vae_loss,
        train_mb_size=32,
        evaluator=EvaluationPlugin(),
        plugins=[GenerativeReplayPlugin()],
    )
    return GenerativeReplay(generator_strategy=generator, **common(net, plugins))


# --- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    build: Callable[[GrowableNetwork, list], Any]
    term: Callable[[Any], float] | None = None  # regularisation claimed unchanged by growth
    state: Callable[[Any], Shapes] | None = None  # per-parameter state right after growth
    widths: tuple[int, int] = (GROWN, GROWN)  # layers "0" and "2" during experience 1
    rel: float = 1e-6  # tolerance of ``term``


def naive_with(plugin: Callable[[], SupervisedPlugin]) -> Callable[[GrowableNetwork, list], Any]:
    return lambda net, plugins: Naive(**common(net, [*plugins, plugin()]))


WORKS: dict[str, Case] = {
    "ewc-separate": Case(
        lambda net, pl: EWC(ewc_lambda=1.0, **common(net, pl)),
        plugin_penalty(EWCPlugin),
        ewc_state,
    ),
    "ewc-online": Case(
        lambda net, pl: EWC(ewc_lambda=1.0, mode="online", decay_factor=0.9, **common(net, pl)),
        plugin_penalty(EWCPlugin),
        ewc_state,
    ),
    "si": Case(
        lambda net, pl: SynapticIntelligence(si_lambda=1.0, **common(net, pl)), state=si_state
    ),
    "mas": Case(
        lambda net, pl: MAS(lambda_reg=0.01, **common(net, pl)),
        plugin_penalty(MASPlugin),
        mas_state,
    ),
    "rwalk": Case(
        naive_with(lambda: RWalkPlugin(ewc_lambda=1.0, delta_t=2)),
        plugin_penalty(RWalkPlugin),
        rwalk_state,
    ),
    # A KL divergence between nearly equal outputs: float32 rounding of the outputs (1e-6) shows.
    "lwf": Case(
        lambda net, pl: LwF(alpha=1.0, temperature=2.0, **common(net, pl)),
        lwf_distillation,
        rel=1e-4,
    ),
    "gem": Case(lambda net, pl: GEM(patterns_per_exp=16, memory_strength=0.5, **common(net, pl))),
    "agem": Case(lambda net, pl: AGEM(patterns_per_exp=16, sample_size=16, **common(net, pl))),
    "replay": Case(lambda net, pl: Replay(mem_size=50, **common(net, pl))),
    "gss": Case(
        lambda net, pl: GSS_greedy(
            mem_size=50, mem_strength=2, input_size=[64], **(common(net, pl) | {"train_mb_size": 8})
        )
    ),
    # CoPE swaps the last layer for Sequential(Linear, L2Normalization): "2" feeds it.
    "cope": Case(
        lambda net, pl: CoPE(mem_size=50, n_classes=10, p_size=10, **common(net, pl)),
        widths=(GROWN, HIDDEN),
    ),
    "der": Case(lambda net, pl: DER(mem_size=50, batch_size_mem=8, **common(net, pl))),
    "cumulative": Case(lambda net, pl: Cumulative(**common(net, pl))),
    "generative-replay": Case(generative_replay),
}


class Witness(SupervisedPlugin):
    """Placed before the GrowthPlugin. Before the growth that precedes an experience it perturbs
    the weights (so that regularisers see θ ≠ θ*) and measures; right after the growth (at
    ``before_training_exp``, the optimizer rebuilt) it measures again. Records every training
    loss, as the strategy optimises it."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case = case
        self.before: dict[int, tuple] = {}
        self.after: dict[int, tuple] = {}
        self.state: dict[int, Shapes] = {}
        self.widths: dict[int, tuple[int, int]] = {}
        self.losses: dict[int, list[float]] = defaultdict(list)

    def _measure(self, strategy) -> tuple:
        term = self.case.term(strategy) if self.case.term else None
        return outputs(strategy.model, PROBE), term

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        e = strategy.clock.train_exp_counter
        if e > 0:
            perturb(strategy.model)
            self.before[e] = self._measure(strategy)

    def before_training_exp(self, strategy, **kwargs):
        e = strategy.clock.train_exp_counter
        self.widths[e] = (strategy.model.width("0"), strategy.model.width("2"))
        if e > 0:
            self.after[e] = self._measure(strategy)
            if self.case.state:
                self.state[e] = self.case.state(strategy)

    def before_update(self, strategy, **kwargs):
        self.losses[strategy.clock.train_exp_counter].append(float(strategy.loss))


@pytest.mark.parametrize("name", list(WORKS))
def test_strategy_trains_grows_and_trains_on(name, stream):
    case = WORKS[name]
    net = mlp_net(HIDDEN)
    growth = GrowthPlugin(EveryExperience(factor=1.5), generator=0, on_refusal="raise")
    witness = Witness(case)
    strategy = case.build(net, [witness, growth])
    for exp in stream.train_stream[:2]:
        strategy.train(exp)

    assert strategy.model is net  # nothing replaced the grown network
    assert witness.widths == {0: (HIDDEN, HIDDEN), 1: case.widths}
    assert [e.status for e in growth.events] == ["grown"] * (2 if case.widths[1] > HIDDEN else 1)
    for e in (0, 1):
        assert witness.losses[e], f"no training iteration in experience {e}"
        assert all(math.isfinite(v) for v in witness.losses[e]), witness.losses[e]
    (out_before, term_before), (out_after, term_after) = witness.before[1], witness.after[1]
    assert rel_error(out_after, out_before) < 1e-5  # growth kept the function inside the strategy
    if case.term is not None:
        assert term_before > 1e-4
        assert term_after == pytest.approx(term_before, rel=case.rel)
    if case.state is not None:
        shapes = witness.state[1]
        assert shapes and any(want[-1] == GROWN for _, want in shapes.values())
        wrong = {k: v for k, v in shapes.items() if v[0] != v[1]}
        assert not wrong, wrong


def test_cope_refuses_growth_of_the_layer_feeding_its_embedding(stream):
    """CoPE replaces the last layer by Sequential(Linear, L2Normalization): the engine has no
    rule for it, so widening the layer that feeds it is refused (a warning, training goes on)."""
    net = mlp_net(HIDDEN)
    growth = GrowthPlugin(EveryExperience(factor=1.5, layers=["0", "2"]), generator=0)
    strategy = CoPE(mem_size=50, n_classes=10, p_size=10, **common(net, [growth]))
    strategy.train(stream.train_stream[0])
    with pytest.warns(UserWarning, match=r"growth refused: cannot widen '2': layer '4' is a Seq"):
        strategy.train(stream.train_stream[1])
    assert [(e.layer, e.status) for e in growth.events] == [("0", "grown"), ("2", "refused")]
    assert (net.width("0"), net.width("2")) == (GROWN, HIDDEN)
    assert strategy.clock.train_exp_counter == 2


# --- refused up front ---------------------------------------------------------------------------
def icarl(net, plugins):
    torch.manual_seed(0)
    features = GrowableNetwork(nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU()), torch.zeros(4, 64))
    classifier = nn.Linear(HIDDEN, 10)
    params = [*features.parameters(), *classifier.parameters()]
    return ICaRL(
        feature_extractor=features,
        classifier=classifier,
        optimizer=torch.optim.SGD(params, lr=0.05),
        memory_size=50,
        buffer_transform=None,
        fixed_memory=True,
        train_mb_size=32,
        plugins=plugins,
        evaluator=EvaluationPlugin(),
    )


REFUSED = {
    "gdumb": (
        lambda net, pl: GDumb(mem_size=50, **common(net, pl)),
        r"GDumbPlugin replaces strategy.model .* every growth would be discarded",
    ),
    "lfl": (
        lambda net, pl: LFL(lambda_e=0.1, **common(net, pl)),
        r"LFLPlugin .* needs an avalanche.models.BaseModel; a GrowableNetwork is not one",
    ),
    "icarl": (icarl, r"cannot grow ICaRL: the strategy builds its own model"),
    "from-scratch-training": (
        naive_with(FromScratchTrainingPlugin),
        r"FromScratchTrainingPlugin resets the weights .* grown parameters would keep",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_strategy_is_refused_before_training(name, stream):
    build, message = REFUSED[name]
    net = mlp_net(HIDDEN)
    growth = GrowthPlugin(EveryExperience(factor=1.5), generator=0)
    strategy = build(net, [growth])
    weights = [p.detach().clone() for p in strategy.model.parameters()]
    with pytest.raises(GrowthError, match=message):
        strategy.train(stream.train_stream[0])
    assert strategy.clock.train_iterations == 0
    assert all(torch.equal(a, p) for a, p in zip(weights, strategy.model.parameters(), strict=True))
    assert growth.events == []
