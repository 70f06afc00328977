"""Packed variable-length batches: `varlen_attention`, with the signature and
semantics of torch.nn.attention.varlen.varlen_attn (which runs on CUDA only)
on CPU and CUDA, plus dropout and the logsumexp.

Sequences of different lengths are concatenated into one (T, H, D) tensor;
cu_seq_q / cu_seq_k hold the N + 1 offsets of the sequences' first rows, so
no FLOP or byte goes to padding. Sequence b attends its own keys only, with
causal attention and windows aligned bottom-right within each sequence
(FlashAttention's varlen convention: the last query sees the last key).
The ops (torch.ops.selfattn.varlen_forward / varlen_backward, csrc/attention.cpp)
run each sequence through the fused kernels as a batch of one. With a
block_table (inference only), keys and values come from a pool of pages that
the kernels read in place through the table.
"""
from __future__ import annotations

import torch

from . import ops
from ._args import attention_args, call_op, check_block_table, non_negative_int, pools_as_batch
from .errors import ArgumentError, ArgumentTypeError
from .functional import _last_dim_contiguous, rng_state

__all__ = ["varlen_attention"]

FN = "selfattn.varlen_attention"


def _offsets(name, t, device, what="N + 1 offsets"):
    """`t` is a 1-D int32/int64 tensor on `device`; the values are checked by the op."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{FN}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
        raise ArgumentError(f"{FN}: {name} must be a 1-D int32 or int64 tensor of {what}, "
                            f"got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise ArgumentError(f"{FN}: {name} is on {t.device}, but query is on {device}")
    return t


def _check_paged(query, key, value, block_table, seqused_k, dropout_p, cu_seq_q):
    """What a paged call needs beyond the unpaged checks (the op checks the
    page indices against the pool): a block table row per sequence of cu_seq_q."""
    rows = cu_seq_q.shape[0] - 1 if isinstance(cu_seq_q, torch.Tensor) and cu_seq_q.dim() == 1 \
        else None
    check_block_table(FN, block_table, rows, query.device, "query")
    if seqused_k is None:
        raise ArgumentError(f"{FN}: a block_table needs seqused_k, the key count of each "
                            "sequence (as torch's varlen_attn)")
    if dropout_p != 0.0:
        raise ArgumentError(f"{FN}: a paged KV cache is for inference: dropout_p must be 0, "
                            f"got {dropout_p!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise ArgumentError(f"{FN}: a paged KV cache (block_table) is for inference only; "
                            "call it under torch.no_grad() or torch.inference_mode()")


def varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                     block_table=None, num_splits=None, dropout_p=0.0, generator=None,
                     return_lse=False):
    """Attention over packed variable-length sequences.

    Args:
        query: (Tq, Hq, D); key: (Tk, Hkv, D); value: (Tk, Hkv, Dv).
        cu_seq_q, cu_seq_k: int32/int64 (N + 1,) offsets of each sequence's
            first row in query and in key/value (0 first, Tq / Tk last,
            non-decreasing; empty sequences allowed).
        max_q, max_k: the longest query and key sequences (torch's API;
            selfattn reads the lengths from the offsets and checks nothing
            against these).
        return_aux: torch's AuxRequest: with `.lse` True the logsumexp
            (Hq, Tq) is returned too.
        scale: softmax scale, default 1 / sqrt(D).
        window_size: (left, right) keys each query sees around its diagonal,
            -1 for unbounded: (-1, -1) full, (-1, 0) causal, (W, 0) causal
            sliding window; aligned bottom-right within each sequence.
        enable_gqa: allow Hkv < Hq (Hq a multiple of Hkv), as torch.
        seqused_k: int (N,): only the first seqused_k[b] keys of sequence b
            take part (differentiable here, unlike torch's).
        block_table: int32 (N, max_pages): a paged KV cache (inference
            only, as torch's). key and value are then pools of pages
            (num_pages, page_size, Hkv, D|Dv) in any order, sequence b's key
            j lies at row j % page_size of page block_table[b, j // page_size],
            seqused_k is required (the key counts) and cu_seq_k may be None.
        num_splits: split-KV of the forward, as torch's: None or 0 lets
            selfattn choose (from the shape and the CPU threads or GPU SMs),
            1 never splits, n > 1 splits each block of queries' keys n ways
            (fewer when they span fewer key tiles; at most 64), each split
            holding a float32 partial output the size of the output. Every
            sequence is computed on its own whatever the value, so a
            sequence's result never depends on the rest of the batch.
        dropout_p, generator: dropout on the probabilities (selfattn's
            extra), each sequence drawing its own mask, regenerated by the
            backward.
        return_lse: also return the logsumexp (selfattn's spelling of
            return_aux.lse).

    Returns:
        out (Tq, Hq, Dv) in query's dtype [, lse (Hq, Tq) float32 (float64
        for float64 inputs), -inf for rows that see no key]. Rows that see no
        key are 0.
    """
    paged = block_table is not None
    if cu_seq_k is None and not paged:
        raise ArgumentError(f"{FN}: cu_seq_k is required (torch allows None only with "
                            "block_table)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{FN}: {name} must be a torch.Tensor, got "
                                    f"{type(t).__name__}")
        want = 4 if paged and name != "query" else 3
        if t.dim() != want:
            raise ArgumentError(f"{FN}: {name} must be " + (
                "4-D (num_pages, page_size, H, D) with a block_table" if want == 4
                else "3-D (T, H, D)") + f", got shape {tuple(t.shape)}")
    if paged:
        _check_paged(query, key, value, block_table, seqused_k, dropout_p, cu_seq_q)
        if cu_seq_k is None:
            cu_seq_k = torch.zeros(block_table.shape[0] + 1, dtype=torch.int64,
                                   device=query.device)
    non_negative_int(FN, "max_q", max_q)
    non_negative_int(FN, "max_k", max_k)
    num_splits = non_negative_int(FN, "num_splits", num_splits) or 0
    if not isinstance(enable_gqa, bool):
        raise ArgumentTypeError(f"{FN}: enable_gqa must be a bool, got {enable_gqa!r}")
    if not enable_gqa and query.shape[1] != key.shape[-2]:
        raise ArgumentError(f"{FN}: query has {query.shape[1]} heads and key {key.shape[-2]}; "
                            "pass enable_gqa=True for grouped-query attention")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ArgumentTypeError(f"{FN}: window_size must be a pair (left, right), got "
                                f"{window_size!r}")
    # checks of dtypes, devices, heads, head dims, scale, window and dropout, on views
    # of the packed tensors as one batch
    k1, v1 = (pools_as_batch(FN, key, value, 1, block_table, ("key", "value")) if paged
              else (key.unsqueeze(0), value.unsqueeze(0)))
    a = attention_args(FN, query.unsqueeze(0), k1, v1, False, "bottom_right",
                       tuple(window_size), scale, None, None, dropout_p,
                       ("query", "key", "value"))
    cu_seq_q = _offsets("cu_seq_q", cu_seq_q, query.device)
    cu_seq_k = _offsets("cu_seq_k", cu_seq_k, query.device)
    if seqused_k is not None:
        seqused_k = _offsets("seqused_k", seqused_k, query.device, "N lengths")
    rng = rng_state(a.dropout_p, query.device, generator)
    out, lse = call_op(
        FN, ops.transformable(ops.varlen_forward_op), _last_dim_contiguous(query),
        _last_dim_contiguous(key), _last_dim_contiguous(value), cu_seq_q, cu_seq_k, seqused_k,
        rng, a.scale, a.window_left, a.window_right, a.dropout_p, block_table, num_splits)
    if return_lse or (return_aux is not None and getattr(return_aux, "lse", False)):
        return out, lse
    return out
