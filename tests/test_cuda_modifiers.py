"""Score modifiers on the CUDA backend (issue 18); every test needs a GPU and
is skipped without one (tests/simt runs the same kernels under the emulator
in every CI run).

ALiBi slopes and logit soft-capping through the flash kernels' kMods
instantiations (every head-dim bucket, both dQ paths) and the fallback
kernels, against the float64 reference with DESIGN.md's bound (output and
every gradient, the allocator poisoned first); a soft-cap with a float mask's
gradient (whose backward takes the fallback kernels); a block of a larger
attention drawing the CPU's dropout mask.
"""
from __future__ import annotations

import pytest
import torch

import selfattn
from selfattn import ops, reference

from test_cuda import DEV, check, randn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _slopes(shape):
    return (0.02 + 0.48 * torch.rand(shape, generator=torch.Generator().manual_seed(3))).to(DEV)


@pytest.mark.parametrize("dtype,S,D,kw", [
    (BF16, 300, 64, dict(alibi="h", causal=True)),
    (F16, 257, 128, dict(softcap=5.0)),
    (BF16, 200, 256, dict(alibi="bh", softcap=2.0, window=(40, 10))),
    (F16, 129, 64, dict(alibi="h", softcap=1.0, amplitude=8.0)),
    (F32, 100, 64, dict(alibi="bh", softcap=3.0, causal=True)),
    (F64, 60, 20, dict(alibi="h", softcap=2.0)),
], ids=["bf16-D64-alibi-causal", "f16-D128-softcap", "bf16-D256-both-window",
        "f16-D64-saturated", "f32-fallback", "f64-fallback-D20"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_forward_and_gradients(dtype, S, D, kw, deterministic):
    kw = dict(kw)
    amplitude = kw.pop("amplitude", 1.0)
    alibi = kw.pop("alibi", None)
    if alibi:
        kw["alibi_slopes"] = _slopes((2, 4) if alibi == "bh" else (4,))
    q = (randn(2, S, 4, D, dtype=dtype) * amplitude).requires_grad_()
    k = (randn(2, S, 2, D, dtype=dtype) * amplitude).requires_grad_()
    v = randn(2, S, 2, D, dtype=dtype, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check(lambda q, k, v: selfattn.attention(q, k, v, **kw),
              lambda q, k, v: reference.attention(q, k, v, **kw), [q, k, v])
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_softcap_with_a_float_masks_gradient(dtype):
    q, k, v = (randn(2, 150, 4, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = randn(4, 150, 150, dtype=dtype, requires_grad=True)
    kw = dict(softcap=4.0, alibi_slopes=_slopes((4,)), causal=True)
    check(lambda q, k, v, m: selfattn.attention(q, k, v, attn_mask=m, **kw),
          lambda q, k, v, m: reference.attention(q, k, v, attn_mask=m, **kw), [q, k, v, mask])


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_block_draws_the_cpus_dropout_mask(dtype):
    q, k = randn(1, 130, 2, 64, dtype=dtype), randn(1, 140, 2, 64, dtype=dtype)
    s = _slopes((2,))
    args = (None, None, None, 0.125, -1, -1, 9, 0.4, s, 3.0, 37, 11)  # a block at (37, 11)

    def keep(device):
        rng = torch.tensor([99, 12]).to(device)
        a = list(args)
        a[2], a[8] = rng, s.to(device)
        return (ops.probs_op(q.to(device), k.to(device), None, *a) != 0).cpu()

    assert torch.equal(keep("cpu"), keep(DEV))
