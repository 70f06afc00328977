"""Named edge cases of selfattn.attention on CPU (issue #6): extreme logits and
scales, -inf / +inf / NaN in masks and inputs, rows that see no key, S = 1,
Sk = 1, head dims that are not multiples of 8, float16/bfloat16 values near
their limits, empty batch / sequence. Judged against the float64 reference
(DESIGN.md section 5 via selfattn.testing) or, where the reference itself
gives NaN/inf, by NaN pattern or by an explicit relative bound.

A documented precision limit is kept as an xfail test whose reason names the
input, the expectation and what the kernel gives.
"""
from __future__ import annotations

import pytest
import torch

import selfattn
from selfattn import reference

from helpers import ATOL_FLOOR, check, check_against_reference, max_err, qkv_maker

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ALL = [F32, F64, BF16, F16]
IDS = {F32: "f32", F64: "f64", BF16: "bf16", F16: "f16"}
INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


qkv = qkv_maker(B=2, Sq=13, Sk=17, Hq=4, Hkv=2, D=16)


def run_both(inputs, mask=None, grad_out=None, **kw):
    """(out, grads) of the fused op and of the reference in the inputs' dtype."""
    res = []
    for fn in (selfattn.attention, reference.attention):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        m = None if mask is None else mask.detach().clone().requires_grad_(mask.requires_grad)
        out = fn(*xs, attn_mask=m, **kw)
        leaves = [x for x in xs + ([m] if m is not None else []) if x.requires_grad]
        go = torch.ones_like(out) if grad_out is None else grad_out
        grads = torch.autograd.grad(out, leaves, go) if leaves else ()
        res.append((out, grads))
    return res


def same_nan(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b))


