"""selfattn.nn's own layers against direct dense formulations in plain torch
(float64 golden, float32 and float64 runs): SelfAttention, CausalSelfAttention,
LocalSelfAttention, HierarchicalSelfAttention, AdditiveAttention (including
its chunked custom backward and its memory), and the position encodings."""
from __future__ import annotations

import math

import pytest
import torch

from selfattn import nn as sa
from test_nn_common import assert_golden, clone_as, forward_backward

DTYPES = [torch.float32, torch.float64]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense_attention(q, k, v, visible, scale):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D); visible bool broadcastable to
    (B, H, Sq, Sk). Rows that see nothing give 0."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _compare(ours_module, dense_fn, inputs, dtype):
    """ours (in dtype) vs the dense formulation with ours' weights, in dtype and float64."""
    golden_m = clone_as(ours_module, dtype=torch.float64)
    ref_m = clone_as(ours_module, dtype=dtype)
    ours_m = clone_as(ours_module, dtype=dtype)
    run = lambda m, fn, dt: forward_backward(lambda *a: fn(m, *a), [t.to(dt) for t in inputs],  # noqa: E731
                                            list(m.parameters()))
    assert_golden(run(ours_m, lambda m, *a: m(*a), dtype), run(ref_m, dense_fn, dtype),
                  run(golden_m, dense_fn, torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaled, causal", [(True, False), (False, False), (True, True)])
def test_self_attention(scaled, causal, dtype):
    x = _rand(2, 7, 5, seed=0) * 0.5

    def dense(m, x):
        s = x @ x.transpose(1, 2) * (1 / math.sqrt(x.shape[-1]) if scaled else 1.0)
        if causal:
            s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ x

    _compare(sa.SelfAttention(scaled=scaled, causal=causal), dense, [x], dtype)
    assert list(sa.SelfAttention().state_dict()) == []


def _projected_dense(m, x, visible, key_lengths=None):
    q, k, v = m.qkv_proj(x).split([m.num_heads * m.head_dim] + [m.num_kv_heads * m.head_dim] * 2, -1)
    q, k, v = (t.unflatten(-1, (-1, m.head_dim)) for t in (q, k, v))
    if m.rotary is not None:
        q, k = m.rotary(q, k)
    if key_lengths is not None:
        visible = visible & (torch.arange(x.shape[1]) < key_lengths.view(-1, 1, 1, 1))
    return m.out_proj(_dense_attention(q, k, v, visible, 1 / math.sqrt(m.head_dim)).flatten(2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [{}, dict(num_kv_heads=2, rotary=True), dict(bias=False, num_kv_heads=1)])
def test_causal_self_attention(kw, dtype):
    torch.manual_seed(0)
    m = sa.CausalSelfAttention(16, 4, **kw)
    x = _rand(2, 9, 16, seed=1)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    _compare(m, lambda m, x: _projected_dense(m, x, causal), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window, causal", [(2, False), ((3, 1), False), (2, True)])
def test_local_self_attention(window, causal, dtype, monkeypatch):
    torch.manual_seed(0)
    m = sa.LocalSelfAttention(16, 4, window=window, causal=causal)
    left, right = (window, window) if isinstance(window, int) else window
    i, j = torch.arange(12).view(-1, 1), torch.arange(12).view(1, -1)
    visible = (j >= i - left) & (j <= i + (0 if causal else right))
    lengths = torch.tensor([12, 7])
    x = _rand(2, 12, 16, seed=1)
    m_kl = _KeyLengths(m, lengths)
    _compare(m_kl, lambda mm, x: _projected_dense(mm.inner, x, visible, lengths), [x], dtype)
    seen = []
    monkeypatch.setattr(sa, "attention", lambda *a, **k: seen.append(k) or torch.zeros_like(a[0]))
    m(x.float())
    assert "attn_mask" not in seen[0]  # the kernel's window, never a dense mask
    assert seen[0]["window"] == (left, right) and seen[0]["causal"] == causal


class _KeyLengths(torch.nn.Module):
    """Wraps a layer so its forward takes key_lengths fixed at construction."""

    def __init__(self, inner, key_lengths):
        super().__init__()
        self.inner, self.key_lengths = inner, key_lengths

    def forward(self, x):
        return self.inner(x, key_lengths=self.key_lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hierarchical_self_attention(dtype):
    torch.manual_seed(0)
    P, Sx = 4, 10  # 3 segments, the last one partial
    m = sa.HierarchicalSelfAttention(16, 2, segment_len=P)
    lengths = torch.tensor([10, 6])
    x = _rand(2, Sx, 16, seed=1)

    def dense(mm, x):
        h = mm.inner
        seg = torch.arange(Sx) // P
        valid = torch.arange(Sx) < lengths.view(-1, 1)  # (B, S)
        same = (seg.view(-1, 1) == seg.view(1, -1)).view(1, 1, Sx, Sx) & valid.view(2, 1, 1, Sx)
        local = _projected_dense(h.local, x, same)
        n = -(-Sx // P)
        onehot = (seg.view(1, -1, 1) == torch.arange(n).view(1, 1, -1)) & valid.unsqueeze(-1)
        w = onehot.to(x.dtype)  # (B, S, n)
        summary = (w.transpose(1, 2) @ local) / w.sum(1).clamp(min=1).unsqueeze(-1)
        seg_valid = (torch.arange(n) < (lengths.view(-1, 1) + P - 1) // P).view(2, 1, 1, n)
        g = _projected_dense(h.global_, summary, seg_valid)
        return local + g[:, seg]

    _compare(_KeyLengths(m, lengths), dense, [x], dtype)


def _dense_additive(m, q, k, v, mask=None, key_lengths=None):
    s = torch.tanh(m.query_proj(q).unsqueeze(2) + m.key_proj(k).unsqueeze(1)) @ m.score_weight
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if key_lengths is not None:
        s = s.masked_fill(torch.arange(k.shape[1]) >= key_lengths.view(-1, 1, 1), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_additive_attention(chunk_size, dtype):
    torch.manual_seed(0)
    m = sa.AdditiveAttention(6, key_dim=5, hidden_dim=8, chunk_size=chunk_size)
    q, k, v = _rand(2, 4, 6, seed=1), _rand(2, 10, 5, seed=2), _rand(2, 10, 3, seed=3)
    mask = torch.rand(1, 4, 10, generator=torch.Generator().manual_seed(4)) < 0.7
    mask[0, 0] = False  # query 0 sees no key: 0 output, 0 gradient
    mask[0, 1, :3] = False  # query 1 sees nothing in its first chunk
    lengths = torch.tensor([10, 6])

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = m

        def forward(self, q, k, v):
            return self.inner(q, k, v, attn_mask=mask, key_lengths=lengths)

    _compare(Wrapped(), lambda w, q, k, v: _dense_additive(w.inner, q, k, v, mask, lengths),
             [q, k, v], dtype)
    out, weights = m(q.float(), k.float(), v.float(), attn_mask=mask, key_lengths=lengths,
                     need_weights=True)
    torch.testing.assert_close(weights @ v.float(), out)
    assert torch.all(out[:, 0] == 0)


def test_additive_attention_gradcheck():
    qw, ku = _rand(2, 3, 4, seed=1), _rand(2, 7, 4, seed=2)
    v, w = _rand(2, 7, 3, seed=3), _rand(4, seed=4)
    fn = lambda *a: sa.additive_attention(*a, key_lengths=torch.tensor([7, 4]), chunk_size=2)  # noqa
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (qw, ku, v, w)])


def test_additive_attention_memory_does_not_grow_with_sq_sk_d():
    """What autograd keeps is O(B (Sq + Sk) A); the (B, Sq, chunk, A) tanh is
    recomputed in the backward, never saved."""
    B, Sq, Sk, A = 2, 64, 96, 32
    m = sa.AdditiveAttention(A, hidden_dim=A, chunk_size=8)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(torch.randn(B, Sq, A), torch.randn(B, Sk, A))
    assert max(saved) <= B * max(Sq, Sk) * A
    out.sum().backward()


def test_sinusoidal_positional_encoding():
    pe = sa.SinusoidalPositionalEncoding(6, max_len=32)
    x = torch.zeros(2, 5, 6)
    y = pe(x, offset=3)
    p, i = 3 + torch.arange(5.0).view(-1, 1), torch.arange(3.0)
    angle = p / 10000 ** (2 * i / 6)
    torch.testing.assert_close(y[0, :, 0::2], torch.sin(angle))
    torch.testing.assert_close(y[0, :, 1::2], torch.cos(angle))
    seq_first = sa.SinusoidalPositionalEncoding(6, max_len=32, batch_first=False)
    torch.testing.assert_close(seq_first(x.transpose(0, 1), offset=3), y.transpose(0, 1))
    assert list(pe.state_dict()) == []
    with pytest.raises(ValueError, match="max_len"):
        pe(torch.zeros(1, 40, 6))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding(interleaved):
    D = 8
    rope = sa.RotaryEmbedding(D, interleaved=interleaved)
    q, k = _rand(2, 6, 3, D, seed=1), _rand(2, 6, 3, D, seed=2)
    rq, rk = rope(q, k, offset=2)
    # as complex numbers: each pair rotates by e^{i · position · theta_m}
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = (2 + torch.arange(6.0, dtype=torch.float64)).view(1, -1, 1, 1) * theta
    def as_complex(x):  # noqa: E306
        pairs = x.unflatten(-1, (-1, 2)) if interleaved else torch.stack(x.chunk(2, -1), -1)
        return torch.view_as_complex(pairs.contiguous())
    torch.testing.assert_close(as_complex(rq), as_complex(q) * torch.polar(torch.ones_like(angle), angle))
    # scores depend only on relative positions
    s = torch.einsum("bqhd,bkhd->bhqk", rq, rk)
    rq2, rk2 = rope(q, k, offset=7)
    torch.testing.assert_close(torch.einsum("bqhd,bkhd->bhqk", rq2, rk2), s)
    pos = torch.arange(2, 8).expand(2, 6)
    torch.testing.assert_close(rope(q, k, positions=pos)[0], rq)
