"""Traceable forwards of ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``.

Their ``forward`` first decides whether to take a fused fast path (inference only, checks on
tensor values that ``torch.fx`` cannot trace), then computes the same function with their
submodules. The tracer calls these instead: the submodules' own path, written out, so that the
graph holds ``norm1``, ``self_attn``, ``linear1``, ... and every one of them can grow.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def encoder_layer_forward(
    m: nn.TransformerEncoderLayer,
    src: Any,
    src_mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool = False,
) -> Any:
    """``nn.TransformerEncoderLayer.forward`` without its fast path (same function)."""
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def encoder_forward(
    m: nn.TransformerEncoder,
    src: Any,
    mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool | None = None,
) -> Any:
    """``nn.TransformerEncoder.forward`` without its fast path. A causal ``mask`` is applied as
    given (``is_causal`` is only a hint to the attention kernels, not a change of function)."""
    output = src
    for mod in m.layers:
        output = mod(
            output,
            src_mask=mask,
            is_causal=is_causal if isinstance(is_causal, bool) else False,
            src_key_padding_mask=src_key_padding_mask,
        )
    if m.norm is not None:
        output = m.norm(output)
    return output


#: Module types traced through one of these forwards instead of their own.
TRACED_FORWARDS = {
    nn.TransformerEncoderLayer: encoder_layer_forward,
    nn.TransformerEncoder: encoder_forward,
}
