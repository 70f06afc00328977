"""Generation with a preallocated KV cache: `attention_with_kvcache`
(FlashAttention's flash_attn_with_kvcache, without paging yet).

The new keys and values are written into the cache in place at each
sequence's current length (no copy of the cache, unlike a cache grown by
concatenation), then the new queries attend to the cache's valid prefix.
Query i of sequence b sits at position cache_seqlens[b] + i: causal and
windows are aligned bottom-right per sequence. The attention is the packed
varlen op on views of the cache (cu_seq_k = b * S_max, seqused_k = the
valid lengths), so sequences of different lengths share one call.
"""
from __future__ import annotations

import numbers

import torch

from . import ops
from ._args import attention_args
from .errors import ArgumentError, ArgumentTypeError
from .functional import _last_dim_contiguous

__all__ = ["attention_with_kvcache"]

FN = "selfattn.attention_with_kvcache"


def _seqlens(cache_seqlens, B, device):
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        return torch.full((B,), int(cache_seqlens), dtype=torch.int64, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (
            torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
        raise ArgumentTypeError(f"{FN}: cache_seqlens must be an int or an int32/int64 tensor "
                                f"of shape ({B},), got {cache_seqlens!r}")
    if cache_seqlens.device != device:
        raise ArgumentError(f"{FN}: cache_seqlens is on {cache_seqlens.device}, but q is on "
                            f"{device}")
    return cache_seqlens.to(torch.int64)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                           block_table=None, causal=True, window=None, scale=None,
                           return_lse=False):
    """Appends k, v to the cache in place, then attends q to the cache.

    Args:
        q: (B, n, Hq, D) new queries.
        k_cache, v_cache: (B, S_max, Hkv, D) and (B, S_max, Hkv, Dv), each
            contiguous in its first two dims (a preallocated cache).
        k, v: (B, n_new, Hkv, D|Dv) new keys and values, or None (attend only).
            Written at positions cache_seqlens[b] .. cache_seqlens[b] + n_new - 1.
        cache_seqlens: int or (B,) int: the cache's valid length per sequence
            before this call (not updated: the caller adds n_new).
        block_table: a paged cache; not supported yet (raises).
        causal, window, scale: as selfattn.attention, bottom-right aligned:
            query i of sequence b is position cache_seqlens[b] + n_new - n + i.

    Returns:
        out (B, n, Hq, Dv) [, lse (B, Hq, n)]. Inference only: refuses inputs
        that require grad while grad mode is on.
    """
    if block_table is not None:
        raise ArgumentError(f"{FN}: block_table (a paged KV cache) is not supported yet")
    a = attention_args(FN, q, k_cache, v_cache, causal, "bottom_right", window, scale, None,
                       None, 0.0, ("q", "k_cache", "v_cache"))
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise ArgumentError(f"{FN}: inference only; call it under torch.no_grad() or "
                            "torch.inference_mode()")
    B, n, Hq, D = q.shape
    _, S_max, Hkv, Dv = v_cache.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(0) != S_max * t.stride(1) and B > 1:
            raise ArgumentError(f"{FN}: {name} must be contiguous in its first two dims "
                                f"(B, S_max), got strides {t.stride()}")
    seqlens = _seqlens(cache_seqlens, B, q.device)
    n_new = 0
    if (k is None) != (v is None):
        raise ArgumentError(f"{FN}: pass both k and v, or neither")
    if k is not None:
        attention_args(FN, q, k, v, False, "bottom_right", None, scale, None, None, 0.0,
                       ("q", "k", "v"))
        n_new = k.shape[1]
        if k.shape[0] != B or k.shape[2:] != k_cache.shape[2:] or v.shape[2:] != v_cache.shape[2:]:
            raise ArgumentError(f"{FN}: k and v must be (B, n_new, Hkv, D|Dv) like the caches, "
                                f"got {tuple(k.shape)} and {tuple(v.shape)}")
    total = seqlens + n_new
    if B and (int(seqlens.min()) < 0 or int(total.max()) > S_max):
        raise ArgumentError(f"{FN}: cache_seqlens + n_new must lie in [0, S_max = {S_max}], "
                            f"got cache_seqlens {seqlens.tolist()} and n_new {n_new}")
    if n_new:
        rows = torch.arange(B, device=q.device).unsqueeze(1)
        positions = seqlens.unsqueeze(1) + torch.arange(n_new, device=q.device)
        k_cache[rows, positions] = k  # in place: one write of the new rows
        v_cache[rows, positions] = v
    cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int64) * n
    cu_k = torch.arange(B + 1, device=q.device, dtype=torch.int64) * S_max
    out, lse = ops.varlen_forward_op(
        _last_dim_contiguous(q).reshape(B * n, Hq, D),
        _last_dim_contiguous(k_cache).view(B * S_max, Hkv, D),
        _last_dim_contiguous(v_cache).view(B * S_max, Hkv, Dv),
        cu_q, cu_k, total, None, a.scale, a.window_left, a.window_right, 0.0)
    out = out.view(B, n, Hq, Dv)
    if return_lse:
        return out, lse.view(Hq, B, n).transpose(0, 1)
    return out
