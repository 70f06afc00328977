"""Argument checking and normalisation shared by the fused functions and the
reference, so both accept and refuse exactly the same inputs.

Errors are ArgumentError (a ValueError and a RuntimeError: bad value or shape)
or ArgumentTypeError (a TypeError and a RuntimeError: wrong type), whose text
names the function, the argument and the expectation (selfattn/errors.py).
Tensors reach the kernels as plain strided storage: nested and sparse tensors
are refused, and torch's CausalBias mask (a tensor subclass whose storage holds
no mask) becomes the kernels' own causal flag with its alignment.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

from .errors import ArgumentError, ArgumentTypeError

MAX_HEAD_DIM = 512
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class AttnArgs:
    """Normalised masking and scaling arguments (see DESIGN.md section 2)."""

    scale: float
    window_left: int  # -1 = unbounded
    window_right: int  # -1 = unbounded; causal makes it 0
    diag_offset: int  # Sk - Sq for bottom-right alignment, else 0
    attn_mask: Optional[torch.Tensor]  # bool, or float in q's dtype
    key_lengths: Optional[torch.Tensor]  # int64 (B,)
    dropout_p: float
    lse_dtype: torch.dtype  # float32, or float64 for float64 inputs
    alibi_slopes: Optional[torch.Tensor] = None  # contiguous float32 (Hq,) or (B, Hq)
    softcap: float = 0.0  # 0 = off


def _tensor(fn, name, t):
    """t is a tensor the kernels can read as plain strided storage."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise ArgumentTypeError(
            f"{fn}: {name} is a nested tensor, which selfattn does not take; pad it "
            "(to_padded_tensor) and mask the padding (attn_mask, or key_lengths in "
            "selfattn.attention)")
    if t.layout != torch.strided:
        raise ArgumentTypeError(f"{fn}: {name} must be a dense (strided) tensor, got layout "
                                f"{t.layout}")
    if isinstance(t, CausalBias):
        raise ArgumentTypeError(f"{fn}: {name} is a CausalBias, which only attn_mask takes")


def _causal_bias_alignment(fn, bias, causal, Sq, Sk):
    """The causal alignment a torch.nn.attention.bias.CausalBias attn_mask stands for."""
    if causal:
        raise ArgumentError(f"{fn}: attn_mask is a CausalBias, which should not be combined with "
                            "causal=True (is_causal=True)")
    if (bias.seq_len_q, bias.seq_len_kv) != (Sq, Sk):
        raise ArgumentError(f"{fn}: attn_mask is a CausalBias for (Sq, Sk) = ({bias.seq_len_q}, "
                            f"{bias.seq_len_kv}), but q and k have (Sq, Sk) = ({Sq}, {Sk})")
    return "top_left" if bias.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: 1 / sqrt(D)."""
    return 1.0 / math.sqrt(head_dim)


def non_negative_int(fn, name, value):
    """value as an int >= 0; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ArgumentTypeError(f"{fn}: {name} must be a non-negative int, got {value!r}")
    return int(value)


def _window_side(fn, value, side):
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{fn}: window {side} must be an int, -1 or None, got {value!r}")
    if value < -1:
        raise ArgumentError(
            f"{fn}: window {side} must be >= 0, or -1/None for unbounded, got {value}")
    return int(value)


def window_sides(fn, window, causal):
    """(left, right) of a window pair (None: unbounded; -1 = unbounded side);
    causal sets right = 0."""
    left = right = -1
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ArgumentTypeError(f"{fn}: window must be a pair (left, right), got {window!r}")
        left = _window_side(fn, window[0], "left")
        right = _window_side(fn, window[1], "right")
    return left, 0 if causal else right


