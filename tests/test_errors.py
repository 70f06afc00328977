"""Bad input raises a Python exception whose message names the argument
(issue #2, DESIGN.md section 2): through the public API (ValueError or
TypeError from the shared argument checks; the C++ checks of what only the
kernel can see, e.g. key_lengths' values on CPU, are ValueError too), and through
direct torch.ops.selfattn calls with inconsistent tensors (RuntimeError, never
a crash). The reference refuses exactly what the fused functions refuse.
"""
from __future__ import annotations

import re

import pytest
import torch

import selfattn
from selfattn import ops, reference
from selfattn.errors import ArgumentError

ERRORS = (ValueError, TypeError, RuntimeError)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32).to(dtype).to(device)


B, SQ, SK, HQ, HKV, D = 2, 5, 7, 4, 2, 8


def good():
    return t(B, SQ, HQ, D), t(B, SK, HKV, D), t(B, SK, HKV, D)


@pytest.fixture(params=["fused", "reference"])
def attention(request):
    return selfattn.attention if request.param == "fused" else reference.attention


def _raises(exc, pattern, fn, *args, **kw):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kw)
    return info


# ---------------------------------------------------------------------------
# q, k, v

@pytest.mark.parametrize("which,shape,pattern", [
    ("q", (SQ, HQ, D), r"q must be 4-D"),
    ("k", (1, B, SK, HKV, D), r"k must be 4-D"),
    ("v", (SK, HKV, D), r"v must be 4-D"),
])
def test_rank(attention, which, shape, pattern):
    q, k, v = good()
    args = dict(q=q, k=k, v=v)
    args[which] = t(*shape)
    _raises(ValueError, pattern, attention, args["q"], args["k"], args["v"])


@pytest.mark.parametrize("shapes,pattern", [
    (((B, SQ, HQ, D), (B + 1, SK, HKV, D), (B, SK, HKV, D)), r"batch"),
    (((B, SQ, HQ, D), (B, SK, HKV, D), (B + 1, SK, HKV, D)), r"batch"),
    (((B, SQ, HQ, D), (B, SK, HKV, D), (B, SK + 1, HKV, D)), r"v has 8 keys.*k's 7"),
    (((B, SQ, HQ, D), (B, SK, HKV, D), (B, SK, 1, D)), r"v has 1 heads.*k's 2"),
    (((B, SQ, HQ, D), (B, SK, HKV, D + 1), (B, SK, HKV, D)), r"k has head dim 9.*q's 8"),
], ids=["batch_k", "batch_v", "keys_v", "heads_v", "headdim_k"])
def test_shapes_disagree(attention, shapes, pattern):
    q, k, v = (t(*s) for s in shapes)
    _raises(ValueError, pattern, attention, q, k, v)


@pytest.mark.parametrize("hq,hkv", [(4, 3), (3, 2), (1, 2)])
def test_heads_not_multiple(attention, hq, hkv):
    q, k, v = t(B, SQ, hq, D), t(B, SK, hkv, D), t(B, SK, hkv, D)
    _raises(ValueError, rf"k has {hkv} heads, which does not divide q's {hq} heads",
            attention, q, k, v)


def test_zero_kv_heads(attention):
    q, k, v = t(B, SQ, HQ, D), t(B, SK, 0, D), t(B, SK, 0, D)
    _raises(ValueError, r"k has 0 heads", attention, q, k, v)


@pytest.mark.parametrize("d,dv,pattern", [
    (0, 8, r"head dim of q must be in \[1, 512\], got 0"),
    (513, 8, r"head dim of q must be in \[1, 512\], got 513"),
    (1024, 8, r"head dim of q"),
    (8, 0, r"head dim of v must be in \[1, 512\], got 0"),
    (8, 600, r"head dim of v must be in \[1, 512\], got 600"),
])
def test_unsupported_head_dim(attention, d, dv, pattern):
    q, k, v = t(B, SQ, HQ, d), t(B, SK, HKV, d), t(B, SK, HKV, dv)
    _raises(ValueError, pattern, attention, q, k, v)


