"""torch's CUDA flash ops as selfattn overrides them (selfattn/sdpa.py, issue
15), run on the emulated CUDA backend (torch.ops.selfattn_simt).

The registered CUDA kernels (sdpa.cuda_forward, cuda_backward,
cuda_sdpa_forward, cuda_sdpa_backward, bound to torch's kernel and selfattn's
op) route each call to torch's kernel or to sdpa.flash_forward,
flash_backward, sdpa_flash_forward and sdpa_flash_backward, which take the op
to run: here the emulated one, on CPU tensors. Each case checks torch's
conventions (output and gradients laid out as torch.empty_like of the
inputs, the logsumexp (B, H, Sq) float32, the (2,) uint64 rng state, the
uint64 `unused` scalar, an empty debug mask) and the values against the
float64 reference with DESIGN.md's bound (FlashAttention's bottom-right
alignment for causal and windows). Dropout: the emulated forward and
backward equal selfattn's CPU op, through autograd, given the rng state the
forward returned (the same Philox mask, redrawn by the backward).
"""
from __future__ import annotations

import pytest
import torch

from selfattn import reference, sdpa
from selfattn.testing import assert_close_to_golden

pytestmark = pytest.mark.simt

F16, BF16 = torch.float16, torch.bfloat16


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, bhsd, contiguous_bhsd=False, seed=0):
    """q, k, v and dout in (B, H, S, D) (bhsd) or (B, S, H, D) as torch passes them:
    BHSD as the transposed view of (B, S, H, D) memory, as models make them, or
    contiguous BHSD."""
    g = torch.Generator().manual_seed(seed)

    def make(S, H):
        t = torch.randn(B, S, H, D, generator=g).to(dtype)
        if not bhsd:
            return t
        t = t.transpose(1, 2)
        return t.contiguous() if contiguous_bhsd else t

    return make(Sq, Hq), make(Sk, Hkv), make(Sk, Hkv), make(Sq, Hq)


def _golden(q, k, v, dout, bhsd, kw):
    """reference.attention (bottom-right alignment) in float64 and in q's
    dtype: [out, dq, dk, dv] each, in the inputs' layout."""
    results = []
    for dtype in (torch.float64, q.dtype):
        xs = [(t.transpose(1, 2) if bhsd else t).detach().to(dtype).requires_grad_()
              for t in (q, k, v)]
        out = reference.attention(*xs, causal_alignment="bottom_right", **kw)
        grads = torch.autograd.grad(out, xs, (dout.transpose(1, 2) if bhsd else dout).to(dtype))
        results.append([t.transpose(1, 2) if bhsd else t for t in (out.detach(), *grads)])
    return results


def _check_conventions(name, q, k, v, out, lse, seed_offset, unused, debug):
    assert out.stride() == torch.empty_like(q).stride(), f"{name}: out strides {out.stride()}"
    B, Hq, Sq = (q.shape[0], q.shape[1], q.shape[2]) if name.startswith("sdpa") else \
        (q.shape[0], q.shape[2], q.shape[1])
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert seed_offset.shape == (2,) and seed_offset.dtype == torch.uint64
    assert unused.shape == () and unused.dtype == torch.uint64
    assert debug.numel() == 0 and debug.dtype == q.dtype


CASES = [
    # name, dtype, B, Hq, Hkv, Sq, Sk, D, causal, window (left, right), contiguous BHSD
    ("sdpa_f16", F16, 2, 2, 2, 40, 40, 32, False, None, False),
    ("sdpa_bf16_causal_contiguous", BF16, 1, 2, 2, 33, 33, 64, True, None, True),
    ("sdpa_f16_gqa_causal", F16, 1, 4, 2, 24, 24, 32, True, None, False),
    ("flash_f16_gqa_causal_window", F16, 1, 4, 2, 24, 40, 32, True, (8, None), False),
    ("flash_bf16_window", BF16, 2, 2, 1, 40, 24, 64, False, (5, 3), False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_overrides_match_reference(simt, case):
    name, dtype, B, Hq, Hkv, Sq, Sk, D, causal, window, contiguous = case
    bhsd = name.startswith("sdpa")
    q, k, v, dout = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, bhsd, contiguous)
    left, right = window if window else (None, None)
    if bhsd:
        out, lse, _, _, max_q, max_k, seed_offset, unused, debug = sdpa.sdpa_flash_forward(
            simt.attention_forward, q, k, v, 0.0, causal)
        assert (max_q, max_k) == (Sq, Sk)
        dq, dk, dv = sdpa.sdpa_flash_backward(simt.attention_backward, dout, q, k, v, out, lse,
                                              0.0, causal, seed_offset)
    else:
        out, lse, seed_offset, unused, debug = sdpa.flash_forward(
            simt.attention_forward, q, k, v, 0.0, causal, None, left, right)
        dq, dk, dv = sdpa.flash_backward(simt.attention_backward, dout, q, k, v, out, lse, 0.0,
                                         causal, seed_offset, None, left, right)
    _check_conventions(name, q, k, v, out, lse, seed_offset, unused, debug)
    for x, g in ((q, dq), (k, dk), (v, dv)):
        assert g.stride() == torch.empty_like(x).stride(), f"{name}: gradient strides"
    kw = dict(causal=causal, window=window)  # causal sets the right side to 0
    golden, lowp = _golden(q, k, v, dout, bhsd, kw)
    for label, ours, lp, gd in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), lowp, golden):
        assert_close_to_golden(f"{name} {label}", ours, lp, gd)


