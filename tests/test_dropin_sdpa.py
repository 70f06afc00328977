"""selfattn.scaled_dot_product_attention as a drop-in for
torch.nn.functional.scaled_dot_product_attention, judged by the behaviours
PyTorch's own SDPA tests check, with torch itself as the oracle (never
selfattn.reference, which shares selfattn's argument parsing):

- torch's CausalBias masks (causal_upper_left / causal_lower_right) in every
  size relation and head count, forward and backward, eager and compiled,
  against torch's SDPA with the materialised mask (DESIGN.md section 5 bound)
  and against the kernel's own causal flag with the matching alignment;
- each error case of torch's SDPA tests raises torch's exception type (and
  selfattn's documented ValueError/TypeError);
- jagged nested inputs run the packed kernels; strided nested and sparse
  inputs are refused with a clear message;
- sdpa_kernel(SDPBackend.MATH) runs the reference math, other backend
  choices the fused kernel;
- under torch.autocast it runs in the autocast dtype, as torch's;
- a query row that sees no key gives 0, as torch 2.13 and 2.14 do on CPU.
"""
import warnings

import pytest
import torch
from torch.torch_version import TorchVersion
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import selfattn
from selfattn import functional
from selfattn.testing import check_against_reference, rand


def _bias(variant, L, S):
    with warnings.catch_warnings():  # torch warns that lower-right with L > S has empty rows
        warnings.simplefilter("ignore", UserWarning)
        return variant(L, S)


def _qkv(B, Hq, Hkv, L, S, D=16, dtype=torch.float32, requires_grad=True):
    return (rand(B, Hq, L, D, dtype=dtype, requires_grad=requires_grad),
            rand(B, Hkv, S, D, dtype=dtype, requires_grad=requires_grad),
            rand(B, Hkv, S, D, dtype=dtype, requires_grad=requires_grad))


# ---------------------------------------------------------------------------
# CausalBias

SIZES = [(8, 8), (5, 11), (11, 5), (1, 7), (7, 1)]
VARIANTS = [causal_upper_left, causal_lower_right]


@pytest.mark.parametrize("variant", VARIANTS, ids=["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_bias_matches_torch_with_materialised_mask(variant, L, S, heads, dtype):
    """Output and q/k/v gradients against torch's SDPA given the bias's own
    bool mask (float64 golden, same-dtype torch as the bound's reference)."""
    bias = _bias(variant, L, S)
    dense = bias._materialize()

    def ours(q, k, v):
        return selfattn.scaled_dot_product_attention(q, k, v, attn_mask=_bias(variant, L, S))

    def torch_sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    check_against_reference(ours, torch_sdpa, _qkv(2, heads, heads, L, S, dtype=dtype),
                            name=f"{variant.__name__}({L}, {S})")


@pytest.mark.parametrize("L,S", SIZES)
def test_causal_bias_is_the_kernels_causal_flag(L, S):
    """Bitwise the kernel's causal flag: upper-left = is_causal (top-left),
    lower-right = attention(causal=True) with bottom-right alignment, in
    forward and backward; repeated calls agree (no storage is read)."""
    q, k, v = _qkv(2, 4, 4, L, S)
    grads = {}
    for name, call in {
        "upper": lambda: selfattn.scaled_dot_product_attention(
            q, k, v, attn_mask=_bias(causal_upper_left, L, S)),
        "is_causal": lambda: selfattn.scaled_dot_product_attention(q, k, v, is_causal=True),
        "lower": lambda: selfattn.scaled_dot_product_attention(
            q, k, v, attn_mask=_bias(causal_lower_right, L, S)),
        "bottom_right": lambda: selfattn.attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
            causal_alignment="bottom_right").transpose(1, 2),
    }.items():
        out = call()
        assert torch.equal(out, call())
        grads[name] = [out.detach()] + list(torch.autograd.grad(out.sum(), (q, k, v)))
    for a, b in (("upper", "is_causal"), ("lower", "bottom_right")):
        for x, y in zip(grads[a], grads[b]):
            assert torch.equal(x, y), (a, b)


@pytest.mark.parametrize("variant", VARIANTS, ids=["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", [(6, 9), (9, 6)])
def test_causal_bias_agrees_with_torchs_own_dispatch(variant, L, S):
    """torch's SDPA given the CausalBias object itself (its own dispatch)."""
    q, k, v = _qkv(1, 2, 2, L, S, dtype=torch.float64, requires_grad=False)
    ours = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=_bias(variant, L, S))
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=_bias(variant, L, S))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS, ids=["upper_left", "lower_right"])
def test_causal_bias_in_attention_and_weights(variant):
    """selfattn.attention and attention_weights take the bias as attn_mask too."""
    L, S = 5, 9
    q, k, v = (t.transpose(1, 2) for t in _qkv(2, 3, 3, L, S, requires_grad=False))
    alignment = "top_left" if variant is causal_upper_left else "bottom_right"
    expected = selfattn.attention(q, k, v, causal=True, causal_alignment=alignment)
    assert torch.equal(selfattn.attention(q, k, v, attn_mask=_bias(variant, L, S)), expected)
    weights = selfattn.attention_weights(q, k, attn_mask=_bias(variant, L, S))
    assert torch.equal(weights, selfattn.attention_weights(q, k, causal=True,
                                                            causal_alignment=alignment))


