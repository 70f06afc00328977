"""selfattn.attention_with_kvcache (issue 14, the preallocated cache): the new
keys and values land in the cache in place at each sequence's length (the
rest of the cache untouched, no new cache tensor), and the new queries'
output matches, per sequence, the float64 reference on the cache's valid
prefix with bottom-right causal alignment and windows (DESIGN.md's bound);
sequences of different lengths in one call; decode (1 query) and chunks of
several; bad input raises clearly.
"""
from __future__ import annotations

import pytest
import torch

import selfattn
from selfattn import reference
from selfattn.errors import ArgumentError
from selfattn.testing import assert_close_to_golden

F32, BF16 = torch.float32, torch.bfloat16


def _setup(B=3, S_max=64, Hq=4, Hkv=2, D=16, Dv=None, n=1, n_new=1, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return (r(B, n, Hq, D), r(B, S_max, Hkv, D), r(B, S_max, Hkv, Dv),
            r(B, n_new, Hkv, D) if n_new else None, r(B, n_new, Hkv, Dv) if n_new else None)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n,n_new,window", [(1, 1, None), (5, 5, None), (3, 0, None),
                                            (4, 4, (6, 0)), (1, 1, (8, 0))])
def test_appends_in_place_and_matches_reference(dtype, n, n_new, window):
    q, kc, vc, k, v = _setup(n=n, n_new=n_new, dtype=dtype, Dv=24)
    seqlens = torch.tensor([0, 17, 40], dtype=torch.int32)
    before_k, before_v = kc.clone(), vc.clone()
    ptr = kc.data_ptr()
    with torch.no_grad():
        out, lse = selfattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens,
                                                   window=window, return_lse=True)
    assert kc.data_ptr() == ptr
    for b, s in enumerate(seqlens.tolist()):
        if n_new:  # the new rows are written, nothing else changes
            assert torch.equal(kc[b, s:s + n_new], k[b]) and torch.equal(vc[b, s:s + n_new], v[b])
        for cache, old in ((kc, before_k), (vc, before_v)):
            assert torch.equal(cache[b, :s], old[b, :s])
            assert torch.equal(cache[b, s + n_new:], old[b, s + n_new:])
        total = s + n_new
        kw = dict(causal=True, window=window)  # bottom-right: the last query is the last key
        golden, lowp = (reference.attention(q[b:b + 1].to(dt), kc[b:b + 1, :total].to(dt),
                                            vc[b:b + 1, :total].to(dt), **kw, return_lse=True)
                        for dt in (torch.float64, dtype))
        assert_close_to_golden(f"seq {b} out", out[b:b + 1], lowp[0], golden[0])
        torch.testing.assert_close(lse[b:b + 1], golden[1].float(), rtol=2e-2, atol=2e-2)


def test_decode_loop_equals_attention_on_the_whole():
    """Token by token generation with the cache gives, at every step, the
    causal attention of the sequence so far."""
    B, S, H, D = 2, 12, 2, 8
    g = torch.Generator().manual_seed(3)
    qs, ks, vs = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    kc, vc = torch.zeros(B, S, H, D), torch.zeros(B, S, H, D)
    with torch.inference_mode():
        steps = [selfattn.attention_with_kvcache(qs[:, t:t + 1], kc, vc, ks[:, t:t + 1],
                                                 vs[:, t:t + 1], cache_seqlens=t)
                 for t in range(S)]
    whole = selfattn.attention(qs, ks, vs, causal=True)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused():
    q, kc, vc, k, v = _setup()
    cases = [
        (dict(cache_seqlens=torch.tensor([0, 63, 64])), ArgumentError, "S_max = 64"),
        (dict(cache_seqlens=torch.tensor([0, -1, 3])), ArgumentError,
         r"^selfattn.attention_with_kvcache: cache_seqlens\[1\] = -1 must be >= 0$"),
        (dict(cache_seqlens=torch.tensor([0, 1])), TypeError, "cache_seqlens must be"),
        (dict(cache_seqlens=0, v=None), ValueError, "both k and v"),
        (dict(cache_seqlens=0, k=k.double()), TypeError, "k must be a torch.float32 tensor"),
        (dict(cache_seqlens=0, v=v[:, :0]), ValueError, r"got \(3, 1, 2, 16\) and \(3, 0"),
        (dict(cache_seqlens=0, num_splits=-1), TypeError, "num_splits must be a non-negative"),
        (dict(cache_seqlens=0, num_splits=2.0), TypeError, "num_splits must be a non-negative"),
    ]
    for kw, exc, words in cases:
        args = dict(k=k, v=v)
        args.update(kw)
        with torch.no_grad(), pytest.raises(exc, match=words):
            selfattn.attention_with_kvcache(q, kc, vc, **args)
    with pytest.raises(ValueError, match="inference only"):
        selfattn.attention_with_kvcache(q.requires_grad_(), kc, vc, k, v, cache_seqlens=0)
    with torch.no_grad(), pytest.raises(ValueError, match="contiguous last dim"):
        selfattn.attention_with_kvcache(q, kc.transpose(2, 3), vc, k, v, cache_seqlens=0)