def assert_rel(name, actual, golden, rel):
    """|actual - golden| <= rel * max(1, max |golden|), all finite."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(1.0, golden.abs().max().item())
    err = max_err(actual, golden)
    assert err <= rel * scale, f"{name}: error {err:.3e} > {rel * scale:.3e}"


# ---------------------------------------------------------------------------
# Extreme logits and scales

@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
def test_logits_of_magnitude_1e4_forward(dtype):
    # scores of std ~1e4 (q, k ~ N(0, 1), D = 64, scale = 1e4 / 8): the online
    # softmax must not overflow; output and lse match the reference.
    q, k, v = qkv(D=64, dtype=dtype, requires_grad=False)
    scale = 1e4 / 8
    check([q, k, v], scale=scale)
    out, lse = selfattn.attention(q, k, v, scale=scale, return_lse=True)
    _, lse64 = reference.attention(q.double(), k.double(), v.double(), scale=scale,
                                   return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert lse.abs().max() > 1e3
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5 if dtype != F64 else 1e-12, atol=0)


def test_logits_of_magnitude_1e4_gradients():
    # float64: everything within the bound. float32: output and dv within the
    # bound, dq and dk finite (their bound is the documented float32 limit for
    # scores of std > ~300, see test_attention.py::test_huge_scores_gradient_bound
    # and test_very_large_scale_float32_dq_dk below).
    check(qkv(D=64, dtype=F64), scale=1e4 / 8)
    _check_v_only(qkv(D=64), scale=1e4 / 8)


def _check_v_only(inputs, **kw):
    """Output and dv against the reference (q, k fixed); dq, dk finite."""
    q, k, v = (t.detach() for t in inputs)
    check_against_reference(lambda v: selfattn.attention(q, k, v, **kw),
                            lambda v: reference.attention(q.to(v.dtype), k.to(v.dtype), v, **kw),
                            [v.requires_grad_()])
    q, k, v = (t.requires_grad_() for t in (q, k, v.detach()))
    out = selfattn.attention(q, k, v, **kw)
    for g in torch.autograd.grad(out, (q, k), torch.randn_like(out)):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
def test_very_small_scale(dtype):
    # scale 1e-6: a near-uniform softmax; gradients of q and k are ~1e-6
    check(qkv(dtype=dtype), scale=1e-6)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_very_large_scale(scale):
    # A saturated (one-hot) softmax. float64: all within the bound. float32:
    # output and dv within the bound; dq, dk: see the xfail below.
    check(qkv(dtype=F64), scale=scale)
    _check_v_only(qkv(), scale=scale)


@pytest.mark.xfail(strict=False, reason=(  # passes in builds that round differently (sanitizers)
    "precision (documented float32 limit, extreme form): with scale=1e30 the softmax is "
    "one-hot and the float64 dq, dk are ~0, but float32 dq, dk are ~1e24: dS = P * (dP - "
    "delta) with delta = rowsum(dO * O) rounded differently from dP leaves a ~1e-7 residue "
    "that the backward multiplies by the scale; the float32 reference gives exactly 0"))
def test_very_large_scale_float32_dq_dk():
    check(qkv(), scale=1e30)


def test_overflowing_scale_does_not_crash():
    # scale 1e38 overflows float32 scores (inf - inf = NaN): no crash, right shapes.
    q, k, v = qkv()
    out = selfattn.attention(q, k, v, scale=1e38)
    assert out.shape == (2, 13, 4, 16)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    selfattn.attention_weights(q, k, scale=1e38)


# ---------------------------------------------------------------------------
# -inf, +inf, NaN

@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
def test_float_mask_with_neg_inf(dtype):
    # -inf entries remove keys (as in the reference); whole -inf rows see no key
    q, k, v = qkv(dtype=dtype)
    m = torch.randn(2, 4, 13, 17).masked_fill(torch.rand(2, 4, 13, 17) < 0.3, -INF)
    m[0, 1, 3] = -INF
    m[1, :, 7:9] = -INF
    m = m.to(dtype).requires_grad_()
    check([q, k, v, m])
    out = selfattn.attention(q, k, v, attn_mask=m)
    assert (out[0, 3, 1] == 0).all() and (out[1, 7:9] == 0).all()


def _pos_inf_case():
    q, k, v = qkv()
    m = torch.zeros(2, 4, 13, 17)
    m[0, 1, 2, 3] = INF  # one +inf entry
    m[1, 0, 4, :] = INF  # a whole +inf row
    m[1, 1, :, 2] = -INF
    return q, k, v, m.requires_grad_()


def test_float_mask_with_pos_inf_gives_reference_nan_pattern():
    # +inf in a float mask: softmax(+inf) is NaN in the reference, and so in
    # selfattn: same NaN pattern in out, lse, dq, dk and the mask gradient.
    q, k, v, m = _pos_inf_case()
    (out, g), (ref, g_ref) = run_both([q, k, v], mask=m)
    assert torch.isnan(ref).any()
    assert same_nan(out, ref)
    fin = ~torch.isnan(ref)
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-5, rtol=1e-5)
    for name, i in (("dq", 0), ("dk", 1), ("dmask", 3)):
        assert same_nan(g[i], g_ref[i]), name
    _, lse = selfattn.attention(q, k, v, attn_mask=m, return_lse=True)
    _, lse_ref = reference.attention(q, k, v, attn_mask=m, return_lse=True)
    assert torch.equal(lse.isposinf(), lse_ref.isposinf()) and same_nan(lse, lse_ref)


def test_float_mask_with_pos_inf_dv_and_weights_nan_pattern():
    # softmax(+inf) = NaN in the reference: that row's weights are NaN, and the
    # NaN reaches every key's dv.
    q, k, v, m = _pos_inf_case()
    (_, g), (_, g_ref) = run_both([q, k, v], mask=m)
    w = selfattn.attention_weights(q, k, attn_mask=m)
    w_ref = reference.attention_weights(q, k, attn_mask=m)
    assert same_nan(w, w_ref), "attention_weights"
    assert same_nan(g[2], g_ref[2]), "dv"


@pytest.mark.parametrize("where", [
    "v",
    "k",
    "q",
])
def test_nan_input_propagates_as_in_reference(where):
    q, k, v = qkv(B=1, Sq=3, Sk=5, Hq=1, Hkv=1, D=4)
    t = {"q": q, "k": k, "v": v}[where]
    with torch.no_grad():
        t[0, 1 if where == "q" else 2, 0, 1] = NAN
    (out, g), (ref, g_ref) = run_both([q, k, v])
    assert torch.isnan(ref).any()
    assert same_nan(out, ref), "output"
    fin = ~torch.isnan(ref)
    torch.testing.assert_close(out[fin], ref[fin])
    for name, a, b in zip("qkv", g, g_ref):
        assert same_nan(a, b), f"d{name}"


def test_nan_everywhere_never_crashes():
    # NaN q, k, v, float mask; every entry point runs and returns the right shapes.
    q, k, v = (torch.full(s, NAN, requires_grad=True) for s in
               ((2, 9, 4, 8), (2, 11, 2, 8), (2, 11, 2, 8)))
    m = torch.full((2, 4, 9, 11), NAN, requires_grad=True)
    out = selfattn.attention(q, k, v, attn_mask=m, causal=True)
    assert out.shape == (2, 9, 4, 8)
    g = torch.autograd.grad(out, (q, k, v, m), torch.ones_like(out))
    assert [t.shape for t in g] == [q.shape, k.shape, v.shape, m.shape]
    assert selfattn.attention_weights(q, k, attn_mask=m).shape == (2, 4, 9, 11)
    s = selfattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), enable_gqa=True)
    assert s.shape == (2, 4, 9, 8)


# ---------------------------------------------------------------------------
# Rows that see no key

@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("how", ["bool_mask", "float_mask", "key_lengths", "window", "causal"])
def test_every_key_masked(dtype, how):
    # The whole problem sees no key: output 0, lse -inf, every gradient 0, no NaN.
    q, k, v = qkv(dtype=dtype)
    kw, m = {}, None
    if how == "bool_mask":
        m = torch.zeros(13, 17, dtype=torch.bool)
    elif how == "float_mask":
        m = torch.full((2, 1, 13, 17), -INF, dtype=dtype, requires_grad=True)
    elif how == "key_lengths":
        kw["key_lengths"] = torch.zeros(2, dtype=torch.int64)
    elif how == "window":  # keys 0..16, top-left queries 0..12 shifted past the end
        kw.update(window=(0, 0), key_lengths=torch.tensor([0, 0]))
    else:  # bottom-right causal with Sk = 0 visible: key_lengths 0 and causal
        kw.update(causal=True, key_lengths=torch.tensor([0, 0], dtype=torch.int32))
    out, lse = selfattn.attention(q, k, v, attn_mask=m, return_lse=True, **kw)
    assert (out == 0).all() and (lse == -INF).all()
    leaves = [q, k, v] + ([m] if m is not None and m.requires_grad else [])
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    for g in grads:
        assert (g == 0).all()
    w = selfattn.attention_weights(q, k, attn_mask=m, **kw)
    assert (w == 0).all()


# ---------------------------------------------------------------------------
# S = 1, Sk = 1

@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 37), (37, 1), (1, 200)])
@pytest.mark.parametrize("causal", [False, True])
def test_single_query_or_single_key(dtype, Sq, Sk, causal):
    q, k, v = qkv(Sq=Sq, Sk=Sk, dtype=dtype)
    if Sk == 1 and not (causal and Sq > 1):
        # one key: P = 1, the output is v exactly, for every query
        out = selfattn.attention(q, k, v, causal=causal)
        assert torch.equal(out, v.detach().repeat_interleave(2, dim=2).expand_as(out))
    if Sk == 1 and causal and Sq > 1:
        # bottom-right: only the last query sees the key
        kw = dict(causal=True, causal_alignment="top_left")  # every query sees key 0
    else:
        kw = dict(causal=causal)
    if Sk == 1 and dtype in (BF16, F16):
        # documented limit: with one key dS = P * (dP - delta) cancels; the kernel's
        # delta uses the rounded output. Judge dq, dk absolutely (golden is 0).
        out = selfattn.attention(q, k, v, **kw)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert dq.abs().max() <= ATOL_FLOOR[dtype] and dk.abs().max() <= ATOL_FLOOR[dtype] * Sq
        return
    check([q, k, v], **kw)


# ---------------------------------------------------------------------------
# Head dims that are not multiples of 8

@pytest.mark.parametrize("D,Dv,dtype", [
    (1, 1, F32), (3, 5, F32), (5, 3, BF16), (7, 9, F16), (9, 7, F64), (15, 17, F32),
    (17, 15, BF16), (31, 33, F32), (33, 31, F16), (63, 65, F32), (65, 63, BF16),
    (100, 12, F32), (127, 129, F32), (129, 127, F16), (255, 257, F32), (257, 255, BF16),
    (511, 3, F32), (3, 511, F32),
], ids=lambda x: str(x) if not isinstance(x, torch.dtype) else IDS[x])
def test_head_dims_not_multiple_of_8(D, Dv, dtype):
    q, k, v = qkv(B=1, Sq=21, Sk=133, Hq=2, Hkv=1, D=D, Dv=Dv, dtype=dtype)
    check([q, k, v], causal=True)


# ---------------------------------------------------------------------------
# float16 / bfloat16 near their limits. The same-dtype reference overflows here
# (its float16 matmuls give inf/NaN), so selfattn is judged against the float64
# golden directly: relative error <= 2 x atol_floor(dtype), everything finite.

def _golden(inputs, **kw):
    xs = [t.detach().double().requires_grad_() for t in inputs]
    out = reference.attention(*xs, **kw)
    return out, xs


def _assert_all_rel(q, k, v, rel, **kw):
    """out, dq, dk, dv of selfattn.attention within `rel` (relative to the
    golden's magnitude) of the float64 reference, for a random cotangent."""
    out = selfattn.attention(q, k, v, **kw)
    gold, xs = _golden([q, k, v], **kw)
    go = torch.randn(out.shape)
    g = torch.autograd.grad(out, (q, k, v), go.to(out.dtype))
    g64 = torch.autograd.grad(gold, xs, go.double())
    assert_rel("out", out, gold, rel)
    for n, a, b in zip(("dq", "dk", "dv"), g, g64):
        assert_rel(n, a, b, rel)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=IDS.get)
