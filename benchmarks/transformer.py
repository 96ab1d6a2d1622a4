"""``python -m net2grow.benchmarks transformer``: a GPT grown mid-training vs. the large one.

A small byte-level GPT (:mod:`benchmarks.gpt`) is trained on the Python standard library's
source files; part way through it is grown, function preserved, towards the large model's
shape (FFN width, depth, and hidden size / heads where the engine grows them) and trained on.
The large model is trained from scratch on the same token batches. Reported per seed: the
relative change of the validation loss at each growth operation, and the training FLOPs (and
seconds) the grown model needs to reach the large model's final validation loss.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..growth import GrowableNetwork, GrowthError
from ..growth.deepen import KINDS
from ._report import (
    fmt_mean_std,
    format_table,
    mean_std,
    save_plot,
    tensorboard_writer,
    write_results,
)
from .gpt import GPT, GPTConfig, batches, flops_per_token, lm_loss, stdlib_corpus, val_windows

NAME = "transformer"

#: Settings of the default run and of ``--quick``.
FULL = dict(seeds=3, steps=600, batch_size=32, eval_every=25, corpus_bytes=4_000_000,
            val_windows=64)
QUICK = dict(seeds=1, steps=30, batch_size=8, eval_every=10, corpus_bytes=300_000,
             val_windows=16)

COLUMNS = ["model", "params", "final val loss", "train GFLOPs", "seconds",
           "max rel. loss change at growth", "GFLOPs to reach large", "% of large's FLOPs",
           "seconds to reach large"]


@dataclass
class Config:
    """Resolved settings of one benchmark run."""

    seeds: list[int]
    steps: int
    batch_size: int
    eval_every: int
    corpus_bytes: int
    val_windows: int
    grow_at: float
    ffn_init: str
    heads_init: str
    lr: float
    warmup: int
    small: GPTConfig
    large: GPTConfig
    threads: int
    device: str
    out_dir: str
    runs_dir: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's options (the common ones come from ``benchmarks.__main__``)."""
    g = parser.add_argument_group("transformer")
    g.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help=f"random seeds (default: 0 to {FULL['seeds'] - 1}; quick: 0)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"training steps of each model (default {FULL['steps']}, "
                        f"quick {QUICK['steps']})")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per step (default {FULL['batch_size']}, "
                        f"quick {QUICK['batch_size']})")
    g.add_argument("--eval-every", type=int, default=None,
                   help=f"validation every k steps (default {FULL['eval_every']}, "
                        f"quick {QUICK['eval_every']})")
    g.add_argument("--corpus-bytes", type=int, default=None,
                   help=f"bytes of stdlib source used (default {FULL['corpus_bytes']:,})")
    g.add_argument("--grow-at", type=float, default=0.25,
                   help="growth after this fraction of the steps (default %(default)s)")
    g.add_argument("--ffn-init", choices=("net2net", "vt"), default="vt",
                   help="init of the new FFN units: copies, or Variance Transfer's paired units "
                        "(default %(default)s)")
    g.add_argument("--heads-init", choices=("net2net", "zero"), default="zero",
                   help="init of the new attention heads: copies, or random with zero output "
                        "columns (default %(default)s)")
    g.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (%(default)s)")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps (default: 5%% of the steps)")
    g.add_argument("--context", type=int, default=64, help="bytes per sequence (%(default)s)")
    g.add_argument("--heads", type=int, nargs=2, default=[4, 8], metavar=("SMALL", "LARGE"),
                   help="attention heads of the small and the large model (default %(default)s)")
    g.add_argument("--d-model", type=int, nargs=2, default=[32, 64], metavar=("SMALL", "LARGE"),
                   help="hidden size of the small and the large model (default %(default)s)")
    g.add_argument("--layers", type=int, nargs=2, default=[2, 4], metavar=("SMALL", "LARGE"),
                   help="blocks of the small and the large model (default %(default)s)")
    g.add_argument("--d-ff", type=int, nargs=2, default=[64, 256], metavar=("SMALL", "LARGE"),
                   help="FFN width of the small and the large model (default %(default)s)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is steadiest on shared cores)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve defaults (``--quick`` or full) into a :class:`Config`."""
    base = QUICK if args.quick else FULL

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return base[name] if value is None else value

    seeds = args.seeds if args.seeds is not None else list(range(base["seeds"]))
    steps = pick("steps")
    warmup = args.warmup if args.warmup is not None else max(1, steps // 20)
    if not 0.0 < args.grow_at < 1.0:
        raise SystemExit(f"--grow-at must be in (0, 1), got {args.grow_at}")
    small = GPTConfig(args.d_model[0], args.layers[0], args.heads[0], args.d_ff[0], args.context)
    large = GPTConfig(args.d_model[1], args.layers[1], args.heads[1], args.d_ff[1], args.context)
    if any(getattr(large, f) < getattr(small, f)
           for f in ("d_model", "n_layers", "d_ff", "n_heads")):
        raise SystemExit("the large model must be at least the small one in every size")
    return Config(seeds=list(seeds), steps=steps, batch_size=pick("batch_size"),
                  eval_every=pick("eval_every"), corpus_bytes=pick("corpus_bytes"),
                  val_windows=base["val_windows"], grow_at=args.grow_at,
                  ffn_init=args.ffn_init, heads_init=args.heads_init, lr=args.lr,
                  warmup=warmup, small=small, large=large, threads=args.threads,
                  device=args.device, out_dir=args.out_dir, runs_dir=args.runs_dir)


# --- training ------------------------------------------------------------------------------------
def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to 10% at the last step (the same for both models)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def val_loss(model: nn.Module, windows: Tensor) -> float:
    """Mean next-byte loss (nats) of ``model`` on ``windows``, in eval mode (mode restored)."""
    was = model.training
    model.eval()
    try:
        return float(lm_loss(model(windows), windows))
    finally:
        model.train(was)


def growth_operations(
    small: GPTConfig, large: GPTConfig, ffn_init: str = "vt", heads_init: str = "zero"
) -> list[tuple[str, str, dict]]:
    """``(method, layer, kwargs)`` growth calls that turn ``small`` into ``large``'s shape.

    FFN width, hidden size (``widen("tok")``: the residual stream, an integer multiple of the
    small width, since LayerNorm normalises over it) and heads (``widen_heads`` on each block's
    ``q``; ``k`` and ``v`` follow) first, then depth, so that new blocks copy grown blocks.
    Depth uses ``kind="block"`` (an identity transformer block) where the engine has it, else a
    zero residual MLP after each block's FFN (``kind="residual"``). ``ffn_init`` and
    ``heads_init`` are the ``init=`` of the FFN and heads growths (the hidden size, normalised
    by LayerNorm, grows by copies only).
    """
    ops: list[tuple[str, str, dict]] = []
    if large.d_ff > small.d_ff:
        ops += [("widen", f"blocks.{i}.fc1", {"width": large.d_ff, "init": ffn_init})
                for i in range(small.n_layers)]
    if large.d_model > small.d_model:
        ops.append(("widen", "tok", {"width": large.d_model}))
    if large.n_heads > small.n_heads:
        ops += [("widen_heads", f"blocks.{i}.q", {"heads": large.n_heads, "init": heads_init})
                for i in range(small.n_layers)]
    extra = large.n_layers - small.n_layers
    if "block" in KINDS:
        ops += [("deepen", f"blocks.{small.n_layers - 1}", {"kind": "block"})] * extra
    else:
        ops += [("deepen", f"blocks.{i % small.n_layers}.fc2", {"kind": "residual"})
                for i in range(extra)]
    return ops


def grow(net: GrowableNetwork, ops: list[tuple[str, str, dict]], optimizer: torch.optim.Optimizer,
         windows: Tensor, generator: torch.Generator) -> list[dict[str, Any]]:
    """Apply ``ops`` to ``net`` (optimizer state carried), measuring the validation loss before
    and after each; a refused operation (``GrowthError``) is recorded and skipped."""
    events = []
    for method, layer, kwargs in ops:
        before = val_loss(net, windows)
        event: dict[str, Any] = {"op": method, "layer": layer, **kwargs}
        start = time.perf_counter()
        try:
            fn = getattr(net, method, None)
            if fn is None:
                raise GrowthError(f"this engine has no GrowableNetwork.{method}")
            extra = {"generator": generator} if method == "widen" else {}
            rec = fn(layer, **kwargs, optimizer=optimizer, **extra)
        except GrowthError as exc:
            event.update(status="refused", message=str(exc))
            events.append(event)
            continue
        after = val_loss(net, windows)
        event.update(status="grown", loss_before=before, loss_after=after,
                     rel_loss_change=abs(after - before) / abs(before),
                     max_abs_error=rec.max_abs_error, seconds=time.perf_counter() - start,
                     params_after=net.num_parameters())
        events.append(event)
    return events


def train(model: nn.Module, data: Tensor, windows: Tensor, cfg: Config, seed: int,
          grow_step: int | None = None, writer: Any = None) -> dict[str, Any]:
    """Train ``model`` for ``cfg.steps`` Adam steps on ``seed``'s batches; grow at
    ``grow_step`` (a :class:`GrowableNetwork` then). Returns curves and growth events."""
    gen = torch.Generator().manual_seed(seed)
    grow_gen = torch.Generator().manual_seed(10_000 + seed)
    tokens_per_step = cfg.batch_size * cfg.small.context
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve: list[dict[str, float]] = []
    flops, seconds, events = 0.0, 0.0, []
    per_token = flops_per_token(model, cfg.small.context)

    def record(step: int) -> None:
        point = {"step": step, "flops": flops, "seconds": seconds,
                 "val_loss": val_loss(model, windows)}
        curve.append(point)
        if writer is not None:
            writer.add_scalar("val_loss", point["val_loss"], step)
            writer.add_scalar("val_loss_vs_mflops", point["val_loss"], int(flops / 1e6))
            writer.add_scalar("gflops", flops / 1e9, step)

    model.train()
    record(0)
    for step in range(cfg.steps):
        if step == grow_step:
            start = time.perf_counter()
            ops = growth_operations(cfg.small, cfg.large, cfg.ffn_init, cfg.heads_init)
            events = grow(model, ops, opt, windows, grow_gen)
            seconds += time.perf_counter() - start
            per_token = flops_per_token(model, cfg.small.context)
            if writer is not None:
                writer.add_text("growth", "\n".join(f"{e['op']} {e['layer']}: {e['status']}"
                                                    for e in events), step)
        batch = batches(data, cfg.small.context, cfg.batch_size, 1, gen)[0].to(cfg.device)
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        loss = lm_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
        flops += per_token * tokens_per_step
        if writer is not None:
            writer.add_scalar("train_loss", loss.item(), step + 1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record(step + 1)
    return {"curve": curve, "events": events, "params": sum(p.numel() for p in
                                                            model.parameters())}


def reach(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first evaluation point of ``curve`` at or below ``target`` (None: never)."""
    return next((p for p in curve if p["val_loss"] <= target), None)


def run_seed(seed: int, train_data: Tensor, windows: Tensor, cfg: Config) -> dict[str, Any]:
    """Both models on one seed: the large one from scratch, the small one grown."""
    runs = {}
    for key in ("large", "grown"):
        torch.manual_seed(seed)
        writer = tensorboard_writer(f"{NAME}/{key}/seed{seed}", cfg.runs_dir, fresh=True)
        try:
            if key == "large":
                model: nn.Module = GPT(cfg.large).to(cfg.device)
                runs[key] = train(model, train_data, windows, cfg, seed, writer=writer)
            else:
                net = GrowableNetwork(GPT(cfg.small).to(cfg.device), windows[:8])
                grow_step = max(1, round(cfg.grow_at * cfg.steps))
                runs[key] = train(net, train_data, windows, cfg, seed, grow_step, writer)
                runs[key]["summary"] = net.summary()
        finally:
            writer.close()
    target = runs["large"]["curve"][-1]["val_loss"]
    hit = reach(runs["grown"]["curve"], target)
    large_flops = runs["large"]["curve"][-1]["flops"]
    grown = [e for e in runs["grown"]["events"] if e["status"] == "grown"]
    return {
        "seed": seed,
        "runs": runs,
        "target_loss": target,
        "max_rel_loss_change": max((e["rel_loss_change"] for e in grown), default=None),
        "reach_flops": None if hit is None else hit["flops"],
        "reach_seconds": None if hit is None else hit["seconds"],
        "reach_fraction": None if hit is None else hit["flops"] / large_flops,
    }


# --- report --------------------------------------------------------------------------------------
def _stat(values: list[float | None], scale: float = 1.0, digits: int = 3) -> str | None:
    present = [v * scale for v in values if v is not None]
    if not present:
        return None
    text = fmt_mean_std(present, digits)
    missing = len(values) - len(present)
    return text + (f" ({missing} of {len(values)} never)" if missing else "")


def table_rows(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: mean ± std over seeds."""
    rows = []
    for key, label in (("large", "large, from scratch"), ("grown", "small, grown")):
        runs = [s["runs"][key] for s in per_seed]
        row: dict[str, Any] = {
            "model": label,
            "params": runs[0]["params"],
            "final val loss": _stat([r["curve"][-1]["val_loss"] for r in runs], digits=4),
            "train GFLOPs": _stat([r["curve"][-1]["flops"] for r in runs], 1e-9),
            "seconds": _stat([r["curve"][-1]["seconds"] for r in runs], digits=1),
        }
        if key == "grown":
            row["max rel. loss change at growth"] = max(
                (s["max_rel_loss_change"] for s in per_seed if s["max_rel_loss_change"]
                 is not None), default=None)
            row["GFLOPs to reach large"] = _stat([s["reach_flops"] for s in per_seed], 1e-9)
            row["% of large's FLOPs"] = _stat([s["reach_fraction"] for s in per_seed], 100.0, 1)
            row["seconds to reach large"] = _stat([s["reach_seconds"] for s in per_seed],
                                                  digits=1)
        rows.append(row)
    return rows


def plot(per_seed: list[dict[str, Any]], cfg: Config) -> Any:
    """Validation loss against training FLOPs (left) and seconds (right), every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"large": "tab:blue", "grown": "tab:orange"}
    labels = {"large": "large, from scratch", "grown": "small, grown"}
    for ax, x_key, x_label, scale in ((axes[0], "flops", "training GFLOPs", 1e-9),
                                      (axes[1], "seconds", "training seconds", 1.0)):
        for i, s in enumerate(per_seed):
            for key in ("large", "grown"):
                curve = s["runs"][key]["curve"]
                ax.plot([p[x_key] * scale for p in curve], [p["val_loss"] for p in curve],
                        color=colors[key], alpha=0.8, lw=1.2, label=labels[key] if i == 0 else None)
            ax.axhline(s["target_loss"], color="gray", lw=0.6, ls=":")
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.legend()
    fig.suptitle(f"byte-level GPT on stdlib sources: grown at {cfg.grow_at:.0%} of "
                 f"{cfg.steps} steps vs. large from scratch ({len(per_seed)} seeds)")
    return fig


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; print the table, write JSON/Markdown/PNG and TensorBoard runs."""
    cfg = config_from_args(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        train_data, val_data = stdlib_corpus(cfg.corpus_bytes)
        windows = val_windows(val_data, cfg.small.context, cfg.val_windows).to(cfg.device)
        per_seed = []
        for seed in cfg.seeds:
            per_seed.append(run_seed(seed, train_data, windows, cfg))
            s = per_seed[-1]
            frac = s["reach_fraction"]
            print(f"seed {seed}: large {s['target_loss']:.4f}, grown "
                  f"{s['runs']['grown']['curve'][-1]['val_loss']:.4f}, reaches large at "
                  f"{'never' if frac is None else f'{frac:.1%}'} of its FLOPs", flush=True)
    finally:
        torch.set_num_threads(threads)
    rows = table_rows(per_seed)
    print(format_table(rows, COLUMNS))
    events = per_seed[0]["runs"]["grown"]["events"]
    for e in events:
        what = (f"rel. loss change {e['rel_loss_change']:.2e}" if e["status"] == "grown"
                else f"refused: {e['message']}")
        print(f"  growth {e['op']} {e['layer']}: {what}")
    config = {**asdict(cfg), "small": asdict(cfg.small), "large": asdict(cfg.large),
              "optimizer": "Adam (state carried through growth)",
              "flops": "6 x Linear weights + 12 x context x d per block, per token (fwd+bwd)"}
    payload = {"config": config, "per_seed": per_seed,
               "mean_std_reach_fraction": mean_std(
                   [s["reach_fraction"] for s in per_seed if s["reach_fraction"] is not None])
               if any(s["reach_fraction"] is not None for s in per_seed) else None}
    paths = dict(write_results(NAME, payload, rows, COLUMNS, out_dir=cfg.out_dir))
    paths["png"] = save_plot(plot(per_seed, cfg), NAME, out_dir=cfg.out_dir)
    return {"rows": rows, "per_seed": per_seed, "paths": paths, "config": config}


__all__ = ["Config", "add_arguments", "config_from_args", "grow", "growth_operations", "run",
           "run_seed", "train"]