def test_head_dim_512_is_supported():
    q, k, v = t(1, 3, 1, 512), t(1, 4, 1, 512), t(1, 4, 1, 512)
    out = selfattn.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which,dtype,pattern", [
    ("k", torch.float64, r"k has dtype torch.float64, which differs from q's torch.float32"),
    ("v", torch.bfloat16, r"v has dtype torch.bfloat16"),
])
def test_dtype_mismatch(attention, which, dtype, pattern):
    q, k, v = good()
    args = dict(q=q, k=k, v=v)
    args[which] = args[which].to(dtype)
    _raises(TypeError, pattern, attention, args["q"], args["k"], args["v"])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64, torch.bool])
def test_unsupported_dtype(attention, dtype):
    q, k, v = (x.to(dtype) for x in good())
    _raises(TypeError, r"q must be float32, float64, bfloat16 or float16", attention, q, k, v)


@pytest.mark.parametrize("which", ["k", "v"])
def test_device_mismatch(attention, which):
    q, k, v = good()
    args = dict(q=q, k=k, v=v)
    args[which] = args[which].to("meta")
    _raises(ValueError, rf"{which} is on meta, but q is on cpu", attention, args["q"],
            args["k"], args["v"])


@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0, "q"])
def test_not_a_tensor(attention, bad):
    _, k, v = good()
    _raises(TypeError, r"q must be a torch.Tensor", attention, bad, k, v)


# ---------------------------------------------------------------------------
# attn_mask

@pytest.mark.parametrize("shape", [(SQ + 1, SK), (SK + 1,), (3, 1, SK), (B + 1, HQ, SQ, SK),
                                   (1, 1, 1, SQ, SK), (SK, SQ)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "float"])
def test_mask_not_broadcastable(attention, shape, dtype):
    q, k, v = good()
    mask = torch.ones(shape, dtype=dtype)
    _raises(ValueError, r"attn_mask of shape .* is not broadcastable to \(B, Hq, Sq, Sk\)",
            attention, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32])
def test_mask_dtype(attention, dtype):
    q, k, v = good()
    _raises(TypeError, r"attn_mask must be bool or floating point", attention, q, k, v,
            attn_mask=torch.ones(SQ, SK, dtype=dtype))


def test_mask_device_and_type(attention):
    q, k, v = good()
    _raises(ValueError, r"attn_mask is on meta", attention, q, k, v,
            attn_mask=torch.ones(SQ, SK, device="meta"))
    _raises(TypeError, r"attn_mask must be a torch.Tensor", attention, q, k, v,
            attn_mask=[[True] * SK] * SQ)


# ---------------------------------------------------------------------------
# key_lengths

def test_call_op_converts_only_the_named_checks():
    """call_op raises the op's value checks it is told of as ArgumentError from
    the public function; any other error of the op passes unchanged."""
    from selfattn._args import call_op

    def op(message):
        raise RuntimeError(message)

    with pytest.raises(ArgumentError, match=r"^selfattn.f: key_lengths must lie in \[0, 4\]$"):
        call_op("selfattn.f", op, "selfattn: key_lengths must lie in [0, 4]",
                checks=("key_lengths must lie",))
    for message in ("selfattn: too many rows", "CUDA error: key_lengths must lie"):
        with pytest.raises(RuntimeError) as info:
            call_op("selfattn.f", op, message, checks=("key_lengths must lie",))
        assert type(info.value) is RuntimeError and str(info.value) == message
    with pytest.raises(ArgumentError, match="^selfattn.f: too many rows$"):
        call_op("selfattn.f", op, "selfattn: too many rows")  # default: every op check


