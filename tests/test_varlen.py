"""selfattn.varlen_attention (packed variable-length batches, issue 14) on CPU.

Golden values are per-sequence calls of selfattn.reference.attention in
float64 (bottom-right alignment within each sequence), concatenated; the
bound is DESIGN.md's (2 x the same-dtype per-sequence reference's error),
for the output and the gradients of query, key and value. Lengths are
random, 0 and 1 included, up to a few hundred; query and key lengths of a
sequence may differ. Dropout: each sequence's kept elements are those of the
probabilities op on that sequence at its packed positions (q_start, k_start),
and two identical sequences draw different masks. Plus torch's signature
(return_aux, enable_gqa, window_size), seqused_k, opcheck, torch.compile and
bad input.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import selfattn
from selfattn import ops, reference
from selfattn.errors import ArgumentError
from selfattn.testing import assert_close_to_golden

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _cu(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def _packed(q_lens, k_lens, Hq=4, Hkv=2, D=16, Dv=None, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D

    def make(T, H, d):
        return torch.randn(T, H, d, generator=g).to(dtype)

    Tq, Tk = sum(q_lens), sum(k_lens)
    return make(Tq, Hq, D), make(Tk, Hkv, D), make(Tk, Hkv, Dv), make(Tq, Hq, Dv)


def _per_sequence(q, k, v, dout, q_lens, k_lens, dtype, window, used=None, kept=None, scale=None,
                  dropout_p=0.0):
    """Per-sequence reference in `dtype`: [out, dq, dk, dv] packed."""
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    outs = []
    cq, ck = _cu(q_lens).tolist(), _cu(k_lens).tolist()
    for b in range(len(q_lens)):
        kl = k_lens[b] if used is None else used[b]
        qb = xs[0][cq[b]:cq[b + 1]][None]
        kb, vb = (t[ck[b]:ck[b] + kl][None] for t in xs[1:])
        outs.append(reference.attention(qb, kb, vb, window=window, scale=scale,
                                        dropout_p=dropout_p,
                                        dropout_mask=None if kept is None else kept[b])[0])
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, xs, dout.to(dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(xs, grads)]
    return [out.detach()] + grads


def _ours(q, k, v, dout, q_lens, k_lens, **kw):
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = selfattn.varlen_attention(*xs, _cu(q_lens), _cu(k_lens), max(q_lens), max(k_lens),
                                    enable_gqa=True, **kw)
    return [out.detach()] + list(torch.autograd.grad(out, xs, dout))


def _check(name, ours, lowp, golden):
    for label, o, lp, gd in zip(("out", "dq", "dk", "dv"), ours, lowp, golden):
        assert_close_to_golden(f"{name} {label}", o, lp, gd)


LENGTHS = {
    "mixed": ([37, 0, 1, 200, 5, 64], None),
    "long_tail": ([3, 300, 2, 17, 1, 1, 90], None),
    "q_ne_k": ([7, 40, 1, 0, 33], [20, 12, 1, 5, 33]),
    "single": ([129], None),
}
WINDOWS = {"full": (-1, -1), "causal": (-1, 0), "causal_w16": (16, 0), "band": (4, 3)}


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=list(LENGTHS))
@pytest.mark.parametrize("window", WINDOWS, ids=list(WINDOWS))
def test_matches_per_sequence_reference(dtype, lengths, window):
    q_lens, k_lens = LENGTHS[lengths]
    k_lens = k_lens or q_lens
    q, k, v, dout = _packed(q_lens, k_lens, dtype=dtype, Dv=24 if window == "band" else None)
    ours = _ours(q, k, v, dout, q_lens, k_lens, window_size=WINDOWS[window])
    golden = _per_sequence(q, k, v, dout, q_lens, k_lens, F64, WINDOWS[window])
    lowp = _per_sequence(q, k, v, dout, q_lens, k_lens, dtype, WINDOWS[window])
    _check(f"{dtype} {lengths} {window}", ours, lowp, golden)


def test_seqused_k_scale_and_lse():
    q_lens = k_lens = [30, 9, 50, 4]
    used = [11, 9, 0, 2]
    q, k, v, dout = _packed(q_lens, k_lens, Hq=2, Hkv=2, seed=1)
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    aux = type("AuxRequest", (), {"lse": True})()  # what torch's AuxRequest(lse=True) carries
    out, lse = selfattn.varlen_attention(*xs, _cu(q_lens), _cu(k_lens), 50, 50, scale=0.3,
                                         window_size=(-1, 0), return_aux=aux,
                                         seqused_k=torch.tensor(used))
    ours = [out.detach()] + list(torch.autograd.grad(out, xs, dout))
    golden = _per_sequence(q, k, v, dout, q_lens, k_lens, F64, (-1, 0), used, scale=0.3)
    lowp = _per_sequence(q, k, v, dout, q_lens, k_lens, F32, (-1, 0), used, scale=0.3)
    _check("seqused_k", ours, lowp, golden)
    # lse (Hq, Tq): per-sequence logsumexp of the scaled scores; -inf where no key is seen
    cq = _cu(q_lens).tolist()
    for b, n in enumerate(used):
        rows = lse[:, cq[b]:cq[b + 1]]
        if n == 0:
            assert torch.isinf(rows).all() and (out[cq[b]:cq[b + 1]] == 0).all()
            continue
        _, ref_lse = selfattn.attention(q[cq[b]:cq[b + 1]][None], k[sum(k_lens[:b]):][:n][None],
                                        v[sum(k_lens[:b]):][:n][None], causal=True, scale=0.3,
                                        return_lse=True)
        torch.testing.assert_close(rows, ref_lse[0], rtol=1e-5, atol=1e-5)


def test_dropout_each_sequence_draws_its_own_mask():
    q_lens = k_lens = [24, 24, 9]
    q1, k1, v1, _ = _packed([24], [24], seed=2)
    q, k, v = (torch.cat([t, t, t[:9]]) for t in (q1, k1, v1))  # sequences 0 and 1 identical
    dout = torch.randn(q.shape[0], 4, 16)
    gen = torch.Generator().manual_seed(9)
    ours = _ours(q, k, v, dout, q_lens, k_lens, dropout_p=0.4, generator=gen)
    rng = selfattn.functional.rng_state(0.4, q.device, torch.Generator().manual_seed(9))
    cq = _cu(q_lens).tolist()
    kept = []
    for b, n in enumerate(q_lens):
        s = cq[b]
        probs = ops.probs_op(q[s:s + n][None], k[s:s + n][None], None, None, None, rng,
                             16 ** -0.5, -1, -1, 0, 0.4, None, 0.0, s, s)
        kept.append(probs != 0)
    assert not torch.equal(kept[0], kept[1])  # the same sequence at other positions
    golden = _per_sequence(q, k, v, dout, q_lens, k_lens, F64, None, kept=kept, dropout_p=0.4)
    lowp = _per_sequence(q, k, v, dout, q_lens, k_lens, F32, None, kept=kept, dropout_p=0.4)
    _check("dropout", ours, lowp, golden)
    again = _ours(q, k, v, dout, q_lens, k_lens, dropout_p=0.4,
                  generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(ours, again))


def test_num_splits_reaches_the_kernels():
    """Two decode-like sequences (1 and 2 queries over 3000 and 2000 keys):
    num_splits=1 gives the same bits at 1 and 8 threads, num_splits=3 other
    bits than 1 (the keys split), the same within rounding."""
    q, k, v, _ = _packed([1, 2], [3000, 2000], Hq=2, Hkv=1, D=32)
    results = {}
    for threads in (1, 8):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for splits in (1, 3):
                with torch.no_grad():
                    results[threads, splits] = selfattn.varlen_attention(
                        q, k, v, _cu([1, 2]), _cu([3000, 2000]), 2, 3000, window_size=(-1, 0),
                        enable_gqa=True, num_splits=splits, return_lse=True)
        finally:
            torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(results[1, 1], results[8, 1]))
    assert not torch.equal(results[1, 3][0], results[1, 1][0])
    torch.testing.assert_close(results[1, 3], results[1, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 3])
def test_forward_of_each_sequence_is_its_own_attention(threads):
    """One long and many short sequences (the short ones run side by side on
    the CPU threads, the long one with every thread): each sequence's output
    and lse are bitwise those of selfattn.attention on it alone, whatever the
    thread count, so a sequence's result does not depend on the batch."""
    lens = [700, 1, 0, 5, 33, 64, 2, 90, 17, 3, 40]
    q, k, v, _ = _packed(lens, lens, Hq=4, Hkv=2, D=32)
    cu = _cu(lens).tolist()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out, lse = selfattn.varlen_attention(q, k, v, _cu(lens), _cu(lens), 700, 700,
                                                 window_size=(-1, 0), enable_gqa=True,
                                                 return_lse=True)
            torch.set_num_threads(before)
            for b, n in enumerate(lens):
                rows = slice(cu[b], cu[b + 1])
                alone, alone_lse = selfattn.attention(q[None, rows], k[None, rows], v[None, rows],
                                                      causal=True, return_lse=True)
                assert torch.equal(out[rows], alone[0]), f"sequence {b}"
                assert torch.equal(lse[:, rows], alone_lse[0]), f"sequence {b}"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3])
