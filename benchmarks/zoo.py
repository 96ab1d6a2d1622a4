"""``python -m net2grow.benchmarks zoo``: growth on modern architectures nobody here wrote.

For each model (torchvision ViT, Swin, ConvNeXt, EfficientNet, RegNet, MobileNetV3; timm ViT;
Hugging Face GPT-2 and BERT, tiny configurations with attention dropout 0 — their attention
passes ``self.training`` into the attention call, so its dropout would fix the graph to one
mode — when those libraries are installed) a seeded sample of its layers is widened (factor
1.5, or the next exact width the engine names) and deepened (``kind="residual"``: a zero
residual block after the layer, which the engine documents as exact after any layer it can
copy), with the network in eval mode and in train mode.

The sampling rule (:func:`candidate_layers`): every module with a layer rule (``Linear``,
``Conv``, ``Embedding``, ``nn.MultiheadAttention``, Hugging Face ``Conv1D``, ...) and every
module of another type that owns a weight matrix, whether or not the graph can grow it.
Submodules of a module that has a rule of its own (``nn.MultiheadAttention``'s ``out_proj``)
are not candidates: they are not layers of the graph, their owner is, and growing it grows
them. Layers whose weights a function the graph calls reads (a model's own
``F.linear(x, self.fc.weight)``) stay candidates and count as refusals; Swin's attention and
patch merging are layers with rules of their own, sampled as wholes. Output layers
(:func:`output_layers`: their units are the network's output, such as a classifier or a
language model's head) are sampled like any other layer and deepened, but not widened: their
width is the task's (classes, vocabulary), so widening them changes the function by
definition; that trial is reported as ``n/a`` and left out of the counts.

Every trial runs with ``verify=False`` and is judged by its own output comparison:

- ``exact``: the outputs in that mode are unchanged (within 1e-5 of their scale);
- ``refused``: a ``GrowthError`` (the network is left as it was);
- ``silent``: no error, but the outputs changed;
- ``crash``: any other exception.

Growth and comparison run in float64: in float32, rounding of the split weights, amplified by
train-mode BatchNorm over a few values (4 samples at 1x1 resolution), moves outputs by up to
1e-4 although the function is preserved (1e-12 in float64). Train-mode outputs are compared
with the random generator seeded (stochastic depth draws the same per-sample masks) and dropout
off: dropout draws one mask entry per unit, so no widening of its input can reproduce its
masks; stochastic depth's masks are per sample, so it stays on.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..growth import GrowableNetwork, GrowthError
from ..growth.rules import module_rule_for
from ..growth.verify import iter_tensors
from ._report import format_table, save_plot, tensorboard_writer, write_results

NAME = "zoo"
TOLERANCE = 1e-5
OUTCOMES = ("exact", "refused", "silent", "crash")
NOT_APPLICABLE = "n/a"  # widening an output layer (see output_layers): not counted
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
COLUMNS = ["model", "layers sampled", "trials", *OUTCOMES, "layers all exact", "output widen n/a",
           "seconds"]


@dataclass(frozen=True)
class ZooModel:
    """A model of the zoo: ``build()`` -> ``(model, example_inputs)``."""

    name: str
    build: Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]
    needs: str = "torchvision"


def _images(size: int, n: int = 4) -> tuple[Tensor, ...]:
    return (torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(vocab: int, length: int = 12, n: int = 4) -> tuple[Tensor, ...]:
    return (torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0)),)


def _vit() -> tuple[nn.Module, tuple[Tensor, ...]]:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    return model, _images(32)


def _torchvision(name: str, size: int) -> Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]:
    def build() -> tuple[nn.Module, tuple[Tensor, ...]]:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10), _images(size)

    return build


def _timm_vit() -> tuple[nn.Module, tuple[Tensor, ...]]:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                              img_size=32)
    return model, _images(32)


def _gpt2() -> tuple[nn.Module, tuple[Tensor, ...]]:
    import transformers

    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg), _tokens(96)


def _bert() -> tuple[nn.Module, tuple[Tensor, ...]]:
    import transformers

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=96, max_position_embeddings=32,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg), _tokens(96)


#: The zoo, in report order.
MODELS = [
    ZooModel("torchvision ViT (small config)", _vit),
    ZooModel("swin_t", _torchvision("swin_t", 32)),
    ZooModel("convnext_tiny", _torchvision("convnext_tiny", 32)),
    ZooModel("efficientnet_b0", _torchvision("efficientnet_b0", 32)),
    ZooModel("regnet_y_400mf", _torchvision("regnet_y_400mf", 32)),
    ZooModel("mobilenet_v3_small", _torchvision("mobilenet_v3_small", 32)),
    ZooModel("timm vit_tiny_patch16_224", _timm_vit, needs="timm"),
    ZooModel("HF GPT-2 (tiny)", _gpt2, needs="transformers"),
    ZooModel("HF BERT (tiny)", _bert, needs="transformers"),
]


# --- one trial ---------------------------------------------------------------------------------
def candidate_layers(net: GrowableNetwork) -> list[str]:
    """Every layer of the network, in module order: modules with a layer rule (``Linear``,
    ``Conv``, ``Embedding``, ``nn.MultiheadAttention``, ...) and modules of other types that own
    a weight matrix, whether or not the graph can grow them. Submodules of a module that has a
    rule of its own (``nn.MultiheadAttention``'s ``out_proj``) are not layers of the graph: the
    rule grows them with their owner, which is the candidate. Layers whose weights are read by
    a function the graph calls (``F.linear(x, self.fc.weight)``) stay candidates."""
    names = []
    ruled: list[str] = []  # modules with a rule: leaves of the traced graph
    for name, module in net.named_modules():
        if not name or name.split(".")[0] in ("grown", "functional"):
            continue
        if any(name.startswith(owner + ".") for owner in ruled):
            continue
        rule = module_rule_for(module)
        if rule is not None:
            ruled.append(name)
        weight = module._parameters.get("weight")
        if (rule is not None and rule.is_layer) or (
            rule is None and weight is not None and weight.dim() >= 2
        ):
            names.append(name)
    return names


def output_layers(net: GrowableNetwork) -> set[str]:
    """Layers whose output units are units of the network's output (a classifier, a language
    model's head): their width is the task's (classes, vocabulary), so widening them is not a
    growth of the network but a change of its function by definition."""
    analysis = net.analysis
    out = next(n for n in net.graph.nodes if n.op == "output")
    groups = {
        analysis.spaces.find(seg.space)
        for arg in out.all_input_nodes
        if (lay := analysis.layouts.get(arg)) is not None
        for seg in lay.segments
    }
    names = set()
    for name, nodes in analysis.module_nodes.items():
        lay = analysis.layouts.get(nodes[0])
        if lay is not None and any(analysis.spaces.find(s.space) in groups for s in lay.segments):
            names.add(name)
    return names


def sample_layers(net: GrowableNetwork, k: int, seed: int) -> list[str]:
    """``k`` of :func:`candidate_layers`, drawn with ``seed``, in graph order."""
    names = candidate_layers(net)
    picked = set(random.Random(seed).sample(names, min(k, len(names))))
    return [n for n in names if n in picked]


def outputs(net: nn.Module, inputs: tuple[Tensor, ...], train: bool) -> list[Tensor]:
    """Every output tensor of a float64 copy of ``net`` in that mode (seeded; dropout off in
    train). Float64 keeps float32 rounding of the forward pass (train-mode BatchNorm over a few
    values amplifies it past 1e-5) from passing for a change of function, and back."""
    model = copy.deepcopy(net).double().train(train)
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    if train:
        for m in model.modules():
            if isinstance(m, DROPOUTS):
                m.p = 0.0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return [t.detach().double() for t in iter_tensors(model(*inputs))]


def relative_change(before: list[Tensor], after: list[Tensor]) -> float:
    """Largest output change relative to the largest output value."""
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        return math.inf
    err = max((float((a - b).abs().max()) for a, b in zip(before, after) if a.numel()),
              default=0.0)
    scale = max((float(b.abs().max()) for b in before if b.numel()), default=0.0)
    return err / max(scale, 1e-12)


#: "exact widths for this layer: 64, 96, ..." and "exact widths for this layer are 40, 48, ..."
_EXACT_WIDTHS = re.compile(r"exact widths[^:\d]*?(?::|\bare\b)\s*([\d,\s]+)", re.IGNORECASE)


def exact_width(message: str, width: int) -> int | None:
    """The first width above ``width`` that a refusal's message names as exact, if any."""
    match = _EXACT_WIDTHS.search(message)
    if match is None:
        return None
    widths = [int(w) for w in re.findall(r"\d+", match.group(1))]
    return next((w for w in widths if w > width), None)


def grow_once(net: GrowableNetwork, layer: str, op: str) -> dict[str, Any]:
    """Grow ``net`` in place (``verify=False``): widen by 1.5 (or the next exact width the
    engine names) or deepen with a zero residual block."""
    if op == "deepen":
        net.deepen(layer, kind="residual", verify=False)
        return {}
    width = net.width(layer)
    target = max(width + 1, math.ceil(width * 1.5))
    try:
        net.widen(layer, target, verify=False, generator=torch.Generator().manual_seed(0))
    except GrowthError as exc:
        retry = exact_width(str(exc), width)
        if retry is None or retry == target:
            raise
        target = retry
        net.widen(layer, target, verify=False, generator=torch.Generator().manual_seed(0))
    return {"width": [width, target]}


def trial(net: GrowableNetwork, layer: str, op: str, train: bool,
          reference: list[Tensor]) -> dict[str, Any]:
    """One growth of a copy of ``net`` in one mode, classified (see the module docstring)."""
    grown = copy.deepcopy(net).double().train(train)  # growth itself free of float32 rounding
    result: dict[str, Any] = {"layer": layer, "op": op, "mode": "train" if train else "eval"}
    try:
        result.update(grow_once(grown, layer, op))
    except GrowthError as exc:
        return {**result, "outcome": "refused", "message": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        return {**result, "outcome": "crash", "message": f"{type(exc).__name__}: {exc}"}
    try:
        change = relative_change(reference, outputs(grown, net.probe, train))
    except Exception as exc:
        return {**result, "outcome": "crash",
                "message": f"grown network does not run: {type(exc).__name__}: {exc}"}
    outcome = "exact" if change <= TOLERANCE else "silent"
    return {**result, "outcome": outcome, "rel_change": change}


def run_model(entry: ZooModel, layers: int, seed: int) -> dict[str, Any]:
    """Every trial on one model (or why it could not be built or traced)."""
    start = time.perf_counter()
    try:
        model, inputs = entry.build()
    except ImportError as exc:
        return {"model": entry.name, "status": f"skipped: {entry.needs} not installed ({exc})"}
    torch.manual_seed(seed)
    try:
        net = GrowableNetwork(model, inputs, probe_size=len(inputs[0]))
    except GrowthError as exc:
        return {"model": entry.name, "status": f"not traced: {type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - start}
    sample = sample_layers(net, layers, seed)
    fixed = output_layers(net)
    trials = []
    for train in (False, True):
        reference = outputs(net, net.probe, train)
        for layer in sample:
            for op in ("widen", "deepen"):
                if op == "widen" and layer in fixed:
                    trials.append({"layer": layer, "op": op, "mode": "train" if train else "eval",
                                   "outcome": NOT_APPLICABLE,
                                   "message": "an output layer: its width is the task's"})
                    continue
                trials.append(trial(net, layer, op, train, reference))
    return {"model": entry.name, "status": "ok", "candidates": len(candidate_layers(net)),
            "sample": sample, "trials": trials, "seconds": time.perf_counter() - start}


# --- report ------------------------------------------------------------------------------------
def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """One table row: counts of each outcome, layers whose every trial was exact."""
    row: dict[str, Any] = {"model": result["model"]}
    if result["status"] != "ok":
        row["layers sampled"] = result["status"][:60]
        return row
    trials = [t for t in result["trials"] if t["outcome"] != NOT_APPLICABLE]
    row.update({"layers sampled": f"{len(result['sample'])} of {result['candidates']}",
                "trials": len(trials), "seconds": round(result["seconds"], 1),
                "output widen n/a": len(result["trials"]) - len(trials)})
    for outcome in OUTCOMES:
        row[outcome] = sum(t["outcome"] == outcome for t in trials)
    exact_layers = sum(all(t["outcome"] == "exact" for t in trials if t["layer"] == layer)
                       for layer in result["sample"])
    row["layers all exact"] = exact_layers
    return row


def totals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over every model that ran."""
    ran = [r for r in results if r["status"] == "ok"]
    trials = [t for r in ran for t in r["trials"] if t["outcome"] != NOT_APPLICABLE]
    layers = sum(len(r["sample"]) for r in ran)
    exact_layers = sum(table_row(r)["layers all exact"] for r in ran)
    counts = {o: sum(t["outcome"] == o for t in trials) for o in OUTCOMES}
    return {
        "models": len(ran),
        "trials": len(trials),
        "output_widen_na": sum(t["outcome"] == NOT_APPLICABLE for r in ran for t in r["trials"]),
        **counts,
        "exact_trial_fraction": counts["exact"] / len(trials) if trials else None,
        "layers": layers,
        "layers_all_exact": exact_layers,
        "exact_layer_fraction": exact_layers / layers if layers else None,
    }


def plot(results: list[dict[str, Any]]) -> Any:
    """Stacked bars: outcome counts per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(10, 4))
    colors = {"exact": "tab:green", "refused": "tab:gray", "silent": "tab:red",
              "crash": "black"}
    bottom = [0] * len(ran)
    for outcome in OUTCOMES:
        counts = [sum(t["outcome"] == outcome for t in r["trials"]) for r in ran]
        ax.bar([r["model"] for r in ran], counts, bottom=bottom, label=outcome,
               color=colors[outcome])
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_ylabel("growth trials (widen + deepen, eval + train)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This command's options (the common ones come from ``benchmarks.__main__``)."""
    g = parser.add_argument_group("zoo")
    g.add_argument("--layers", type=int, default=None,
                   help="layers sampled per model (default 6, quick 2)")
    g.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="substrings of the model names to run (default: all)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the zoo; print the table, write JSON/Markdown/PNG and a TensorBoard text summary."""
    layers = args.layers if args.layers is not None else (2 if args.quick else 6)
    seed = args.seeds[0]
    entries = [m for m in MODELS
               if args.models is None or any(s.lower() in m.name.lower() for s in args.models)]
    if args.quick and args.models is None:
        entries = [m for m in entries if m.name.startswith(("torchvision ViT", "mobilenet"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    results = []
    try:
        for entry in entries:
            results.append(run_model(entry, layers, seed))
            print(f"{entry.name}: {table_row(results[-1])}", flush=True)
    finally:
        torch.set_num_threads(threads)
    rows = [table_row(r) for r in results]
    total = totals(results)
    rows.append({"model": "total", "layers sampled": total["layers"], "trials": total["trials"],
                 **{o: total[o] for o in OUTCOMES}, "layers all exact": total["layers_all_exact"],
                 "output widen n/a": total["output_widen_na"]})
    print(format_table(rows, COLUMNS))
    for r in results:
        for t in r.get("trials", []):
            if t["outcome"] not in ("exact", NOT_APPLICABLE):
                print(f"  {r['model']} {t['layer']} {t['op']} ({t['mode']}): {t['outcome']}: "
                      f"{t.get('message', t.get('rel_change', ''))!s:.200}")
    payload = {"config": {"layers": layers, "seed": seed, "tolerance": TOLERANCE},
               "totals": total, "results": results}
    paths = dict(write_results(NAME, payload, rows, COLUMNS, out_dir=args.out_dir))
    paths["png"] = save_plot(plot(results), NAME, out_dir=args.out_dir)
    writer = tensorboard_writer(NAME, args.runs_dir, fresh=True)
    try:
        writer.add_text("zoo", "\n".join(f"{r['model']}: {table_row(r)}" for r in results))
        for key in ("exact_trial_fraction", "exact_layer_fraction"):
            if total[key] is not None:
                writer.add_scalar(f"zoo/{key}", total[key], 0)
    finally:
        writer.close()
    return {"rows": rows, "totals": total, "results": results, "paths": paths}
