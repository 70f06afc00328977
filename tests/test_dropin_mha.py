"""selfattn.nn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention,
judged by the behaviours PyTorch's own MultiheadAttention tests check, with
torch's module (same weights) as the oracle:

- every invalid-shape case of torch's tests raises AssertionError, as torch's
  (and selfattn's documented ValueError/TypeError), batched and unbatched;
- the causal hint: with is_causal, no key_padding_mask and no weights, torch
  does not read attn_mask (any 2-D or 3-D shape is accepted), elsewhere it
  checks it;
- an in_proj_bias of another dtype than the input, as in torch's test;
- nested tensors refused with an AssertionError, as torch outside its fast path;
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
def test_in_proj_bias_of_another_dtype(training, self_attention):
    """torch's test_multihead_attn_fast_path_query_and_bias_have_different_dtypes:
    float64 module and input, float16 in_proj_bias."""
    theirs, ours = _pair(4, 4, batch_first=True, dtype=torch.float64)
    for m in (theirs, ours):
        m.in_proj_bias = torch.nn.Parameter(m.in_proj_bias.detach().to(torch.half))
        m.train(training)
    query = torch.randn(4, 4, 4, dtype=torch.float64)
    key = query if self_attention else query.clone()
    with torch.no_grad():
        expected, _ = theirs(query, key, key)
        out, _ = ours(query, key, key)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected)


def test_nested_tensors_are_refused():
    """torch asserts outside its inference fast path; selfattn has no such path."""
    theirs, ours = _pair(4, 4, batch_first=True)
    nt = torch.nested.nested_tensor([torch.randn(4, 4), torch.randn(2, 4)], layout=torch.jagged)
    for module in (theirs, ours):
        with pytest.raises(AssertionError, match="(?i)nested"):
            module(nt, nt, nt)
    with pytest.raises(TypeError, match="nested tensor inputs are not supported"):
        ours(nt, nt, nt)


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
        for module in (scripted, loaded):
            got = module(q, k, v, **kwargs)
            torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
            assert (got[1] is None) == (expected[1] is None)
            if expected[1] is not None:
                torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def test_scripted_unbatched_and_causal():
    _, ours = _pair(16, 4)
    scripted = torch.jit.script(ours)
    q = torch.randn(5, 16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    for kwargs in (dict(), dict(attn_mask=causal, is_causal=True, need_weights=False)):
        expected = ours(q, q, q, **kwargs)[0]
        torch.testing.assert_close(scripted(q, q, q, **kwargs)[0], expected, rtol=0, atol=0)


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
    torch.testing.assert_close(s_out, out, rtol=0, atol=0)
    torch.testing.assert_close(s_weights, weights, rtol=0, atol=0)
    for a, b in zip(s_grads, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (weights == 0).any()  # dropout did drop


def test_subclass_scripts():
    class Logged(sa.MultiheadAttention):
        pass

    torch.manual_seed(0)
    m = Logged(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(torch.jit.script(m)(x, x, x)[0], m(x, x, x)[0], rtol=0, atol=0)


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
    monkeypatch.setattr(sa, "forward", no_fused)
    with sdpa_kernel(SDPBackend.MATH):
        ours = run(sa.MultiheadAttention, torch.float32)
    assert_golden(ours, run(None, torch.float32), golden)


def test_fastpath_switch_changes_nothing():
    _, ours = _pair(16, 4, batch_first=True)
    ours.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = ours(x, x, x)[0]
        previous = torch.backends.mha.get_fastpath_enabled()
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            assert torch.equal(ours(x, x, x)[0], expected)
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)


def test_fused_path_outside_math(monkeypatch):
    calls = []
    real = functional.forward
    monkeypatch.setattr(sa, "forward", lambda *a: calls.append(1) or real(*a))
    _, ours = _pair(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        ours(x, x, x)
    assert calls == [1]
