"""Stability of selfattn's fused ops on CPU (issue #6): no memory growth over
many forward + backward calls (resident set size after a warm-up vs after the
run), bitwise-identical results from 4 Python threads calling concurrently
(against a serial run), and bitwise-identical gradients across runs under
torch.use_deterministic_algorithms(True) (CPU; CUDA marked and skipped without
a GPU). Deterministic mode also NaN-fills every torch.empty, so an output
element the kernels forget to write shows up as a NaN here.
"""
from __future__ import annotations

import gc
import os
import threading

import pytest
import torch

import selfattn

F32, BF16 = torch.float32, torch.bfloat16


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _problems(device="cpu"):
    """A few small problems covering the code paths: (inputs, kwargs)."""
    g = torch.Generator().manual_seed(0)

    def r(*s, dtype=F32):
        return torch.randn(*s, generator=g).to(dtype).to(device)

    m = torch.rand(1, 1, 24, 40, generator=g).lt(0.8).to(device)
    fm = r(2, 4, 24, 40)
    return [
        ((r(2, 24, 4, 16), r(2, 40, 2, 16), r(2, 40, 2, 8)), dict(causal=True)),
        ((r(2, 24, 4, 16), r(2, 40, 2, 16), r(2, 40, 2, 8)), dict(attn_mask=m, window=(5, 3))),
        ((r(2, 24, 4, 16), r(2, 40, 2, 16), r(2, 40, 2, 8)),
         dict(attn_mask=fm, key_lengths=torch.tensor([40, 17], device=device))),
        ((r(1, 70, 2, 32, dtype=BF16), r(1, 150, 1, 32, dtype=BF16),
          r(1, 150, 1, 32, dtype=BF16)), dict(causal=True, causal_alignment="top_left")),
    ]


def _fwd_bwd(inputs, kw, mask_grad=False):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    kw = dict(kw)
    if mask_grad and "attn_mask" in kw and kw["attn_mask"].is_floating_point():
        kw["attn_mask"] = kw["attn_mask"].detach().clone().requires_grad_()
        xs.append(kw["attn_mask"])
    out = selfattn.attention(*xs[:3], **kw)
    go = torch.ones_like(out) * 0.5
    grads = torch.autograd.grad(out, xs, go)
    return [out.detach()] + list(grads)


def _churn(calls):
    probs = _problems()
    for i in range(calls):
        (q, k, v), kw = probs[i % len(probs)]
        _fwd_bwd((q, k, v), kw, mask_grad=(i % 3 == 0))
        if i % 50 == 0:
            selfattn.attention_weights(q, k, **{n: x for n, x in kw.items()})


def _memory_growth(calls, slack_mb):
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc (Linux)")
    _churn(300)  # warm-up: allocator caches, brgemm JIT, thread pools
    gc.collect()
    before = _rss_bytes()
    _churn(calls)
    gc.collect()
    grown = (_rss_bytes() - before) / 2**20
    print(f"\nRSS growth over {calls} forward+backward calls: {grown:.2f} MiB")
    assert grown < slack_mb, f"RSS grew by {grown:.1f} MiB over {calls} calls"


def test_no_memory_growth_10000_calls():
    _memory_growth(10000, slack_mb=16)


def test_concurrent_threads_bitwise_equal_to_serial():
    probs = _problems()
    serial = [_fwd_bwd(x, kw, mask_grad=True) for x, kw in probs]
    results, errors = {}, []

    def worker(tid):
        try:
            for rep in range(3):
                order = list(range(len(probs)))[tid % len(probs):] + \
                    list(range(len(probs)))[:tid % len(probs)]
                for i in order:
                    results[(tid, rep, i)] = _fwd_bwd(probs[i][0], probs[i][1], mask_grad=True)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert len(results) == 4 * 3 * len(probs)
    for (tid, rep, i), res in results.items():
        for j, (a, b) in enumerate(zip(res, serial[i])):
            assert torch.equal(a, b), f"thread {tid} rep {rep} problem {i} result {j} differs"


def _deterministic_runs(device):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [[_fwd_bwd(x, kw, mask_grad=True) for x, kw in _problems(device)]
                for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for run in runs[1:]:
        for i, (res, ref) in enumerate(zip(run, runs[0])):
            for j, (a, b) in enumerate(zip(res, ref)):
                assert not torch.isnan(a).any(), f"problem {i} result {j}: NaN"
                assert torch.equal(a, b), f"problem {i} result {j} differs between runs"


def test_deterministic_algorithms_cpu_bitwise():
    _deterministic_runs("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_algorithms_cuda_bitwise():
    _deterministic_runs("cuda")