def check_qkv(fn, q, k, v, names=("q", "k", "v")):
    """Shapes (B, S, H, D) of q, k, v agree; returns (B, Sq, Sk, Hq, Hkv, D, Dv)."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        _tensor(fn, name, t)
        if t.dim() != 4:
            raise ArgumentError(
                f"{fn}: {name} must be 4-D (B, S, H, D), got shape {tuple(t.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(
            f"{fn}: {nq} must be float32, float64, bfloat16 or float16, got {q.dtype}")
    for name, t in ((nk, k), (nv, v)):
        if t.dtype != q.dtype:
            raise ArgumentTypeError(
                f"{fn}: {name} has dtype {t.dtype}, which differs from {nq}'s {q.dtype}")
        if t.device != q.device:
            raise ArgumentError(f"{fn}: {name} is on {t.device}, but {nq} is on {q.device}")
    B, Sq, Hq, D = q.shape
    _, Sk, Hkv, _ = k.shape
    Dv = v.shape[3]
    if k.shape[0] != B or v.shape[0] != B:
        raise ArgumentError(
            f"{fn}: batch sizes differ: {nq} {B}, {nk} {k.shape[0]}, {nv} {v.shape[0]}")
    if v.shape[1] != Sk:
        raise ArgumentError(f"{fn}: {nv} has {v.shape[1]} keys, which differs from {nk}'s {Sk}")
    if v.shape[2] != Hkv:
        raise ArgumentError(f"{fn}: {nv} has {v.shape[2]} heads, which differs from {nk}'s {Hkv}")
    if k.shape[3] != D:
        raise ArgumentError(f"{fn}: {nk} has head dim {k.shape[3]}, which differs from {nq}'s {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ArgumentError(f"{fn}: {nk} has {Hkv} heads, which does not divide {nq}'s {Hq} heads")
    for name, dim in ((nq, D), (nv, Dv)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ArgumentError(
                f"{fn}: head dim of {name} must be in [1, {MAX_HEAD_DIM}], got {dim}")
    return B, Sq, Sk, Hq, Hkv, D, Dv


def _softcap(fn, softcap):
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise ArgumentTypeError(f"{fn}: softcap must be a float (0.0 = off), got {softcap!r}")
    if not (_finite(softcap) and softcap >= 0):
        raise ArgumentError(f"{fn}: softcap must be finite and >= 0 (0.0 = off), got {softcap}")
    return float(softcap)


def _alibi_slopes(fn, slopes, B, Hq, device, q_name):
    if slopes is None:
        return None
    _tensor(fn, "alibi_slopes", slopes)
    if slopes.dtype != torch.float32:
        raise ArgumentTypeError(f"{fn}: alibi_slopes must be float32, got {slopes.dtype}")
    if tuple(slopes.shape) not in ((Hq,), (B, Hq)):
        raise ArgumentError(f"{fn}: alibi_slopes must have shape (Hq,) = ({Hq},) or (B, Hq) = "
                            f"({B}, {Hq}), got {tuple(slopes.shape)}")
    if slopes.device != device:
        raise ArgumentError(f"{fn}: alibi_slopes is on {slopes.device}, but {q_name} is on {device}")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise ArgumentError(f"{fn}: alibi_slopes requires grad, but the slopes get no gradient; "
                            "pass alibi_slopes.detach()")
    return slopes.contiguous()


def check_block_table(fn, block_table, rows, device, q_name):
    """A paged cache's block table: an int32 (rows, max_pages) tensor (rows None:
    any count, checked by the op) on `device`; the page indices are checked
    where the pool is known."""
    shape = f"({'N' if rows is None else rows}, max_pages)"
    _tensor(fn, "block_table", block_table)
    if block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or (rows is not None and block_table.shape[0] != rows):
        raise ArgumentTypeError(f"{fn}: block_table must be an int32 tensor of shape {shape}, "
                                f"got {block_table.dtype} of shape {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ArgumentError(f"{fn}: block_table is on {block_table.device}, but {q_name} is on "
                            f"{device}")


def pools_as_batch(fn, k_pool, v_pool, batch, block_table, names):
    """A paged cache's key and value pools (num_pages, page_size, H, D|Dv),
    checked to hold one number (>= 1) of pages of one size, each seen as
    `batch` sequences of the longest length the block table can address,
    every position its first row (zero-stride views, for the shape checks of
    attention_args). `names`: the pools' names in messages."""
    if k_pool.shape[0] < 1 or k_pool.shape[:2] != v_pool.shape[:2]:
        raise ArgumentError(f"{fn}: {names[0]} and {names[1]} must be pools of one number (>= 1) "
                            f"of pages of one size, got {tuple(k_pool.shape)} and "
                            f"{tuple(v_pool.shape)}")
    longest = block_table.shape[1] * k_pool.shape[1]
    return tuple(t.as_strided((batch, longest) + tuple(t.shape[2:]), (0, 0) + t.stride()[2:])
                 for t in (k_pool, v_pool))


