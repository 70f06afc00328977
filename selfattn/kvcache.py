"""Generation with a KV cache: `attention_with_kvcache` (FlashAttention's
flash_attn_with_kvcache), on a preallocated (B, S_max, Hkv, D) cache or a
paged pool (num_pages, page_size, Hkv, D) with a block table.

The new keys and values are written into the cache in place at each
sequence's current length (no copy of the cache, unlike a cache grown by
concatenation), then the new queries attend to the cache's valid prefix.
Query i of sequence b sits at position cache_seqlens[b] + i: causal and
windows are aligned bottom-right per sequence. The attention is the packed
varlen op, on views of a contiguous cache (cu_seq_k = b * S_max, seqused_k =
the valid lengths) or on the pool through the block table, whose pages the
kernels read in place; sequences of different lengths share one call.
"""
from __future__ import annotations

import numbers

import torch

from . import ops
from ._args import attention_args, check_block_table
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


def _check_pages(block_table, total, page_size, num_pages):
    """Before any write: each sequence's pages up to its new length exist and
    lie in the pool (a negative index would wrap to another page)."""
    B = total.shape[0]
    max_pages = block_table.shape[1]
    needed = (total + page_size - 1) // page_size
    if B and int(needed.max()) > max_pages:
        raise ArgumentError(f"{FN}: cache_seqlens + n_new = {total.tolist()} needs up to "
                            f"{int(needed.max())} pages of {page_size}, but block_table has "
                            f"{max_pages} per sequence")
    used = torch.arange(max_pages, device=total.device) < needed.unsqueeze(1)
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ArgumentError(f"{FN}: block_table[{b}, {i}] = {int(block_table[b, i])} is not a "
                            f"page of the pool ({num_pages} pages)")


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                           block_table=None, causal=True, window=None, scale=None,
                           return_lse=False):
    """Appends k, v to the cache in place, then attends q to the cache.

    Args:
        q: (B, n, Hq, D) new queries.
        k_cache, v_cache: (B, S_max, Hkv, D) and (B, S_max, Hkv, Dv), each
            contiguous in its first two dims (a preallocated cache); with a
            block_table, pools of pages (num_pages, page_size, Hkv, D|Dv).
        k, v: (B, n_new, Hkv, D|Dv) new keys and values, or None (attend only).
            Written at positions cache_seqlens[b] .. cache_seqlens[b] + n_new - 1.
        cache_seqlens: int or (B,) int: the cache's valid length per sequence
            before this call (not updated: the caller adds n_new).
        block_table: int32 (B, max_pages), a paged cache (vLLM's layout):
            position j of sequence b is row j % page_size of page
            block_table[b, j // page_size]; pages in any order, any page size.
        causal, window, scale: as selfattn.attention, bottom-right aligned:
            query i of sequence b is position cache_seqlens[b] + n_new - n + i.

    Returns:
        out (B, n, Hq, Dv) [, lse (B, Hq, n)]. Inference only: refuses inputs
        that require grad while grad mode is on.
    """
    paged = block_table is not None
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ArgumentError(f"{FN}: {name} must be a 4-D tensor, got "
                                f"{getattr(t, 'shape', t)!r}")
    k1, v1 = k_cache, v_cache
    if paged and isinstance(q, torch.Tensor) and q.dim() == 4:
        check_block_table(FN, block_table, q.shape[0], q.device, "q")
        if k_cache.shape[0] < 1 or k_cache.shape[:2] != v_cache.shape[:2]:
            raise ArgumentError(f"{FN}: k_cache and v_cache must be pools of one number (>= 1) "
                                f"of pages of one size, got {tuple(k_cache.shape)} and "
                                f"{tuple(v_cache.shape)}")
        # a pool's first key stands for a sequence of the longest length it can hold
        longest = block_table.shape[1] * k_cache.shape[1]
        k1, v1 = (t[:1, :1].expand(q.shape[0], longest, *t.shape[2:]) for t in (k_cache, v_cache))
    a = attention_args(FN, q, k1, v1, causal, "bottom_right", window, scale, None, None, 0.0,
                       ("q", "k_cache", "v_cache"))
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise ArgumentError(f"{FN}: inference only; call it under torch.no_grad() or "
                            "torch.inference_mode()")
    B, n, Hq, D = q.shape
    Hkv, Dv = v_cache.shape[2:]
    if paged:
        page_size = k_cache.shape[1]
    else:
        S_max = v_cache.shape[1]
        if k_cache.shape[0] != B:
            raise ArgumentError(f"{FN}: k_cache must have q's batch size {B}, got "
                                f"{tuple(k_cache.shape)}")
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
    if B and int(seqlens.min()) < 0:
        raise ArgumentError(f"{FN}: cache_seqlens must be >= 0, got {seqlens.tolist()}")
    if paged:
        _check_pages(block_table, total, page_size, k_cache.shape[0])
    elif B and int(total.max()) > S_max:
        raise ArgumentError(f"{FN}: cache_seqlens + n_new must lie in [0, S_max = {S_max}], "
                            f"got cache_seqlens {seqlens.tolist()} and n_new {n_new}")
    if n_new:
        rows = torch.arange(B, device=q.device).unsqueeze(1)
        positions = seqlens.unsqueeze(1) + torch.arange(n_new, device=q.device)
        if paged:  # (page, row) of each new position
            rows = block_table.long().gather(1, positions // page_size)
            positions = positions % page_size
        k_cache[rows, positions] = k  # in place: one write of the new rows
        v_cache[rows, positions] = v
    cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int64) * n
    q_packed = _last_dim_contiguous(q).reshape(B * n, Hq, D)
    if paged:
        cu_k = torch.zeros(B + 1, device=q.device, dtype=torch.int64)
        out, lse = ops.varlen_forward_op(
            q_packed, _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache), cu_q, cu_k,
            total, None, a.scale, a.window_left, a.window_right, 0.0, block_table)
    else:
        cu_k = torch.arange(B + 1, device=q.device, dtype=torch.int64) * S_max
        out, lse = ops.varlen_forward_op(
            q_packed, _last_dim_contiguous(k_cache).view(B * S_max, Hkv, D),
            _last_dim_contiguous(v_cache).view(B * S_max, Hkv, Dv),
            cu_q, cu_k, total, None, a.scale, a.window_left, a.window_right, 0.0)
    out = out.view(B, n, Hq, Dv)
    if return_lse:
        return out, lse.view(Hq, B, n).transpose(0, 1)
    return out
