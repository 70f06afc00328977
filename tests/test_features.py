"""CPU tests of selfattn's features (issue #2): attention masks of several
broadcast shapes (bool and float, float with its gradient), key_lengths,
windows, dropout, rows that see no key, strided inputs, the SDPA drop-in
against torch's F.scaled_dot_product_attention, and attention_weights.

Accuracy is judged by DESIGN.md section 5's bound (tests/helpers.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import selfattn
from selfattn import reference

from helpers import assert_close_to_golden, check, check_against_reference, qkv_maker, rand

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


qkv = qkv_maker(B=2, Sq=33, Sk=47, Hq=4, Hkv=2, D=32)


# ---------------------------------------------------------------------------
# Attention masks. Target (B, Hq, Sq, Sk) = (2, 4, 33, 47).

MASK_SHAPES = [
    (47,),
    (33, 47),
    (1, 33, 47),
    (4, 1, 47),
    (2, 1, 1, 47),
    (1, 4, 33, 1),
    (2, 4, 33, 47),
    (2, 1, 33, 47),
    (1, 1, 1, 1),
]


def bool_mask(shape, p_keep=0.7):
    return torch.rand(shape) < p_keep


def float_mask(shape, dtype=F32, with_inf=True):
    m = torch.randn(shape, dtype=torch.float32)
    if with_inf:
        m = m.masked_fill(torch.rand(shape) < 0.2, NEG_INF)
    return m.to(dtype)


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_bool_mask_shapes(shape):
    q, k, v = qkv()
    check([q, k, v, bool_mask(shape)])


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_float_mask_with_gradient(shape):
    q, k, v = qkv()
    mask = float_mask(shape).requires_grad_()
    check([q, k, v, mask])  # mask gradient included: it requires grad


@pytest.mark.parametrize("dtype,mask_dtype,shape,kw", [
    (F64, F64, (2, 4, 33, 47), {}),
    (BF16, BF16, (33, 47), dict(causal=True)),
    (F16, F16, (2, 1, 1, 47), dict(window=(4, 4))),
    (BF16, F32, (1, 4, 33, 47), {}),   # mask dtype differs from q's: cast, gradient flows back
    (F32, F16, (4, 33, 47), dict(causal=True, causal_alignment="top_left")),
], ids=["f64", "bf16-causal", "f16-window", "bf16-f32mask", "f32-f16mask-causal_tl"])
def test_float_mask_dtypes(dtype, mask_dtype, shape, kw):
    q, k, v = qkv(dtype=dtype)
    mask = float_mask(shape, dtype=mask_dtype).requires_grad_()
    check([q, k, v, mask], **kw)


@pytest.mark.parametrize("dtype", [F16, BF16, F64])
def test_bool_mask_dtypes_with_gqa_causal(dtype):
    q, k, v = qkv(dtype=dtype, Hq=4, Hkv=1)
    check([q, k, v, bool_mask((2, 4, 33, 47))], causal=True)


def test_float_mask_without_gradient_and_scale():
    q, k, v = qkv()
    check([q, k, v, float_mask((33, 47), with_inf=False)], scale=0.3)


def test_mask_non_contiguous_and_expanded():
    q, k, v = qkv()
    # transposed view: last dim stride != 1
    base = torch.randn(2, 4, 47, 33)
    check([q, k, v, base.transpose(-1, -2).requires_grad_()])
    # expanded view: stride 0 on non-1 dims
    row = torch.rand(1, 1, 1, 47) < 0.8
    check([q, k, v, row.expand(2, 4, 33, 47)])
    # slice with a stride in the key dim
    wide = torch.randn(33, 94)
    check([q, k, v, wide[:, ::2].requires_grad_()])


def test_float_mask_gradient_through_expand():
    # A (47,) leaf expanded by the user: the gradient is summed back by autograd.
    q, k, v = (t.detach() for t in qkv())
    leaf = torch.randn(47, requires_grad=True)
    out = selfattn.attention(q, k, v, attn_mask=leaf.expand(2, 4, 33, 47))
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, leaf, dout)
    leaf64 = leaf.detach().double().requires_grad_()
    ref = reference.attention(q.double(), k.double(), v.double(), attn_mask=leaf64)
    (g64,) = torch.autograd.grad(ref, leaf64, dout.double())
    torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4)


def test_bool_mask_matches_float_mask():
    q, k, v = (t.detach() for t in qkv())
    keep = bool_mask((2, 1, 33, 47))
    additive = torch.zeros(keep.shape).masked_fill(~keep, NEG_INF)
    a = selfattn.attention(q, k, v, attn_mask=keep)
    b = selfattn.attention(q, k, v, attn_mask=additive)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# key_lengths

@pytest.mark.parametrize("lengths,kw", [
    ([0, 47, 5, 1], {}),
    ([47, 47, 47, 47], {}),
    ([0, 0, 0, 0], {}),
    ([13, 47, 64 - 17, 30], dict(causal=True)),
    ([13, 47, 20, 30], dict(causal=True, causal_alignment="top_left")),
    ([40, 2, 47, 33], dict(window=(3, 5))),
    ([40, 0, 47, 33], dict(window=(None, 0), causal_alignment="top_left")),
], ids=["mixed_0_full", "full", "all_zero", "causal_br", "causal_tl", "window", "window_tl"])
@pytest.mark.parametrize("kl_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_key_lengths(lengths, kw, kl_dtype):
    q, k, v = qkv(B=4)
    kl = torch.tensor(lengths, dtype=kl_dtype)
    check([q, k, v], key_lengths=kl, **kw)


@pytest.mark.parametrize("dtype", [BF16, F16, F64])
def test_key_lengths_dtypes_with_mask(dtype):
    q, k, v = qkv(B=3, dtype=dtype)
    kl = torch.tensor([0, 20, 47])
    mask = float_mask((3, 1, 33, 47), dtype=dtype).requires_grad_()
    check([q, k, v, mask], key_lengths=kl)


def test_key_lengths_equals_slicing():
    # Padding keys beyond key_lengths[b] do not matter: same as slicing them off.
    q, k, v = qkv(B=3, Sk=64)
    kl = torch.tensor([17, 64, 1])
    out = selfattn.attention(q, k, v, key_lengths=kl)
    for b, n in enumerate(kl.tolist()):
        alone = selfattn.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# Windows: visibility pattern exactly as DESIGN section 2 says.

@pytest.mark.parametrize("Sq,Sk", [(20, 20), (9, 31), (31, 9)])
@pytest.mark.parametrize("causal,window", [
    (False, (2, 3)), (False, (0, 0)), (False, (None, 1)), (False, (4, -1)),
    (True, None), (True, (3, None)), (True, (0, 5)),
])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_visibility_pattern(Sq, Sk, causal, window, align):
    q, k = rand(1, Sq, 1, 16), rand(1, Sk, 1, 16)
    w = selfattn.attention_weights(q, k, causal=causal, causal_alignment=align, window=window)
    left = -1 if window is None or window[0] is None else window[0]
    right = -1 if window is None or window[1] is None else window[1]
    if causal:
        right = 0
    offset = Sk - Sq if align == "bottom_right" else 0
    i = torch.arange(Sq).view(-1, 1)
    j = torch.arange(Sk).view(1, -1)
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        visible &= j >= i + offset - left
    if right >= 0:
        visible &= j <= i + offset + right
    assert torch.equal(w[0, 0] > 0, visible)


@pytest.mark.parametrize("window,kw", [
    ((3, 3), {}),
    ((0, 0), dict(causal=True)),
    ((10, 0), dict(causal_alignment="top_left")),
    ((1, 2), dict(attn_mask="bool")),
], ids=["sym", "diag_causal", "left_tl", "with_mask"])
def test_window_gradients(window, kw):
    q, k, v = qkv(Sq=70, Sk=90)
    inputs = [q, k, v]
    if kw.pop("attn_mask", None):
        inputs.append(bool_mask((70, 90)))
    check(inputs, window=window, **kw)


def test_window_wider_than_sequence_is_unbounded():
    q, k, v = (t.detach() for t in qkv())
    a = selfattn.attention(q, k, v, window=(1000, 1000))
    b = selfattn.attention(q, k, v)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------
# Rows that see no key: output 0, lse -inf, gradients 0 and never NaN.

def _dead_cases():
    Sq, Sk = 33, 47
    row_mask = torch.ones(2, 1, Sq, Sk, dtype=torch.bool)
    row_mask[:, :, 5] = False
    row_mask[1, :, 20:] = False
    fmask = torch.randn(2, 4, Sq, Sk)
    fmask[0, 1, 7] = NEG_INF
    fmask[:, :, 30:] = NEG_INF
    return [
        pytest.param(dict(attn_mask=row_mask), id="bool_mask_rows"),
        pytest.param(dict(attn_mask=fmask, mask_grad=True), id="float_mask_inf_rows"),
        pytest.param(dict(key_lengths=torch.tensor([0, 10])), id="key_lengths_0"),
        pytest.param(dict(Sq=47, Sk=33, causal=True), id="causal_br_Sq_gt_Sk"),
        pytest.param(dict(window=(2, 2), key_lengths=torch.tensor([20, 47])), id="window_past_length"),
        pytest.param(dict(Sq=10, Sk=40, window=(0, 0), causal_alignment="top_left",
                          key_lengths=torch.tensor([4, 40])), id="diag_window_padding"),
        pytest.param(dict(Sk=0), id="no_keys"),
    ]


@pytest.mark.parametrize("cfg", _dead_cases())
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["f32", "bf16", "f64"])
def test_fully_masked_rows(cfg, dtype):
    cfg = dict(cfg)
    Sq, Sk = cfg.pop("Sq", 33), cfg.pop("Sk", 47)
    mask_grad = cfg.pop("mask_grad", False)
    q, k, v = qkv(Sq=Sq, Sk=Sk, dtype=dtype)
    if "attn_mask" in cfg and cfg["attn_mask"].is_floating_point():
        cfg["attn_mask"] = cfg["attn_mask"].to(dtype).requires_grad_(mask_grad)
    mask = cfg.get("attn_mask")
    out, lse = selfattn.attention(q, k, v, return_lse=True, **cfg)
    _, lse64 = reference.attention(q.double(), k.double(), v.double(), return_lse=True,
                                   **{n: (t.double() if isinstance(t, torch.Tensor)
                                          and t.is_floating_point() else t)
                                      for n, t in cfg.items()})
    dead = torch.isinf(lse64)  # (B, Hq, Sq)
    assert dead.any(), "the case must have rows that see no key"
    assert torch.equal(torch.isinf(lse), dead)
    assert (lse[dead] == NEG_INF).all()
    dead_rows = dead.transpose(1, 2)  # (B, Sq, Hq)
    assert (out[dead_rows] == 0).all(), "rows that see no key must be 0"
    assert not torch.isnan(out).any()
    grads_of = [q, k, v] + ([mask] if mask_grad else [])
    grads = torch.autograd.grad(out, grads_of, torch.randn_like(out))
    for g in grads:
        assert not torch.isnan(g).any() and not torch.isinf(g).any()
    assert (grads[0][dead_rows] == 0).all(), "dq of rows that see no key must be 0"
    if mask_grad:
        assert (grads[3].transpose(1, 2)[dead_rows] == 0).all()
    # and everything matches the (NaN-free) reference within the bound
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    kw = {n: t for n, t in cfg.items() if n != "attn_mask"}
    check(inputs, **kw)
    # attention_weights: rows are 0 too
    w = selfattn.attention_weights(q, k, **cfg)
    assert (w.permute(0, 2, 1, 3)[dead_rows] == 0).all()
    assert not torch.isnan(w).any()


def test_fully_masked_differs_from_torch_nan():
    # Documented difference: torch's math path gives NaN, selfattn gives 0.
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    ours = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (ours[:, :, 2] == 0).all() and not torch.isnan(ours).any()
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours[:, :, [0, 1, 3, 4]], theirs[:, :, [0, 1, 3, 4]])


# ---------------------------------------------------------------------------
# Strided / non-contiguous inputs.

def _bhsd_view(B, S, H, D, dtype=F32):
    # (B, H, S, D) storage seen as (B, S, H, D)
    return rand(B, H, S, D, dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("layout", ["bhsd_views", "seq_stride", "head_stride", "row_padding",
                                    "expanded_kv_heads", "expanded_kv_batch", "last_dim_strided",
                                    "mixed"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_strided_inputs(layout, dtype):
    B, Sq, Sk, Hq, Hkv, D = 2, 37, 45, 4, 2, 32
    if layout == "bhsd_views":
        q, k, v = _bhsd_view(B, Sq, Hq, D, dtype), _bhsd_view(B, Sk, Hkv, D, dtype), \
            _bhsd_view(B, Sk, Hkv, D, dtype)
    elif layout == "seq_stride":
        q = rand(B, 2 * Sq, Hq, D, dtype=dtype)[:, ::2]
        k = rand(B, 3 * Sk, Hkv, D, dtype=dtype)[:, 1::3]
        v = rand(B, 2 * Sk, Hkv, D, dtype=dtype)[:, ::2]
    elif layout == "head_stride":
        q = rand(B, Sq, 2 * Hq, D, dtype=dtype)[:, :, ::2]
        k = rand(B, Sk, 2 * Hkv, D, dtype=dtype)[:, :, 1::2]
        v = rand(B, Sk, 3 * Hkv, D, dtype=dtype)[:, :, ::3]
    elif layout == "row_padding":  # fused-qkv style: slices of one wide last dim
        qkv_ = rand(B, Sq, Hq, 3 * D, dtype=dtype)
        q = qkv_[..., :D]
        k = rand(B, Sk, Hkv, 2 * D, dtype=dtype)[..., D:]
        v = rand(B, Sk, Hkv, D + 8, dtype=dtype)[..., 8:]
    elif layout == "expanded_kv_heads":  # MQA written as expand
        q = rand(B, Sq, Hq, D, dtype=dtype)
        k = rand(B, Sk, 1, D, dtype=dtype).expand(B, Sk, Hkv, D)
        v = rand(B, Sk, 1, D, dtype=dtype).expand(B, Sk, Hkv, D)
    elif layout == "expanded_kv_batch":
        q = rand(B, Sq, Hq, D, dtype=dtype)
        k = rand(1, Sk, Hkv, D, dtype=dtype).expand(B, Sk, Hkv, D)
        v = rand(1, Sk, Hkv, D, dtype=dtype).expand(B, Sk, Hkv, D)
    elif layout == "last_dim_strided":  # stride(-1) != 1: the API makes it contiguous
        q = rand(B, Sq, Hq, 2 * D, dtype=dtype)[..., ::2]
        k = rand(B, Sk, Hkv, D, 2, dtype=dtype)[..., 0]
        v = rand(B, Sk, Hkv, D, dtype=dtype)
    else:  # mixed
        q = _bhsd_view(B, Sq, Hq, 2 * D, dtype)[..., :D]
        k = rand(B, Sk, 2 * Hkv, D, dtype=dtype)[:, :, ::2]
        v = rand(1, 2 * Sk, Hkv, D, dtype=dtype)[:, ::2].expand(B, Sk, Hkv, D)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    inputs = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    check(inputs, causal=True)


def test_non_contiguous_grad_output():
    q, k, v = qkv(Dv=32)
    out = selfattn.attention(q, k, v)
    dout = torch.randn(out.shape[0], out.shape[2], out.shape[1], out.shape[3]).transpose(1, 2)
    g1 = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), dout.contiguous(), retain_graph=True)
    wide = torch.randn(*out.shape[:-1], 2 * out.shape[-1])[..., ::2].copy_(dout)
    g3 = torch.autograd.grad(out, (q, k, v), wide)
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=0, rtol=0)


def test_strided_input_not_modified():
    q, k, v = (t.detach() for t in qkv())
    big = torch.randn(2, 33, 4, 64)
    q_view = big[..., :32]
    before = big.clone()
    selfattn.attention(q_view, k, v)
    assert torch.equal(big, before)


# ---------------------------------------------------------------------------
# Dropout

def _dropout_case(B=2, Sq=64, Sk=80, Hq=4, Hkv=2, D=32, dtype=F32):
    return qkv(B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_dropout_reproducible_with_generator():
    q, k, v = _dropout_case()

    def run(seed):
        out = selfattn.attention(q, k, v, dropout_p=0.3, generator=_gen(seed))
        return (out,) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_dropout_default_generator_reproducible():
    q, k, v = (t.detach() for t in _dropout_case())
    torch.manual_seed(5)
    a = selfattn.attention(q, k, v, dropout_p=0.2)
    b = selfattn.attention(q, k, v, dropout_p=0.2)  # generator advanced: new mask
    torch.manual_seed(5)
    c = selfattn.attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_dropout_generator_advances():
    q, k, v = (t.detach() for t in _dropout_case())
    g = _gen(3)
    a = selfattn.attention(q, k, v, dropout_p=0.5, generator=g)
    b = selfattn.attention(q, k, v, dropout_p=0.5, generator=g)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    q, k = rand(2, 128, 4, 16), rand(2, 160, 4, 16)
    w = selfattn.attention_weights(q, k, dropout_p=p, generator=_gen(11))
    w0 = selfattn.attention_weights(q, k)
    assert (w0 > 0).all()
    kept = w != 0
    n = kept.numel()
    count = kept.sum().item()
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(count - mean) <= 5 * sd, f"kept {count} of {n}, expected {mean:.0f} +- {5 * sd:.0f}"
    # each of the four Philox lanes (key j mod 4), and the first key, keep at the same rate
    for lane in range(4):
        sub = kept[..., lane::4]
        m, sd_ = sub.numel() * (1 - p), math.sqrt(sub.numel() * p * (1 - p))
        assert abs(sub.sum().item() - m) <= 5 * sd_, f"lane {lane}"
    first = kept[..., 0]
    m, sd_ = first.numel() * (1 - p), math.sqrt(first.numel() * p * (1 - p))
    assert abs(first.sum().item() - m) <= 5 * sd_
    # kept values are the undropped probabilities scaled by 1 / (1 - p)
    torch.testing.assert_close(w[kept], w0[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    # the mask differs between heads, batch entries and rows (no repeated pattern)
    assert not torch.equal(kept[0, 0], kept[0, 1])
    assert not torch.equal(kept[0, 0], kept[1, 0])
    assert not torch.equal(kept[0, 0, 0], kept[0, 0, 1])


def _fused_mask(q, k, p, seed, **kw):
    """The keep mask the fused op draws for generator seed `seed` (True where the
    undropped probability is 0: those elements contribute nothing anyway)."""
    w = selfattn.attention_weights(q, k, dropout_p=p, generator=_gen(seed), **kw)
    w0 = selfattn.attention_weights(q, k, **kw)
    return (w != 0) | (w0 == 0)


@pytest.mark.parametrize("dtype,kw", [
    (F32, {}),
    (F64, dict(causal=True)),
    (BF16, dict(window=(8, 8))),
    (F16, dict(causal=True, causal_alignment="top_left")),
    (F32, dict(attn_mask="float", key_lengths=torch.tensor([80, 37]))),
], ids=["f32", "f64-causal", "bf16-window", "f16-causal_tl", "f32-mask-key_lengths"])
def test_dropout_matches_reference_with_same_mask(dtype, kw):
    p, seed = 0.25, 7
    kw = dict(kw)
    inputs = _dropout_case(dtype=dtype)
    if kw.pop("attn_mask", None):
        inputs.append(float_mask((2, 1, 64, 80), dtype=dtype).requires_grad_())
    q, k = inputs[0].detach(), inputs[1].detach()
    mask_kw = dict(kw, attn_mask=inputs[3].detach() if len(inputs) > 3 else None)
    keep = _fused_mask(q, k, p, seed, **mask_kw)
    assert not keep.all()

    def fused(q, k, v, *m):
        return selfattn.attention(q, k, v, attn_mask=m[0] if m else None, dropout_p=p,
                                  generator=_gen(seed), **kw)

    def ref(q, k, v, *m):
        return reference.attention(q, k, v, attn_mask=m[0] if m else None, dropout_p=p,
                                   dropout_mask=keep, **kw)

    check_against_reference(fused, ref, inputs)


def test_dropout_forward_equals_weights_times_v():
    q, k, v = (t.detach() for t in _dropout_case(Hq=2, Hkv=2))
    out = selfattn.attention(q, k, v, dropout_p=0.4, generator=_gen(9))
    w = selfattn.attention_weights(q, k, dropout_p=0.4, generator=_gen(9))
    expect = (w @ v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_dropout_zero_is_identity():
    q, k, v = (t.detach() for t in _dropout_case())
    a = selfattn.attention(q, k, v, dropout_p=0.0, generator=_gen(1))
    b = selfattn.attention(q, k, v)
    assert torch.equal(a, b)


def test_dropout_unbiased_in_expectation():
    # Averaged over many masks, the dropped-out output approaches the undropped one.
    q, k, v = (t.detach() for t in _dropout_case(B=1, Sq=16, Sk=16, Hq=1, Hkv=1))
    g = _gen(0)
    mean = sum(selfattn.attention(q, k, v, dropout_p=0.5, generator=g) for _ in range(400)) / 400
    base = selfattn.attention(q, k, v)
    assert (mean - base).abs().max() < 0.25


# ---------------------------------------------------------------------------
# SDPA drop-in vs torch.nn.functional.scaled_dot_product_attention

def _bhsd(B, H, S, D, dtype=F32):
    return rand(B, H, S, D, dtype=dtype, requires_grad=True)


def _sdpa_check(inputs, **kw):
    def ours(q, k, v, *m):
        return selfattn.scaled_dot_product_attention(q, k, v, *m, **kw)

    def torchs(q, k, v, *m):
        return F.scaled_dot_product_attention(q, k, v, *m, **kw)

    check_against_reference(ours, torchs, inputs, name="sdpa")


@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("Sq,Sk,kw", [
    (37, 37, {}),
    (37, 53, dict(is_causal=True)),
    (53, 37, dict(is_causal=True)),
    (64, 64, dict(scale=0.2)),
], ids=["plain", "causal_Sq_lt_Sk", "causal_Sq_gt_Sk", "scale"])
def test_sdpa_matches_torch(dtype, Sq, Sk, kw):
    inputs = [_bhsd(2, 3, Sq, 32, dtype), _bhsd(2, 3, Sk, 32, dtype), _bhsd(2, 3, Sk, 32, dtype)]
    _sdpa_check(inputs, **kw)


@pytest.mark.parametrize("kind,shape", [
    ("bool", (37, 53)), ("bool", (2, 1, 37, 53)), ("float", (2, 3, 37, 53)),
    ("float", (1, 53)), ("float_grad", (1, 3, 37, 53)),
])
def test_sdpa_masks_match_torch(kind, shape):
    q, k, v = _bhsd(2, 3, 37, 32), _bhsd(2, 3, 53, 32), _bhsd(2, 3, 53, 16)
    if kind == "bool":
        mask = bool_mask(shape)
        mask[..., 0] = True  # every row sees a key: torch and selfattn agree there
    else:
        mask = float_mask(shape, with_inf=False).requires_grad_(kind == "float_grad")
    _sdpa_check([q, k, v, mask])


def test_sdpa_gqa_matches_torch():
    inputs = [_bhsd(2, 8, 40, 32), _bhsd(2, 2, 40, 32), _bhsd(2, 2, 40, 32)]
    _sdpa_check(inputs, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("shape_q,shape_kv", [((3, 29, 16), (3, 41, 16)),
                                              ((2, 2, 3, 29, 16), (2, 2, 3, 41, 16))],
                         ids=["3d", "5d"])
def test_sdpa_other_ranks_match_torch(shape_q, shape_kv):
    inputs = [rand(*shape_q, requires_grad=True), rand(*shape_kv, requires_grad=True),
              rand(*shape_kv, requires_grad=True)]
    _sdpa_check(inputs)


def test_sdpa_non_contiguous_inputs():
    # (B, S, H, D) storage seen as (B, H, S, D): what a model's projections give.
    q = rand(2, 37, 3, 32).transpose(1, 2).requires_grad_()
    k = rand(2, 41, 3, 32).transpose(1, 2).requires_grad_()
    v = rand(2, 41, 3, 32).transpose(1, 2).requires_grad_()
    _sdpa_check([q, k, v], is_causal=True)


def test_sdpa_dropout_runs_and_is_reproducible():
    q, k, v = (t.detach() for t in (_bhsd(2, 3, 30, 16) for _ in range(3)))
    torch.manual_seed(1)
    a = selfattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(1)
    b = selfattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and a.shape == (2, 3, 30, 16)
    assert not torch.equal(a, selfattn.scaled_dot_product_attention(q, k, v))


def test_sdpa_keyword_signature():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out = selfattn.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=None,
                                                dropout_p=0.0, is_causal=False, scale=None,
                                                enable_gqa=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_sdpa_replaces_torch_by_assignment(monkeypatch):
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 19, 32)
    with torch.no_grad():
        expect, _ = mha(x, x, x, need_weights=False)
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            selfattn.scaled_dot_product_attention)
        got, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# attention_weights

@pytest.mark.parametrize("dtype,kw", [
    (F32, {}),
    (F64, dict(causal=True)),
    (BF16, dict(window=(5, 2), causal_alignment="top_left")),
    (F16, dict(key_lengths=torch.tensor([0, 30]))),
    (F32, dict(attn_mask="float", causal=True)),
    (F32, dict(attn_mask="bool", scale=0.7)),
], ids=["f32", "f64-causal", "bf16-window", "f16-key_lengths", "f32-float_mask", "f32-bool_mask"])
def test_attention_weights_match_reference(dtype, kw):
    kw = dict(kw)
    q, k, _ = qkv(dtype=dtype, requires_grad=False)
    kind = kw.pop("attn_mask", None)
    if kind == "float":
        kw["attn_mask"] = float_mask((2, 4, 33, 47), dtype=dtype)
    elif kind == "bool":
        kw["attn_mask"] = bool_mask((33, 47))
    w = selfattn.attention_weights(q, k, **kw)
    assert w.shape == (2, 4, 33, 47) and w.dtype == dtype
    ref = reference.attention_weights(q, k, **kw)
    kw64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}
    gold = reference.attention_weights(q.double(), k.double(), **kw64)
    assert_close_to_golden("attention_weights", w, ref, gold)
    rows = w.double().sum(-1)
    live = gold.sum(-1) > 0
    torch.testing.assert_close(rows[live], torch.ones_like(rows[live]),
                               atol=2e-2 if dtype in (BF16, F16) else 1e-5, rtol=0)
    assert (rows[~live] == 0).all()


def test_attention_weights_with_given_lse():
    q, k, v = (t.detach() for t in qkv())
    mask = bool_mask((33, 47))
    out, lse = selfattn.attention(q, k, v, attn_mask=mask, causal=True, return_lse=True)
    a = selfattn.attention_weights(q, k, attn_mask=mask, causal=True, lse=lse)
    b = selfattn.attention_weights(q, k, attn_mask=mask, causal=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # weights @ v reproduces the output
    vh = v.transpose(1, 2).repeat_interleave(2, dim=1)
    torch.testing.assert_close((a @ vh).transpose(1, 2), out, atol=1e-5, rtol=1e-5)


def test_attention_weights_carry_no_gradient():
    q, k, _ = qkv()
    w = selfattn.attention_weights(q, k)
    assert not w.requires_grad
    with torch.enable_grad():
        assert not selfattn.attention_weights(q, k, causal=True).requires_grad


def test_attention_weights_gqa_head_mapping():
    # query head h reads kv head h // (Hq / Hkv)
    q = rand(1, 9, 6, 16)
    k = rand(1, 11, 2, 16)
    w = selfattn.attention_weights(q, k)
    for h in range(6):
        alone = selfattn.attention_weights(q[:, :, h:h + 1], k[:, :, h // 3:h // 3 + 1])
        torch.testing.assert_close(w[:, h:h + 1], alone, atol=0, rtol=0)


# ---------------------------------------------------------------------------
# Edge cases: empty problems, thread count.

@pytest.mark.parametrize("qs,ks", [((0, 5, 2, 8), (0, 4, 2, 8)), ((1, 0, 2, 8), (1, 4, 2, 8)),
                                   ((1, 5, 2, 8), (1, 0, 2, 8))], ids=["B0", "Sq0", "Sk0"])
def test_empty_problems(qs, ks):
    q, k, v = rand(*qs, requires_grad=True), rand(*ks, requires_grad=True), \
        rand(*ks, requires_grad=True)
    out, lse = selfattn.attention(q, k, v, return_lse=True)
    assert out.shape == (qs[0], qs[1], qs[2], 8) and lse.shape == (qs[0], qs[2], qs[1])
    assert not torch.isnan(out).any() and (out == 0).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and (g == 0).all()
    w = selfattn.attention_weights(q, k)
    assert w.shape == (qs[0], qs[2], qs[1], ks[1])


@pytest.mark.parametrize("qs", [(0, 5, 2, 8), (1, 0, 2, 8)], ids=["B0", "Sq0"])
def test_empty_query_backward_of_sum(qs):
    q = rand(*qs, requires_grad=True)
    k = rand(qs[0], 4, 2, 8, requires_grad=True)
    v = rand(qs[0], 4, 2, 8, requires_grad=True)
    selfattn.attention(q, k, v).sum().backward()
    assert (q.grad == 0).all() and (k.grad == 0).all()


def test_thread_count_does_not_change_results():
    q, k, v = qkv(B=2, Sq=150, Sk=170, Hq=4, Hkv=2)
    mask = float_mask((2, 1, 150, 170)).requires_grad_()

    def run():
        out = selfattn.attention(q, k, v, attn_mask=mask, causal=True)
        return (out,) + torch.autograd.grad(out, (q, k, v, mask), torch.ones_like(out))

    threads = torch.get_num_threads()
    a = run()
    try:
        torch.set_num_threads(1)
        b = run()
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_shape", [(2, 1, 29, 41), (2, 1, 1, 29, 41), (1, 2, 1, 29, 41)],
                         ids=["4d_over_dim1", "5d_over_dim0", "5d_over_dim1"])
def test_sdpa_5d_mask_broadcast_over_leading_dims(mask_shape):
    q, k, v = rand(2, 2, 3, 29, 16), rand(2, 2, 3, 41, 16), rand(2, 2, 3, 41, 16)
    mask = torch.randn(mask_shape)
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_shape", [(2, 2, 1, 29, 41), (3, 29, 41), (1, 3, 29, 41)],
                         ids=["5d_full_lead", "3d", "4d_heads"])
def test_sdpa_5d_mask_shapes_that_work(mask_shape):
    q, k, v = rand(2, 2, 3, 29, 16), rand(2, 2, 3, 41, 16), rand(2, 2, 3, 41, 16)
    mask = torch.randn(mask_shape)
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# torch.func

def test_vmap_runs_per_sample():
    """vmap runs the op once per sample (torch's batching fallback, which
    warns): README, Drop-ins."""
    q = rand(3, 2, 5, 2, 8, dtype=F64)
    k, v = rand(2, 6, 2, 8, dtype=F64), rand(2, 6, 2, 8, dtype=F64)
    batched = torch.func.vmap(lambda x: selfattn.attention(x, k, v, causal=True))(q)
    looped = torch.stack([selfattn.attention(x, k, v, causal=True) for x in q])
    torch.testing.assert_close(batched, looped, rtol=0, atol=0)


def test_func_grad_of_every_input_matches_the_reference():
    """torch.func.grad through the fused op, for q, k, v and a float mask, GQA
    and a window, against torch.func.grad of the float64 reference."""
    q, k, v = rand(2, 5, 4, 8, dtype=F64), rand(2, 7, 2, 8, dtype=F64), rand(2, 7, 2, 8, dtype=F64)
    mask = rand(2, 1, 5, 7, dtype=F64)
    w = rand(2, 5, 4, 8, dtype=F64)

    def loss(attention):
        return lambda *t: (attention(*t[:3], attn_mask=t[3], window=(3, 1)) * w).sum()

    got = torch.func.grad(loss(selfattn.attention), argnums=(0, 1, 2, 3))(q, k, v, mask)
    expect = torch.func.grad(loss(reference.attention), argnums=(0, 1, 2, 3))(q, k, v, mask)
    for name, g, e in zip(("q", "k", "v", "attn_mask"), got, expect):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_per_sample_gradients_of_multihead_attention():
    """vmap(grad) over functional_call: per-sample gradients of every
    parameter of selfattn's MultiheadAttention, as one backward per sample."""
    torch.manual_seed(0)
    mha = selfattn.nn.MultiheadAttention(16, 2, batch_first=True, dtype=F64)
    params = {n: p.detach() for n, p in mha.named_parameters()}
    x = rand(4, 5, 16, dtype=F64)

    def loss(p, xi):
        xi = xi[None]
        out, _ = torch.func.functional_call(mha, p, (xi, xi, xi), {"need_weights": False})
        return (out ** 2).sum()

    with pytest.warns(UserWarning, match="batching rule"):
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i, xi in enumerate(x):
        mha.zero_grad()
        loss(dict(mha.named_parameters()), xi).backward()
        for n, p in mha.named_parameters():
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_func_grad_of_varlen_attention_matches_the_reference():
    """torch.func.grad through the packed op (two sequences of 3 and 5 tokens,
    GQA, causal) against the padded float64 reference of each sequence."""
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = rand(8, 4, 8, dtype=F64), rand(8, 2, 8, dtype=F64), rand(8, 2, 8, dtype=F64)
    w = rand(8, 4, 8, dtype=F64)

    def packed(q, k, v):
        return (selfattn.varlen_attention(q, k, v, cu, cu, 5, 5, window_size=(-1, 0),
                                          enable_gqa=True) * w).sum()

    def per_sequence(q, k, v):
        return sum((reference.attention(q[None, a:b], k[None, a:b], v[None, a:b], causal=True)
                    * w[None, a:b]).sum() for a, b in ((0, 3), (3, 8)))

    got = torch.func.grad(packed, argnums=(0, 1, 2))(q, k, v)
    expect = torch.func.grad(per_sequence, argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip(("query", "key", "value"), got, expect):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("order", ["compile_of_grad", "grad_of_compile"])
def test_func_grad_and_compile_compose(order):
    """torch.compile of torch.func.grad, and grad of a compiled function,
    give the eager gradient."""
    q, k, v = rand(2, 5, 2, 8, dtype=F64), rand(2, 6, 2, 8, dtype=F64), rand(2, 6, 2, 8, dtype=F64)

    def f(x):
        return (selfattn.attention(x, k, v, causal=True) ** 2).sum()

    torch._dynamo.reset()
    if order == "compile_of_grad":
        got = torch.compile(torch.func.grad(f))(q)
    else:
        got = torch.func.grad(torch.compile(f))(q)
    x = q.clone().requires_grad_()
    f(x).backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad_of_grad", "outer_autograd", "hessian", "jvp"])
def test_derivatives_of_the_gradient_and_forward_mode_raise(transform):
    """The backward is not differentiable: a derivative of a torch.func
    gradient raises (rather than missing the attention's terms, as it would if
    the backward op simply ran under functorch's graph); forward mode raises."""
    q, k, v = rand(1, 3, 2, 8, dtype=F64), rand(1, 4, 2, 8, dtype=F64), rand(1, 4, 2, 8, dtype=F64)

    def f(x):
        return (selfattn.attention(x, k, v) ** 2).sum() + (x ** 3).sum()

    if transform in ("hessian", "jvp"):
        with pytest.raises(NotImplementedError, match="jvp"):
            if transform == "hessian":
                torch.func.hessian(f)(q)
            else:
                torch.func.jvp(f, (q,), (q,))
        return
    with pytest.raises(RuntimeError, match="double backward") as info:
        if transform == "grad_of_grad":
            torch.func.grad(lambda x: torch.func.grad(f)(x).sum())(q)
        else:  # an autograd graph around torch.func.grad (the x ** 3 term keeps one)
            x = q.clone().requires_grad_()
            (torch.func.grad(f)(x) ** 2).sum().backward()
    assert type(info.value) is RuntimeError


def test_transforms_without_grad_keep_the_op():
    """Without a differentiating transform the op runs as itself: vmap with
    create_graph=True still refuses the double backward at the first
    backward, functionalize traces the op, a paged varlen call runs under vmap."""
    q, k, v = rand(2, 3, 2, 8, dtype=F64), rand(1, 4, 2, 8, dtype=F64), rand(1, 4, 2, 8, dtype=F64)
    x = q.clone().requires_grad_()
    out = torch.func.vmap(lambda xi: selfattn.attention(xi[None], k, v)[0])(x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    got = torch.func.functionalize(lambda y: selfattn.attention(y, k, v))(q[:1])
    torch.testing.assert_close(got, selfattn.attention(q[:1], k, v), rtol=0, atol=0)
    pool, table = rand(2, 4, 2, 8, dtype=F64), torch.tensor([[1, 0]], dtype=torch.int32)
    cu_q, used = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([6], dtype=torch.int32)
    with torch.no_grad():
        batched = torch.func.vmap(lambda y: selfattn.varlen_attention(
            y, pool, pool, cu_q, None, 3, 6, seqused_k=used, block_table=table))(q)
        looped = [selfattn.varlen_attention(y, pool, pool, cu_q, None, 3, 6, seqused_k=used,
                                            block_table=table) for y in q]
    torch.testing.assert_close(batched, torch.stack(looped), rtol=0, atol=0)