@pytest.mark.parametrize("variant", VARIANTS, ids=["upper_left", "lower_right"])
@pytest.mark.parametrize("as_input", [True, False], ids=["graph_input", "closure"])
def test_causal_bias_under_torch_compile(variant, as_input):
    L, S = 6, 10
    q, k, v = _qkv(2, 2, 2, L, S)
    bias = _bias(variant, L, S)
    if as_input:
        fn = torch.compile(lambda q, k, v, m: selfattn.scaled_dot_product_attention(
            q, k, v, attn_mask=m), fullgraph=True, backend="aot_eager")
        compiled = fn(q, k, v, bias)
    else:
        fn = torch.compile(lambda q, k, v: selfattn.scaled_dot_product_attention(
            q, k, v, attn_mask=bias), fullgraph=True, backend="aot_eager")
        compiled = fn(q, k, v)
    eager = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    g_compiled = torch.autograd.grad(compiled.sum(), (q, k, v))
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_causal_bias_errors():
    q, k, v = _qkv(1, 2, 2, 4, 6, requires_grad=False)
    with pytest.raises(ValueError, match="CausalBias"):  # torch: ValueError too
        selfattn.scaled_dot_product_attention(q, k, v, attn_mask=_bias(causal_upper_left, 4, 6),
                                              is_causal=True)
    with pytest.raises(ValueError, match=r"CausalBias for \(Sq, Sk\) = \(5, 6\)"):
        selfattn.scaled_dot_product_attention(q, k, v, attn_mask=_bias(causal_lower_right, 5, 6))
    with pytest.raises(TypeError, match="query is a CausalBias"):
        selfattn.scaled_dot_product_attention(_bias(causal_upper_left, 4, 6), k, v)


# ---------------------------------------------------------------------------
# Errors: torch's exception types


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