def test_values_near_float16_limit(dtype):
    # v ~ U(-3e4, 3e4) (float16 max 65504): out, dq, dk, dv finite and accurate
    q, k, _ = qkv(Sq=37, Sk=37, D=64, dtype=dtype)
    v = ((torch.rand(2, 37, 2, 64) * 2 - 1) * 3e4).to(dtype).requires_grad_()
    _assert_all_rel(q, k, v, 2 * ATOL_FLOOR[dtype])


@pytest.mark.parametrize("dtype,mag,scale", [(F16, 100.0, None), (F16, 100.0, 1e-4),
                                             (BF16, 1e3, 1e-5)], ids=["f16_100", "f16_100_s1e-4",
                                                                      "bf16_1e3_s1e-5"])
def test_large_q_k_in_low_precision(dtype, mag, scale):
    # q, k ~ N(0, mag^2): q.k overflows float16 (the reference gives NaN);
    # selfattn accumulates in float32 and stays finite and accurate.
    q, k, v = qkv(Sq=37, Sk=37, D=64, dtype=F32)
    q, k = (t.detach().mul(mag).to(dtype).requires_grad_() for t in (q, k))
    v = v.detach().to(dtype).requires_grad_()
    # peaked softmax of rounded inputs: 1 ulp of the output magnitude
    _assert_all_rel(q, k, v, 4 * ATOL_FLOOR[dtype], scale=scale)