def test_cache_of_any_strides_is_written_in_place():
    """A cache stored (S_max, B, ...) (e.g. a slice of a larger buffer) is
    appended to in place and read as the contiguous one."""
    q, kc, vc, k, v = _setup(n=2, n_new=2)
    seqlens = torch.tensor([3, 0, 30])
    kt, vt = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (kc, vc))
    with torch.no_grad():
        ours = selfattn.attention_with_kvcache(q, kt, vt, k, v, cache_seqlens=seqlens)
        contiguous = selfattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens)
    assert torch.equal(kt, kc) and torch.equal(vt, vc)
    torch.testing.assert_close(ours, contiguous, rtol=0, atol=0)


def test_op_checks_before_writing():
    """torch.ops.selfattn.kvcache_forward called directly refuses lengths past
    the cache and a bad block table before it writes anything."""
    q, kc, vc, k, v = _setup()
    op = torch.ops.selfattn.kvcache_forward.default
    before = kc.clone()
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[2\] \+ n_new = 64 \+ 1"):
        op(q, kc, vc, k, v, torch.tensor([0, 1, 64]), None, 0.25, -1, 0)
    kp, table = _paged(kc, 8)
    vp, _ = _paged(vc, 8)
    pool, far = kp.clone(), table.clone()
    far[0, 0] = kp.shape[0]
    with pytest.raises(RuntimeError, match=r"block_table\[0, 0\] = 27 is not a page"):
        op(q, kp, vp, k, v, torch.tensor([3, 1, 2]), far, 0.25, -1, 0)
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[2\] \+ n_new = 32 \+ 1 must lie in "
                       r"\[0, pages x page_size = 32\]"):
        op(q, kp, vp, k, v, torch.tensor([3, 1, 32]), table[:, :4], 0.25, -1, 0)
    with pytest.raises(RuntimeError, match="cache_seqlens"):  # no int64 overflow past the checks
        op(q, kp, vp, k, v, torch.tensor([3, 1, 2 ** 63 - 1]), table, 0.25, -1, 0)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(q, kc, vc, k, v, torch.tensor([3, 1, 2]), None, float("nan"), -1, 0)
    with pytest.raises(RuntimeError, match="num_splits must be >= 0"):
        op(q, kc, vc, k, v, torch.tensor([3, 1, 2]), None, 0.25, -1, 0, -2)
    with pytest.raises(RuntimeError, match="pass both k and v"):
        op(q, kc, vc, k, None, torch.tensor([3, 1, 2]), None, 0.25, -1, 0)
    assert torch.equal(kc, before) and torch.equal(kp, pool)


def test_opcheck_and_compile():
    q, kc, vc, k, v = _setup(n=2, n_new=2)
    kp, table = _paged(kc, 8)
    vp, _ = _paged(vc, 8)
    lens = torch.tensor([5, 0, 20])
    op = torch.ops.selfattn.kvcache_forward.default
    torch.library.opcheck(op, (q, kc, vc, k, v, lens, None, 0.25, -1, 0))
    torch.library.opcheck(op, (q, kp, vp, k, v, lens, table, 0.25, 6, 0))

    def step(q, kc, vc, k, v):
        return selfattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)

    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, k, v)
        eager = step(q, kc2, vc2, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the compiled step wrote in place
    bad = torch.compile(lambda q, kc, vc, k, v, lens: selfattn.attention_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=lens), fullgraph=True, backend="aot_eager")
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"cache_seqlens\[2\] \+ n_new"):
        bad(q, kc, vc, k, v, torch.tensor([5, 0, 63]))  # compiled: the op's own check


