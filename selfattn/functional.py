"""Public fused functions: `attention` ((B, S, H, D) layout, every option),
`scaled_dot_product_attention` (torch's signature and (B, H, S, D) layout) and
`attention_weights`. Each checks its arguments (selfattn/_args.py), brings the
tensors to what the ops take (last dim contiguous, int64 key_lengths, a float
mask in q's dtype, a (seed, offset) rng_state for dropout) and calls the ops.

`fused_forward` and `fused_probs` are the TorchScript-compatible calls of the
ops that the functions here and the nn layers share (scripted layers keep the
fused ops in their graphs). Inside torch.nn.attention.sdpa_kernel(
SDPBackend.MATH) the torch drop-ins (`scaled_dot_product_attention`, the nn
layers) run selfattn.reference's math instead, as torch's do (`math_only`).
Inside torch.autocast the floating-point inputs are cast to the autocast dtype
before the checks, as torch's dispatcher casts SDPA's (the ops' autocast
kernels then have nothing left to cast).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference
from ._args import attention_args, call_op, sdpa_to_attention
from .errors import ArgumentError, ArgumentTypeError
from .ops import forward_op, transformable

__all__ = ["attention", "scaled_dot_product_attention", "attention_weights"]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rng_state(dropout_p: float, device: torch.device,
              generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """(seed, offset) drawn from `generator` (or torch's default one on `device`)."""
    if dropout_p == 0.0:
        return None
    gen_device = device
    if not torch.jit.is_scripting():
        if generator is not None:
            gen_device = generator.device
    # seed and offset below 2**62 (a literal: TorchScript reads no globals)
    state = torch.randint(0, 4611686018427387904, [2], dtype=torch.int64, device=gen_device,
                          generator=generator)
    return state.to(device)


def fused_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                  key_lengths: Optional[Tensor], rng: Optional[Tensor], scale: float,
                  window_left: int, window_right: int, diag_offset: int, dropout_p: float,
                  alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
                  q_start: int = 0, k_start: int = 0) -> Tuple[Tensor, Tensor]:
    """The forward op on checked arguments: (out, lse). diag_offset is Sk - Sq
    for bottom-right alignment, 0 for top-left (AttnArgs.diag_offset)."""
    if not torch.jit.is_scripting():  # torch.func transforms take a Function (ops.py)
        return transformable(forward_op)(
            _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), attn_mask,
            key_lengths, rng, scale, window_left, window_right, diag_offset, dropout_p,
            alibi_slopes, softcap, q_start, k_start)
    return torch.ops.selfattn.attention_forward(
        _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), attn_mask,
        key_lengths, rng, scale, window_left, window_right, diag_offset, dropout_p,
        alibi_slopes, softcap, q_start, k_start)


def fused_probs(q: Tensor, k: Tensor, lse: Optional[Tensor], attn_mask: Optional[Tensor],
                key_lengths: Optional[Tensor], rng: Optional[Tensor], scale: float,
                window_left: int, window_right: int, diag_offset: int, dropout_p: float,
                alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
                q_start: int = 0, k_start: int = 0) -> Tensor:
    """The probabilities op on checked arguments (no gradient)."""
    if attn_mask is not None:
        attn_mask = attn_mask.detach()
    if lse is not None:
        lse = lse.detach().contiguous()
    return torch.ops.selfattn.attention_probs(
        _last_dim_contiguous(q.detach()), _last_dim_contiguous(k.detach()), lse, attn_mask,
        key_lengths, rng, scale, window_left, window_right, diag_offset, dropout_p,
        alibi_slopes, softcap, q_start, k_start)


def math_only() -> bool:
    """Whether torch's SDPA backend choice is the math backend alone
    (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)). Not read under
    torch.compile, where the fused path always runs."""
    if torch.compiler.is_compiling():
        return False
    b = torch.backends.cuda
    return b.math_sdp_enabled() and not (
        b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled() or b.cudnn_sdp_enabled())


