"""Score modifiers on the CPU (issue 18): ALiBi slopes and logit soft-capping.

The scaled score s of query i and key j becomes softcap * tanh(s / softcap)
(softcap > 0), then gets the ALiBi bias -slope * |i + offset - j|, then the
masks (FlashAttention's order). Checked against selfattn.reference in float64
(which writes the bias and the soft-cap out densely) with DESIGN.md's bound,
forward and every gradient (q, k, v and a float mask, whose gradient is dS
before the soft-cap's derivative), with and without each other option;
soft-caps from 1 to 100 and scores that saturate tanh; gradcheck in float64;
opcheck (tests/test_ops.py) and torch.compile; attention_weights; a block of
a larger attention (diag_offset, q_start, k_start) against the whole, dropout
included; diag_offset at its limits; bad arguments. The grid also runs on
every other CPU kernel module this CPU can run (in a subprocess).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from selfattn import ops, reference

from helpers import assert_close_to_golden, check_against_reference, make_qkv, rand
from test_cpu_isa import _other_isas

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DT = {F32: "f32", F64: "f64", BF16: "bf16", F16: "f16"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def slopes(B, Hq, per_batch=False, seed=0):
    """ALiBi slopes in [0.02, 0.5]: (Hq,), or (B, Hq) when per_batch."""
    shape = (B, Hq) if per_batch else (Hq,)
    return 0.02 + 0.48 * torch.rand(shape, generator=_gen(100 + seed))


# ---------------------------------------------------------------------------
# The accuracy grid: each case crosses the modifiers with other options.

def case(dtype=F32, B=2, Sq=33, Sk=47, Hq=4, Hkv=2, D=32, Dv=None, alibi=None, softcap=0.0,
         amplitude=1.0, mask=None, dropout=0.0, **kw):
    parts = [DT[dtype], f"B{B}", f"Sq{Sq}", f"Sk{Sk}", f"H{Hq}x{Hkv}", f"D{D}"]
    parts += [f"Dv{Dv}"] if Dv else []
    parts += [f"alibi_{alibi}"] if alibi else []
    parts += [f"softcap{softcap:g}"] if softcap else []
    parts += [f"amp{amplitude:g}"] if amplitude != 1.0 else []
    parts += [f"{mask}mask"] if mask else []
    parts += [f"drop{dropout}"] if dropout else []
    parts += [f"{k}={v}" for k, v in kw.items()]
    c = dict(dtype=dtype, B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, alibi=alibi,
             softcap=softcap, amplitude=amplitude, mask=mask, dropout=dropout, kw=kw)
    return pytest.param(c, id="-".join(parts).replace(" ", ""))


GRID = [
    # each modifier alone, every dtype
    case(alibi="h"), case(softcap=5.0), case(F64, alibi="bh", softcap=20.0),
    case(BF16, alibi="h"), case(F16, softcap=30.0), case(BF16, alibi="bh", softcap=50.0),
    case(F16, alibi="h", softcap=1.0),
    # soft-caps from 1 to 100, scores large enough for tanh to saturate
    case(softcap=1.0, amplitude=6.0), case(softcap=100.0, amplitude=8.0),
    case(F64, softcap=2.0, amplitude=10.0, alibi="h"), case(BF16, softcap=1.0, amplitude=6.0),
    # causal in both alignments, windows, Sq != Sk both ways, a row of 1
    case(alibi="h", softcap=10.0, causal=True),
    case(alibi="bh", causal=True, causal_alignment="top_left"),
    case(Sq=47, Sk=33, alibi="h", softcap=3.0, causal=True),
    case(Sq=1, Sk=60, alibi="bh", softcap=3.0, causal=True),
    case(alibi="h", window=(5, 3)), case(F64, softcap=4.0, window=(None, 0), causal_alignment="top_left"),
    # several key and query tiles (kBlockN 256, kBlockM 64; backward 256 x 64)
    case(B=1, Sq=300, Sk=520, Hq=2, Hkv=1, alibi="h", softcap=15.0),
    case(BF16, B=1, Sq=270, Sk=270, Hq=2, Hkv=2, D=64, alibi="bh", softcap=30.0, causal=True),
    # GQA / MQA, D != Dv
    case(Hq=6, Hkv=1, D=24, Dv=40, alibi="h", softcap=8.0),
    case(F16, Hq=4, Hkv=4, D=16, Dv=8, alibi="bh"),
    # key_lengths, masks (with a float mask's gradient), rows that see no key
    case(alibi="h", softcap=6.0, key_lengths=(47, 0)),
    case(alibi="bh", mask="bool"), case(softcap=5.0, mask="float"),
    case(F64, alibi="h", softcap=2.0, mask="float", window=(7, 7)),
    case(BF16, alibi="h", softcap=12.0, mask="float", causal=True),
    # dropout (the reference given the fused kernel's mask)
    case(alibi="h", softcap=5.0, dropout=0.3),
    case(F64, alibi="bh", softcap=3.0, dropout=0.2, mask="float", causal=True),
    case(BF16, alibi="h", dropout=0.25, key_lengths=(30, 47)),
    # scale
    case(alibi="h", softcap=5.0, scale=1.7), case(F64, softcap=40.0, scale=0.01, alibi="h"),
]


def _inputs(c):
    q, k, v = make_qkv(c["B"], c["Sq"], c["Sk"], c["Hq"], c["Hkv"], c["D"], c["Dv"],
                       dtype=c["dtype"])
    if c["amplitude"] != 1.0:
        q, k = (t.detach().mul(c["amplitude"]).requires_grad_() for t in (q, k))
    inputs = [q, k, v]
    if c["mask"] == "bool":
        m = torch.rand(c["B"], 1, c["Sq"], c["Sk"]) < 0.7
        m[:, :, 3] = False  # a row that sees no key
        inputs.append(m)
    elif c["mask"] == "float":
        m = rand(c["Hq"], c["Sq"], c["Sk"], dtype=c["dtype"]) * 2
        m.masked_fill_(torch.rand(m.shape) < 0.1, float("-inf"))
        inputs.append(m.requires_grad_())
    return inputs


def _options(c):
    kw = dict(c["kw"])
    if "key_lengths" in kw:
        kw["key_lengths"] = torch.tensor(kw["key_lengths"])
    if c["alibi"]:
        kw["alibi_slopes"] = slopes(c["B"], c["Hq"], per_batch=c["alibi"] == "bh")
    kw["softcap"] = c["softcap"]
    return kw


def _kept(q, k, mask, p, seed, **kw):
    """The keep mask the fused ops draw for generator seed `seed` (True where
    the undropped probability is 0: those elements contribute nothing)."""
    w = selfattn.attention_weights(q, k, attn_mask=mask, dropout_p=p, generator=_gen(seed), **kw)
    w0 = selfattn.attention_weights(q, k, attn_mask=mask, **kw)
    return (w != 0) | (w0 == 0)


@pytest.mark.parametrize("c", GRID)
def test_grid_against_reference(c):
    inputs = _inputs(c)
    kw = _options(c)
    p, seed = c["dropout"], 5
    drop_ref = {}
    if p:
        mask = inputs[3].detach() if len(inputs) > 3 else None
        keep = _kept(inputs[0].detach(), inputs[1].detach(), mask, p, seed, **kw)
        assert not keep.all()
        drop_ref = dict(dropout_p=p, dropout_mask=keep)

    def fused(q, k, v, *m):
        drop = dict(dropout_p=p, generator=_gen(seed)) if p else {}
        return selfattn.attention(q, k, v, attn_mask=m[0] if m else None, **kw, **drop)

    def ref(q, k, v, *m):
        return reference.attention(q, k, v, attn_mask=m[0] if m else None, **kw, **drop_ref)

    check_against_reference(fused, ref, inputs)


@pytest.mark.parametrize("c", [GRID[i] for i in (2, 9, 14, 24, 25, 28)])
def test_attention_weights_against_reference(c):
    q, k, *rest = (t.detach() for t in _inputs(c))
    kw = _options(c)
    mask = rest[1] if len(rest) > 1 else None
    gold = reference.attention_weights(q.double(), k.double(), attn_mask=mask if mask is None
                                       or mask.dtype == torch.bool else mask.double(), **kw)
    lowp = reference.attention_weights(q, k, attn_mask=mask, **kw)
    _, lse = selfattn.attention(q, k, rest[0], attn_mask=mask, return_lse=True, **kw)
    for lse_in in (None, lse):
        w = selfattn.attention_weights(q, k, attn_mask=mask, lse=lse_in, **kw)
        assert_close_to_golden("weights", w, lowp, gold)


def test_softcap_bounds_the_scores():
    """With a soft-cap and nothing else, every score lies in [-softcap, softcap]:
    the weights' log-ratios are at most 2 * softcap."""
    q, k = (t.detach() * 30 for t in make_qkv(1, 20, 30, 2, 2, 16)[:2])
    w = selfattn.attention_weights(q, k, softcap=1.5, scale=1.0).double()
    ratio = w.max(-1).values.log() - w.min(-1).values.log()
    assert ratio.max().item() <= 3.0 + 1e-5


