"""Python side of the `torch.ops.selfattn` operators: fake kernels (shapes
only, so torch.compile can trace and plan memory) and the autograd formula,
whose backward calls the registered backward op (and the same formula as
autograd.Functions that torch.func's transforms take). The kernels themselves are
C++/CUDA (csrc/): selfattn._C holds the schemas (and the CUDA kernels), and
one of the selfattn._cpu_* modules the CPU kernels, built once per
instruction set; the best one this CPU supports is loaded.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys

import torch

from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)


def _x86_flags():
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return None


def _cpu_module_name():
    """The CPU kernel module for this CPU; on x86, SELFATTN_CPU_ISA=avx512|avx2|generic
    forces one (generic: the portable build other architectures use)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "_cpu_generic"
    forced = os.environ.get("SELFATTN_CPU_ISA")
    if forced:
        if forced not in ("avx2", "avx512", "generic"):
            raise ImportError(
                f"selfattn: SELFATTN_CPU_ISA must be avx512, avx2 or generic, got {forced!r}")
        return f"_cpu_{forced}"
    flags = _x86_flags()
    if flags is None:  # not Linux: trust torch's own detection
        return "_cpu_avx512" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") \
            else "_cpu_avx2"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "_cpu_avx512"
    if {"avx2", "fma"} <= flags:
        return "_cpu_avx2"
    raise ImportError("selfattn: this x86-64 CPU lacks AVX2/FMA, which the CPU kernels need")


CPU_KERNELS = _cpu_module_name()
importlib.import_module(f"selfattn.{CPU_KERNELS}")

forward_op = torch.ops.selfattn.attention_forward.default
backward_op = torch.ops.selfattn.attention_backward.default
probs_op = torch.ops.selfattn.attention_probs.default
varlen_forward_op = torch.ops.selfattn.varlen_forward.default
varlen_backward_op = torch.ops.selfattn.varlen_backward.default
kvcache_forward_op = torch.ops.selfattn.kvcache_forward.default


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _same_device(q, **tensors):
    """The fake kernels also serve a real call with a `meta` argument: refuse
    tensors on another device than q, as the real kernels do, rather than
    return uninitialised outputs."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise RuntimeError(f"selfattn: {name} is on {t.device}, but q is on {q.device}")


@torch.library.register_fake("selfattn::attention_forward")
def _forward_fake(q, k, v, attn_mask, key_lengths, rng_state, scale, window_left,
                  window_right, diag_offset, dropout_p, alibi_slopes=None, softcap=0.0,
                  q_start=0, k_start=0):
    _same_device(q, k=k, v=v, attn_mask=attn_mask, key_lengths=key_lengths, rng_state=rng_state,
                 alibi_slopes=alibi_slopes)
    B, Sq, Hq, _ = q.shape
    out = q.new_empty((B, Sq, Hq, v.shape[3]))
    lse = q.new_empty((B, Hq, Sq), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("selfattn::attention_backward")
def _backward_fake(dout, q, k, v, out, lse, attn_mask, key_lengths, rng_state, scale,
                   window_left, window_right, diag_offset, dropout_p, alibi_slopes, softcap,
                   q_start, k_start, mask_grad):
    _same_device(q, dout=dout, k=k, v=v, out=out, lse=lse, attn_mask=attn_mask,
                 key_lengths=key_lengths, rng_state=rng_state, alibi_slopes=alibi_slopes)
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
                window_right, diag_offset, dropout_p, alibi_slopes=None, softcap=0.0,
                q_start=0, k_start=0):
    _same_device(q, k=k, lse=lse, attn_mask=attn_mask, key_lengths=key_lengths,
                 rng_state=rng_state, alibi_slopes=alibi_slopes)
    B, Sq, Hq, _ = q.shape
    return q.new_empty((B, Hq, Sq, k.shape[1]))


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, key_lengths, rng_state, scale, window_left, window_right, diag_offset,
     dropout_p, alibi_slopes, softcap, q_start, k_start) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_lengths, rng_state, alibi_slopes)
    ctx.scalars = (scale, window_left, window_right, diag_offset, dropout_p)
    ctx.modifiers = (softcap, q_start, k_start)
    ctx.mark_non_differentiable(lse)


def _double_backward(fn):
    return RuntimeError(f"{fn}: double backward (create_graph=True, grad of grad) is not "
                        "supported")


def _backward(ctx, dout, _dlse):
    if torch.is_grad_enabled():  # create_graph=True: refuse rather than drop second-order terms
        raise _double_backward("selfattn.attention")
    return _grads(backward_op, ctx, dout)


def _grads(backward, ctx, dout):
    """The formula: `backward` is backward_op, or under torch.func its Function."""
    q, k, v, out, lse, attn_mask, key_lengths, rng_state, alibi_slopes = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dmask = backward(dout, q, k, v, out, lse, attn_mask, key_lengths, rng_state,
                                 *ctx.scalars, alibi_slopes, *ctx.modifiers, mask_grad)
    return (dq, dk, dv, dmask if mask_grad else None) + (None,) * 11


torch.library.register_autograd("selfattn::attention_forward", _backward,
                                setup_context=_setup_context)


@torch.library.register_fake("selfattn::varlen_forward")
def _varlen_forward_fake(q, k, v, cu_seq_q, cu_seq_k, seqused_k, rng_state, scale, window_left,
                         window_right, dropout_p, block_table=None, num_splits=0):
    _same_device(q, k=k, v=v, cu_seq_q=cu_seq_q, cu_seq_k=cu_seq_k, seqused_k=seqused_k,
                 rng_state=rng_state, block_table=block_table)
    Tq, Hq, _ = q.shape
    return q.new_empty((Tq, Hq, v.shape[-1])), q.new_empty((Hq, Tq), dtype=_lse_dtype(q))


@torch.library.register_fake("selfattn::varlen_backward")
def _varlen_backward_fake(dout, q, k, v, out, lse, cu_seq_q, cu_seq_k, seqused_k, rng_state,
                          scale, window_left, window_right, dropout_p):
    _same_device(q, dout=dout, k=k, v=v, out=out, lse=lse, cu_seq_q=cu_seq_q,
                 cu_seq_k=cu_seq_k, seqused_k=seqused_k, rng_state=rng_state)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seq_q, cu_seq_k, seqused_k, rng_state, *scalars = inputs
    if len(scalars) > 4 and scalars[4] is not None:
        raise RuntimeError("selfattn varlen_forward: a paged KV cache (block_table) is for "
                           "inference only; call it under torch.no_grad()")
    scalars = scalars[:4]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seq_q, cu_seq_k, seqused_k, rng_state)
    ctx.scalars = scalars  # scale, window_left, window_right, dropout_p
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, _dlse):
    if torch.is_grad_enabled():
        raise _double_backward("selfattn.varlen_attention")
    return _varlen_grads(varlen_backward_op, ctx, dout)


def _varlen_grads(backward, ctx, dout):
    q, k, v, out, lse, cu_seq_q, cu_seq_k, seqused_k, rng_state = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = backward(dout, q, k, v, out, lse, cu_seq_q, cu_seq_k, seqused_k, rng_state,
                          *ctx.scalars)
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("selfattn::varlen_forward", _varlen_backward,
                                setup_context=_varlen_setup_context)


# torch.func: its transforms take only an autograd.Function with a setup_context
# (the one register_autograd builds has none), and functorch's grad records a
# graph of every backward, so the backward op runs as a Function too, whose own
# backward raises: a derivative of the backward (grad of grad, an autograd
# around torch.func.grad) fails instead of missing its terms.
def _function(name, op, setup_context, backward):
    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,  # the op runs per sample through torch's batching fallback
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)})


def _transformable_pair(name, fn, forward, setup_context, grads, backward):
    def refuse(ctx, *_grads):
        raise _double_backward(fn)

    backward_fn = _function(name + "Backward", backward, lambda ctx, inputs, output: None, refuse)
    return _function(name, forward, setup_context,
                     lambda ctx, dout, _dlse: grads(backward_fn.apply, ctx, dout))


_TRANSFORMABLE = {
    forward_op: _transformable_pair("Attention", "selfattn.attention", forward_op,
                                    _setup_context, _grads, backward_op),
    varlen_forward_op: _transformable_pair("Varlen", "selfattn.varlen_attention",
                                           varlen_forward_op, _varlen_setup_context,
                                           _varlen_grads, varlen_backward_op),
}


def transformable(op):
    """op (forward_op or varlen_forward_op), or in eager mode under a
    differentiating torch.func transform (grad, vjp, jacrev, and vmap of
    them) the same op and formula as a Function those transforms take."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return op
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    if any(i.key() in (TransformType.Grad, TransformType.Jvp)
           for i in retrieve_all_functorch_interpreters()):
        return _TRANSFORMABLE[op].apply
    return op