def test_gradients_of_each_sequence_are_its_own(threads):
    """The backward of one long and several shorter sequences (at 3 threads
    the 600-token ones run side by side, inline on one thread each, their 3
    key blocks split into 3 chunks whose dQ sum in chunk order): each
    sequence's dq, dk, dv are bitwise those of selfattn.attention's backward
    on it alone at the same thread count."""
    lens = [2000, 600, 0, 600, 1, 600, 40]
    q, k, v, dout = _packed(lens, lens, Hq=2, Hkv=1, D=16)
    cu = _cu(lens).tolist()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = selfattn.varlen_attention(*xs, _cu(lens), _cu(lens), 2000, 2000,
                                        window_size=(-1, 0), enable_gqa=True)
        grads = torch.autograd.grad(out, xs, dout)
        for b, n in enumerate(lens):
            if n == 0:
                continue
            rows = slice(cu[b], cu[b + 1])
            alone = [t[None, rows].clone().requires_grad_() for t in (q, k, v)]
            o = selfattn.attention(*alone, causal=True)
            expected = torch.autograd.grad(o, alone, dout[None, rows])
            for name, g, e in zip(("dq", "dk", "dv"), grads, expected):
                assert torch.equal(g[rows], e[0]), f"sequence {b} {name}"
    finally:
        torch.set_num_threads(before)