def test_zero_slopes_and_huge_softcap_change_nothing():
    q, k, v = (t.detach() for t in make_qkv(2, 17, 23, 4, 2, 16))
    plain = selfattn.attention(q, k, v, causal=True)
    mods = selfattn.attention(q, k, v, causal=True, alibi_slopes=torch.zeros(4), softcap=1e9)
    torch.testing.assert_close(mods, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_softcap_of_non_finite_scores(dtype):
    """The kernels' own tanh: an infinite score is capped to +-softcap like
    the reference's torch.tanh, and a NaN one stays NaN (its row is NaN)."""
    q, k, v = (t.detach().to(dtype) for t in make_qkv(1, 6, 9, 2, 2, 8))
    q[0, 1, 0, 0] = float("inf")
    q[0, 4, 1, 2] = float("nan")
    out = selfattn.attention(q, k, v, softcap=5.0)
    gold = reference.attention(q.double(), k.double(), v.double(), softcap=5.0)
    assert out[0, 4, 1].isnan().all() and gold[0, 4, 1].isnan().all()
    assert not out[0, 1, 0].isnan().any() and not gold[0, 1, 0].isnan().any()
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------------
# gradcheck (float64, small)

def _gc(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(softcap=2.0),
    dict(alibi="bh", causal=True),
    dict(alibi="h", softcap=0.7, window=(2, 1), causal_alignment="top_left"),
    dict(alibi="h", softcap=1.5, dropout=0.3),
], ids=["softcap", "alibi_bh-causal", "both-window", "both-dropout"])
def test_gradcheck_with_float_mask(kw):
    kw = dict(kw)
    q, k, v = make_qkv(2, 5, 7, 4, 2, 6, 3, dtype=F64)
    mask = rand(4, 5, 7, dtype=F64, requires_grad=True)
    alibi = kw.pop("alibi", None)
    if alibi:
        kw["alibi_slopes"] = slopes(2, 4, per_batch=alibi == "bh")
    p = kw.pop("dropout", 0.0)

    def fn(q, k, v, m):
        return selfattn.attention(q, k, v, attn_mask=m, dropout_p=p, generator=_gen(3), **kw)

    _gc(fn, (q, k, v, mask))


