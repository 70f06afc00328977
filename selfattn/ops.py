"""Python side of the `torch.ops.selfattn` operators: fake kernels (shapes
only, so torch.compile can trace and plan memory) and the autograd formula,
whose backward calls the registered backward op. The kernels themselves are
C++/CUDA (csrc/), loaded by importing selfattn._C.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)

forward_op = torch.ops.selfattn.attention_forward.default
backward_op = torch.ops.selfattn.attention_backward.default
probs_op = torch.ops.selfattn.attention_probs.default


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("selfattn::attention_forward")
def _forward_fake(q, k, v, attn_mask, key_lengths, rng_state, scale, window_left,
                  window_right, bottom_right, dropout_p):
    B, Sq, Hq, _ = q.shape
    out = q.new_empty((B, Sq, Hq, v.shape[3]))
    lse = q.new_empty((B, Hq, Sq), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("selfattn::attention_backward")
def _backward_fake(dout, q, k, v, out, lse, attn_mask, key_lengths, rng_state, scale,
                   window_left, window_right, bottom_right, dropout_p, mask_grad):
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if mask_grad and attn_mask is not None:
        dmask = attn_mask.new_empty(attn_mask.shape)
    else:
        dmask = q.new_empty((0,))
    return dq, dk, dv, dmask


@torch.library.register_fake("selfattn::attention_probs")
def _probs_fake(q, k, lse, attn_mask, key_lengths, rng_state, scale, window_left,
                window_right, bottom_right, dropout_p):
    B, Sq, Hq, _ = q.shape
    return q.new_empty((B, Hq, Sq, k.shape[1]))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, key_lengths, rng_state, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_lengths, rng_state)
    ctx.scalars = scalars  # scale, window_left, window_right, bottom_right, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, key_lengths, rng_state = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dmask = backward_op(dout, q, k, v, out, lse, attn_mask, key_lengths, rng_state,
                                    *ctx.scalars, mask_grad)
    return (dq, dk, dv, dmask if mask_grad else None) + (None,) * 7


torch.library.register_autograd("selfattn::attention_forward", _backward,
                                setup_context=_setup_context)


# The backward and probabilities ops are not differentiable (no double
# backward; attention weights carry no gradient): their outputs never require grad.
_lib = torch.library.Library("selfattn", "IMPL")
for _name in ("attention_backward", "attention_probs"):
    _lib.impl(_name, torch.library.fallthrough_kernel, "Autograd")