@pytest.mark.parametrize("lengths", [[SK + 1, 3], [-1, 3], [0, 100]])
def test_key_lengths_out_of_range(lengths):
    q, k, v = good()
    _raises(ArgumentError, rf"^selfattn.attention: key_lengths must lie in \[0, {SK}\]",
            selfattn.attention, q, k, v, key_lengths=torch.tensor(lengths))
    _raises(ArgumentError, r"^selfattn.attention_weights: key_lengths must lie",
            selfattn.attention_weights, q, k, key_lengths=torch.tensor(lengths, dtype=torch.int32))


@pytest.mark.parametrize("kl,exc,pattern", [
    (torch.tensor([3.0, 4.0]), TypeError, r"key_lengths must be int32 or int64"),
    (torch.tensor([3, 4], dtype=torch.int16), TypeError, r"key_lengths must be int32 or int64"),
    (torch.tensor([3, 4, 5]), ValueError, r"key_lengths must have shape \(2,\)"),
    (torch.tensor([[3, 4]]), ValueError, r"key_lengths must have shape \(2,\)"),
    (torch.tensor(3), ValueError, r"key_lengths must have shape"),
    ([3, 4], TypeError, r"key_lengths must be a torch.Tensor"),
    (torch.tensor([3, 4], device="meta"), ValueError, r"key_lengths is on meta"),
], ids=["float", "int16", "long", "2d", "scalar", "list", "meta"])
def test_key_lengths_bad(attention, kl, exc, pattern):
    q, k, v = good()
    _raises(exc, pattern, attention, q, k, v, key_lengths=kl)


# ---------------------------------------------------------------------------
# dropout_p, window, causal_alignment, causal, scale

@pytest.mark.parametrize("p,exc", [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError),
                                   (float("nan"), ValueError), ("0.1", TypeError),
                                   (True, TypeError), (None, TypeError)])
def test_dropout_p(attention, p, exc):
    q, k, v = good()
    _raises(exc, r"dropout_p", attention, q, k, v, dropout_p=p)


@pytest.mark.parametrize("window,exc,pattern", [
    ((-5, 0), ValueError, r"window left must be >= 0.*got -5"),
    ((0, -2), ValueError, r"window right must be >= 0.*got -2"),
    ((1, 2, 3), TypeError, r"window must be a pair \(left, right\)"),
    ((1,), TypeError, r"window must be a pair"),
    (3, TypeError, r"window must be a pair"),
    ("ab", TypeError, r"window must be a pair"),
    ((1.5, 2), TypeError, r"window left must be an int"),
    ((1, "2"), TypeError, r"window right must be an int"),
    ((True, 1), TypeError, r"window left must be an int"),
])
def test_window_invalid(attention, window, exc, pattern):
    q, k, v = good()
    _raises(exc, pattern, attention, q, k, v, window=window)


@pytest.mark.parametrize("alignment", ["bottom-right", "topleft", None, 0, "BOTTOM_RIGHT"])
def test_causal_alignment(attention, alignment):
    q, k, v = good()
    _raises(ValueError, r"causal_alignment must be 'bottom_right' or 'top_left'", attention,
            q, k, v, causal=True, causal_alignment=alignment)


@pytest.mark.parametrize("causal", [1, "yes", None, torch.tensor(True)])
def test_causal_not_bool(attention, causal):
    q, k, v = good()
    _raises(TypeError, r"causal must be a bool", attention, q, k, v, causal=causal)