@pytest.mark.parametrize("bhsd", [True, False], ids=["sdpa", "flash"])
def test_cuda_override_dropout_redraws_the_forward_mask(simt, bhsd):
    """The emulated mapping's forward and backward equal selfattn's CPU op,
    through autograd, given the rng state that forward returned: the backward
    redraws the forward's mask from it."""
    q, k, v, dout = _inputs(1, 2, 2, 24, 24, 32, F16, bhsd, seed=3)
    torch.manual_seed(1234)
    if bhsd:
        out, lse, *_, seed_offset, _, _ = sdpa.sdpa_flash_forward(
            simt.attention_forward, q, k, v, 0.3, True)
        grads = sdpa.sdpa_flash_backward(simt.attention_backward, dout, q, k, v, out, lse, 0.3,
                                         True, seed_offset)
    else:
        out, lse, seed_offset, _, _ = sdpa.flash_forward(simt.attention_forward, q, k, v, 0.3,
                                                         True)
        grads = sdpa.flash_backward(simt.attention_backward, dout, q, k, v, out, lse, 0.3, True,
                                    seed_offset)
    rng = seed_offset.view(torch.int64)
    assert rng.abs().sum() > 0  # a drawn (seed, offset)
    bshd = (lambda t: t.transpose(1, 2)) if bhsd else (lambda t: t)
    xs = [bshd(t).detach().requires_grad_() for t in (q, k, v)]
    expected, _ = torch.ops.selfattn.attention_forward(*xs, None, None, rng, 32 ** -0.5, -1, 0,
                                                       0, 0.3, None, 0.0, 0, 0)
    expected_grads = torch.autograd.grad(expected, xs, bshd(dout))
    without, _ = torch.ops.selfattn.attention_forward(*xs, None, None, None, 32 ** -0.5, -1, 0,
                                                      0, 0.0, None, 0.0, 0, 0)
    assert not torch.allclose(expected.float(), without.float(), atol=1e-2)  # elements dropped
    for label, ours, cpu in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                (expected, *expected_grads)):
        torch.testing.assert_close(bshd(ours).float(), cpu.float(), rtol=2e-2, atol=2e-2,
                                   msg=lambda m, label=label: f"{label}: {m}")


class _TorchKernel:
    """Stands for torch's own kernel: records the calls it takes."""

    def __init__(self):
        self.calls = []

    def call_boxed(self, keyset, *args, **kwargs):
        self.calls.append(kwargs)
        return "torch's"


def test_cuda_override_kernels_route_and_run(simt):
    """The four registered CUDA kernels (sdpa.cuda_forward, ...), with the
    emulated ops: what selfattn takes runs as flash_forward / flash_backward
    do (their values against the reference above); packed batches go to
    torch's kernel in both halves; dropout with an argument that only the
    forward op receives raises."""
    torch_kernel = _TorchKernel()
    fwd, bwd = simt.attention_forward, simt.attention_backward
    for bhsd in (False, True):
        q, k, v, dout = _inputs(1, 4, 2, 24, 24, 32, F16, bhsd, seed=5)
        if bhsd:
            out, lse, *_, seed_offset, unused, _ = sdpa.cuda_sdpa_forward(
                torch_kernel, fwd, None, q, k, v, 0.0, True)
            expected = sdpa.sdpa_flash_forward(fwd, q, k, v, 0.0, True)[0]
            grads = sdpa.cuda_sdpa_backward(torch_kernel, bwd, None, dout, q, k, v, out, lse, None,
                                            None, 24, 24, 0.0, True, seed_offset, unused)
            expected_grads = sdpa.sdpa_flash_backward(bwd, dout, q, k, v, out, lse, 0.0, True,
                                                      seed_offset)
        else:
            out, lse, seed_offset, unused, _ = sdpa.cuda_forward(
                torch_kernel, fwd, None, q, k, v, None, None, 24, 24, 0.0, True, False,
                window_size_left=8)
            expected = sdpa.flash_forward(fwd, q, k, v, 0.0, True, None, 8)[0]
            grads = sdpa.cuda_backward(torch_kernel, bwd, None, dout, q, k, v, out, lse, None,
                                       None, 24, 24, 0.0, True, seed_offset, unused,
                                       window_size_left=8)
            expected_grads = sdpa.flash_backward(bwd, dout, q, k, v, out, lse, 0.0, True,
                                                 seed_offset, None, 8)
        for ours, theirs in zip((out, *grads), (expected, *expected_grads)):
            torch.testing.assert_close(ours, theirs)
    assert torch_kernel.calls == []
    offsets = torch.tensor([0, 24], dtype=torch.int32)
    assert sdpa.cuda_forward(torch_kernel, fwd, None, q, k, v, offsets, offsets, 24, 24, 0.1,
                             True, False) == "torch's"
    assert sdpa.cuda_backward(torch_kernel, bwd, None, dout, q, k, v, out, lse, offsets, offsets,
                              24, 24, 0.1, True, seed_offset, unused) == "torch's"
    assert len(torch_kernel.calls) == 2
    with pytest.raises(NotImplementedError, match="return_debug_mask"):
        sdpa.cuda_sdpa_forward(torch_kernel, fwd, None, q, k, v, 0.1, True, True)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        sdpa.cuda_forward(torch_kernel, fwd, None, q, k, v, None, None, 24, 24, 0.1, True, False,
                          alibi_slopes=torch.ones(4))
    assert len(torch_kernel.calls) == 2