def test_causal_self_attention_generates_with_the_cache():
    """selfattn.nn.CausalSelfAttention(rotary) with a KVCache: a prompt then
    tokens one by one give the layer's output on the whole sequence."""
    torch.manual_seed(0)
    layer = selfattn.nn.CausalSelfAttention(32, 4, num_kv_heads=2, rotary=True).eval()
    x = torch.randn(2, 11, 32)
    cache = selfattn.nn.KVCache(2, 16, 2, 8)
    with torch.no_grad():
        whole = layer(x)
        steps = [layer(x[:, :6], cache=cache)]
        steps += [layer(x[:, t:t + 1], cache=cache) for t in range(6, 11)]
    assert cache.lengths.tolist() == [11, 11]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key_lengths=None"):
        layer(x[:, :1], key_lengths=torch.tensor([1, 1]), cache=cache)


# ---------------------------------------------------------------------------
# Paged caches: pools of pages in shuffled order, read in place through the
# block table.

def _paged(cache, page_size, seed=1):
    """A pool holding `cache` (B, S, H, D) in pages of page_size rows, in a
    shuffled order among spare pages of noise, and its block table."""
    B, S = cache.shape[:2]
    per = -(-S // page_size)
    g = torch.Generator().manual_seed(seed)
    num_pages = B * per + 3
    table = torch.randperm(num_pages, generator=g)[:B * per].view(B, per).to(torch.int32)
    pool = torch.randn(num_pages, page_size, *cache.shape[2:], generator=g).to(cache.dtype)
    for b in range(B):
        for i in range(per):
            rows = cache[b, i * page_size:(i + 1) * page_size]
            pool[table[b, i], :rows.shape[0]] = rows
    return pool, table


def _unpaged(pool, table, S):
    """The contiguous (B, S, H, D) view of a pool's sequences, as a copy."""
    return torch.stack([pool[row.long()].flatten(0, 1)[:S] for row in table])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("page_size", [1, 5, 16, 64, 256])
@pytest.mark.parametrize("n,n_new,window", [(1, 1, None), (7, 7, None), (3, 0, (9, 0))])
def test_paged_cache_equals_the_contiguous_one(dtype, page_size, n, n_new, window):
    """The same cache, contiguous or in shuffled pages of any size, gives the
    same output (and the reference's); appends land in the right pages, across
    page boundaries, and no other page changes."""
    S_max = 300
    q, kc, vc, k, v = _setup(S_max=S_max, n=n, n_new=n_new, dtype=dtype, Dv=24)
    seqlens = torch.tensor([0, 62, 250], dtype=torch.int32)  # appends cross pages of 5, 16, 64
    kp, table = _paged(kc, page_size)
    vp, _ = _paged(vc, page_size)
    kp_before, vp_before = kp.clone(), vp.clone()
    with torch.no_grad():
        ours, lse = selfattn.attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=seqlens,
                                                    block_table=table, window=window,
                                                    return_lse=True)
        contiguous, lse_c = selfattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens,
                                                            window=window, return_lse=True)
    torch.testing.assert_close(_unpaged(kp, table, S_max), kc, rtol=0, atol=0)
    torch.testing.assert_close(_unpaged(vp, table, S_max), vc, rtol=0, atol=0)
    for pool, before in ((kp, kp_before), (vp, vp_before)):
        written = torch.zeros(pool.shape[:2], dtype=torch.bool)
        for b, s in enumerate(seqlens.tolist()):
            for pos in range(s, s + n_new):
                written[table[b, pos // page_size], pos % page_size] = True
        assert torch.equal(pool[~written], before[~written])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours, contiguous, **tol)
    torch.testing.assert_close(lse, lse_c, rtol=1e-5, atol=1e-5)
    for b, s in enumerate(seqlens.tolist()):
        total = s + n_new
        golden, lowp = (reference.attention(q[b:b + 1].to(dt), kc[b:b + 1, :total].to(dt),
                                            vc[b:b + 1, :total].to(dt), causal=True,
                                            window=window)
                        for dt in (torch.float64, dtype))
        assert_close_to_golden(f"paged seq {b}", ours[b:b + 1], lowp, golden)


def test_paged_decode_loop_equals_attention_on_the_whole():
    B, S, H, D, page = 2, 13, 2, 8, 4
    g = torch.Generator().manual_seed(5)
    qs, ks, vs = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    table = torch.tensor([[5, 0, 7, 2], [1, 6, 3, 4]], dtype=torch.int32)
    kp, vp = torch.zeros(8, page, H, D), torch.zeros(8, page, H, D)
    with torch.inference_mode():
        steps = [selfattn.attention_with_kvcache(qs[:, t:t + 1], kp, vp, ks[:, t:t + 1],
                                                 vs[:, t:t + 1], cache_seqlens=t,
                                                 block_table=table)
                 for t in range(S)]
    whole = selfattn.attention(qs, ks, vs, causal=True)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_bad_paged_input_is_refused():
    q, kc, vc, k, v = _setup(S_max=32)
    kp, table = _paged(kc, 8)
    vp, _ = _paged(vc, 8)
    far = table.clone()
    far[1, 0] = kp.shape[0]
    negative = table.clone()
    negative[2, 3] = -1
    cases = [
        (dict(cache_seqlens=32), ArgumentError, r"\+ n_new = 32 \+ 1 must lie in \[0, pages x "
         r"page_size = 32\]"),
        (dict(cache_seqlens=3, block_table=far), ArgumentError, r"block_table\[1, 0\] = 15"),
        (dict(cache_seqlens=torch.tensor([0, 0, 24]), block_table=negative), ArgumentError,
         r"block_table\[2, 3\] = -1"),
        (dict(cache_seqlens=0, block_table=table.long()), TypeError, "int32"),
        (dict(cache_seqlens=0, block_table=table[:2]), TypeError, r"shape \(3, max_pages\)"),
    ]
    for kw, exc, words in cases:
        args = dict(k=k, v=v, block_table=table)
        args.update(kw)
        before = kp.clone()
        with torch.no_grad(), pytest.raises(exc, match=words):
            selfattn.attention_with_kvcache(q, kp, vp, **args)
        assert torch.equal(kp, before)  # nothing written before the refusal
    with torch.no_grad(), pytest.raises(ValueError, match="pools of one number"):
        selfattn.attention_with_kvcache(q, kp, vp[:, :4], k, v, cache_seqlens=0,
                                        block_table=table)
    with pytest.raises(ValueError, match="inference only"):
        selfattn.attention_with_kvcache(q.requires_grad_(), kp, vp, k, v, cache_seqlens=0,
                                        block_table=table)


def test_paged_kv_cache_layer_hands_out_pages_as_sequences_grow():
    """selfattn.nn.KVCache(page_size=...): the layer generates as with the
    preallocated cache, pages are taken only as the sequences grow, a pool
    too small raises clearly, and reset() frees every page."""
    torch.manual_seed(0)
    layer = selfattn.nn.CausalSelfAttention(32, 4, num_kv_heads=2, rotary=True).eval()
    x = torch.randn(2, 11, 32)
    cache = selfattn.nn.KVCache(2, 16, 2, 8, page_size=4, num_pages=6)
    with torch.no_grad():
        whole = layer(x)
        steps = [layer(x[:, :6], cache=cache)]
        assert (cache.block_table >= 0).sum().item() == 4  # 2 pages of 4 per sequence
        steps += [layer(x[:, t:t + 1], cache=cache) for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [11, 11]
    held = cache.block_table[cache.block_table >= 0]
    assert held.numel() == 6 and held.unique().numel() == 6
    with torch.no_grad(), pytest.raises(ValueError, match="pages are all in use"):
        layer(x[:, :2], cache=cache)
    cache.reset()
    assert (cache.block_table == -1).all() and sorted(cache._free) == list(range(6))
    with torch.no_grad(), pytest.raises(ValueError, match="past max_len = 16"):
        layer(torch.randn(2, 17, 32), cache=cache)
    small = selfattn.nn.KVCache(2, 16, 2, 8, page_size=4, num_pages=5)
    with torch.no_grad(), pytest.raises(ValueError, match=r"6 more needed, 5 free"):
        layer(x[:, :10], cache=small)  # sequence 0's pages would fit: none is taken
    assert (small.block_table == -1).all() and len(small._free) == 5


# ---------------------------------------------------------------------------
# Split-KV: with few query rows and fewer tasks than threads, the CPU forward
# splits each task's keys across threads and merges through the logsumexp.

@pytest.mark.parametrize("kw", [
    dict(),
    dict(causal=True),
    dict(window=(1500, 0)),
    dict(causal=True, softcap=8.0, alibi_slopes=torch.tensor([0.01, 0.02, 0.05, 0.1])),
    dict(dropout_p=0.2, generator="g"),
    dict(attn_mask="bool"),
    dict(key_lengths=torch.tensor([3000])),
], ids=["full", "causal", "window", "modifiers", "dropout", "bool_mask", "key_lengths"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_split_kv_equals_one_split(kw, dtype):
    """B = 1, one K/V head, 1 or 3 queries over 5000 keys: 8 threads split the
    keys (up to 4 ranges of >= 1024), 1 thread does not; same output and lse
    within float rounding, and the reference's within DESIGN.md's bound."""
    g = torch.Generator().manual_seed(7)
    for n in (1, 3):
        q = torch.randn(1, n, 4, 32, generator=g).to(dtype)
        k, v = (torch.randn(1, 5000, 1, 32, generator=g).to(dtype) for _ in range(2))
        args = dict(kw)
        if args.get("attn_mask") == "bool":
            args["attn_mask"] = torch.rand(1, 4, n, 5000, generator=g) > 0.3
        results = []
        for threads in (1, 8):
            if args.get("generator") is not None:
                args["generator"] = torch.Generator().manual_seed(3)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                results.append(selfattn.attention(q, k, v, return_lse=True, **args))
            finally:
                torch.set_num_threads(before)
        (one, lse1), (split, lse8) = results
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == F32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(split, one, **tol)
        torch.testing.assert_close(lse8, lse1, rtol=1e-5, atol=1e-5)
        if "dropout_p" not in args:
            ref = dict(args)
            golden, lowp = (reference.attention(q.to(dt), k.to(dt), v.to(dt), **ref)
                            for dt in (torch.float64, dtype))
            assert_close_to_golden(f"split-kv n={n}", split, lowp, golden)


def test_num_splits_sets_the_split_count():
    """B = 1, one K/V head, one query over 5000 keys. num_splits=1 never
    splits: the same bits at 1 and 8 threads, where the automatic choice
    splits. num_splits=4 splits 4 ways at any thread count: the same bits at 1
    and 8 threads, other bits than no split, and the reference's within
    DESIGN.md's bound."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 1, 4, 32, generator=g)
    kc, vc = (torch.randn(1, 5000, 1, 32, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 1, 1, 32, generator=g) for _ in range(2))
    results = {}
    for threads in (1, 8):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for splits in (None, 1, 4):
                with torch.no_grad():
                    results[threads, splits] = selfattn.attention_with_kvcache(
                        q, kc, vc, k, v, cache_seqlens=4999, num_splits=splits, return_lse=True)
        finally:
            torch.set_num_threads(before)

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(results[a], results[b]))

    assert same((1, 1), (8, 1)) and same((1, 4), (8, 4)) and same((1, None), (1, 1))
    assert not same((8, None), (8, 1))  # the automatic choice splits at 8 threads
    assert not same((1, 4), (1, 1))
    torch.testing.assert_close(results[1, 4], results[1, 1], rtol=1e-5, atol=1e-6)
    golden, lowp = (reference.attention(q.to(dt), kc.to(dt), vc.to(dt), causal=True,
                                        causal_alignment="bottom_right")
                    for dt in (torch.float64, F32))
    assert_close_to_golden("num_splits=4", results[1, 4][0], lowp, golden)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_a_step_with_no_key_gives_zeros(paged):
    """Every sequence empty and nothing appended (a block table of no column
    when paged): out 0 and lse -inf, as for rows that see no key."""
    q, kc, vc, _, _ = _setup(B=2, n=3)
    table = torch.empty(2, 0, dtype=torch.int32) if paged else None
    with torch.no_grad():
        out, lse = selfattn.attention_with_kvcache(q, kc, vc, cache_seqlens=0, block_table=table,
                                                   return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 4, 3) and bool(torch.isneginf(lse).all())