def _autocast(*tensors):
    """The tensors as the ops' autocast kernels would see them: inside
    torch.autocast for their device, floating-point ones (float64 excepted) in
    the autocast dtype. Non-tensors pass unchanged (the checks refuse them)."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def _attention(fn, names, q, k, v, causal, causal_alignment, window, scale, attn_mask,
               key_lengths, dropout_p, generator, alibi_slopes=None, softcap=0.0):
    """`attention` for the public functions: errors name `fn` and q, k, v as `names`."""
    q, k, v, attn_mask = _autocast(q, k, v, attn_mask)
    a = attention_args(fn, q, k, v, causal, causal_alignment, window, scale, attn_mask,
                       key_lengths, dropout_p, names, alibi_slopes, softcap)
    rng = rng_state(a.dropout_p, q.device, generator)
    return call_op(fn, fused_forward, q, k, v, a.attn_mask, a.key_lengths, rng, a.scale,
                   a.window_left, a.window_right, a.diag_offset, a.dropout_p, a.alibi_slopes,
                   a.softcap, checks=("key_lengths must lie",))


def attention(q, k, v, *, causal=False, causal_alignment="bottom_right", window=None,
              scale=None, attn_mask=None, key_lengths=None, dropout_p=0.0, generator=None,
              return_lse=False, alibi_slopes=None, softcap=0.0):
    """Fused multi-head attention.

    Args:
        q: (B, Sq, Hq, D) queries. k: (B, Sk, Hkv, D) keys. v: (B, Sk, Hkv, Dv)
            values. Any strides with a contiguous last dim are read in place;
            Hq must be a multiple of Hkv (GQA/MQA: query head h reads kv head
            h // (Hq // Hkv)). float32, float64, bfloat16 or float16.
        causal: key j is visible to query i only when j <= i + offset.
        causal_alignment: "bottom_right" (offset = Sk - Sq, FlashAttention's
            convention, right for KV caches) or "top_left" (offset = 0, torch's
            is_causal).
        window: (left, right) sliding window: i + offset - left <= j <=
            i + offset + right; None or -1 means unbounded on that side.
        scale: multiplies q·k; default 1 / sqrt(D).
        attn_mask: bool (True = takes part) or float (added to the scaled
            scores), broadcastable to (B, Hq, Sq, Sk); read in place. A float
            mask that requires grad receives its gradient. torch's CausalBias
            (causal_upper_left / causal_lower_right) means causal=True with
            its alignment (which overrides causal_alignment).
        key_lengths: (B,) int; keys at positions >= key_lengths[b] are padding.
        dropout_p: dropout on the probabilities, drawn from `generator` (or
            torch's default generator); the backward regenerates the same mask.
        return_lse: also return the logsumexp (B, Hq, Sq), float32 (float64
            for float64 inputs), -inf for rows that see no key.
        alibi_slopes: float32 (Hq,) or (B, Hq) ALiBi slopes: the bias
            -slope * |i + offset - j| is added to the scaled score of query i
            and key j (offset as for the causal alignment). No gradient.
        softcap: logit soft-capping: the scaled score s becomes
            softcap * tanh(s / softcap) before the ALiBi bias and attn_mask are
            added (FlashAttention's order); 0.0 = off.

    Returns:
        out (B, Sq, Hq, Dv) in q's dtype; rows that see no key are 0.
    """
    out, lse = _attention("selfattn.attention", ("q", "k", "v"), q, k, v, causal,
                          causal_alignment, window, scale, attn_mask, key_lengths, dropout_p,
                          generator, alibi_slopes, softcap)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    query (N, ..., Hq, L, D), key (N, ..., Hkv, S, D), value (N, ..., Hkv, S, Dv)
    -> (N, ..., Hq, L, Dv). Same semantics as torch: is_causal is top-left
    aligned, a bool attn_mask is True where the key takes part, a float one is
    added, enable_gqa allows Hq a multiple of Hkv; torch's CausalBias masks
    (torch.nn.attention.bias.causal_upper_left / causal_lower_right) run as the
    kernel's causal flag with their alignment. A query row that sees no key
    returns 0. Inside torch.nn.attention.sdpa_kernel(SDPBackend.MATH) it runs
    selfattn.reference's math instead of the fused kernel. Jagged nested
    tensors (B, H, j, D) (torch.nested, layout=torch.jagged) run the packed
    varlen kernels (selfattn.varlen_attention), forward and backward.
    """
    fn = "selfattn.scaled_dot_product_attention"
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
        return _jagged_sdpa(fn, query, key, value, attn_mask, dropout_p, is_causal, scale,
                            enable_gqa)
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    if math_only():
        return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                      is_causal, scale, enable_gqa)
    q, k, v, kw, unflatten = sdpa_to_attention(fn, query, key, value, attn_mask, dropout_p,
                                               is_causal, scale, enable_gqa)
    out, _ = _attention(fn, ("query", "key", "value"), q, k, v, kw["causal"],
                        kw["causal_alignment"], None, kw["scale"], kw["attn_mask"], None,
                        kw["dropout_p"], None)
    return unflatten(out)


def _jagged_sdpa(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """SDPA on jagged nested tensors (B, H, j, D) (torch.nested, layout=torch.jagged, the
    sequence dim ragged): the packed values and offsets go to varlen_attention."""
    from .varlen import varlen_attention

    packed = []
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not (isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged
                and t.dim() == 4 and t._ragged_idx == 2):
            raise ArgumentTypeError(
                f"{fn}: with nested tensors, query, key and value must all be jagged "
                f"(layout=torch.jagged) of shape (B, H, j, D) with the sequence dim ragged; "
                f"{name} is not")
        bshd = t.transpose(1, 2)  # (B, j, H, D): values (T, H, D), offsets (B + 1,)
        packed.append((bshd.values(), bshd.offsets()))
    if attn_mask is not None:
        raise ArgumentError(f"{fn}: attn_mask is not supported with nested tensors (as in torch)")
    (q, cu_q), (k, cu_k), (v, cu_v) = packed
    if cu_v is not cu_k and not torch.equal(cu_v, cu_k):
        raise ArgumentError(f"{fn}: key and value must have the same sequence lengths")
    same = cu_k is cu_q or torch.equal(cu_k, cu_q)
    if is_causal and not same:
        raise ArgumentError(
            f"{fn}: is_causal with query and key lengths that differ per sequence is not "
            "supported with nested tensors (torch aligns it top-left, selfattn's packed "
            "kernels bottom-right)")
    lengths_q, lengths_k = cu_q.diff(), cu_k.diff()
    out = varlen_attention(q, k, v, cu_q, cu_k, int(lengths_q.max()) if len(lengths_q) else 0,
                           int(lengths_k.max()) if len(lengths_k) else 0, scale=scale,
                           window_size=(-1, 0) if is_causal else (-1, -1),
                           enable_gqa=enable_gqa, dropout_p=dropout_p)
    return torch.nested.nested_tensor_from_jagged(out, cu_q).transpose(1, 2)


def attention_weights(q, k, *, causal=False, causal_alignment="bottom_right", window=None,
                      scale=None, attn_mask=None, key_lengths=None, dropout_p=0.0,
                      generator=None, lse=None, alibi_slopes=None, softcap=0.0):
    """Attention probabilities (B, Hq, Sq, Sk) for q (B, Sq, Hq, D) and
    k (B, Sk, Hkv, D), with the masking and score arguments of `attention`
    (alibi_slopes, softcap included).

    Computed by their own op from the logsumexp: pass `lse` from
    `attention(..., return_lse=True)` to reuse it, else it is recomputed. With
    dropout_p > 0 the probabilities are the dropped-out ones (kept entries
    scaled by 1 / (1 - p)); a generator in the state the forward used gives the
    forward's mask. Rows that see no key are 0. The result does not carry
    gradients (it is for need_weights and for inspection).
    """
    fn = "selfattn.attention_weights"
    q, k, attn_mask = _autocast(q, k, attn_mask)
    a = attention_args(fn, q, k, k, causal, causal_alignment, window, scale, attn_mask,
                       key_lengths, dropout_p, alibi_slopes=alibi_slopes, softcap=softcap)
    if lse is not None:
        expected = (q.shape[0], q.shape[2], q.shape[1])
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != expected \
                or lse.dtype != a.lse_dtype:
            raise ArgumentError(
                f"{fn}: lse must be a {a.lse_dtype} tensor of shape (B, Hq, Sq) = {expected}")
    rng = rng_state(a.dropout_p, q.device, generator)
    return call_op(fn, fused_probs, q, k, lse, a.attn_mask, a.key_lengths, rng, a.scale,
                   a.window_left, a.window_right, a.diag_offset, a.dropout_p, a.alibi_slopes,
                   a.softcap, checks=("key_lengths must lie",))