@torch.library.register_fake("selfattn::kvcache_forward")
def _kvcache_forward_fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale,
                          window_left, window_right, num_splits=0):
    _same_device(q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                 block_table=block_table)
    B, n, Hq, _ = q.shape
    return q.new_empty((B, n, Hq, v_cache.shape[-1])), q.new_empty((B, Hq, n),
                                                                   dtype=_lse_dtype(q))


# The backward and probabilities ops are not differentiable (no double
# backward; attention weights carry no gradient), nor is the KV cache step
# (inference only): their outputs never require grad.
_lib = torch.library.Library("selfattn", "IMPL")
for _name in ("attention_backward", "attention_probs", "varlen_backward", "kvcache_forward"):
    _lib.impl(_name, torch.library.fallthrough_kernel, "Autograd")


# Autocast, as torch's scaled_dot_product_attention: inside torch.autocast the
# forward and probabilities ops run in the autocast dtype, their floating-point
# inputs (q, k, v, a float mask; float64 excepted, and never lse) cast to it.
def _register_autocast(name, cast_args, device_type):
    op = getattr(torch.ops.selfattn, name).default
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        args = [a.to(dtype) if i in cast_args and isinstance(a, torch.Tensor)
                and a.is_floating_point() and a.dtype != torch.float64 else a
                for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    _lib.impl(name, kernel, key, with_keyset=True)


for _device in ("cpu", "cuda"):
    _register_autocast("attention_forward", (0, 1, 2, 3), _device)  # q, k, v, attn_mask
    _register_autocast("attention_probs", (0, 1, 3), _device)  # q, k, attn_mask
