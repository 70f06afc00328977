"""Packed variable-length attention (issue 14) on the emulated CUDA backend:
torch.ops.selfattn_simt.varlen_forward / varlen_backward, which run each
sequence through the CUDA kernels (flash for float16/bfloat16 at D = 64,
the fallback kernels for float32), against per-sequence calls of the float64
reference with DESIGN.md's bound; lengths 0, 1 and several tiles, query and
key lengths that differ, GQA, causal and windows aligned bottom-right per
sequence, seqused_k; and the KV cache step (kvcache_forward), which appends
into a contiguous cache or a pool of pages and runs each sequence's queries
through the same kernels.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import check_lse, configure

from selfattn import reference
from selfattn.testing import assert_close_to_golden

pytestmark = pytest.mark.simt

CASES = [
    # name, dtype, q lengths, k lengths, Hq, Hkv, D, window (left, right), seqused_k, kernel
    ("f16_causal_gqa", torch.float16, [0, 1, 37, 70], [3, 1, 37, 90], 4, 2, 64, (-1, 0), None,
     "flash"),
    ("bf16_window", torch.bfloat16, [20, 65], [20, 65], 2, 2, 64, (8, 2), None, "flash"),
    ("f32_seqused_k", torch.float32, [9, 30], [16, 40], 2, 1, 24, (-1, -1), [5, 0], "fallback"),
]


def _cu(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def _reference(xs, dout, q_lens, k_lens, window, used, scale):
    q, k, v = xs
    cq, ck = _cu(q_lens).tolist(), _cu(k_lens).tolist()
    outs = []
    for b in range(len(q_lens)):
        n = k_lens[b] if used is None else used[b]
        outs.append(reference.attention(q[cq[b]:cq[b + 1]][None], k[ck[b]:ck[b] + n][None],
                                        v[ck[b]:ck[b] + n][None], window=window,
                                        scale=scale)[0])
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, xs, dout.to(out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulated_varlen_matches_reference(simt, case):
    name, dtype, q_lens, k_lens, Hq, Hkv, D, window, used, kernel = case
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(sum(k_lens), Hkv, D, generator=g).to(dtype) for _ in range(2))
    seqused = None if used is None else torch.tensor(used)
    scale = D ** -0.5
    simt.simt_take_log()
    out, lse = simt.varlen_forward(q, k, v, _cu(q_lens), _cu(k_lens), seqused, None, scale,
                                   window[0], window[1], 0.0)
    dq, dk, dv = simt.varlen_backward(dout, q, k, v, out, lse, _cu(q_lens), _cu(k_lens), seqused,
                                      None, scale, window[0], window[1], 0.0)
    log = simt.simt_take_log()
    assert any(kernel in launch for launch in log), f"{kernel} not launched: {log}"
    assert lse.shape == (Hq, sum(q_lens)) and lse.dtype == torch.float32
    results = []
    for dt in (torch.float64, dtype):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        results.append(_reference(xs, dout, q_lens, k_lens, window, used, scale))
    golden, lowp = results
    for label, ours, lp, gd in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), lowp, golden):
        assert_close_to_golden(f"{name} {label}", ours, lp, gd)


PAGED = [
    # name, dtype, q lengths, k lengths, page size, window, kernel
    ("f16_pages64_causal", torch.float16, [1, 5, 0], [150, 64, 9], 64, (-1, 0), "flash"),
    ("bf16_pages128_window", torch.bfloat16, [3, 2], [200, 0], 128, (40, 0), "flash"),
    ("f16_pages16", torch.float16, [2, 1], [70, 33], 16, (-1, 0), "fallback"),
    ("f32_pages5", torch.float32, [4, 1], [23, 11], 5, (-1, -1), "fallback"),
]


@pytest.mark.parametrize("case", PAGED, ids=[c[0] for c in PAGED])
def test_emulated_paged_varlen_matches_reference(simt, case):
    """A paged pool (shuffled pages, spare pages of noise) read through the
    block table: the flash forward when every key tile lies in one page, the
    fallback otherwise."""
    name, dtype, q_lens, k_lens, page_size, window, kernel = case
    Hq, Hkv, D = 4, 2, 64
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    k, v = (torch.randn(sum(k_lens), Hkv, D, generator=g).to(dtype) for _ in range(2))
    pages = [-(-n // page_size) for n in k_lens]
    num_pages = sum(pages) + 2
    order = torch.randperm(num_pages, generator=g).tolist()
    pools = [torch.randn(num_pages, page_size, Hkv, D, generator=g).to(dtype) for _ in range(2)]
    table = torch.zeros(len(k_lens), max(pages), dtype=torch.int32)
    start = 0
    for b, n in enumerate(k_lens):
        for i in range(pages[b]):
            table[b, i] = page = order.pop()
            for pool, x in zip(pools, (k, v)):
                rows = x[start + i * page_size:start + min(n, (i + 1) * page_size)]
                pool[page, :rows.shape[0]] = rows
        start += n
    scale = D ** -0.5
    simt.simt_take_log()
    out, lse = simt.varlen_forward(q, pools[0], pools[1], _cu(q_lens), _cu([0] * len(k_lens)),
                                   torch.tensor(k_lens), None, scale, window[0], window[1], 0.0,
                                   table)
    log = simt.simt_take_log()
    assert any(kernel in launch for launch in log), f"{kernel} not launched: {log}"
    golden, lowp = (_reference([t.to(dt).requires_grad_() for t in (q, k, v)],
                               torch.zeros_like(out), q_lens, k_lens, window, None, scale)[0]
                    for dt in (torch.float64, dtype))
    assert_close_to_golden(f"{name} out", out, lowp, golden)


KVCACHE = [
    # name, dtype, cache lengths before the step, n (queries), n_new, page size (None:
    # contiguous), window (left, right), -1 unbounded: (-1, 0) is causal
    ("f16_decode", torch.float16, [0, 70, 127], 1, 1, None, (-1, 0)),
    ("bf16_chunk_pages64", torch.bfloat16, [60, 3], 5, 5, 64, (30, 0)),
    ("f32_pages5", torch.float32, [11, 0], 2, 2, 5, (-1, 0)),
    ("f16_window_decode", torch.float16, [150, 3, 90], 1, 1, None, (10, 0)),
    ("f32_window_pages5", torch.float32, [140, 0, 37], 3, 1, 5, (20, 0)),
    ("f16_no_append_empty_pages64", torch.float16, [0, 100, 70], 4, 0, 64, (10, 3)),
    ("f32_no_append_two_sided", torch.float32, [0, 90], 3, 0, None, (4, 2)),
]


@pytest.mark.parametrize("case", KVCACHE, ids=[c[0] for c in KVCACHE])
def test_emulated_kvcache_step_matches_reference(simt, case):
    """torch.ops.selfattn_simt.kvcache_forward: the new rows land in the cache
    (contiguous or a shuffled pool of pages; table entries past a sequence's
    pages are -1, which no kernel may read), then each sequence's queries
    attend causally or within a window to its valid prefix through the CUDA
    kernels, the whole batch in one forward launch (its diagonal and window
    aligned to each sequence's own length): out and lse against the float64
    reference, rows that see no key 0 and -inf."""
    name, dtype, lens, n, n_new, page_size, window = case
    B, Hq, Hkv, D, S_max = len(lens), 4, 2, 64, 160
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, n, Hq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, n_new, Hkv, D, generator=g).to(dtype) for _ in range(2))
    caches = [torch.randn(B, S_max, Hkv, D, generator=g).to(dtype) for _ in range(2)]
    table = None
    if page_size is not None:
        per = -(-S_max // page_size)
        table = torch.randperm(B * per, generator=g).view(B, per).to(torch.int32)
        pools = [torch.empty(B * per, page_size, Hkv, D, dtype=dtype) for _ in range(2)]
        for pool, cache in zip(pools, caches):
            pool[table.flatten().long()] = torch.nn.functional.pad(
                cache, (0, 0, 0, 0, 0, per * page_size - S_max)).view(B * per, page_size, Hkv, D)
        targets = pools
        for b, s in enumerate(lens):
            table[b, -(-(s + n_new) // page_size):] = -1
    else:
        targets = [c.clone() for c in caches]
    scale = D ** -0.5
    simt.simt_take_log()
    out, lse = simt.kvcache_forward(q, *targets, k, v, torch.tensor(lens), table, scale,
                                    *window)
    log = simt.simt_take_log()
    assert sum("fwd_kernel" in k for k in log) == 1, log
    assert out.shape == (B, n, Hq, D) and lse.shape == (B, Hq, n)
    for b, s in enumerate(lens):
        for cache, new in zip(caches, (k, v) if n_new else ()):
            cache[b, s:s + n_new] = new[b]
        if page_size is None:
            assert torch.equal(targets[0][b], caches[0][b])
        elif s + n_new:  # the pool's rows of this sequence, in order
            rows = [targets[0][table[b, j // page_size], j % page_size] for j in range(s + n_new)]
            assert torch.equal(torch.stack(rows), caches[0][b, :s + n_new])
        kb, vb = (c[b:b + 1, :s + n_new] for c in caches)
        (golden, golden_lse), (lowp, lowp_lse) = (
            reference.attention(q[b:b + 1].to(dt), kb.to(dt), vb.to(dt), window=window,
                                scale=scale, return_lse=True)
            for dt in (torch.float64, dtype))
        assert_close_to_golden(f"{name} seq {b}", out[b:b + 1], lowp, golden)
        check_lse(lse[b:b + 1], lowp_lse, golden_lse)


def test_emulated_kvcache_num_splits_sets_the_split_count(simt):
    """num_splits on the emulated 108-SM device: 1 launches no merge and gives
    the bits of the automatic choice on a 1-SM device (which never splits);
    5 and 100 (more splits than the 11 key tiles: one per tile) merge, within
    DESIGN.md's bound of the reference."""
    g = torch.Generator().manual_seed(4)
    Hq, Hkv, D, S = 4, 2, 64, 700
    q = torch.randn(1, 1, Hq, D, generator=g).to(torch.float16)
    kc, vc = (torch.randn(1, S, Hkv, D, generator=g).to(torch.float16) for _ in range(2))
    lens, scale = torch.tensor([S]), D ** -0.5
    golden, lowp = (reference.attention(q.to(dt), kc.to(dt), vc.to(dt), causal=True,
                                        scale=scale)
                    for dt in (torch.float64, torch.float16))
    results = {}
    for sm_count, splits, merged in ((1, 0, False), (108, 1, False), (108, 5, True),
                                     (108, 100, True)):
        configure(0, sm_count=sm_count)
        results[sm_count, splits] = simt.kvcache_forward(q, kc, vc, None, None, lens, None,
                                                         scale, -1, 0, splits)
        log = simt.simt_take_log()
        assert any("split_kv_combine_kernel" in k for k in log) == merged, log
        assert_close_to_golden(f"num_splits={splits}", results[sm_count, splits][0], lowp,
                               golden)
    assert all(torch.equal(a, b) for a, b in zip(results[1, 0], results[108, 1]))