@pytest.mark.parametrize("scale,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                       ("0.5", TypeError), (True, TypeError)])
def test_scale(attention, scale, exc):
    q, k, v = good()
    _raises(exc, r"scale must be", attention, q, k, v, scale=scale)


def test_message_names_function():
    q, k, v = t(B, SQ, 6, D), t(B, SK, 4, D), t(B, SK, 4, D)
    _raises(ValueError, r"^selfattn\.attention: k has 4 heads, which does not divide q's 6 heads$",
            selfattn.attention, q, k, v)


# ---------------------------------------------------------------------------
# attention_weights and scaled_dot_product_attention

def test_attention_weights_errors():
    q, k, _ = good()
    _raises(ValueError, r"selfattn.attention_weights: .*heads", selfattn.attention_weights,
            q, t(B, SK, 3, D))
    _, lse = selfattn.attention(*good(), return_lse=True)
    _raises(ValueError, r"lse must be a torch.float32 tensor of shape \(B, Hq, Sq\)",
            selfattn.attention_weights, q, k, lse=lse[:, :, :-1])
    _raises(ValueError, r"lse must be", selfattn.attention_weights, q, k, lse=lse.double())
    _raises(ValueError, r"lse must be", selfattn.attention_weights, q, k, lse=[0.0])
    _raises(ValueError, r"dropout_p", selfattn.attention_weights, q, k, dropout_p=1.0)
    _raises(ValueError, r"window left", selfattn.attention_weights, q, k, window=(-3, 1))


@pytest.fixture(params=["fused", "reference"])
def sdpa(request):
    return (selfattn.scaled_dot_product_attention if request.param == "fused"
            else reference.scaled_dot_product_attention)


def test_sdpa_errors(sdpa):
    q, k, v = t(B, HQ, SQ, D), t(B, HQ, SK, D), t(B, HQ, SK, D)
    _raises(ValueError, r"query must have at least 3 dims", sdpa, t(SQ, D), k, v)
    _raises(ValueError, r"key must have at least 3 dims", sdpa, q, t(SK, D), v)
    _raises(ValueError, r"same number of dims", sdpa, q, k, v[0])
    _raises(ValueError, r"attn_mask or is_causal", sdpa, q, k, v,
            attn_mask=torch.ones(SQ, SK, dtype=torch.bool), is_causal=True)
    _raises(ValueError, r"enable_gqa", sdpa, q, k[:, :2], v[:, :2])
    _raises(TypeError, r"query must be a torch.Tensor", sdpa, None, k, v)
    _raises(ValueError, r"dropout_p", sdpa, q, k, v, dropout_p=1.0)
    _raises(ValueError, r"attn_mask of shape", sdpa, q, k, v, attn_mask=torch.ones(SQ, SK + 2))
    _raises(ValueError, r"head dim", sdpa, t(B, HQ, SQ, 600), t(B, HQ, SK, 600), v)
    _raises(ValueError, r"does not divide", sdpa, q, k[:, :3], v[:, :3], enable_gqa=True)


# ---------------------------------------------------------------------------
# Direct torch.ops.selfattn calls with inconsistent tensors: RuntimeError, no crash.

def _fwd_args(**over):
    q, k, v = good()
    a = dict(q=q, k=k, v=v, attn_mask=None, key_lengths=None, rng_state=None, scale=0.3,
             window_left=-1, window_right=-1, diag_offset=SK - SQ, dropout_p=0.0,
             alibi_slopes=None, softcap=0.0, q_start=0, k_start=0)
    a.update(over)
    return a


FWD_ORDER = ["q", "k", "v", "attn_mask", "key_lengths", "rng_state", "scale", "window_left",
             "window_right", "diag_offset", "dropout_p", "alibi_slopes", "softcap", "q_start",
             "k_start"]


def _call_fwd(a):
    return ops.forward_op(*[a[n] for n in FWD_ORDER])


FWD_BAD = [
    ("q_rank", dict(q=t(SQ, HQ, D)), r"q must be 4-D"),
    ("v_rank", dict(v=t(1, B, SK, HKV, D)), r"v must be 4-D"),
    ("q_last_dim_strided", dict(q=t(B, SQ, HQ, 2 * D)[..., ::2]), r"q must have a contiguous last dim"),
    ("k_last_dim_strided", dict(k=t(B, SK, HKV, D, 2)[..., 0]), r"k must have a contiguous last dim"),
    ("dtype", dict(k=t(B, SK, HKV, D, dtype=torch.float64)), r"one dtype"),
    ("int_dtype", dict(q=torch.ones(B, SQ, HQ, D, dtype=torch.int32)), r"q must be float32"),
    ("batch", dict(k=t(B + 1, SK, HKV, D)), r"one batch size"),
    ("keys", dict(v=t(B, SK + 1, HKV, D)), r"v has 8 keys"),
    ("heads", dict(k=t(B, SK, 3, D), v=t(B, SK, 3, D)), r"does not divide"),
    ("zero_heads", dict(k=t(B, SK, 0, D), v=t(B, SK, 0, D)), r"does not divide"),
    ("head_dim", dict(k=t(B, SK, HKV, D + 1)), r"k has head dim"),
    ("head_dim_0", dict(q=t(B, SQ, HQ, 0), k=t(B, SK, HKV, 0), v=t(B, SK, HKV, 0)),
     r"head dim of q must be in"),
    ("head_dim_big", dict(q=t(1, 2, 1, 513), k=t(1, 2, 1, 513), v=t(1, 2, 1, 4)),
     r"head dim of q must be in"),
    ("dv_big", dict(v=t(B, SK, HKV, 520)), r"head dim of v must be in"),
    ("mask_dtype", dict(attn_mask=t(SQ, SK, dtype=torch.float64)), r"attn_mask must be bool or have q's dtype"),
    ("mask_int", dict(attn_mask=torch.ones(SQ, SK, dtype=torch.int64)), r"attn_mask"),
    ("mask_shape", dict(attn_mask=t(SQ + 1, SK)), r"attn_mask of shape .* is not broadcastable"),
    ("mask_rank", dict(attn_mask=t(1, 1, 1, SQ, SK)), r"attn_mask must have at most 4 dims"),
    ("kl_dtype", dict(key_lengths=torch.tensor([1, 2], dtype=torch.int32)), r"key_lengths must be int64"),
    ("kl_shape", dict(key_lengths=torch.tensor([1, 2, 3])), r"key_lengths must have shape"),
    ("kl_range", dict(key_lengths=torch.tensor([1, SK + 1])), r"key_lengths must lie in"),
    ("kl_negative", dict(key_lengths=torch.tensor([-4, 1])), r"key_lengths must lie in"),
    ("kl_strided", dict(key_lengths=torch.tensor([1, 9, 2, 9])[::2]), r"key_lengths must be contiguous"),
    ("no_rng", dict(dropout_p=0.5), r"dropout_p > 0 needs rng_state"),
    ("rng_shape", dict(dropout_p=0.5, rng_state=torch.tensor([1, 2, 3])), r"rng_state must be"),
    ("rng_dtype", dict(dropout_p=0.5, rng_state=torch.tensor([1.0, 2.0])), r"rng_state must be"),
    ("dropout_1", dict(dropout_p=1.0, rng_state=torch.tensor([1, 2])), r"dropout_p must be in \[0, 1\)"),
    ("dropout_neg", dict(dropout_p=-0.5), r"dropout_p must be in"),
    ("window_left", dict(window_left=-5), r"window sides must be >= 0 or -1"),
    ("window_right", dict(window_right=-2), r"window sides"),
    ("scale_inf", dict(scale=float("inf")), r"scale must be finite"),
    ("scale_nan", dict(scale=float("nan")), r"scale must be finite"),
]


@pytest.mark.parametrize("over,pattern", [pytest.param(o, p, id=n) for n, o, p in FWD_BAD])
def test_direct_forward_op_errors(over, pattern):
    _raises(RuntimeError, pattern, _call_fwd, _fwd_args(**over))


@pytest.mark.parametrize("over,pattern", [pytest.param(o, p, id=n) for n, o, p in FWD_BAD
                                           if set(o) != {"v"}])  # probs takes no v
def test_direct_probs_op_errors(over, pattern):
    a = _fwd_args(**over)
    _raises(RuntimeError, r"selfattn", ops.probs_op, a["q"], a["k"], None,
            *[a[n] for n in FWD_ORDER[3:]])


def _bwd_args(mask=None, **over):
    q, k, v = good()
    out, lse = ops.forward_op(q, k, v, mask, None, None, 0.3, -1, -1, SK - SQ, 0.0, None, 0.0,
                              0, 0)
    a = dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse, attn_mask=mask,
             key_lengths=None, rng_state=None, scale=0.3, window_left=-1, window_right=-1,
             diag_offset=SK - SQ, dropout_p=0.0, alibi_slopes=None, softcap=0.0, q_start=0,
             k_start=0, mask_grad=False)
    a.update(over)
    return a


