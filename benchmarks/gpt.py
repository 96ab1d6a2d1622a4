"""A small GPT-style byte-level language model and its offline corpus.

The model is written so that ``torch.fx`` traces it into plain layers: token and positional
embeddings, pre-norm blocks with explicit ``q``/``k``/``v`` projections, causal
``F.scaled_dot_product_attention`` and an output projection, a GELU feed-forward network, a final
``LayerNorm`` and an untied output head. The corpus is the bytes of the Python standard library's
own source files: every machine with Python has it, no download needed.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Byte-level vocabulary: every byte value is a token.
VOCAB = 256


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT`."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    context: int = 64
    vocab: int = VOCAB


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def _heads(self, x: Tensor) -> Tensor:
        """``(batch, time, heads * head_dim)`` -> ``(batch, heads, time, head_dim)``."""
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).flatten(-2))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT: ``(batch, time)`` int64 tokens -> ``(batch, time, vocab)`` logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.tok = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.Sequential(
            *[Block(c.d_model, c.n_heads, c.d_ff) for _ in range(c.n_layers)]
        )
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab)
        self.apply(_init)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        return self.head(self.ln_f(self.blocks(x)))


def _init(m: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-byte cross-entropy (nats): logits at ``t`` predict ``tokens[t + 1]``."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


# --- corpus ------------------------------------------------------------------------------------
def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files (``site-packages`` excluded), sorted by path."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    return sorted(p for p in base.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def stdlib_corpus(max_bytes: int, val_fraction: float = 0.1,
                  root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """``(train, val)`` uint8 byte tensors from the standard library's sources.

    Files are read in sorted path order and concatenated until ``max_bytes``; the last
    ``val_fraction`` of the bytes is the validation split (other files than training's, mostly),
    so the split is the same on every run of the same Python.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    chunks, size = [], 0
    for path in stdlib_files(root):
        data = path.read_bytes()
        chunks.append(data[: max_bytes - size])
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    if size < 1024:
        raise FileNotFoundError(f"too little Python source under {root or 'the stdlib'}: {size} B")
    corpus = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    cut = int(len(corpus) * (1.0 - val_fraction))
    return corpus[:cut].clone(), corpus[cut:].clone()


def batches(data: Tensor, context: int, batch_size: int, steps: int,
            generator: torch.Generator) -> Tensor:
    """``(steps, batch_size, context)`` int64 windows at random offsets (drawn by ``generator``)."""
    starts = torch.randint(0, len(data) - context, (steps, batch_size), generator=generator)
    return data[starts.unsqueeze(-1) + torch.arange(context)].long()


def val_windows(data: Tensor, context: int, count: int) -> Tensor:
    """``(count, context)`` int64 windows evenly spaced over ``data`` (fixed evaluation set)."""
    starts = torch.linspace(0, len(data) - context - 1, count).long()
    return data[starts.unsqueeze(-1) + torch.arange(context)].long()


# --- cost ---------------------------------------------------------------------------------------
def flops_per_token(model: nn.Module, context: int) -> float:
    """Forward + backward FLOPs per token: ``6 x`` weight-matrix parameters (embeddings
    excluded, they are lookups) plus attention's ``6 x 2 x context x d`` per layer (scores and
    weighted sum; the causal half is not subtracted, as in Kaplan et al. 2020)."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = sum(2 * context * b.q.out_features for b in model.modules()
                    if isinstance(b, Block))
    return 6.0 * matmul + 6.0 * attention
