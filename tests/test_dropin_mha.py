"""selfattn.nn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention,
judged by the behaviours PyTorch's own MultiheadAttention tests check, with
torch's module (same weights) as the oracle:

- every invalid-shape case of torch's tests raises AssertionError, as torch's
  (and selfattn's documented ValueError/TypeError), batched and unbatched;
- the causal hint: with is_causal, no key_padding_mask and no weights, torch
  does not read attn_mask (any 2-D or 3-D shape is accepted), elsewhere it
  checks it;
- an in_proj_bias of another dtype than the weights, in both directions;
- jagged nested tensors run the packed kernels (need_weights=False); the
  nested inputs selfattn does not take raise an AssertionError, as torch;
  masks that are not plain dense tensors on the query's device (a CausalBias,
  a meta or sparse tensor, a list), head dims above 512 and dropout 1 refused
  with a clear error (never a kernel reading garbage);
- torch.jit.trace follows the traced inputs' mask (no host decision baked in);
- torch.jit.script: the scripted layer (every projection variant, masks,
  weights, dropout in training) gives the eager output, keeps the fused ops in
  its graph, saves and loads; subclasses script too;
- torch's switches: sdpa_kernel(SDPBackend.MATH) runs the reference math,
  torch.backends.mha.set_fastpath_enabled changes nothing.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from selfattn import functional
from selfattn import nn as sa
from test_nn_common import assert_golden, clone_as, forward_backward, save_load

# torch 2.14 deprecates TorchScript; scripting is still what these tests check
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")


def _pair(*args, **kwargs):
    """torch's and selfattn's module with the same weights."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(*args, **kwargs)
    ours = clone_as(theirs, sa.MultiheadAttention, dtype=theirs.in_proj_bias.dtype
                    if theirs.in_proj_bias is not None else torch.float32)
    return theirs, ours


# ---------------------------------------------------------------------------
# Invalid shapes (torch's test_multihead_attn_invalid_shape and its fast-path twin)

