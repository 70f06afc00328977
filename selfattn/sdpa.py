"""selfattn as PyTorch's own SDPA flash implementation: every
F.scaled_dot_product_attention call that torch routes to its flash kernel
runs selfattn's kernel instead, with no change to the model's code.

    torch.nn.attention.activate_flash_attention_impl("selfattn")   # torch >= 2.9
    selfattn.enable_sdpa()                                          # any torch
    ...
    torch.nn.attention.restore_flash_attention_impl()  # or selfattn.disable_sdpa()

Importing selfattn registers "selfattn" with torch's flash-implementation
registry (torch.nn.attention.register_flash_attention_impl) where it exists;
nothing is activated until the user asks. Activation overrides, through a
torch.library.Library whose destruction restores torch's kernels:

- CPU: aten::_scaled_dot_product_flash_attention_for_cpu and its backward.
  Torch routes there (B, H, L, E) tensors with one head size (D = Dv), no
  dropout and a mask (bool masks already turned into 0 / -inf floats) of rank
  2 or 4 without gradient. Results have exactly torch's layouts (the output
  like `torch.empty_like(query)`, the logsumexp (B, H, L) over (B, L, H)
  memory, the gradients over (B, S, H, D) memory), which torch.compile's
  fake kernels assume.

- CUDA (when selfattn's CUDA backend is built): aten::_flash_attention_forward
  and _flash_attention_backward ((B, S, H, D) tensors), and
  _scaled_dot_product_flash_attention and its backward ((B, H, S, D)): the
  ops torch's own FA3/FA4 registrations override, with their conventions:
  FlashAttention's bottom-right alignment for is_causal and windows, GQA,
  D != Dv, dropout (selfattn's (seed, offset) travels to the backward in the
  (2,) uint64 rng_state output; `unused` is a uint64 zero), the logsumexp
  (B, H, Sq) float32, an empty debug mask, results laid out as
  torch.empty_like of the inputs.

Arguments selfattn does not take go to torch's own kernel, fetched before the
override: on CPU dropout (this backward could not regenerate the mask without
an rng state), on CUDA packed variable-length batches (cum_seq_q/cum_seq_k),
paged KV (block_table), ALiBi slopes and seqused_k (the backward op of
torch's schema does not receive them), return_debug_mask, a num_splits other
than None or 0 without dropout (selfattn's attention op chooses its own
split-KV); on both head dims above 512 and non-floating dtypes. The backward
of the non-packed CUDA ops is always selfattn's and redraws selfattn's dropout
mask, so with dropout num_splits is ignored, and block_table, alibi_slopes,
seqused_k and return_debug_mask raise NotImplementedError (torch's forward
would draw a mask the backward cannot redraw). A row that sees no key gives
0 in both.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from . import ops
from ._args import FLOAT_DTYPES, MAX_HEAD_DIM
from .functional import rng_state

__all__ = ["enable_sdpa", "disable_sdpa", "IMPL_NAME"]

IMPL_NAME = "selfattn"
_CPU_FORWARD = "_scaled_dot_product_flash_attention_for_cpu"
_CPU_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


_CUDA_FORWARD = "_flash_attention_forward"
_CUDA_BACKWARD = "_flash_attention_backward"
_CUDA_SDPA_FORWARD = "_scaled_dot_product_flash_attention"
_CUDA_SDPA_BACKWARD = "_scaled_dot_product_flash_attention_backward"


def _torch_kernel(name: str, device: str):
    """torch's own kernel of aten::`name` for `device`, callable with a keyset,
    or None where torch cannot hand it out (torch.library.get_kernel missing,
    or no kernel for `device` in this build of torch)."""
    get_kernel = getattr(torch.library, "get_kernel", None)
    if get_kernel is None:
        return None
    try:
        return get_kernel(f"aten::{name}", device)
    except RuntimeError:
        return None


def _has_cuda_backend() -> bool:
    """Whether this build of selfattn has CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("selfattn::attention_forward", "CUDA")


def _refusal(query, key, value, dropout_p):
    """Why selfattn's kernel does not take these arguments of torch's flash op,
    or None when it does."""
    if dropout_p != 0.0:
        return "dropout_p > 0 (its backward gets no rng state to redraw the mask)"
    if query.dtype not in FLOAT_DTYPES:
        return f"dtype {query.dtype}"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs that are not 4-D"
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM}"
    return None


