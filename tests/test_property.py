"""Property-based tests (hypothesis) of selfattn's public API (issue #6).

Random problems for selfattn.attention, scaled_dot_product_attention,
attention_weights and selfattn.nn.MultiheadAttention: batch (incl. 0),
sequence lengths (incl. 0 and 1), GQA/MQA heads, head dims (odd ones too),
dtypes, strides (transposed (B, H, S, D) storage, padded rows, strided last
dim, k/v expanded over batch or heads), causal with both alignments, windows,
key_lengths, masks of random broadcast shapes (bool, float, float with its
gradient; contiguous, transposed or expanded), scale, dropout_p=0. Forward and
gradients are judged against the float64 reference with DESIGN.md section 5's
bound (selfattn.testing.check_against_reference); MultiheadAttention against
torch.nn.MultiheadAttention with the same weights (float64 torch = golden).

Profiles (hypothesis.settings.register_profile):
  ci    default; ~300 examples over the four tests, derandomized (reproducible),
        no example database.
  slow  SELFATTN_HYPOTHESIS_PROFILE=slow; 5000 examples, random seeds; a
        failure prints the reproduce_failure blob.

Documented precision limits (DESIGN.md section 5's 2x bound cannot hold
there). Every example is first judged with the strict bound; only when that
fails inside one of these limits is it judged again with the looser bound of
_check_loose (counted as a hypothesis `event`, see --hypothesis-show-statistics):
  * float16/bfloat16: the backward's delta = rowsum(dO * O) uses the output
    rounded to the input dtype (as FlashAttention does) while the same-dtype
    reference differentiates its own rounded probabilities; on tiny problems
    ~1% of examples reach 2.0-2.9x the reference's error (LOWP_FACTOR = 4x).
    Extremely peaked low-precision softmax is kept out: scores std <= ~2;
  * gradients that cancel to ~0: rows that effectively see 1 or 2 keys
    (1 / sum(P^2) < 3: few visible keys, or a peaked softmax) (dq, dk), and a
    float mask broadcast over the keys (its gradient is a sum of dS over keys,
    0 by the softmax's shift invariance): the rounding residue is judged
    against atol_floor x max(1, scale) x sqrt(number of rows summed), or
    FEW_KEYS_FACTOR = 8x the reference's error; in float16/bfloat16 the mask
    gradient also carries delta's rounded-O residue (5 standard deviations of
    it, computed from the example's O and dO);
  * a softmax scale > 1 (float32 up to 30 with D = 1): the same rounding residue
    of dS reaches dq, dk multiplied by the scale; floor x scale;
  * kept out: float32 scores of std > ~300 (lse's float32 ulp; see
    test_attention.py::test_huge_scores_gradient_bound). float32/64 scores here
    have std <= ~30;
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import selfattn
from selfattn import reference
from selfattn import nn as sa
from selfattn.testing import ATOL_FLOOR, assert_close_to_golden, check_against_reference, max_err

from test_nn_common import assert_golden, clone_as, forward_backward

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
LOWP = (BF16, F16)

# ---------------------------------------------------------------------------
# Profiles. max_examples is the per-test base; each test takes a share of it
# (the shares sum to 4): ci = 4 x 75 = 300 examples, slow = 4 x 1250 = 5000.

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=75, derandomize=True, **_COMMON)
settings.register_profile("slow", max_examples=1250, derandomize=False, **_COMMON)
PROFILE = os.environ.get("SELFATTN_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(share: float) -> settings:
    return settings(max_examples=max(1, round(settings.default.max_examples * share)))


# Documented looser bounds (_check_loose): x the same-dtype reference's error.
LOWP_FACTOR = 4.0  # float16/bfloat16
FEW_KEYS_FACTOR = 8.0  # rows that see fewer than 3 keys (any dtype)


@pytest.fixture(autouse=True)
def _threads():
    # Results must not depend on it, but keep the suite's footprint small.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# Strategies.

dtypes = st.sampled_from([F32, F64, BF16, F16])
window_side = st.one_of(st.none(), st.just(-1), st.integers(0, 8), st.integers(0, 160))
QKV_LAYOUTS = ["contiguous", "bhsd", "padded", "last_strided"]
KV_LAYOUTS = QKV_LAYOUTS + ["expand_batch", "expand_heads"]


@st.composite
def mask_specs(draw, target):
    """None or (kind, shape, layout, dtype_choice) for a mask broadcastable to target."""
    kind = draw(st.sampled_from([None, "bool", "float", "float_grad"]))
    if kind is None:
        return None
    rank = draw(st.integers(0, 4))
    full = [draw(st.booleans()) for _ in range(4)]
    shape = tuple(t if f else 1 for t, f in zip(target, full))[4 - rank:]
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    mask_dtype = draw(st.sampled_from(["same", "float32"]))
    with_inf = draw(st.booleans())
    return dict(kind=kind, shape=shape, layout=layout, mask_dtype=mask_dtype, with_inf=with_inf)


@st.composite
def attention_cases(draw):
    dtype = draw(dtypes)
    B = draw(st.sampled_from([1, 2, 3, 1, 2, 0]))  # 0 in 1/6 of the cases
    # short, medium and multi-tile (the CPU kernel's tiles: 64 queries x 128 keys)
    Sq = draw(st.one_of(st.integers(0, 9), st.integers(10, 70), st.integers(60, 150)))
    Sk = draw(st.one_of(st.integers(0, 9), st.integers(10, 150), st.integers(120, 270)))
    big = Sq * Sk > 4000  # keep each example cheap: fewer heads on long sequences
    Hkv = draw(st.integers(1, 2 if big else 3))
    Hq = Hkv * draw(st.integers(1, 2 if big else 3))
    D = draw(st.one_of(st.sampled_from([1, 3, 8, 16, 32, 64]), st.integers(1, 48 if big else 80)))
    Dv = draw(st.one_of(st.just(D), st.integers(1, 40 if big else 72)))
    c = dict(dtype=dtype, B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv)
    c["layouts"] = (draw(st.sampled_from(QKV_LAYOUTS)), draw(st.sampled_from(KV_LAYOUTS)),
                    draw(st.sampled_from(KV_LAYOUTS)))
    c["causal"] = draw(st.booleans())
    c["align"] = draw(st.sampled_from(["bottom_right", "top_left"]))
    c["window"] = draw(st.one_of(st.none(), st.tuples(window_side, window_side)))
    c["key_lengths"] = draw(st.one_of(
        st.none(), st.tuples(st.lists(st.integers(0, Sk), min_size=B, max_size=B),
                             st.sampled_from([torch.int32, torch.int64]))))
    c["mask"] = draw(mask_specs((B, Hq, Sq, Sk)))
    # scores = scale * q.k with q, k ~ N(0, 1): std = scale * sqrt(D) * |mag|^2
    max_std = 2.0 if dtype in LOWP else 30.0
    c["scale"] = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    default = 1.0 / math.sqrt(D)
    s = default if c["scale"] is None else c["scale"] * max_std / math.sqrt(D)
    c["scale_value"] = s
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    c["grad"] = draw(st.sampled_from(["qkv", "qkv", "none", "q", "kv"]))
    return c


# ---------------------------------------------------------------------------
# Building tensors.

def _randn(shape, gen, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_bshd(shape, layout, gen, dtype):
    """A (B, S, H, D) tensor with the given memory layout (values ~ N(0, 1))."""
    B, S, H, D = shape
    if layout == "contiguous":
        return _randn(shape, gen, dtype)
    if layout == "bhsd":  # (B, H, S, D) storage seen as (B, S, H, D)
        return _randn((B, H, S, D), gen, dtype).transpose(1, 2)
    if layout == "padded":  # padding between rows and heads
        return _randn((B, S + 1, H + 2, D + 5), gen, dtype)[:, 1:, 1:H + 1, 2:D + 2]
    if layout == "last_strided":  # stride 2 in the last dim (the wrapper copies)
        return _randn((B, S, H, 2 * D), gen, dtype)[..., ::2]
    if layout == "expand_batch":
        return _randn((1, S, H, D), gen, dtype).expand(B, S, H, D)
    if layout == "expand_heads":
        return _randn((B, S, 1, D), gen, dtype).expand(B, S, H, D)
    raise AssertionError(layout)


def make_mask(spec, target, gen, dtype):
    if spec is None:
        return None
    shape = spec["shape"]
    full = [1] * (4 - len(shape)) + list(shape)
    if spec["layout"] == "expanded":  # stored with size-1 dims, expanded (stride 0)
        base_shape = [1 if (i % 2 == 0) else s for i, s in enumerate(full)][4 - len(shape):]
    else:
        base_shape = list(shape)
    if spec["kind"] == "bool":
        m = torch.rand(base_shape, generator=gen) < 0.75
    else:
        m = torch.randn(base_shape, generator=gen, dtype=torch.float64)
        if spec["with_inf"]:
            m = m.masked_fill(torch.rand(base_shape, generator=gen, dtype=torch.float64) < 0.15,
                              float("-inf"))
        m = m.to(F32 if spec["mask_dtype"] == "float32" else dtype)
    if spec["layout"] == "expanded":
        m = m.expand(shape)
    elif spec["layout"] == "transposed" and m.dim() >= 2:
        m = m.mT.contiguous().mT
    if spec["kind"] == "float_grad" and not m.requires_grad:
        m = m.detach().requires_grad_()
    return m


def build(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = c["dtype"]
    B, Sq, Sk, Hq, Hkv, D, Dv = (c[n] for n in ("B", "Sq", "Sk", "Hq", "Hkv", "D", "Dv"))
    lq, lk, lv = c["layouts"]
    q = make_bshd((B, Sq, Hq, D), lq, gen, dt)
    k = make_bshd((B, Sk, Hkv, D), lk, gen, dt)
    v = make_bshd((B, Sk, Hkv, Dv), lv, gen, dt)
    grad = {"qkv": (1, 1, 1), "none": (0, 0, 0), "q": (1, 0, 0), "kv": (0, 1, 1)}[c["grad"]]
    q, k, v = (t.requires_grad_(bool(g)) for t, g in zip((q, k, v), grad))
    mask = make_mask(c["mask"], (B, Hq, Sq, Sk), gen, dt)
    kl = None
    if c["key_lengths"] is not None:
        kl = torch.tensor(c["key_lengths"][0], dtype=c["key_lengths"][1]).reshape(B)
    kw = dict(causal=c["causal"], causal_alignment=c["align"], window=c["window"],
              scale=None if c["scale"] is None else c["scale_value"], key_lengths=kl,
              dropout_p=0.0)
    return q, k, v, mask, kw


def effective_keys(q, k, mask, kw):
    """(B, Hq, Sq) number of keys each query effectively sees: 1 / sum(P^2) of
    the float64 reference probabilities (n for n equally weighted keys, ~1 for
    a one-hot softmax, 0 for a row that sees no key)."""
    m = None if mask is None else (mask.detach() if mask.dtype == torch.bool
                                   else mask.detach().double())
    p = reference.attention_weights(q.detach().double(), k.detach().double(), attn_mask=m,
                                    causal=kw["causal"], causal_alignment=kw["causal_alignment"],
                                    window=kw["window"], scale=kw["scale"],
                                    key_lengths=kw["key_lengths"])
    sq = (p * p).sum(-1)
    return torch.where(sq > 0, 1.0 / sq, torch.zeros_like(sq))


def _check(fused, ref, inputs, name, c, few_keys, summed_mask_grad=False):
    """check_against_reference (DESIGN.md section 5); where it fails inside a
    documented precision limit, the looser bound of _check_loose."""
    try:
        check_against_reference(fused, ref, inputs, name=name)
        return
    except AssertionError as e:
        limits = []
        if c["dtype"] in LOWP:
            limits.append("float16/bfloat16")
        if few_keys:
            limits.append("rows that effectively see < 3 keys")
        if summed_mask_grad:
            limits.append("mask gradient summed over keys")
        if c["scale_value"] > 1.0:
            limits.append("softmax scale > 1")
        if not limits:
            raise
        event("looser bound: " + " + ".join(limits))
        note(f"{e}; retrying with the looser bound of: {', '.join(limits)}")
    # dk of a key seen by few rows sums the residues of Sq * (Hq / Hkv) rows; the
    # gradient of a mask broadcast over the keys sums those of up to B * Hq * Sq rows
    rows = max(1, c["Sq"] * c["Hq"] // c["Hkv"])
    floor_mult = max(1.0, c["scale_value"])  # dq, dk carry the scale
    if few_keys:
        floor_mult = max(1.0, c["scale_value"]) * math.sqrt(rows)
    if summed_mask_grad:
        floor_mult = max(floor_mult, math.sqrt(max(1, c["B"] * c["Hq"] * c["Sq"])))
    _check_loose(fused, ref, inputs, name, problem_dtype=c["dtype"],
                 factor=FEW_KEYS_FACTOR if (few_keys or summed_mask_grad) else LOWP_FACTOR,
                 floor_mult=floor_mult, summed_mask_grad=summed_mask_grad,
                 scale=c["scale_value"], rows=rows)


def _half_ulp(dtype):
    return torch.finfo(dtype).eps / 2


def _check_loose(fused_fn, ref_fn, inputs, name, problem_dtype, factor, floor_mult,
                 summed_mask_grad, scale, rows):
    """check_against_reference's comparison with the looser bound
    max(atol_floor(problem dtype) * floor_mult * max(1, |golden|),
        factor x the same-dtype reference's error),
    floor_mult = max(1, scale) * sqrt(Sq * Hq / Hkv) for rows that effectively
    see < 3 keys.
    In float16/bfloat16 the bounds add the residue of delta's rounded O: row i's
    dS_ij carries P_ij * r_i with r_i = dO_i . (O_i - round(O_i)), whose rounding
    errors are independent with std <= u |O| / sqrt(3) (u the dtype's unit
    roundoff); with R = 5 standard deviations of one row's r_i, dq gets
    scale * R * max|k|, dk scale * R * max|q| * sqrt(rows), and a mask
    gradient summed over the keys (inputs[3]) the sum over all rows,
    5 u / sqrt(3) * ||dO * O||. Every bound adds half an ulp of the
    result's dtype at the golden's magnitude: the fused result is rounded to
    that dtype once more than the float64 golden.

    Why (see the module docstring): in float16/bfloat16 the kernel's
    delta = rowsum(dO * O) uses the rounded O, and the 2x-the-reference bound is
    statistically fragile on tiny problems (measured: ~1% of random small
    float16/bfloat16 problems reach 2.0-2.9x: LOWP_FACTOR); with 1 or 2 visible keys
    dS = P * (dP - delta) cancels (exactly 0 for one key) and the residue of
    rounding reaches dq/dk multiplied by the softmax scale, while the
    same-dtype reference cancels exactly (and dk of such a key sums the
    residues of all the query rows of its group). A float32 gradient of a
    low-precision problem (a float32 mask) gets the problem dtype's floor."""
    grad_inputs = [i for i, t in enumerate(inputs)
                   if isinstance(t, torch.Tensor) and t.requires_grad]

    def run(fn, cast):
        xs = [t.detach().to(cast).requires_grad_(t.requires_grad)
              if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        return fn(*xs), xs

    def close(what, a, lp, gold, residue=0.0):
        assert not torch.isnan(a).any(), f"{what}: NaN"
        sc = max(1.0, gold.abs().max().item()) if gold.numel() else 1.0
        floor = max(ATOL_FLOOR[a.dtype], ATOL_FLOOR[problem_dtype]) * floor_mult
        # + half an ulp of the result's dtype: the fused result is rounded once more
        bound = max(floor * sc, factor * max_err(lp, gold)) + residue + _half_ulp(a.dtype) * sc
        err = max_err(a, gold)
        assert err <= bound, f"{what}: error {err:.3e} > loose bound {bound:.3e}"

    torch.manual_seed(1)
    out, xs = run(fused_fn, None)
    lp, xs_lp = run(ref_fn, None)
    gold, xs_64 = run(ref_fn, torch.float64)
    close(f"{name} output", out, lp, gold)
    if not grad_inputs:
        return
    dout = torch.randn(out.shape, dtype=torch.float32).to(out.dtype)
    g = torch.autograd.grad(out, [xs[i] for i in grad_inputs], dout)
    g_lp = torch.autograd.grad(lp, [xs_lp[i] for i in grad_inputs], dout)
    g_64 = torch.autograd.grad(gold, [xs_64[i] for i in grad_inputs], dout.double())
    residue = {}
    if problem_dtype in LOWP:
        sigma = _half_ulp(problem_dtype) / math.sqrt(3) * (dout.double() * out.double())
        row_r = 5 * sigma.norm(dim=-1).max().item() if sigma.numel() else 0.0
        residue[0] = scale * row_r * inputs[1].detach().abs().max().item()
        residue[1] = scale * row_r * inputs[0].detach().abs().max().item() * math.sqrt(rows)
        if summed_mask_grad:
            residue[3] = 5 * sigma.norm().item()
    for i, a, b, gd in zip(grad_inputs, g, g_lp, g_64):
        close(f"{name} grad of input {i}", a, b, gd, residue.get(i, 0.0))


def _describe(c, q, k, v, mask):
    note(f"case {c}")
    note(f"strides q {q.stride()} k {k.stride()} v {v.stride()}"
         + ("" if mask is None else f" mask {tuple(mask.shape)} {mask.dtype} {mask.stride()}"))


# ---------------------------------------------------------------------------
# selfattn.attention

@examples(2.0)
@given(c=attention_cases())
def test_attention_matches_reference(c):
    q, k, v, mask, kw = build(c)
    _describe(c, q, k, v, mask)
    torch.manual_seed(c["seed"] % 1000)  # the cotangent

    def fused(q, k, v, *m):
        return selfattn.attention(q, k, v, attn_mask=m[0] if m else None, **kw)

    def ref(q, k, v, *m):
        return reference.attention(q, k, v, attn_mask=m[0] if m else None, **kw)

    inputs = [q, k, v] + ([mask] if mask is not None else [])
    keys = effective_keys(q, k, mask, kw)
    summed = (mask is not None and mask.requires_grad
              and (mask.dim() == 0 or mask.shape[-1] == 1))
    _check(fused, ref, inputs, "attention", c, bool(((keys > 0) & (keys < 3)).any()),
           summed_mask_grad=summed)
    # The inputs were read in place, not modified.
    out, lse = selfattn.attention(q.detach(), k.detach(), v.detach(), attn_mask=mask,
                                  return_lse=True, **kw)
    assert out.shape == (c["B"], c["Sq"], c["Hq"], c["Dv"]) and out.dtype == c["dtype"]
    assert lse.shape == (c["B"], c["Hq"], c["Sq"])
    assert lse.dtype == (F64 if c["dtype"] == F64 else F32)
    m64 = None if mask is None else (mask.detach() if mask.dtype == torch.bool
                                     else mask.detach().double())
    _, lse64 = reference.attention(q.detach().double(), k.detach().double(),
                                   v.detach().double(), attn_mask=m64, return_lse=True, **kw)
    # rows that see no key: exactly -inf in both, and output 0
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
    dead = torch.isneginf(lse).transpose(1, 2)
    assert (out[dead] == 0).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


# ---------------------------------------------------------------------------
# selfattn.attention_weights

@examples(0.6)
@given(c=attention_cases(), given_lse=st.booleans())
def test_attention_weights_match_reference(c, given_lse):
    q, k, v, mask, kw = build(c)
    _describe(c, q, k, v, mask)
    q, k, v = q.detach(), k.detach(), v.detach()
    if mask is not None:
        mask = mask.detach()
    lse = None
    if given_lse:
        _, lse = selfattn.attention(q, k, v, attn_mask=mask, return_lse=True, **kw)
    w = selfattn.attention_weights(q, k, attn_mask=mask, lse=lse, **kw)
    assert not w.requires_grad
    w_lp = reference.attention_weights(q, k, attn_mask=mask, **kw)
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    w_64 = reference.attention_weights(q.double(), k.double(), attn_mask=m64, **kw)
    assert w.dtype == c["dtype"]
    try:
        assert_close_to_golden("attention_weights", w, w_lp, w_64)
    except AssertionError:
        if c["dtype"] not in LOWP:
            raise
        # probabilities of a peaked low-precision row: a few ulps of 1.0
        err, ref_err = max_err(w, w_64), max_err(w_lp, w_64)
        assert err <= max(FEW_KEYS_FACTOR * ref_err, 4 * ATOL_FLOOR[c["dtype"]]), (err, ref_err)
    # rows sum to 1 (or 0 for rows that see no key)
    s = w.double().sum(-1)
    ok = ((s - 1).abs() < 2e-2) | (s == 0)
    assert ok.all()


# ---------------------------------------------------------------------------
# selfattn.scaled_dot_product_attention ((..., H, S, D) layout, torch's semantics)

@st.composite
def sdpa_cases(draw):
    dtype = draw(dtypes)
    rank = draw(st.sampled_from([3, 4, 4, 4, 5]))
    N = draw(st.sampled_from([1, 2, 3, 1, 2, 0]))
    Hkv = 1 if rank == 3 else draw(st.integers(1, 3))
    gqa = rank != 3 and draw(st.booleans())
    Hq = Hkv * (draw(st.integers(1, 3)) if gqa else 1)
    Sq = draw(st.one_of(st.integers(1, 9), st.integers(0, 80), st.integers(60, 130)))
    Sk = draw(st.one_of(st.integers(1, 9), st.integers(0, 140), st.integers(120, 200)))
    D = draw(st.integers(1, 72))
    Dv = draw(st.one_of(st.just(D), st.integers(1, 72)))
    mask = draw(st.sampled_from([None, "bool", "float", "float_grad", "causal"]))
    target = {3: (N, Sq, Sk), 4: (N, Hq, Sq, Sk), 5: (N, 2, Hq, Sq, Sk)}[rank]
    mshape = None
    if mask in ("bool", "float", "float_grad"):
        r = draw(st.integers(1, len(target)))
        mshape = tuple(t if draw(st.booleans()) else 1 for t in target)[len(target) - r:]
    max_std = 2.0 if dtype in LOWP else 30.0
    scale = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    return dict(dtype=dtype, rank=rank, N=N, Hq=Hq, Hkv=Hkv, gqa=gqa, Sq=Sq, Sk=Sk, D=D, Dv=Dv,
                mask=mask, mshape=mshape,
                scale=None if scale is None else scale * max_std / math.sqrt(D),
                transposed=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _sdpa_tensor(shape, transposed, gen, dtype, rank):
    # (..., H, S, D); transposed: stored as (..., S, H, D) like a projection's output
    if transposed and rank >= 4:
        t = _randn(shape[:-3] + (shape[-2], shape[-3], shape[-1]), gen, dtype)
        return t.transpose(-3, -2)
    return _randn(shape, gen, dtype)


@examples(0.6)
@given(c=sdpa_cases())
def test_sdpa_matches_reference_and_torch(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt, N, Hq, Hkv, Sq, Sk, D, Dv = (c[n] for n in ("dtype", "N", "Hq", "Hkv", "Sq", "Sk", "D", "Dv"))
    lead = {3: (N,), 4: (N,), 5: (N, 2)}[c["rank"]]
    hq, hkv = ((), ()) if c["rank"] == 3 else ((Hq,), (Hkv,))
    q = _sdpa_tensor(lead[:1] + lead[1:] + hq + (Sq, D), c["transposed"], gen, dt, c["rank"])
    k = _sdpa_tensor(lead + hkv + (Sk, D), c["transposed"], gen, dt, c["rank"])
    v = _sdpa_tensor(lead + hkv + (Sk, Dv), c["transposed"], gen, dt, c["rank"])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask, is_causal = None, c["mask"] == "causal"
    if c["mask"] == "bool":
        mask = torch.rand(c["mshape"], generator=gen) < 0.75
    elif c["mask"] in ("float", "float_grad"):
        mask = _randn(c["mshape"], gen, dt).requires_grad_(c["mask"] == "float_grad")
    kw = dict(is_causal=is_causal, scale=c["scale"], enable_gqa=c["gqa"])
    note(f"case {c}; shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    torch.manual_seed(c["seed"] % 1000)

    def fused(q, k, v, *m):
        return selfattn.scaled_dot_product_attention(q, k, v, m[0] if m else None, **kw)

    def ref(q, k, v, *m):
        return reference.scaled_dot_product_attention(q, k, v, m[0] if m else None, **kw)

    inputs = [q, k, v] + ([mask] if mask is not None else [])
    c["scale_value"] = 1.0 / math.sqrt(D) if c["scale"] is None else c["scale"]
    few_keys = is_causal or Sk < 3 or (mask is not None and mask.dtype == torch.bool)
    summed = mask is not None and mask.requires_grad and mask.shape[-1] == 1
    c["B"] = N * (2 if c["rank"] == 5 else 1)
    _check(fused, ref, inputs, "sdpa", c, few_keys, summed_mask_grad=summed)
    # The oracle itself agrees with torch's SDPA (float64) on rows that see a key.
    # (Not at scale=0 with is_causal: torch multiplies its -inf causal bias by
    # the scale and returns NaN for every row.)
    if is_causal and c["scale"] == 0.0:
        return
    with torch.no_grad():
        m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
        if m64 is not None and m64.dim() < 2:  # torch's SDPA wants >= 2-D masks
            m64 = m64.reshape((1,) * (2 - m64.dim()) + tuple(m64.shape))
        gold = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), m64, **kw)
        if c["rank"] == 5:  # torch's SDPA takes one batch dim only in some versions
            qf, kf, vf = (t.double().flatten(0, 1) for t in (q, k, v))
            mf = None if m64 is None else m64.expand(*lead, *m64.shape[-3:]).flatten(0, 1) \
                if m64.dim() >= 4 else m64
            theirs = F.scaled_dot_product_attention(qf, kf, vf, mf, **kw).unflatten(0, lead)
        else:
            theirs = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), m64, **kw)
        live = ~torch.isnan(theirs)
        torch.testing.assert_close(gold[live], theirs[live], rtol=1e-9, atol=1e-9)
        # where torch gives NaN (query sees no key), selfattn gives 0
        assert (gold[~live] == 0).all()


# ---------------------------------------------------------------------------
# selfattn.nn.MultiheadAttention vs torch.nn.MultiheadAttention

@st.composite
def mha_cases(draw):
    H = draw(st.integers(1, 4))
    E = H * draw(st.integers(1, 8))
    self_attn = draw(st.booleans())
    kvdim = (not self_attn) and draw(st.booleans())
    N = draw(st.integers(1, 3))
    L = draw(st.integers(1, 12))
    S = L if self_attn else draw(st.integers(1, 12))
    c = dict(H=H, E=E, self_attn=self_attn, N=N, L=L, S=S,
             kdim=draw(st.integers(1, 9)) if kvdim else None,
             vdim=draw(st.integers(1, 9)) if kvdim else None,
             bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()),
             add_zero_attn=draw(st.booleans()), batch_first=draw(st.booleans()),
             batched=draw(st.booleans()), dtype=draw(st.sampled_from([F32, F64])),
             kpm=draw(st.sampled_from([None, "bool_suffix", "bool", "float"])),
             attn_mask=draw(st.sampled_from([None, "bool2d", "bool3d", "float2d", "float3d",
                                             "causal"])),
             need_weights=draw(st.booleans()), average=draw(st.booleans()),
             seed=draw(st.integers(0, 2**31 - 1)))
    if c["attn_mask"] == "causal" and L != S:
        c["attn_mask"] = None
    if not c["batched"]:
        c["N"] = 1
        if c["attn_mask"] in ("bool3d", "float3d"):
            c["attn_mask"] = "bool2d"
    return c