SHAPE = (1, 4, 8, 16)
# torch 2.13 takes attn_mask with is_causal=True (and applies both); 2.14 raises.
MASK_WITH_IS_CAUSAL = RuntimeError if TorchVersion(torch.__version__) >= "2.14" else None
# (id, args, kwargs, the type torch raises, None where this torch raises
# nothing); taken from torch's SDPA tests and the checks of its CPU dispatch.
ERRORS = [
    ("dtypes_differ", lambda: (_t(*SHAPE), _t(*SHAPE, dtype=torch.half),
                               _t(*SHAPE, dtype=torch.half)), {}, RuntimeError),
    ("one_dim_query", lambda: (_t(4, dtype=torch.half), _t(1, 4, dtype=torch.half),
                               _t(1, 4, dtype=torch.half)), {}, RuntimeError),
    ("integer_dtype", lambda: tuple(torch.ones(SHAPE, dtype=torch.int32) for _ in range(3)), {},
     RuntimeError),
    ("devices_differ", lambda: (_t(*SHAPE), _t(*SHAPE, device="meta"), _t(*SHAPE)), {},
     RuntimeError),
    ("batch_differs", lambda: (_t(2, 4, 8, 16), _t(3, 4, 8, 16), _t(3, 4, 8, 16)), {},
     RuntimeError),
    ("head_dim_differs", lambda: (_t(*SHAPE), _t(1, 4, 8, 15), _t(*SHAPE)), {}, RuntimeError),
    ("heads_differ_without_gqa", lambda: (_t(1, 4, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)),
     {}, RuntimeError),
    ("gqa_heads_do_not_divide", lambda: (_t(1, 4, 8, 16), _t(1, 3, 8, 16), _t(1, 3, 8, 16)),
     dict(enable_gqa=True), RuntimeError),
    ("mask_with_is_causal", lambda: (_t(*SHAPE),) * 3,
     dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True), MASK_WITH_IS_CAUSAL),
    ("mask_float64_with_float32_query", lambda: (_t(*SHAPE),) * 3,
     dict(attn_mask=torch.zeros(8, 8, dtype=torch.float64)), RuntimeError),
    ("mask_not_broadcastable", lambda: (_t(*SHAPE),) * 3,
     dict(attn_mask=torch.ones(3, 8, dtype=torch.bool)), RuntimeError),
    ("mask_integer_dtype", lambda: (_t(*SHAPE),) * 3,
     dict(attn_mask=torch.ones(8, 8, dtype=torch.int64)), RuntimeError),
    ("dropout_above_one", lambda: (_t(*SHAPE),) * 3, dict(dropout_p=1.5), RuntimeError),
    ("query_not_a_tensor", lambda: (1.0, _t(*SHAPE), _t(*SHAPE)), {}, TypeError),
    ("scale_not_a_float", lambda: (_t(*SHAPE),) * 3, dict(scale="0.5"), TypeError),
    ("is_causal_not_a_bool", lambda: (_t(*SHAPE),) * 3, dict(is_causal=1), TypeError),
    ("enable_gqa_not_a_bool", lambda: (_t(*SHAPE),) * 3, dict(enable_gqa=None), TypeError),
]


@pytest.mark.parametrize("args,kwargs,torch_type", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors_have_torchs_type(args, kwargs, torch_type):
    if torch_type is None:  # this torch takes it; selfattn refuses it (README) as 2.14 does
        F.scaled_dot_product_attention(*args(), **kwargs)
        torch_type = RuntimeError
    else:
        with pytest.raises(torch_type):  # what torch raises, so the table stays true
            F.scaled_dot_product_attention(*args(), **kwargs)
    with pytest.raises(torch_type, match="selfattn") as info:
        selfattn.scaled_dot_product_attention(*args(), **kwargs)
    assert isinstance(info.value, (ValueError, TypeError))  # selfattn's documented types


def test_errors_name_query_key_value():
    q = _t(*SHAPE)
    with pytest.raises(TypeError, match=r"scaled_dot_product_attention: key has dtype "
                                        r"torch.float64, which differs from query's"):
        selfattn.scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(ValueError, match=r"key has 3 heads, which does not divide query's 4"):
        selfattn.scaled_dot_product_attention(q, _t(1, 3, 8, 16), _t(1, 3, 8, 16),
                                              enable_gqa=True)


def test_unsupported_nested_and_sparse_inputs_are_refused():
    """Jagged nested tensors run (tests/test_varlen.py); strided nested ones, a
    mix of nested and dense, and sparse masks are refused clearly."""
    parts = [torch.randn(3, 2, 8), torch.randn(5, 2, 8)]
    jagged = torch.nested.nested_tensor(parts, layout=torch.jagged).transpose(1, 2)
    strided = torch.nested.nested_tensor(parts).transpose(1, 2)
    dense = torch.randn(2, 2, 5, 8)
    for q, k in ((strided, strided), (jagged, dense)):
        with pytest.raises(TypeError, match="must all be jagged"):
            selfattn.scaled_dot_product_attention(q, k, k)
    q, k, v = _qkv(1, 2, 2, 4, 4, requires_grad=False)
    with pytest.raises(TypeError, match="attn_mask must be a dense"):
        selfattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 4).to_sparse())