BWD_ORDER = ["dout", "q", "k", "v", "out", "lse", "attn_mask", "key_lengths", "rng_state",
             "scale", "window_left", "window_right", "diag_offset", "dropout_p", "alibi_slopes",
             "softcap", "q_start", "k_start", "mask_grad"]

BWD_BAD = [
    ("dout_shape", dict(dout=t(B, SQ, HQ, D + 1)), r"dout and out must have shape"),
    ("out_shape", dict(out=t(B, SQ + 1, HQ, D)), r"dout and out must have shape"),
    ("dout_rank", dict(dout=t(B, SQ, HQ * D)), r"dout must be 4-D"),
    ("dout_strided", dict(dout=t(B, SQ, HQ, 2 * D)[..., ::2]), r"dout must have a contiguous last dim"),
    ("dout_dtype", dict(dout=t(B, SQ, HQ, D, dtype=torch.float64)), r"dout and out must have q's dtype"),
    ("out_dtype", dict(out=t(B, SQ, HQ, D, dtype=torch.bfloat16)), r"dout and out must have q's dtype"),
    ("lse_shape", dict(lse=t(B, SQ, HQ)), r"lse must be a contiguous"),
    ("lse_dtype", dict(lse=t(B, HQ, SQ, dtype=torch.float64)), r"lse must be"),
    ("lse_strided", dict(lse=t(B, SQ, HQ).transpose(1, 2)), r"lse must be"),
    ("qkv_heads", dict(k=t(B, SK, 3, D), v=t(B, SK, 3, D)), r"does not divide"),
    ("mask_grad_bool", dict(attn_mask=torch.ones(SQ, SK, dtype=torch.bool), mask_grad=True),
     r"mask_grad needs a float attn_mask"),
    ("mask_shape", dict(attn_mask=t(SQ, SK + 1), mask_grad=True), r"attn_mask of shape"),
    ("kl_range", dict(key_lengths=torch.tensor([SK + 3, 0])), r"key_lengths must lie in"),
    ("no_rng", dict(dropout_p=0.2), r"needs rng_state"),
    ("window", dict(window_right=-7), r"window sides"),
]


@pytest.mark.parametrize("over,pattern", [pytest.param(o, p, id=n) for n, o, p in BWD_BAD])
def test_direct_backward_op_errors(over, pattern):
    a = _bwd_args(**over)
    _raises(RuntimeError, pattern, ops.backward_op, *[a[n] for n in BWD_ORDER])


def test_direct_probs_op_bad_lse():
    q, k, _ = good()
    base = (None, None, None, 0.3, -1, -1, SK - SQ, 0.0, None, 0.0, 0, 0)
    for lse in (t(B, HQ, SQ + 1), t(B, HQ, SQ, dtype=torch.float64), t(B, SQ, HQ).transpose(1, 2)):
        _raises(RuntimeError, r"lse must be a contiguous", ops.probs_op, q, k, lse, *base)


def test_messages_are_plain_text():
    # Messages from C++ checks carry no C++ stack trace noise at the front.
    with pytest.raises(RuntimeError) as info:
        _call_fwd(_fwd_args(window_left=-5))
    assert re.match(r"selfattn: window sides", str(info.value))
