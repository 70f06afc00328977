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
        (dict(cache_seqlens=torch.tensor([0, 63, 64])), ValueError, "S_max = 64"),
        (dict(cache_seqlens=torch.tensor([0, 1])), TypeError, "cache_seqlens must be"),
        (dict(cache_seqlens=0, block_table=torch.zeros(3, 1, dtype=torch.int32)), ValueError,
         "block_table"),
        (dict(cache_seqlens=0, v=None), ValueError, "both k and v"),
    ]
    for kw, exc, words in cases:
        args = dict(k=k, v=v)
        args.update(kw)
        with torch.no_grad(), pytest.raises(exc, match=words):
            selfattn.attention_with_kvcache(q, kc, vc, **args)
    with pytest.raises(ValueError, match="inference only"):
        selfattn.attention_with_kvcache(q.requires_grad_(), kc, vc, k, v, cache_seqlens=0)
    with torch.no_grad(), pytest.raises(ValueError, match="contiguous in its first two dims"):
        selfattn.attention_with_kvcache(q, kc.transpose(0, 1).contiguous().transpose(0, 1), vc,
                                        k, v, cache_seqlens=0)


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