B3 = (4, 4, 4)  # batched (L, N, E) with E = num_heads = 4
U2 = (4, 4)     # unbatched (L, E)
INVALID = [
    ("batched_key_2d", B3, dict(key=(3, 3))),
    ("batched_value_2d", B3, dict(value=(3, 3))),
    ("batched_kpm_1d", B3, dict(key_padding_mask=torch.tensor([False, True, True, True]))),
    ("batched_mask_1d", B3, dict(attn_mask=torch.tensor([False, True, True, True]))),
    ("batched_mask_4d", B3, dict(attn_mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool))),
    ("batched_kpm_wrong_batch", B3, dict(key_padding_mask=torch.zeros(5, 4, dtype=torch.bool))),
    ("unbatched_key_3d", U2, dict(key=(4, 4, 4))),
    ("unbatched_value_3d", U2, dict(value=(4, 4, 4))),
    ("unbatched_kpm_2d", U2, dict(key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))),
    ("unbatched_mask_1d", U2, dict(attn_mask=torch.tensor([False, False, True, True]))),
    ("unbatched_mask_3d_wrong", U2, dict(attn_mask=torch.zeros(5, 4, 4, dtype=torch.bool))),
    ("query_4d", (1, 4, 4, 4), {}),
    ("embed_dim", (4, 4, 5), {}),
    ("key_value_lengths_differ", B3, dict(value=(5, 4, 4))),
    ("kpm_integer", B3, dict(key_padding_mask=torch.zeros(4, 4, dtype=torch.int64))),
    ("mask_integer", B3, dict(attn_mask=torch.zeros(4, 4, dtype=torch.int64))),
]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("query_shape,over", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_shapes_assert_as_torch(query_shape, over, batch_first):
    theirs, ours = _pair(4, 4, batch_first=batch_first)
    query = torch.randn(query_shape)
    args = dict(key=query, value=query)
    for name, shape in over.items():
        args[name] = torch.randn(shape) if isinstance(shape, tuple) else shape
    key, value = args.pop("key"), args.pop("value")
    # torch's message differs, its type is the contract (torch's inference fast
    # path, batch_first in eval, raises other types for some of these)
    for module in (theirs, ours) if not batch_first else (ours,):
        for mode in (module.train, module.eval):
            mode()
            with torch.no_grad(), pytest.raises(AssertionError):
                module(query, key, value, **args)
    with pytest.raises((ValueError, TypeError), match="selfattn.nn.MultiheadAttention"):
        ours(query, key, value, **args)


@pytest.mark.parametrize("attn_mask", [torch.zeros(7, 7, dtype=torch.bool),
                                       torch.zeros(5, 7, 7)], ids=["2d", "3d"])
def test_causal_hint_does_not_read_the_mask(attn_mask):
    """torch uses is_causal alone when no key_padding_mask and no weights are
    asked for; with either it checks the mask (RuntimeError there)."""
    L, N, E = 4, 3, 8
    x = torch.randn(L, N, E)
    theirs, ours = _pair(E, 2)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    expected = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    for module in (theirs, ours):
        out, weights = module(x, x, x, attn_mask=attn_mask, is_causal=True, need_weights=False)
        assert weights is None
        torch.testing.assert_close(out, expected)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    for kwargs in (dict(need_weights=True), dict(need_weights=False, key_padding_mask=kpm)):
        for module in (theirs, ours):
            with pytest.raises(RuntimeError):
                module(x, x, x, attn_mask=attn_mask, is_causal=True, **kwargs)


def test_causal_hint_still_checks_the_mask_dtype_and_rank():
    x = torch.randn(4, 3, 8)
    theirs, ours = _pair(8, 2)
    for mask in (torch.zeros(4, 4, dtype=torch.int64), torch.zeros(1, 1, 4, 4, dtype=torch.bool)):
        for module in (theirs, ours):
            with pytest.raises(AssertionError):
                module(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("self_attention", [True, False])
@pytest.mark.parametrize("dtype,bias_dtype", [(torch.float64, torch.float16),
                                              (torch.float32, torch.float64),
                                              (torch.float16, torch.float32)])
def test_in_proj_bias_of_another_dtype(training, self_attention, dtype, bias_dtype):
    """torch's test_multihead_attn_fast_path_query_and_bias_have_different_dtypes
    (float64 module and input, float16 in_proj_bias), and a bias more precise
    than the weights: the projections keep the weights' dtype, as torch's."""
    theirs, ours = _pair(4, 4, batch_first=True)
    for m in (theirs, ours):
        m.to(dtype)
        m.in_proj_bias = torch.nn.Parameter(m.in_proj_bias.detach().to(bias_dtype))
        m.train(training)
    query = torch.randn(4, 4, 4, dtype=torch.float64).to(dtype)
    key = query if self_attention else query.clone()
    with torch.no_grad():
        expected, _ = theirs(query, key, key)
        out, _ = ours(query, key, key)
    assert out.dtype == expected.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def _refused_masks():
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left
    return {  # each would read storage that is not the mask (the first two: torch's does)
        "causal_upper_left": (causal_upper_left(4, 4), TypeError),
        "causal_lower_right": (causal_lower_right(4, 4), TypeError),
        "meta": (torch.zeros(4, 4, device="meta"), ValueError),
        "sparse": (torch.ones(4, 4).to_sparse(), TypeError),
        "list": ([[0.0] * 4] * 4, TypeError),
    }


@pytest.mark.parametrize("name", _refused_masks().keys())
@pytest.mark.parametrize("heads", [1, 2])
def test_masks_the_kernel_cannot_read_are_refused(name, heads):
    mask, error = _refused_masks()[name]
    _, ours = _pair(8, heads, batch_first=True)
    x = torch.randn(1, 4, 8)
    for kwargs in (dict(attn_mask=mask), dict(attn_mask=mask, need_weights=False)):
        with pytest.raises(error, match="attn_mask") as info:
            ours(x, x, x, **kwargs)
        assert isinstance(info.value, AssertionError)


def test_what_selfattn_does_not_take_is_refused_clearly():
    """torch takes head dims above 512 and dropout 1 (zeros); selfattn refuses
    them naming the cause (README, deliberate differences)."""
    _, wide = _pair(1024, 1, batch_first=True)
    x = torch.randn(1, 3, 1024)
    with pytest.raises(ValueError, match="embed_dim / num_heads = 1024 exceeds"):
        wide(x, x, x)
    _, ours = _pair(8, 2, dropout=1.0, batch_first=True)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="dropout must be below 1 in training"):
        ours(x, x, x)
    ours.eval()
    ours(x, x, x)  # no dropout in eval


def test_fake_kernels_refuse_other_devices():
    """A meta argument routes a real call to the fake kernel: it refuses."""
    from selfattn import ops
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="attn_mask is on meta, but q is on cpu"):
        ops.forward_op(q, q, q, torch.zeros(4, 4, device="meta"), None, None, 0.3, -1, -1,
                       True, 0.0)


