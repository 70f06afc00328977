"""Python side of the `torch.ops.selfattn` operators: fake kernels (shapes
only, so torch.compile can trace and plan memory) and the autograd formula,
whose backward calls the registered backward op. The kernels themselves are
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
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

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


def _backward(ctx, dout, _dlse):
    if torch.is_grad_enabled():  # create_graph=True: refuse rather than drop second-order terms
        raise RuntimeError("selfattn.attention: double backward (create_graph=True) is not supported")
    return _grads(ctx, dout, _dlse)


def _grads(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, key_lengths, rng_state, alibi_slopes = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dmask = backward_op(dout, q, k, v, out, lse, attn_mask, key_lengths, rng_state,
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
        raise RuntimeError("selfattn.varlen_attention: double backward (create_graph=True) is "
                           "not supported")
    return _varlen_grads(ctx, dout, _dlse)


def _varlen_grads(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seq_q, cu_seq_k, seqused_k, rng_state = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = varlen_backward_op(dout, q, k, v, out, lse, cu_seq_q, cu_seq_k, seqused_k,
                                    rng_state, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("selfattn::varlen_forward", _varlen_backward,
                                setup_context=_varlen_setup_context)


def _functorch_function(name, op, setup_context, grads):
    """op and its formula as an autograd.Function with a setup_context, which
    torch.func's transforms require (the one register_autograd builds has none)."""
    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,  # the op runs per sample through torch's batching fallback
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(grads)})


_FUNCTORCH = {
    forward_op: _functorch_function("FunctorchAttention", forward_op, _setup_context, _grads),
    varlen_forward_op: _functorch_function("FunctorchVarlen", varlen_forward_op,
                                           _varlen_setup_context, _varlen_grads),
}


def transformable(op):
    """op (forward_op or varlen_forward_op), or while a torch.func transform
    (grad, vjp, jacrev, vmap of them) is active in eager mode the same op and
    formula as a Function those transforms take. Its backward is not
    differentiable and functorch would not say so (its grad records a graph of
    every backward): transforms nested for a higher derivative are refused."""
    if not torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return op
    differentiating = [i for i in retrieve_all_functorch_interpreters()
                       if i.key() in (TransformType.Grad, TransformType.Jvp)]
    if len(differentiating) > 1:
        raise RuntimeError("selfattn: nested torch.func differentiation (grad of grad, hessian, "
                           "jacrev of jacrev) is not supported: the backward is not "
                           "differentiable")
    return _FUNCTORCH[op].apply


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