def _torch_or_refuse(kernel, reason):
    """torch's kernel for arguments selfattn refuses, or an error naming them
    where torch cannot hand its kernel out (torch.library.get_kernel missing)."""
    if kernel is None:
        raise RuntimeError(f"selfattn, active as torch's SDPA flash kernel, does not take {reason}; "
                           "call selfattn.disable_sdpa() (or restore_flash_attention_impl())")
    return kernel


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> the (B, S, H, D) view the ops read, last dim contiguous."""
    t = t.transpose(1, 2)
    return t if t.stride(-1) == 1 else t.contiguous()


def _like(ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`t` laid out as torch.empty_like(ref) (what torch's meta kernels say);
    `t` itself where the shapes differ (D != Dv, which torch's flash never sees)."""
    if t.shape != ref.shape or torch.empty_like(ref, device="meta").stride() == t.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def _op_args(query, attn_mask, is_causal, scale):
    """(attn_mask, scale, window_right) in the ops' terms."""
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        attn_mask = attn_mask.to(query.dtype)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return attn_mask, scale, 0 if is_causal else -1


# ---------------------------------------------------------------------------
# CUDA: torch's flash ops in selfattn's terms. `forward` and `backward` are the
# ops to run (selfattn's, or the emulated backend's in tests/simt).

def cuda_refusal(query, key, value, cum_seq_q=None, cum_seq_k=None, return_debug_mask=False,
                 seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None, *,
                 dropout_p=0.0):
    """Why selfattn's kernels do not take these arguments of torch's CUDA
    flash ops, or None when they do. With dropout, num_splits is ignored (the
    forward stays selfattn's), and the arguments that only the forward op
    receives raise NotImplementedError: torch's forward would draw a dropout
    mask that the backward, which cannot tell and is selfattn's, would not
    redraw (silently wrong gradients)."""
    if cum_seq_q is not None or cum_seq_k is not None:
        return "packed variable-length batches (cum_seq_q, cum_seq_k)"
    forward_only = [name for name, given in (
        ("block_table", block_table is not None), ("alibi_slopes", alibi_slopes is not None),
        ("seqused_k", seqused_k is not None), ("return_debug_mask", return_debug_mask)) if given]
    if forward_only and dropout_p > 0.0:
        raise NotImplementedError(
            f"selfattn's flash attention override: dropout_p > 0 with {', '.join(forward_only)} "
            "would run torch's forward, whose dropout mask selfattn's backward cannot redraw; "
            "restore torch's flash implementation for this call "
            "(torch.nn.attention.restore_flash_attention_impl() or selfattn.disable_sdpa())")
    if block_table is not None:
        return "a paged KV cache (block_table)"
    if alibi_slopes is not None or seqused_k is not None:
        return "alibi_slopes or seqused_k (the backward op does not receive them)"
    if num_splits and dropout_p == 0.0:
        return "num_splits (selfattn's attention op chooses its own split-KV)"
    if return_debug_mask:
        return "return_debug_mask=True"
    return _refusal(query, key, value, 0.0)


def _cuda_window(is_causal, window_size_left, window_size_right):
    left = -1 if window_size_left is None or window_size_left < 0 else int(window_size_left)
    right = -1 if window_size_right is None or window_size_right < 0 else int(window_size_right)
    return left, 0 if is_causal else right


def flash_forward(forward, query, key, value, dropout_p, is_causal, scale=None,
                  window_size_left=None, window_size_right=None):
    """aten::_flash_attention_forward on (B, S, H, D) tensors:
    (out, logsumexp, rng_state, unused, debug_attn_mask)."""
    left, right = _cuda_window(is_causal, window_size_left, window_size_right)
    scale_ = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    rng = rng_state(dropout_p, query.device)
    out, lse = forward(query, key, value, None, None, rng, scale_, left, right,
                       key.shape[1] - query.shape[1], dropout_p, None, 0.0, 0, 0)
    seed_offset = rng.view(torch.uint64) if rng is not None else \
        torch.zeros(2, dtype=torch.uint64, device=query.device)
    unused = torch.zeros((), dtype=torch.uint64, device=query.device)
    debug = torch.empty(0, dtype=query.dtype, device=query.device)
    return _like(query, out), lse, seed_offset, unused, debug


