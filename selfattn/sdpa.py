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

Arguments selfattn does not take (dropout, which this backward could not
regenerate without an rng state, head dims above 512, other dtypes) go to
torch's own kernel, fetched before the override. A row that sees no key gives
0 in both.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import ops
from ._args import FLOAT_DTYPES, MAX_HEAD_DIM

__all__ = ["enable_sdpa", "disable_sdpa", "IMPL_NAME"]

IMPL_NAME = "selfattn"
_CPU_FORWARD = "_scaled_dot_product_flash_attention_for_cpu"
_CPU_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def _torch_kernel(name: str, device: str):
    """torch's own kernel of aten::`name` for `device`, callable with a keyset,
    or None on torch versions without torch.library.get_kernel."""
    get_kernel = getattr(torch.library, "get_kernel", None)
    return None if get_kernel is None else get_kernel(f"aten::{name}", device)


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


def _op_args(query, attn_mask, is_causal, scale):
    """(attn_mask, scale, window_right) in the ops' terms."""
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        attn_mask = attn_mask.to(query.dtype)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return attn_mask, scale, 0 if is_causal else -1


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
            out = out.transpose(1, 2)
            result = torch.empty_like(query)
            if result.stride() == out.stride():
                result = out
            else:
                result.copy_(out)
            return result, lse.transpose(1, 2).contiguous().transpose(1, 2)

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