def test_opcheck_and_compile():
    q_lens = [5, 0, 12]
    q, k, v, dout = _packed(q_lens, q_lens, Hq=2, Hkv=1)
    cu = _cu(q_lens)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, cu, None, None,
            0.25, -1, 0, 0.0)
    torch.library.opcheck(torch.ops.selfattn.varlen_forward.default, args)

    def fn(a, b, c):
        return selfattn.varlen_attention(a, b, c, cu, cu, 12, 12, window_size=(-1, 0),
                                         enable_gqa=True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    gq = torch.autograd.grad(compiled(q, k, v).sum(), q)[0]
    torch.testing.assert_close(gq, torch.autograd.grad(fn(q, k, v).sum(), q)[0])


def test_bad_input_names_the_argument():
    q, k, v, _ = _packed([4, 4], [4, 4])
    cu = _cu([4, 4])

    def call(**kw):
        args = dict(query=q, key=k, value=v, cu_seq_q=cu, cu_seq_k=cu, max_q=4, max_k=4,
                    enable_gqa=True)
        args.update(kw)
        return selfattn.varlen_attention(**args)

    cases = [
        (dict(cu_seq_q=torch.tensor([1, 4, 8])), ArgumentError, "cu_seq_q must start at 0"),
        (dict(cu_seq_q=torch.tensor([0, 5, 4])), ArgumentError, "cu_seq_q must not decrease"),
        (dict(cu_seq_k=torch.tensor([0, 4, 7])), ArgumentError, "cu_seq_k must end at"),
        (dict(cu_seq_k=torch.tensor([0, 8])), ArgumentError, "one number of sequences"),
        (dict(cu_seq_q=cu.float()), ValueError, "cu_seq_q must be a 1-D int32"),
        (dict(seqused_k=torch.tensor([5, 1])), ArgumentError, r"seqused_k\[0\] = 5"),
        (dict(seqused_k=torch.tensor([1])), ArgumentError, "seqused_k must be a 1-D"),
        (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), ValueError, "block_table"),
        (dict(cu_seq_k=None), ValueError, "cu_seq_k is required"),
        (dict(enable_gqa=False), ValueError, "enable_gqa=True"),
        (dict(window_size=(-2, 0)), ValueError, "window left"),
        (dict(window_size=5), TypeError, "window_size must be a pair"),
        (dict(query=q[None]), ValueError, "query must be 3-D"),
        (dict(value=v.double()), TypeError, "value has dtype"),
        (dict(max_q=-1), TypeError, "max_q"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
    ]
    for kw, exc, words in cases:
        with pytest.raises(exc, match=words):
            call(**kw)


# ---------------------------------------------------------------------------
# Jagged nested tensors (torch.nested, layout=torch.jagged) in the drop-ins,
# against torch's own SDPA and MultiheadAttention run sequence by sequence.

def _jagged(lengths, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, E, generator=g) for n in lengths]
    return parts, torch.nested.nested_tensor(parts, layout=torch.jagged).requires_grad_()


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_on_jagged_nested_tensors(causal):
    H, D = 4, 8
    parts, nj = _jagged([7, 1, 30, 12], H * D)
    q = nj.unflatten(-1, (H, D)).transpose(1, 2)  # (B, H, j, D)
    out = selfattn.scaled_dot_product_attention(q, q, q, is_causal=causal)
    assert out.is_nested and out.shape[:2] == (4, H)
    dout = [torch.randn(n, H * D) for n in (7, 1, 30, 12)]
    out.transpose(1, 2).flatten(-2).values().backward(torch.cat(dout))
    for i, (x, o, d) in enumerate(zip(parts, out.transpose(1, 2).unbind(), dout)):
        xt = x.detach().requires_grad_()
        qt = xt.view(1, -1, H, D).transpose(1, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(qt, qt, qt, is_causal=causal)
        ref = ref.transpose(1, 2)[0]
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
        ref.flatten(-2).backward(d)
        torch.testing.assert_close(nj.grad.unbind()[i], xt.grad, rtol=1e-4, atol=1e-5)


def test_multihead_attention_on_jagged_nested_tensors():
    E, H = 16, 2
    torch.manual_seed(0)
    ours = selfattn.nn.MultiheadAttention(E, H, batch_first=True)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    parts, nj = _jagged([3, 9, 1], E, seed=1)
    out, weights = ours(nj, nj, nj, need_weights=False)
    assert weights is None and out.is_nested
    out.values().sum().backward()
    for i, (x, o) in enumerate(zip(parts, out.unbind())):
        xt = x[None].detach().requires_grad_()
        ref = theirs(xt, xt, xt, need_weights=False)[0][0]
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
        ref.sum().backward()
        torch.testing.assert_close(nj.grad.unbind()[i], xt.grad[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match="need_weights=False"):
        ours(nj, nj, nj)
    with pytest.raises(TypeError, match="must all be jagged"):
        ours(nj, torch.randn(3, 9, E), nj, need_weights=False)


# ---------------------------------------------------------------------------
# Paged keys and values (block_table): torch's varlen_attn layout, inference only.

def _pool(k, k_lens, page_size, seed=2):
    """The packed keys (Tk, H, D) as a pool of pages in shuffled order among
    spare pages of noise, and the (N, max_pages) int32 block table."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // page_size) for n in k_lens]
    max_pages = max(pages + [1])
    num_pages = sum(pages) + 2
    order = torch.randperm(num_pages, generator=g)
    pool = torch.randn(num_pages, page_size, *k.shape[1:], generator=g).to(k.dtype)
    table = torch.full((len(k_lens), max_pages), -7, dtype=torch.int32)  # unused entries: junk
    start, used = 0, 0
    for b, n in enumerate(k_lens):
        for i in range(pages[b]):
            page = int(order[used])
            used += 1
            table[b, i] = page
            rows = k[start + i * page_size:start + min(n, (i + 1) * page_size)]
            pool[page, :rows.shape[0]] = rows
        start += n
    return pool, table


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("page_size", [1, 7, 64, 256])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (20, 0)], ids=["full", "causal", "win"])
def test_paged_keys_equal_packed_ones(dtype, page_size, window):
    q_lens, k_lens = [1, 0, 9, 3], [300, 5, 70, 0]
    q, k, v, _ = _packed(q_lens, k_lens, Hq=4, Hkv=2, D=16, Dv=24, dtype=dtype)
    kp, table = _pool(k, k_lens, page_size)
    vp, _ = _pool(v, k_lens, page_size)
    used = torch.tensor(k_lens, dtype=torch.int32)
    with torch.no_grad():
        packed, lse = selfattn.varlen_attention(q, k, v, _cu(q_lens), _cu(k_lens), 9, 300,
                                                window_size=window, enable_gqa=True,
                                                return_lse=True)
        paged, lse_p = selfattn.varlen_attention(q, kp, vp, _cu(q_lens), None, 9, 300,
                                                 window_size=window, enable_gqa=True,
                                                 seqused_k=used, block_table=table,
                                                 return_lse=True)
    torch.testing.assert_close(paged, packed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_p, lse, rtol=1e-5, atol=1e-5)
    golden, lowp = (_per_sequence(q, k, v, torch.zeros_like(packed), q_lens, k_lens, dt,
                                  window)[0] for dt in (F64, dtype))
    _check("paged", [paged], [lowp], [golden])


def _paged_case(q_lens, k_lens, Hkv, page_size):
    """q, the key and value pools, their block table and seqused_k."""
    q, k, v, _ = _packed(q_lens, k_lens, Hq=2, Hkv=Hkv)
    kp, table = _pool(k, k_lens, page_size)
    vp, _ = _pool(v, k_lens, page_size)
    return q, kp, vp, table, torch.tensor(k_lens)


def test_paged_opcheck_and_compile():
    q_lens, k_lens = [3, 2], [10, 17]
    q, kp, vp, table, used = _paged_case(q_lens, k_lens, 1, 4)
    args = (q, kp, vp, _cu(q_lens), _cu([0, 0]), used, None, 0.25, -1, 0, 0.0, table)
    torch.library.opcheck(torch.ops.selfattn.varlen_forward.default, args)

    def fn(a, b, c):
        return selfattn.varlen_attention(a, b, c, _cu(q_lens), None, 3, 17, seqused_k=used,
                                         block_table=table, window_size=(-1, 0),
                                         enable_gqa=True)

    with torch.no_grad():
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(q, kp, vp), fn(q, kp, vp))


def test_bad_paged_input_names_the_argument():
    q_lens, k_lens = [2, 3], [10, 17]
    q, kp, vp, table, used = _paged_case(q_lens, k_lens, 2, 8)
    k = torch.randn(sum(k_lens), 2, 16)

    def call(**kw):
        args = dict(query=q, key=kp, value=vp, cu_seq_q=_cu(q_lens), cu_seq_k=None, max_q=3,
                    max_k=17, seqused_k=used, block_table=table)
        args.update(kw)
        with torch.no_grad():
            return selfattn.varlen_attention(**args)

    far, short = table.clone(), table[:, :2]
    far[1, 2] = kp.shape[0]
    cases = [
        (dict(seqused_k=None), ValueError, "needs seqused_k"),
        (dict(key=k), ValueError, "key must be 4-D"),
        (dict(block_table=table.long()), TypeError, "block_table must be an int32"),
        (dict(block_table=far), ArgumentError, r"block_table\[1, 2\] = 7 is not a page"),
        (dict(block_table=short), ArgumentError, "needs 3 pages of 8"),
        (dict(block_table=table[:1]), TypeError, r"block_table must be an int32 tensor of "
         r"shape \(2, max_pages\)"),
        (dict(cu_seq_k=torch.zeros(4, dtype=torch.int64)), ArgumentError,
         "cu_seq_k must have 3 offsets"),
        (dict(seqused_k=torch.tensor([10, -1])), ArgumentError, r"seqused_k\[1\] = -1"),
        (dict(value=vp[:, :4]), ValueError, "pools of one number"),
        (dict(dropout_p=0.1), ValueError, "dropout_p must be 0"),
    ]
    for kw, exc, words in cases:
        with pytest.raises(exc, match=words):
            call(**kw)
    with pytest.raises(ValueError, match="inference only"):
        selfattn.varlen_attention(q.requires_grad_(), kp, vp, _cu(q_lens), None, 3, 17,
                                  seqused_k=used, block_table=table)