def call_op(fn, op, *args, checks=("",)):
    """op(*args), the RuntimeError of the op's own argument checks (those of
    values only it reads, all run before it writes anything: packed offsets,
    KV cache lengths, block table pages, key_lengths; their messages start
    with "selfattn: " and one of `checks`) raised as ArgumentError from `fn`.
    Compiled, the op's RuntimeError passes as it is."""
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        return op(*args)
    except RuntimeError as e:
        message = str(e)
        if not any(message.startswith("selfattn: " + check) for check in checks):
            raise
        raise ArgumentError(f"{fn}: {message.removeprefix('selfattn: ')}") from None


def attention_args(fn, q, k, v, causal, causal_alignment, window, scale, attn_mask,
                   key_lengths, dropout_p, names=("q", "k", "v"), alibi_slopes=None,
                   softcap=0.0) -> AttnArgs:
    """Checks and normalises `attention`'s arguments; `names` are q, k and v's
    names in the caller's error messages. A CausalBias attn_mask stands for
    causal=True with its own alignment (it overrides causal_alignment)."""
    B, Sq, Sk, Hq, Hkv, D, Dv = check_qkv(fn, q, k, v, names)
    if not isinstance(causal, bool):
        raise ArgumentTypeError(f"{fn}: causal must be a bool, got {causal!r}")
    if isinstance(attn_mask, CausalBias):
        causal_alignment = _causal_bias_alignment(fn, attn_mask, causal, Sq, Sk)
        causal, attn_mask = True, None
    if causal_alignment not in ("bottom_right", "top_left"):
        raise ArgumentError(
            f"{fn}: causal_alignment must be 'bottom_right' or 'top_left', got {causal_alignment!r}")
    left, right = window_sides(fn, window, causal)
    # A side at least Sq + Sk wide bounds nothing: unbounded (no int64 overflow downstream).
    left = -1 if left > Sq + Sk else left
    right = -1 if right > Sq + Sk else right
    if scale is None:
        scale = default_scale(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ArgumentTypeError(f"{fn}: scale must be a float or None, got {scale!r}")
    elif not _finite(scale):
        raise ArgumentError(f"{fn}: scale must be finite, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise ArgumentTypeError(f"{fn}: dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ArgumentError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None:
        _tensor(fn, "attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ArgumentTypeError(
                f"{fn}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ArgumentError(
                f"{fn}: attn_mask is on {attn_mask.device}, but {names[0]} is on {q.device}")
        target = (B, Hq, Sq, Sk)
        shape = tuple(attn_mask.shape)
        if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
            raise ArgumentError(
                f"{fn}: attn_mask of shape {shape} is not broadcastable to (B, Hq, Sq, Sk) = {target}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)
    if key_lengths is not None:
        _tensor(fn, "key_lengths", key_lengths)
        if key_lengths.dtype not in (torch.int32, torch.int64):
            raise ArgumentTypeError(
                f"{fn}: key_lengths must be int32 or int64, got {key_lengths.dtype}")
        if tuple(key_lengths.shape) != (B,):
            raise ArgumentError(
                f"{fn}: key_lengths must have shape ({B},), got {tuple(key_lengths.shape)}")
        if key_lengths.device != q.device:
            raise ArgumentError(
                f"{fn}: key_lengths is on {key_lengths.device}, but {names[0]} is on {q.device}")
        key_lengths = key_lengths.to(torch.int64).contiguous()
    softcap = _softcap(fn, softcap)
    alibi_slopes = _alibi_slopes(fn, alibi_slopes, B, Hq, q.device, names[0])
    return AttnArgs(
        scale=float(scale), window_left=left, window_right=right,
        diag_offset=Sk - Sq if causal_alignment == "bottom_right" else 0, attn_mask=attn_mask,
        key_lengths=key_lengths, dropout_p=float(dropout_p),
        lse_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
        alibi_slopes=alibi_slopes, softcap=softcap)


def sdpa_to_attention(fn, query, key, value, attn_mask, dropout_p, is_causal, scale,
                      enable_gqa):
    """Maps torch's SDPA arguments ((..., H, S, D) layout, top-left is_causal) to
    `attention`'s: returns (q, k, v, kwargs, unflatten) where unflatten maps the
    (B, Sq, Hq, Dv) output back to query's layout."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _tensor(fn, name, t)
        if t.dim() < 3:
            raise ArgumentError(
                f"{fn}: {name} must have at least 3 dims (..., S, D), got {t.dim()}")
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise ArgumentTypeError(f"{fn}: {name} must be a bool, got {flag!r}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ArgumentError(f"{fn}: query, key and value must have the same number of dims, got "
                            f"{query.dim()}, {key.dim()} and {value.dim()}")
    if is_causal and attn_mask is not None and not isinstance(attn_mask, CausalBias):
        raise ArgumentError(f"{fn}: pass either attn_mask or is_causal=True, not both")
    lead = query.shape[:-3] if query.dim() > 3 else query.shape[:-2]

    def to_bshd(t):
        if t.dim() == 3:
            t = t.unsqueeze(1)
        elif t.dim() > 4:
            t = t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])
        return t.transpose(1, 2)

    q, k, v = to_bshd(query), to_bshd(key), to_bshd(value)
    if not enable_gqa and q.shape[2] != k.shape[2]:
        raise ArgumentError(f"{fn}: query has {q.shape[2]} heads and key {k.shape[2]}; "
                            "pass enable_gqa=True for grouped-query attention")
    if isinstance(attn_mask, torch.Tensor) and not isinstance(attn_mask, CausalBias):
        if attn_mask.is_floating_point() and attn_mask.dtype not in (torch.float32, query.dtype):
            raise ArgumentTypeError(  # torch's rule: bool, float32 or query's dtype
                f"{fn}: attn_mask must be bool, float32 or query's dtype {query.dtype}, got "
                f"{attn_mask.dtype}")
        if query.dim() == 3 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        elif query.dim() > 4 and attn_mask.dim() > 3:
            # broadcast over the leading dims that q, k, v flatten into one batch dim
            if attn_mask.dim() > query.dim():
                raise ArgumentError(f"{fn}: attn_mask has more dims ({attn_mask.dim()}) than query "
                                    f"({query.dim()})")
            m = attn_mask.reshape((1,) * (query.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
            try:
                m = m.expand(*lead, *m.shape[-3:])
            except RuntimeError as e:
                raise ArgumentError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} is not "
                                    f"broadcastable to query's leading dims {tuple(lead)}") from e
            attn_mask = m.reshape(math.prod(m.shape[:-3]), *m.shape[-3:])
    kwargs = dict(causal=bool(is_causal), causal_alignment="top_left", scale=scale,
                  attn_mask=attn_mask, dropout_p=dropout_p)

    def unflatten(out: torch.Tensor) -> torch.Tensor:
        out = out.transpose(1, 2)
        if query.dim() == 3:
            return out.squeeze(1)
        return out.reshape(*lead, *out.shape[-3:]) if query.dim() > 4 else out

    return q, k, v, kwargs, unflatten

