"""Plain-PyTorch reference of selfattn's functions: the oracle of the tests.

Same signatures and semantics as `selfattn.attention`,
`selfattn.scaled_dot_product_attention` and `selfattn.attention_weights`
(DESIGN.md sections 2 and 7), computed the direct way: the full
(B, Hq, Sq, Sk) score matrix, soft-capped and with the dense ALiBi bias
written out, a softmax, a matmul. Run it in float64 for golden values.

Beyond the fused functions it accepts `dropout_mask`, a bool (B, Hq, Sq, Sk)
tensor of kept elements, so a test can feed it the mask the fused kernel drew.
"""
from __future__ import annotations


import torch

from ._args import attention_args, sdpa_to_attention

__all__ = ["attention", "scaled_dot_product_attention", "attention_weights", "visibility",
           "alibi_bias"]


def visibility(Sq, Sk, window_left, window_right, diag_offset, device=None):
    """Bool (Sq, Sk): key j visible to query i under the window (-1 = unbounded)."""
    i = torch.arange(Sq, device=device).view(-1, 1) + diag_offset
    j = torch.arange(Sk, device=device).view(1, -1)
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= j >= i - window_left
    if window_right >= 0:
        visible &= j <= i + window_right
    return visible


def alibi_bias(slopes, Sq, Sk, diag_offset, dtype):
    """Dense ALiBi bias -slope * |i + diag_offset - j|: (Hq, Sq, Sk) for (Hq,)
    slopes, (B, Hq, Sq, Sk) for (B, Hq), in `dtype`."""
    i = torch.arange(Sq, device=slopes.device).view(-1, 1) + diag_offset
    j = torch.arange(Sk, device=slopes.device).view(1, -1)
    distance = (i - j).abs().to(dtype)
    return -slopes.to(dtype)[..., None, None] * distance


def _probs(q, k, a, dropout_mask, generator, with_lse=False):
    """Probabilities (B, Hq, Sq, Sk) after soft-capping, ALiBi, masking and
    dropout, and lse (B, Hq, Sq)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * a.scale
    if a.softcap > 0:
        scores = a.softcap * torch.tanh(scores / a.softcap)
    if a.alibi_slopes is not None:
        scores = scores + alibi_bias(a.alibi_slopes, Sq, Sk, a.diag_offset, scores.dtype)
    visible = visibility(Sq, Sk, a.window_left, a.window_right, a.diag_offset, q.device)
    visible = visible.expand(B, Hq, Sq, Sk)
    if a.key_lengths is not None:
        keys = torch.arange(Sk, device=q.device)
        visible = visible & (keys < a.key_lengths.view(B, 1, 1, 1))
    if a.attn_mask is not None:
        if a.attn_mask.dtype == torch.bool:
            visible = visible & a.attn_mask
        else:
            scores = scores + a.attn_mask
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.to(a.lse_dtype), dim=-1)
    # Rows that see no key give 0 (and 0 gradients), never NaN.
    dead = (lse == float("-inf")).unsqueeze(-1)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if a.dropout_p > 0:
        if dropout_mask is None:
            keep = torch.full_like(probs, 1 - a.dropout_p)
            dropout_mask = torch.bernoulli(keep, generator=generator).bool()
        probs = probs * dropout_mask / (1 - a.dropout_p)
    return (probs, lse) if with_lse else probs


def attention(q, k, v, *, causal=False, causal_alignment="bottom_right", window=None,
              scale=None, attn_mask=None, key_lengths=None, dropout_p=0.0, generator=None,
              return_lse=False, alibi_slopes=None, softcap=0.0, dropout_mask=None):
    """Reference of `selfattn.attention`: q (B, Sq, Hq, D), k (B, Sk, Hkv, D),
    v (B, Sk, Hkv, Dv) -> (B, Sq, Hq, Dv) [, lse (B, Hq, Sq)]."""
    a = attention_args("selfattn.reference.attention", q, k, v, causal, causal_alignment,
                       window, scale, attn_mask, key_lengths, dropout_p,
                       alibi_slopes=alibi_slopes, softcap=softcap)
    probs, lse = _probs(q, k, a, dropout_mask, generator, with_lse=True)
    Hq, Hkv = q.shape[2], k.shape[2]
    vh = v.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    out = (probs.to(v.dtype) @ vh).transpose(1, 2)
    return (out, lse) if return_lse else out


def attention_weights(q, k, *, causal=False, causal_alignment="bottom_right", window=None,
                      scale=None, attn_mask=None, key_lengths=None, dropout_p=0.0,
                      generator=None, alibi_slopes=None, softcap=0.0, dropout_mask=None):
    """Reference of `selfattn.attention_weights`: -> (B, Hq, Sq, Sk)."""
    a = attention_args("selfattn.reference.attention_weights", q, k, k, causal,
                       causal_alignment, window, scale, attn_mask, key_lengths, dropout_p,
                       alibi_slopes=alibi_slopes, softcap=softcap)
    return _probs(q, k, a, dropout_mask, generator)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """Reference of `selfattn.scaled_dot_product_attention` ((B, H, S, D) layout,
    torch's semantics; rows seeing no key give 0, as torch 2.13/2.14's SDPA)."""
    q, k, v, kwargs, unflatten = sdpa_to_attention(
        "selfattn.reference.scaled_dot_product_attention", query, key, value, attn_mask,
        dropout_p, is_causal, scale, enable_gqa)
    return unflatten(attention(q, k, v, **kwargs))