# ---------------------------------------------------------------------------
# torch.compile(fullgraph=True)

@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile(backend):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 9, 11, 4, 2, 16)
    mask = rand(9, 11, requires_grad=True)
    s = slopes(2, 4, per_batch=True)

    def fn(q, k, v, m):
        out, lse = selfattn.attention(q * 0.5, k, v, causal=True, attn_mask=m, alibi_slopes=s,
                                      softcap=3.0, return_lse=True)
        w = selfattn.attention_weights(q, k, causal=True, attn_mask=m, alibi_slopes=s,
                                       softcap=3.0, lse=lse)
        return out.relu() + w.sum(-1).transpose(1, 2).unsqueeze(-1)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (fn, compiled):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, mask)]
        out = f(*xs)
        results.append((out, torch.autograd.grad(out.square().sum(), xs)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# A block of a larger attention: diag_offset, q_start and k_start (the ops).

def _op_args(rng, scale, wr, off, p, s, softcap, q_start=0, k_start=0):
    """The arguments after (mask, key_lengths) of the forward and probs ops."""
    return (rng, scale, -1, wr, off, p, s, softcap, q_start, k_start)


ROW_BLOCKS = [(0, 70), (70, 203), (203, 300)]
KEY_BLOCKS = [(0, 61), (61, 258), (258, 300)]  # odd starts: dropout's groups of 4 keys split


@pytest.mark.parametrize("dtype", [F64, F32], ids=DT.get)
def test_blocks_reproduce_the_whole(dtype):
    """The whole causal (top-left) attention cut into row and key blocks: each
    block, given diag_offset = r0 - c0 and q_start, k_start = r0, c0, draws
    the whole's dropout mask and sees the whole's ALiBi distances, so that
    its probabilities (from the whole's lse) are the whole's, the
    lse-weighted sum of its outputs is the whole's output, and the sums of its
    gradients (from the whole's out and lse) are the whole's gradients."""
    B, S, H, D, p, cap = 2, 300, 2, 16, 0.3, 4.0
    q, k, v = (t.detach() for t in make_qkv(B, S, S, H, H, D, dtype=dtype))
    rng = torch.tensor([1234, 56789])
    s, scale = slopes(B, H, per_batch=True), D ** -0.5
    out, lse = ops.forward_op(q, k, v, None, None, *_op_args(rng, scale, 0, 0, p, s, cap))
    probs = ops.probs_op(q, k, lse, None, None, *_op_args(rng, scale, 0, 0, p, s, cap))
    dout = torch.randn_like(out)
    dq, dk, dv, _ = ops.backward_op(dout, q, k, v, out, lse, None, None,
                                    *_op_args(rng, scale, 0, 0, p, s, cap), False)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == F64 else dict(atol=2e-6, rtol=2e-5)
    merged = torch.zeros_like(out)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for r0, r1 in ROW_BLOCKS:
        qb, lse_b, out_b, dout_b = (q[:, r0:r1], lse[:, :, r0:r1].contiguous(), out[:, r0:r1],
                                    dout[:, r0:r1])
        for c0, c1 in KEY_BLOCKS:
            args = _op_args(rng, scale, 0, r0 - c0, p, s, cap, r0, c0)
            kb, vb = k[:, c0:c1], v[:, c0:c1]
            pb = ops.probs_op(qb, kb, lse_b, None, None, *args)
            whole = probs[:, :, r0:r1, c0:c1]
            torch.testing.assert_close(pb, whole, **tol)
            assert torch.equal(pb != 0, whole != 0), "the block drew another dropout mask"
            ob, lb = ops.forward_op(qb, kb, vb, None, None, *args)
            weight = torch.exp(lb - lse_b).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
            merged[:, r0:r1] += weight * ob
            gq, gk, gv, _ = ops.backward_op(dout_b, qb, kb, vb, out_b, lse_b, None, None, *args,
                                            False)
            grads[0][:, r0:r1] += gq
            grads[1][:, c0:c1] += gk
            grads[2][:, c0:c1] += gv
    torch.testing.assert_close(merged, out, **tol)
    for got, want in zip(grads, (dq, dk, dv)):
        torch.testing.assert_close(got, want, **tol)


def _dense(q, k, v, scale, wl, wr, off, s, cap):
    """Float64 oracle of the forward op for any diag_offset: (out, lse)."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    if cap:
        scores = cap * torch.tanh(scores / cap)
    if s is not None:
        scores = scores + reference.alibi_bias(s, Sq, Sk, off, torch.float64)
    i = torch.arange(Sq, dtype=F64).view(-1, 1) + float(off)  # float: no int64 overflow
    j = torch.arange(Sk, dtype=F64).view(1, -1)
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if wl >= 0:
        visible &= j >= i - float(wl)
    if wr >= 0:
        visible &= j <= i + float(wr)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", probs, v.double()), lse


@pytest.mark.parametrize("off", [10**6, -10**6, 12345, -7])
def test_alibi_at_large_offsets(off):
    q, k, v = (t.detach() for t in make_qkv(2, 19, 23, 3, 3, 8, dtype=F64))
    s = slopes(2, 3, per_batch=True)
    for wl, wr in ((-1, -1), (-1, 0), (5, -1)):
        want_out, want_lse = _dense(q, k, v, 0.3, wl, wr, off, s, 2.0)
        out, lse = ops.forward_op(q, k, v, None, None, None, 0.3, wl, wr, off, 0.0, s, 2.0, 0, 0)
        dead = torch.isneginf(want_lse)
        assert torch.equal(torch.isneginf(lse), dead)
        torch.testing.assert_close(lse[~dead], want_lse[~dead], atol=1e-9, rtol=1e-12)
        torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("off", [-100, -20, -3, 0, 7, 30, 100])
def test_windows_at_any_offset(off):
    """Windows wider than Sq + Sk still bound the keys of a block far from the
    diagonal (the kernels drop only sides that bound nothing at the offset)."""
    q, k, v = (t.detach() for t in make_qkv(2, 9, 13, 2, 1, 8, dtype=F64))
    for wl, wr in ((-1, -1), (0, -1), (-1, 0), (5, 5), (25, -1), (-1, 25), (60, 60), (150, 3),
                   (2**63 - 1, 0), (0, 2**63 - 1)):
        want_out, want_lse = _dense(q, k, v, 0.3, wl, wr, off, None, 0.0)
        out, lse = ops.forward_op(q, k, v, None, None, None, 0.3, wl, wr, off, 0.0)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)), (wl, wr)
        torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("off", [2**62, -2**62])
def test_diag_offset_at_the_limit_equals_any_far_offset(off):
    """Beyond 2 (Sq + Sk) + 1 an offset only decides all-or-nothing
    visibility: +-2^62 (the largest accepted) gives what that bound gives, on
    every path, with no overflow."""
    q, k, v = (t.detach() for t in make_qkv(2, 13, 17, 2, 1, 8))
    far = (2 * (13 + 17) + 1) * (1 if off > 0 else -1)
    for wl, wr in ((-1, -1), (-1, 0), (3, -1), (3, 0), (0, 40)):
        def run(o):
            out, lse = ops.forward_op(q, k, v, None, None, None, 0.4, wl, wr, o, 0.0, None, 1.5,
                                      0, 0)
            probs = ops.probs_op(q, k, None, None, None, None, 0.4, wl, wr, o, 0.0, None, 1.5, 0, 0)
            grads = ops.backward_op(torch.ones_like(out), q, k, v, out, lse, None, None, None,
                                    0.4, wl, wr, o, 0.0, None, 1.5, 0, 0, False)[:3]
            return (out, lse, probs, *grads)

        for a, b in zip(run(off), run(far)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("off", [2**62 + 1, -2**62 - 1, 2**63 - 1, -2**63])
def test_diag_offset_beyond_the_limit_is_refused(off):
    q, k, v = (t.detach() for t in make_qkv(1, 3, 4, 1, 1, 4))
    with pytest.raises(RuntimeError, match=r"diag_offset must lie in \[-2\^62, 2\^62\]"):
        ops.forward_op(q, k, v, None, None, None, 0.5, -1, -1, off, 0.0, None, 0.0, 0, 0)


# ---------------------------------------------------------------------------
# Bad arguments: a clear exception naming the argument.

def _qkv():
    return [t.detach() for t in make_qkv(2, 5, 7, 4, 2, 8)]


@pytest.mark.parametrize("fn", ["attention", "attention_weights", "reference"])
@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(softcap=-1.0), ValueError, r"softcap must be finite and >= 0"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be finite"),
    (dict(softcap=float("nan")), ValueError, r"softcap must be finite"),
    (dict(softcap="5"), TypeError, r"softcap must be a float"),
    (dict(softcap=True), TypeError, r"softcap must be a float"),
    (dict(softcap=None), TypeError, r"softcap must be a float"),
    (dict(alibi_slopes=torch.ones(4, dtype=F64)), TypeError, r"alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.ones(2)), ValueError, r"alibi_slopes must have shape \(Hq,\) = \(4,\)"),
    (dict(alibi_slopes=torch.ones(3, 4)), ValueError, r"\(B, Hq\) = \(2, 4\)"),
    (dict(alibi_slopes=torch.ones(2, 4, 1)), ValueError, r"alibi_slopes must have shape"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, r"alibi_slopes must be a torch.Tensor"),
    (dict(alibi_slopes=torch.ones(4, device="meta")), ValueError, r"alibi_slopes is on meta"),
    (dict(alibi_slopes=torch.ones(4, requires_grad=True)), ValueError,
     r"alibi_slopes requires grad"),
], ids=["softcap_neg", "softcap_inf", "softcap_nan", "softcap_str", "softcap_bool",
        "softcap_none", "alibi_f64", "alibi_heads", "alibi_batch", "alibi_rank", "alibi_list",
        "alibi_meta", "alibi_grad"])
def test_bad_modifier_arguments(fn, kw, exc, pattern):
    q, k, v = _qkv()
    call = {"attention": lambda: selfattn.attention(q, k, v, **kw),
            "attention_weights": lambda: selfattn.attention_weights(q, k, **kw),
            "reference": lambda: reference.attention(q, k, v, **kw)}[fn]
    with pytest.raises(exc, match=pattern) as info:
        call()
    assert isinstance(info.value, RuntimeError)  # also torch's error type


def test_strided_slopes_are_accepted():
    q, k, v = _qkv()
    s = torch.rand(2, 8)[:, ::2]  # (B, Hq) with a head stride of 2
    torch.testing.assert_close(selfattn.attention(q, k, v, alibi_slopes=s),
                               selfattn.attention(q, k, v, alibi_slopes=s.contiguous()))


def test_slopes_that_need_no_grad_are_accepted_under_no_grad():
    q, k, v = _qkv()
    s = torch.rand(4, requires_grad=True)
    with torch.no_grad():
        selfattn.attention(q, k, v, alibi_slopes=s)


@pytest.mark.parametrize("over,pattern", [
    (dict(softcap=-0.5), r"softcap must be finite and >= 0"),
    (dict(softcap=float("inf")), r"softcap must be finite"),
    (dict(alibi_slopes=torch.ones(4, dtype=F16)), r"alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.ones(5)), r"alibi_slopes must have shape \(Hq,\) = \(4,\)"),
    (dict(alibi_slopes=torch.ones(2, 8)[:, ::2]), r"alibi_slopes must be contiguous"),
    (dict(alibi_slopes=torch.ones(4, device="meta")), r"alibi_slopes"),
    (dict(q_start=-1), r"q_start and k_start must be >= 0"),
    (dict(k_start=-3), r"q_start and k_start must be >= 0"),
], ids=["softcap_neg", "softcap_inf", "alibi_f16", "alibi_shape", "alibi_strided", "alibi_meta",
        "q_start", "k_start"])
def test_direct_op_errors(over, pattern):
    q, k, v = _qkv()
    a = dict(alibi_slopes=None, softcap=0.0, q_start=0, k_start=0)
    a.update(over)
    tail = (a["alibi_slopes"], a["softcap"], a["q_start"], a["k_start"])
    with pytest.raises(RuntimeError, match=pattern):
        ops.forward_op(q, k, v, None, None, None, 0.3, -1, -1, 2, 0.0, *tail)
    with pytest.raises(RuntimeError, match=pattern):
        ops.probs_op(q, k, None, None, None, None, 0.3, -1, -1, 2, 0.0, *tail)
    out, lse = ops.forward_op(q, k, v, None, None, None, 0.3, -1, -1, 2, 0.0)
    with pytest.raises(RuntimeError, match=pattern):
        ops.backward_op(out, q, k, v, out, lse, None, None, None, 0.3, -1, -1, 2, 0.0, *tail,
                        False)


def test_sdpa_keeps_torchs_signature():
    import inspect

    params = inspect.signature(selfattn.scaled_dot_product_attention).parameters
    assert "alibi_slopes" not in params and "softcap" not in params


# ---------------------------------------------------------------------------
# The other CPU kernel modules (AVX2, generic) run the grid in a subprocess.

@pytest.mark.parametrize("isa", _other_isas() or [None])
def test_other_cpu_modules_pass_the_grid(isa):
    if isa is None:
        pytest.skip("this CPU runs only the loaded CPU module")
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, SELFATTN_CPU_ISA=isa)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(tests / "test_modifiers.py"), "-k", "grid_against or gradcheck or blocks"],
        env=env, capture_output=True, text=True, cwd=tests.parent)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