# ---------------------------------------------------------------------------
# Empty batch / sequence

@pytest.mark.parametrize("B,Sq,Sk", [(0, 5, 7), (2, 0, 7), (2, 5, 0), (0, 0, 0), (2, 0, 0)])
@pytest.mark.parametrize("extra", ["none", "float_mask_grad", "bool_mask", "key_lengths",
                                   "causal_window"])
def test_empty_problems(B, Sq, Sk, extra):
    q, k, v = qkv(B=B, Sq=Sq, Sk=Sk, Hq=4, Hkv=2, D=8, Dv=6)
    kw, m = {}, None
    if extra == "float_mask_grad":
        m = torch.randn(B, 1, Sq, Sk, requires_grad=True)
    elif extra == "bool_mask":
        m = torch.ones(Sq, Sk, dtype=torch.bool)
    elif extra == "key_lengths":
        kw["key_lengths"] = torch.zeros(B, dtype=torch.int64)
    elif extra == "causal_window":
        kw.update(causal=True, window=(3, None), causal_alignment="top_left")
    out, lse = selfattn.attention(q, k, v, attn_mask=m, return_lse=True, **kw)
    assert out.shape == (B, Sq, 4, 6) and lse.shape == (B, 4, Sq)
    assert (out == 0).all() and (lse == -INF).all()
    leaves = [q, k, v] + ([m] if m is not None and m.requires_grad else [])
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for leaf, g in zip(leaves, grads):
        assert g is not None and g.shape == leaf.shape and (g == 0).all()
    w = selfattn.attention_weights(q, k, attn_mask=m, **kw)
    assert w.shape == (B, 4, Sq, Sk)
    s = selfattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), enable_gqa=True)
    assert s.shape == (B, 4, Sq, 6) and (s == 0).all()


