"""Generation with a KV cache: `attention_with_kvcache` (FlashAttention's
flash_attn_with_kvcache), on a preallocated (B, S_max, Hkv, D) cache or a
paged pool (num_pages, page_size, Hkv, D) with a block table.

The new keys and values are written into the cache in place at each
sequence's current length (no copy of the cache, unlike a cache grown by
concatenation), then the new queries attend to the cache's valid prefix.
Query i of sequence b sits at position cache_seqlens[b] + i: causal and
windows are aligned bottom-right per sequence. Both happen in one op
(torch.ops.selfattn.kvcache_forward, csrc/attention.cpp), which copies the
new rows and runs the fused forward (on CUDA one call for the batch, each
sequence aligned to its own length; on the CPU per sequence, side by side),
on the cache's valid prefix or on the pool through the block table, whose
pages the kernels read in place. Nothing is written before every argument is
checked: here, or, for the lengths and pages (values of cache_seqlens and
block_table), by the op alone, whose RuntimeError is raised here as
ArgumentError (compiled: the op's RuntimeError).
"""
from __future__ import annotations

import numbers

import torch

from . import ops
from ._args import (_tensor, attention_args, call_op, check_block_table, non_negative_int,
                    pools_as_batch)
from .errors import ArgumentError, ArgumentTypeError
from .functional import _last_dim_contiguous

__all__ = ["attention_with_kvcache"]

FN = "selfattn.attention_with_kvcache"


def _seqlens(cache_seqlens, B, device):
    """cache_seqlens as a (B,) int tensor for the op."""
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        return torch.full((B,), int(cache_seqlens), dtype=torch.int64, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (
            torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
        raise ArgumentTypeError(f"{FN}: cache_seqlens must be an int or an int32/int64 tensor "
                                f"of shape ({B},), got {cache_seqlens!r}")
    if cache_seqlens.device != device:
        raise ArgumentError(f"{FN}: cache_seqlens is on {cache_seqlens.device}, but q is on "
                            f"{device}")
    return cache_seqlens


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                           block_table=None, causal=True, window=None, scale=None,
                           return_lse=False, num_splits=None):
    """Appends k, v to the cache in place, then attends q to the cache.

    Args:
        q: (B, n, Hq, D) new queries.
        k_cache, v_cache: (B, S_max, Hkv, D) and (B, S_max, Hkv, Dv), any
            strides with a contiguous last dim (a preallocated cache); with a
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
        num_splits: split-KV (FlashAttention's): None or 0 lets selfattn
            choose from the shape and the CPU threads or GPU SMs, 1 never
            splits, n > 1 splits each block of queries' keys n ways (fewer
            when they span fewer key tiles; at most 64), each split holding
            a float32 partial output the size of the output.

    Returns:
        out (B, n, Hq, Dv) [, lse (B, Hq, n)]. Inference only: refuses inputs
        that require grad while grad mode is on.
    """
    paged = block_table is not None
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ArgumentError(f"{FN}: {name} must be a 4-D tensor, got "
                                f"{getattr(t, 'shape', t)!r}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ArgumentError(f"{FN}: {name} must have a contiguous last dim (it is written "
                                f"in place), got strides {t.stride()}")
    k1, v1 = k_cache, v_cache
    if paged and isinstance(q, torch.Tensor) and q.dim() == 4:
        check_block_table(FN, block_table, q.shape[0], q.device, "q")
        k1, v1 = pools_as_batch(FN, k_cache, v_cache, q.shape[0], block_table,
                                ("k_cache", "v_cache"))
    a = attention_args(FN, q, k1, v1, causal, "bottom_right", window, scale, None, None, 0.0,
                       ("q", "k_cache", "v_cache"))
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise ArgumentError(f"{FN}: inference only; call it under torch.no_grad() or "
                            "torch.inference_mode()")
    num_splits = non_negative_int(FN, "num_splits", num_splits) or 0
    B = q.shape[0]
    seqlens = _seqlens(cache_seqlens, B, q.device)
    n_new = 0
    if (k is None) != (v is None):
        raise ArgumentError(f"{FN}: pass both k and v, or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _tensor(FN, name, t)
            if t.dtype != q.dtype or t.device != q.device:
                raise ArgumentTypeError(f"{FN}: {name} must be a {q.dtype} tensor on {q.device} "
                                        f"like q, got {t.dtype} on {t.device}")
        n_new = k.shape[1] if k.dim() == 4 else -1
        for t, cache in ((k, k_cache), (v, v_cache)):
            if t.shape != (B, n_new) + tuple(cache.shape[2:]):
                raise ArgumentError(f"{FN}: k and v must be (B, n_new, Hkv, D|Dv) like the "
                                    f"caches, got {tuple(k.shape)} and {tuple(v.shape)}")
    # the op checks the lengths and pages before it writes anything
    out, lse = call_op(FN, ops.kvcache_forward_op, _last_dim_contiguous(q), k_cache, v_cache, k,
                       v, seqlens, block_table, a.scale, a.window_left, a.window_right,
                       num_splits)
    return (out, lse) if return_lse else out