@examples(0.8)
@given(c=mha_cases())
def test_multihead_attention_matches_torch(c):
    note(f"case {c}")
    gen = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"] % 1000)
    E, H, N, L, S = c["E"], c["H"], c["N"], c["L"], c["S"]
    golden = torch.nn.MultiheadAttention(E, H, bias=c["bias"], add_bias_kv=c["add_bias_kv"],
                                         add_zero_attn=c["add_zero_attn"], kdim=c["kdim"],
                                         vdim=c["vdim"], batch_first=c["batch_first"],
                                         dtype=torch.float64)
    dt = c["dtype"]
    ref = clone_as(golden, dtype=dt)
    ours = clone_as(golden, sa.MultiheadAttention, dt)
    kdim, vdim = c["kdim"] or E, c["vdim"] or E

    def shaped(n, s, e):
        if not c["batched"]:
            return (s, e)
        return (n, s, e) if c["batch_first"] else (s, n, e)

    q = torch.randn(shaped(N, L, E), generator=gen, dtype=F64)
    k = torch.randn(shaped(N, S, kdim), generator=gen, dtype=F64)
    v = torch.randn(shaped(N, S, vdim), generator=gen, dtype=F64)
    # masks (torch's conventions: bool True = not allowed); key 0 stays visible to
    # every query so that torch gives no NaN rows (selfattn gives 0 there)
    kpm = None
    if c["kpm"] is not None:
        if c["kpm"] == "bool_suffix":
            lengths = torch.randint(1, S + 1, (N,), generator=gen)
            kpm = torch.arange(S) >= lengths.view(N, 1)
        else:
            kpm = torch.rand(N, S, generator=gen) < 0.4
            kpm[:, 0] = False
        if c["kpm"] == "float":
            kpm = torch.zeros(N, S, dtype=F64).masked_fill(kpm, float("-inf"))
        if not c["batched"]:
            kpm = kpm[0]
    am, is_causal = None, False
    kind = c["attn_mask"]
    if kind == "causal":
        am, is_causal = torch.ones(L, S, dtype=torch.bool).triu(1), True
    elif kind is not None:
        shape = (L, S) if kind.endswith("2d") else (N * H, L, S)
        if kind.startswith("bool"):
            am = torch.rand(shape, generator=gen) < 0.4
            am[..., 0] = False
        else:
            am = torch.randn(shape, generator=gen, dtype=F64)

    def results(m, d):
        kw = dict(key_padding_mask=None if kpm is None else (kpm if kpm.dtype == torch.bool
                                                             else kpm.to(d)),
                  attn_mask=None if am is None else (am if am.dtype == torch.bool else am.to(d)),
                  need_weights=c["need_weights"], average_attn_weights=c["average"],
                  is_causal=is_causal)
        if c["self_attn"]:
            return forward_backward(lambda x: m(x, x, x, **kw), [q.to(d)], list(m.parameters()))
        return forward_backward(lambda a, b, e: m(a, b, e, **kw), [q.to(d), k.to(d), v.to(d)],
                                list(m.parameters()))

    assert_golden(results(ours, dt), results(ref, dt), results(golden, F64))