# ---------------------------------------------------------------------------
# torch's backend switch and empty rows


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused forward op."""
    calls = []
    real = functional.fused_forward

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(functional, "fused_forward", spy)
    return calls


def test_sdpa_kernel_math_runs_the_reference(fused_calls):
    q, k, v = _qkv(2, 4, 2, 6, 9)
    mask = torch.rand(6, 9) < 0.7
    with sdpa_kernel(SDPBackend.MATH):
        out = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert not fused_calls
    expected = selfattn.reference.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                               enable_gqa=True)
    assert torch.equal(out, expected)
    for backends in ([SDPBackend.FLASH_ATTENTION], [SDPBackend.EFFICIENT_ATTENTION],
                     [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]):
        with sdpa_kernel(backends):
            selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert len(fused_calls) == 3


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autocast_runs_in_the_autocast_dtype_as_torch(compiled):
    """Inside torch.autocast("cpu", bfloat16) float32 inputs and a float mask
    run in bfloat16 (float64 stays float64); gradients reach the float32
    leaves through the casts."""
    q, k, v = _qkv(2, 2, 2, 5, 7)
    mask = rand(5, 7, requires_grad=True)
    sdpa = selfattn.scaled_dot_product_attention
    if compiled:
        sdpa = torch.compile(sdpa, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v, attn_mask=mask)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        as_float64 = selfattn.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert out.dtype == theirs.dtype == torch.bfloat16 and as_float64.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed input dtypes, as torch takes them
        mixed = selfattn.scaled_dot_product_attention(q, k.bfloat16(), v, attn_mask=mask)
        assert F.scaled_dot_product_attention(q, k.bfloat16(), v, attn_mask=mask).dtype \
            == mixed.dtype == torch.bfloat16
    cast = [t.detach().bfloat16().requires_grad_() for t in (q, k, v, mask)]
    expected = selfattn.scaled_dot_product_attention(*cast[:3], attn_mask=cast[3])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v, mask))
    expected_grads = torch.autograd.grad(expected.float().sum(), cast)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_row_that_sees_no_key_gives_zero_as_torch(dtype, mask_kind):
    """torch 2.13 and 2.14 return 0 there on CPU (default dispatch and math)."""
    q, k, v = _qkv(2, 2, 2, 4, 4, dtype=dtype, requires_grad=False)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0] = False
    mask = keep if mask_kind == "bool" else torch.zeros(4, 4, dtype=dtype).masked_fill(
        ~keep, float("-inf"))
    ours = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(ours[..., 0, :], torch.zeros_like(ours[..., 0, :]))
    for backends in (None, SDPBackend.MATH):
        if backends is None:
            theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            with sdpa_kernel(backends):
                theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.equal(theirs[..., 0, :], ours[..., 0, :])


def test_causal_bias_is_a_tensor_subclass_torch_defines():
    """The guard above relies on torch's CausalBias being a Tensor subclass whose
    storage is not the mask (if torch changes that, these tests must change)."""
    bias = _bias(causal_upper_left, 3, 5)
    assert isinstance(bias, CausalBias) and isinstance(bias, torch.Tensor)
    assert tuple(bias.shape) != (3, 5)