@pytest.mark.parametrize("Sq,Sk", [(1, 0), (0, 5)])
def test_sdpa_5d_empty_sequence(Sq, Sk):
    q = torch.randn(1, 2, 1, Sq, 4)
    k, v = torch.randn(1, 2, 1, Sk, 4), torch.randn(1, 2, 1, Sk, 4)
    out = selfattn.scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 2, 1, Sq, 4) and (out == 0).all()


# ---------------------------------------------------------------------------
# Windows at the int64 limit

@pytest.mark.parametrize("window", [(2**62, 2**62), (2**62, 0), (0, 2**62)])
def test_huge_window_equals_unbounded(window):
    q, k, v = qkv(Sq=13, Sk=17)
    wl = tuple(-1 if w == 2**62 else w for w in window)
    a = selfattn.attention(q, k, v, window=window)
    b = selfattn.attention(q, k, v, window=wl)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("window", [(2**63 - 1, 2**63 - 1), (2**63 - 1, None), (None, 2**63 - 1)])
def test_int64_max_window_equals_unbounded(window):
    q, k, v = qkv(Sq=13, Sk=17)
    a = selfattn.attention(q, k, v, window=window)
    b = selfattn.attention(q, k, v)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


# ---------------------------------------------------------------------------
# Bugs found by the property and hostile tests, pinned down


@pytest.mark.parametrize("fn", ["attention", "attention_weights"])
def test_head_dim_1_with_non_unit_last_stride(fn):
    q, k, v = (torch.randn(1, 1, 1, 2)[..., ::2] for _ in range(3))
    if fn == "attention":
        torch.testing.assert_close(selfattn.attention(q, k, v), reference.attention(q, k, v))
    else:
        torch.testing.assert_close(selfattn.attention_weights(q, k),
                                   reference.attention_weights(q, k))


def test_rows_dead_by_window_and_key_lengths_are_zero():
    # Output exactly 0 and lse -inf; deterministic mode NaN-fills torch.empty, so
    # unwritten or garbage-derived output elements show up as NaN.
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    bad = []
    try:
        for dtype in (F32, F64):
            for Sq, Sk, D, Dv, window, kl in [(9, 130, 13, 16, (0, None), 29),
                                              (61, 210, 8, 8, (4, 28), 16),
                                              (61, 205, 16, 16, (0, 0), 17)]:
                q = torch.randn(1, Sq, 6, D, dtype=dtype)
                k = torch.randn(1, Sk, 2, D, dtype=dtype)
                v = torch.randn(1, Sk, 2, Dv, dtype=dtype)
                for _ in range(5):
                    out, lse = selfattn.attention(q, k, v, window=window, return_lse=True,
                                                  key_lengths=torch.tensor([kl]))
                    assert (lse == -INF).all()
                    if not (out == 0).all():
                        bad.append((dtype, Sq, Sk, D, Dv, window, kl, int(out.isnan().sum())))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert not bad, bad


def test_scale_huge_int_raises_value_error():
    q, k, v = qkv(requires_grad=False)
    with pytest.raises((ValueError, TypeError), match="scale"):
        selfattn.attention(q, k, v, scale=10**400)