def flash_backward(backward, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal,
                   rng_state_, scale=None, window_size_left=None, window_size_right=None):
    """aten::_flash_attention_backward on (B, S, H, D) tensors: (dq, dk, dv)."""
    left, right = _cuda_window(is_causal, window_size_left, window_size_right)
    scale_ = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    rng = rng_state_.view(torch.int64) if dropout_p > 0.0 else None
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv, _ = backward(grad_out, query, key, value, out, logsumexp.contiguous(), None, None,
                             rng, scale_, left, right, key.shape[1] - query.shape[1], dropout_p,
                             None, 0.0, 0, 0, False)
    return _like(query, dq), _like(key, dk), _like(value, dv)


def sdpa_flash_forward(forward, query, key, value, dropout_p=0.0, is_causal=False, scale=None):
    """aten::_scaled_dot_product_flash_attention on (B, H, S, D) tensors."""
    out, lse, seed_offset, unused, debug = flash_forward(
        forward, _bshd(query), _bshd(key), _bshd(value), dropout_p, is_causal, scale)
    return (_like(query, out.transpose(1, 2)), lse, None, None, query.shape[2], key.shape[2],
            seed_offset, unused, debug)


def sdpa_flash_backward(backward, grad_out, query, key, value, out, logsumexp, dropout_p,
                        is_causal, philox_seed, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward on (B, H, S, D) tensors."""
    dq, dk, dv = flash_backward(backward, _bshd(grad_out), _bshd(query), _bshd(key),
                                _bshd(value), _bshd(out), logsumexp, dropout_p, is_causal,
                                philox_seed, scale)
    return (_like(query, dq.transpose(1, 2)), _like(key, dk.transpose(1, 2)),
            _like(value, dv.transpose(1, 2)))


# The CUDA kernels of torch's four flash ops: `torch_kernel` is torch's own
# (for the arguments selfattn refuses), `op` selfattn's forward or backward op
# (or the emulated backend's in tests/simt).

def cuda_forward(torch_kernel, op, keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                 dropout_p, is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                 window_size_right=None, seqused_k=None, alibi_slopes=None, block_table=None,
                 num_splits=None):
    """aten::_flash_attention_forward."""
    reason = cuda_refusal(query, key, value, cum_seq_q, cum_seq_k, return_debug_mask, seqused_k,
                          alibi_slopes, block_table, num_splits, dropout_p=dropout_p)
    if reason is not None:
        return _torch_or_refuse(torch_kernel, reason).call_boxed(
            keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
            return_debug_mask, scale=scale, window_size_left=window_size_left,
            window_size_right=window_size_right, seqused_k=seqused_k, alibi_slopes=alibi_slopes,
            block_table=block_table, num_splits=num_splits)
    return flash_forward(op, query, key, value, dropout_p, is_causal, scale, window_size_left,
                         window_size_right)


def cuda_backward(torch_kernel, op, keyset, grad_out, query, key, value, out, logsumexp,
                  cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state_, unused, *,
                  scale=None, window_size_left=None, window_size_right=None):
    """aten::_flash_attention_backward."""
    reason = cuda_refusal(query, key, value, cum_seq_q, cum_seq_k)
    if reason is not None:
        return _torch_or_refuse(torch_kernel, reason).call_boxed(
            keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
            max_k, dropout_p, is_causal, rng_state_, unused, scale=scale,
            window_size_left=window_size_left, window_size_right=window_size_right)
    return flash_backward(op, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal,
                          rng_state_, scale, window_size_left, window_size_right)


def cuda_sdpa_forward(torch_kernel, op, keyset, query, key, value, dropout_p=0.0,
                      is_causal=False, return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention."""
    reason = cuda_refusal(query, key, value, return_debug_mask=return_debug_mask,
                          dropout_p=dropout_p)
    if reason is not None:
        return _torch_or_refuse(torch_kernel, reason).call_boxed(
            keyset, query, key, value, dropout_p, is_causal, return_debug_mask, scale=scale)
    return sdpa_flash_forward(op, query, key, value, dropout_p, is_causal, scale)


def cuda_sdpa_backward(torch_kernel, op, keyset, grad_out, query, key, value, out, logsumexp,
                       cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed,
                       philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward."""
    reason = cuda_refusal(query, key, value)
    if reason is not None:
        return _torch_or_refuse(torch_kernel, reason).call_boxed(
            keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
            max_k, dropout_p, is_causal, philox_seed, philox_offset, scale=scale)
    return sdpa_flash_backward(op, grad_out, query, key, value, out, logsumexp, dropout_p,
                               is_causal, philox_seed, scale)


class _Handle:
    """Keeps the overriding registrations; remove() restores torch's kernels."""

    def __init__(self):
        self._lib = torch.library.Library("aten", "IMPL")
        cpu_forward = _torch_kernel(_CPU_FORWARD, "CPU")
        cpu_backward = _torch_kernel(_CPU_BACKWARD, "CPU")

        def forward(keyset, query, key, value, dropout_p=0.0, is_causal=False, *,
                    attn_mask=None, scale=None):
            reason = _refusal(query, key, value, dropout_p)
            if reason is not None:
                return _torch_or_refuse(cpu_forward, reason).call_boxed(
                    keyset, query, key, value, dropout_p, is_causal, attn_mask=attn_mask,
                    scale=scale)
            mask, scale_, right = _op_args(query, attn_mask, is_causal, scale)
            out, lse = ops.forward_op(_bshd(query), _bshd(key), _bshd(value), mask, None, None,
                                      scale_, -1, right, 0, 0.0, None, 0.0, 0, 0)
            return _like(query, out.transpose(1, 2)), lse.transpose(1, 2).contiguous().transpose(1, 2)

        def backward(keyset, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal,
                     *, attn_mask=None, scale=None):
            reason = _refusal(query, key, value, dropout_p)
            if reason is not None:
                return _torch_or_refuse(cpu_backward, reason).call_boxed(
                    keyset, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal,
                    attn_mask=attn_mask, scale=scale)
            mask, scale_, right = _op_args(query, attn_mask, is_causal, scale)
            dq, dk, dv, _ = ops.backward_op(
                _bshd(grad_out), _bshd(query), _bshd(key), _bshd(value), _bshd(out),
                logsumexp.contiguous(), mask, None, None, scale_, -1, right, 0, 0.0, None, 0.0,
                0, 0, False)
            return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

        with warnings.catch_warnings():  # torch warns once that a kernel is overridden
            warnings.simplefilter("ignore", UserWarning)
            self._lib.impl(_CPU_FORWARD, forward, "CPU", with_keyset=True)
            self._lib.impl(_CPU_BACKWARD, backward, "CPU", with_keyset=True)
            if _has_cuda_backend():
                self._register_cuda()

    def _register_cuda(self) -> None:
        kernels = {name: _torch_kernel(name, "CUDA") for name in (
            _CUDA_FORWARD, _CUDA_BACKWARD, _CUDA_SDPA_FORWARD, _CUDA_SDPA_BACKWARD)}
        for name, fn, op in ((_CUDA_FORWARD, cuda_forward, ops.forward_op),
                             (_CUDA_BACKWARD, cuda_backward, ops.backward_op),
                             (_CUDA_SDPA_FORWARD, cuda_sdpa_forward, ops.forward_op),
                             (_CUDA_SDPA_BACKWARD, cuda_sdpa_backward, ops.backward_op)):
            self._lib.impl(name, functools.partial(fn, kernels[name], op), "CUDA",
                           with_keyset=True)

    def remove(self) -> None:
        if self._lib is not None:
            self._lib._destroy()
            self._lib = None


_registry = getattr(torch.nn.attention, "register_flash_attention_impl", None)
_active: _Handle | None = None  # the handle of enable_sdpa on torch without the registry


def _activate() -> _Handle:
    return _Handle()


def enable_sdpa() -> None:
    """Routes torch's SDPA flash kernel to selfattn's (what
    torch.nn.attention.activate_flash_attention_impl("selfattn") does on torch
    versions that have the registry; this works on every supported torch)."""
    global _active
    if _registry is not None:
        torch.nn.attention.activate_flash_attention_impl(IMPL_NAME)
        return
    disable_sdpa()
    _active = _activate()


def disable_sdpa() -> None:
    """Puts torch's own flash kernel back (no-op when selfattn's is not active)."""
    global _active
    if _registry is not None:
        if torch.nn.attention.current_flash_attention_impl() == IMPL_NAME:
            torch.nn.attention.restore_flash_attention_impl()
        return
    if _active is not None:
        _active.remove()
        _active = None


if _registry is not None:
    _registry(IMPL_NAME, register_fn=_activate)