def test_jit_trace_follows_the_mask():
    """The suffix-padding shortcut is a host decision: never baked into a trace."""
    _, ours = _pair(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    suffix = torch.arange(5) >= torch.tensor([[5], [3], [2]])
    other = torch.rand(3, 5) < 0.3
    other[:, 0] = False
    traced = torch.jit.trace(ours, (x, x, x, suffix), check_trace=False)
    for kpm in (suffix, other):
        torch.testing.assert_close(traced(x, x, x, kpm)[0],
                                   ours(x, x, x, key_padding_mask=kpm)[0])


def test_nested_tensors_outside_what_selfattn_takes_are_refused():
    """torch asserts outside its inference fast path. selfattn runs jagged
    nested inputs with need_weights=False (tests/test_varlen.py) and asserts,
    as torch, for the rest: weights, masks, strided nested tensors."""
    theirs, ours = _pair(4, 4, batch_first=True)
    nt = torch.nested.nested_tensor([torch.randn(4, 4), torch.randn(2, 4)], layout=torch.jagged)
    for module in (theirs, ours):
        with pytest.raises(AssertionError, match="(?i)nested"):
            module(nt, nt, nt)
    strided = torch.nested.nested_tensor([torch.randn(4, 4), torch.randn(2, 4)])
    with pytest.raises(TypeError, match="must all be jagged"):
        ours(strided, strided, strided, need_weights=False)
    with pytest.raises(AssertionError, match="key_padding_mask"):
        ours(nt, nt, nt, need_weights=False, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------
# TorchScript

CONFIGS = {
    "self": {},
    "kdim_vdim": dict(kdim=6, vdim=10),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "no_bias": dict(bias=False),
}


def _inputs(config, batch_first, batched=True):
    L, S, N, E = 5, 7, 3, 16
    kdim, vdim = config.get("kdim", E), config.get("vdim", E)
    shape = (lambda s, d: (N, s, d) if batch_first else (s, N, d)) if batched else \
        (lambda s, d: (s, d))
    q = torch.randn(shape(L, E))
    if not config:
        return q, q, q  # self-attention: the packed projection path
    return q, torch.randn(shape(S, kdim)), torch.randn(shape(S, vdim))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("batch_first", [False, True])
def test_scripted_matches_eager_and_saves(config, batch_first):
    _, ours = _pair(16, 4, batch_first=batch_first, **config)
    scripted = torch.jit.script(ours)
    graph = str(scripted.inlined_graph)
    assert "selfattn::attention_forward" in graph and "selfattn::attention_probs" in graph
    loaded = save_load(scripted)
    q, k, v = _inputs(config, batch_first)
    S = k.shape[1 if batch_first else 0]
    kpm = torch.rand(3, S) < 0.3
    kpm[:, 0] = False
    attn = torch.rand(q.shape[1 if batch_first else 0], S) < 0.2
    suffix = torch.arange(S) >= torch.tensor([[S], [S - 2], [3]])
    cases = [dict(), dict(key_padding_mask=kpm, attn_mask=attn),
             dict(need_weights=False, key_padding_mask=suffix),
             dict(attn_mask=attn, average_attn_weights=False)]
    for kwargs in cases:
        expected = ours(q, k, v, **kwargs)
        for _ in range(2):  # the profiling executor optimises the graph after a run
            for module in (scripted, loaded):
                got = module(q, k, v, **kwargs)
                torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
                assert (got[1] is None) == (expected[1] is None)
                if expected[1] is not None:
                    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)


def test_scripted_unbatched_and_causal():
    _, ours = _pair(16, 4)
    scripted = torch.jit.script(ours)
    q = torch.randn(5, 16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    for kwargs in (dict(), dict(attn_mask=causal, is_causal=True, need_weights=False)):
        expected = ours(q, q, q, **kwargs)[0]
        torch.testing.assert_close(scripted(q, q, q, **kwargs)[0], expected, rtol=1e-6,
                                   atol=1e-6)


def test_scripted_training_with_dropout_is_the_eager_layer():
    """Same seed, same dropout mask (one rng state for output and weights);
    gradients flow through the scripted graph into the parameters."""
    _, ours = _pair(16, 4, dropout=0.3, batch_first=True)
    scripted = torch.jit.script(ours)
    x = torch.randn(2, 6, 16)
    torch.manual_seed(7)
    out, weights = ours(x, x, x, average_attn_weights=False)
    grads = torch.autograd.grad(out.sum(), list(ours.parameters()))
    torch.manual_seed(7)
    s_out, s_weights = scripted(x, x, x, average_attn_weights=False)
    s_grads = torch.autograd.grad(s_out.sum(), list(scripted.parameters()))
    torch.testing.assert_close(s_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_weights, weights, rtol=1e-6, atol=1e-6)
    for a, b in zip(s_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (weights == 0).any() and torch.equal(s_weights == 0, weights == 0)  # same mask


def test_subclass_scripts():
    class Logged(sa.MultiheadAttention):
        pass

    torch.manual_seed(0)
    m = Logged(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(torch.jit.script(m)(x, x, x)[0], m(x, x, x)[0], rtol=1e-6,
                               atol=1e-6)


# ---------------------------------------------------------------------------
# torch's switches


def test_sdpa_kernel_math_runs_the_reference_against_torch(monkeypatch):
    """Inside sdpa_kernel(MATH) the layer does not call the fused op, and its
    output, weights and gradients match torch's layer (float64 golden)."""
    def no_fused(*args):
        raise AssertionError("the fused op ran inside sdpa_kernel(MATH)")

    theirs, _ = _pair(16, 4, batch_first=True)
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[0, 1] = True
    mask = torch.rand(6, 6) < 0.2
    mask.fill_diagonal_(False)

    def run(cls, dtype):
        module = clone_as(theirs, cls, dtype)
        return forward_backward(
            lambda x: module(x, x, x, key_padding_mask=kpm, attn_mask=mask), [x.to(dtype)],
            list(module.parameters()))

    golden = run(None, torch.float64)
    monkeypatch.setattr(sa, "fused_forward", no_fused)
    with sdpa_kernel(SDPBackend.MATH):
        ours = run(sa.MultiheadAttention, torch.float32)
    assert_golden(ours, run(None, torch.float32), golden)


def test_fastpath_switch_changes_nothing(monkeypatch):
    """The layer never takes torch's inference fast path (which would bypass
    the fused kernel), whatever the switch says; its output is the same."""
    def no_fast_path(*args, **kwargs):
        raise AssertionError("torch's inference fast path ran")

    monkeypatch.setattr(torch, "_native_multi_head_attention", no_fast_path)
    theirs, ours = _pair(16, 4, batch_first=True)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="fast path ran"):  # torch's does take it
            theirs(x, x, x)
        expected = ours(x, x, x)[0]
        previous = torch.backends.mha.get_fastpath_enabled()
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            assert torch.equal(ours(x, x, x)[0], expected)
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)


def test_fused_path_outside_math(monkeypatch):
    calls = []
    real = functional.fused_forward
    monkeypatch.setattr(sa, "fused_forward", lambda *a: calls.append(1) or real(*a))
    _, ours = _pair(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        ours(x, x, x)
    assert calls == [1]
