"""selfattn.nn drop-ins against torch's modules: MultiheadAttention and the
Transformer layers get torch's weights (float64 golden, float32 and float64
runs) and must match outputs and gradients across layouts, masks, projection
variants and need_weights; state_dicts load both ways; torch.compile captures
a model of these layers in one graph."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import selfattn
from selfattn import nn as sa
from test_nn_common import assert_golden, clone_as, forward_backward

DTYPES = [torch.float32, torch.float64]
E, H, N, L, S = 16, 4, 3, 5, 7


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _masks(kind, L, S, dtype):
    """(key_padding_mask, attn_mask, is_causal) in torch's conventions; every
    query keeps at least one visible key."""
    g = torch.Generator().manual_seed(1)
    suffix = torch.arange(S) >= torch.tensor([S, S - 2, 3]).view(N, 1)
    general = suffix.clone()
    general[0, 1] = True
    general[1, 0] = True
    bool_2d = torch.rand(L, S, generator=g) < 0.3
    bool_2d[:, -1] = False
    float_3d = torch.randn(N * H, L, S, generator=g, dtype=torch.float64).to(dtype)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    return {
        "none": (None, None, False),
        "kpm_suffix": (suffix, None, False),
        "kpm_general": (general, None, False),
        "kpm_float": (torch.zeros(N, S, dtype=dtype).masked_fill(general, float("-inf")), None, False),
        "bool_2d": (None, bool_2d, False),
        "float_3d": (None, float_3d, False),
        "bool_2d+kpm": (general, bool_2d, False),
        "float_3d+bool_kpm": (suffix, float_3d, False),
        "causal_hint": (None, causal, True),
        "causal_hint+kpm": (suffix, causal, True),
    }[kind]


MHA_CONFIGS = {
    "default": {},
    "kdim_vdim": dict(kdim=6, vdim=10),
    "no_bias": dict(bias=False),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "bias_kv+zero_attn+kvdim": dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=10),
}
MASKS = ["none", "kpm_suffix", "kpm_general", "kpm_float", "bool_2d", "float_3d", "bool_2d+kpm",
         "float_3d+bool_kpm", "causal_hint", "causal_hint+kpm"]
WEIGHTS = [(False, True), (True, True), (True, False)]  # (need_weights, average_attn_weights)


def _mha_case(cfg, mask_kind, batch_first, dtype, need_weights, average, self_attn, L=L):
    torch.manual_seed(0)
    golden = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64,
                                         **MHA_CONFIGS[cfg])
    ref = clone_as(golden, dtype=dtype)
    ours = clone_as(golden, sa.MultiheadAttention, dtype)
    kdim, vdim = MHA_CONFIGS[cfg].get("kdim", E), MHA_CONFIGS[cfg].get("vdim", E)
    Sk = L if self_attn else S
    shape = (lambda n, s, e: (n, s, e)) if batch_first else (lambda n, s, e: (s, n, e))
    q = _rand(*shape(N, L, E), seed=2)
    k, v = _rand(*shape(N, Sk, kdim), seed=3), _rand(*shape(N, Sk, vdim), seed=4)
    kpm, am, is_causal = _masks(mask_kind, L, Sk, dtype)

    def results(m, dt):
        kw = dict(key_padding_mask=kpm, attn_mask=am if am is None or am.dtype == torch.bool else am.to(dt),
                  need_weights=need_weights, average_attn_weights=average, is_causal=is_causal)
        if kpm is not None and kpm.is_floating_point():
            kw["key_padding_mask"] = kpm.to(dt)
        if self_attn and kdim == vdim == E:
            fn = lambda x: m(x, x, x, **kw)  # noqa: E731 (the packed projection path)
            inputs = [q.to(dt)]
        else:
            fn = lambda a, b, c: m(a, b, c, **kw)  # noqa: E731
            inputs = [q.to(dt), k.to(dt), v.to(dt)]
        return forward_backward(fn, inputs, list(m.parameters()))

    return results(ours, dtype), results(ref, dtype), results(golden, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cfg", list(MHA_CONFIGS))
def test_mha_matches_torch(cfg, batch_first, dtype):
    for i, (mask_kind, self_attn) in enumerate(itertools.product(MASKS, [True, False])):
        if mask_kind.startswith("causal") and not self_attn:
            continue
        need_weights, average = WEIGHTS[i % len(WEIGHTS)]
        ours, ref, golden = _mha_case(cfg, mask_kind, batch_first, dtype, need_weights, average,
                                      self_attn)
        try:
            assert_golden(ours, ref, golden)
        except AssertionError as e:
            raise AssertionError(f"mask={mask_kind} self_attn={self_attn} "
                                 f"need_weights={need_weights} average={average}: {e}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mha_unbatched(dtype):
    torch.manual_seed(0)
    golden = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, add_bias_kv=True)
    ref, ours = clone_as(golden, dtype=dtype), clone_as(golden, sa.MultiheadAttention, dtype)
    q, k, v = _rand(L, E, seed=1), _rand(S, E, seed=2), _rand(S, E, seed=3)
    kpm = torch.arange(S) >= 5
    am = torch.randn(H, L, S, dtype=torch.float64)

    def results(m, dt):
        return forward_backward(lambda a, b, c: m(a, b, c, key_padding_mask=kpm, attn_mask=am.to(dt),
                                                  average_attn_weights=False),
                                [q.to(dt), k.to(dt), v.to(dt)], list(m.parameters()))

    assert_golden(results(ours, dtype), results(ref, dtype), results(golden, torch.float64))


def test_mha_masks_reach_the_kernel_efficiently(monkeypatch):
    """A suffix padding runs as key_lengths, any other padding as one
    (N, 1, 1, S) mask, the causal hint as the kernel's causal flag."""
    calls = []
    names = ("q", "k", "v", "attn_mask", "key_lengths", "rng", "scale", "window_left",
             "window_right", "diag_offset", "dropout_p")

    def spy(*args):
        call = dict(zip(names, args))
        call["causal"] = call["window_right"] == 0
        calls.append(call)
        return selfattn.functional.fused_forward(*args)

    monkeypatch.setattr(sa, "fused_forward", spy)
    m = sa.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    suffix, _, _ = _masks("kpm_suffix", L, L, torch.float32)
    general, _, _ = _masks("kpm_general", L, L, torch.float32)
    m(x, x, x, key_padding_mask=suffix, need_weights=False)
    assert calls[-1]["attn_mask"] is None
    assert calls[-1]["key_lengths"].tolist() == [L, L - 2, 3]
    m(x, x, x, key_padding_mask=general, need_weights=False)
    assert calls[-1]["key_lengths"] is None and calls[-1]["attn_mask"].shape == (N, 1, 1, L)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    m(x, x, x, attn_mask=causal, is_causal=True, key_padding_mask=suffix)
    assert calls[-1]["causal"] and calls[-1]["attn_mask"] is None
    assert calls[-1]["key_lengths"] is not None


def test_mha_fully_masked_rows_give_zero():
    m = sa.MultiheadAttention(E, H, batch_first=True, bias=False)
    x = torch.randn(N, L, E, requires_grad=True)
    am = torch.zeros(L, L, dtype=torch.bool)
    am[0] = True  # query 0 sees nothing: torch gives NaN, selfattn 0
    out, w = m(x, x, x, attn_mask=am)
    assert torch.all(out[:, 0] == 0) and torch.all(w[:, 0] == 0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_mha_dropout_training():
    """In training the dropout runs in the kernel; need_weights returns the
    dropped-out probabilities the output was computed with."""
    torch.manual_seed(0)
    m = sa.MultiheadAttention(E, H, dropout=0.5, batch_first=True, bias=False).double()
    x = torch.randn(N, L, E, dtype=torch.float64)
    out, w = m(x, x, x, average_attn_weights=False)
    v = (x @ m.in_proj_weight[2 * E:].T).view(N, L, H, E // H).transpose(1, 2)
    expected = m.out_proj((w @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, expected)
    assert (w == 0).any()
    m.eval()
    out_eval, _ = m(x, x, x)
    assert not torch.allclose(out, out_eval)
    m.train()
    torch.manual_seed(5)
    a, _ = m(x, x, x, need_weights=False)
    torch.manual_seed(5)
    b, _ = m(x, x, x, need_weights=False)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m(x[..., :8], x, x), "embed_dim"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(2, 2, dtype=torch.bool)), "attn_mask"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(N, 2, dtype=torch.bool)),
     "key_padding_mask"),
    (lambda m, x: m(x, x, x, is_causal=True), "is_causal"),
    (lambda m, x: m(x[0, 0], x, x), "query"),
])
def test_mha_errors_name_the_argument(call, message):
    m = sa.MultiheadAttention(E, H, batch_first=True)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=message):
        call(m, torch.randn(N, L, E))


def test_state_dict_round_trips():
    for kw in MHA_CONFIGS.values():
        torch.manual_seed(0)
        t = torch.nn.MultiheadAttention(E, H, **kw)
        torch.manual_seed(0)
        ours = sa.MultiheadAttention(E, H, **kw)
        for a, b in zip(t.state_dict().items(), ours.state_dict().items()):
            assert a[0] == b[0] and torch.equal(a[1], b[1])  # same names, same init
        t2 = torch.nn.MultiheadAttention(E, H, **kw)
        t2.load_state_dict(sa.MultiheadAttention(E, H, **kw).state_dict())
        ours.load_state_dict(torch.nn.MultiheadAttention(E, H, **kw).state_dict())
    torch.manual_seed(1)
    te = torch.nn.TransformerDecoderLayer(E, H, 32)
    torch.manual_seed(1)
    oe = sa.TransformerDecoderLayer(E, H, 32)
    assert list(te.state_dict()) == list(oe.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(te.state_dict().values(), oe.state_dict().values()))
    te.load_state_dict(sa.TransformerDecoderLayer(E, H, 32).state_dict())
    oe.load_state_dict(torch.nn.TransformerDecoderLayer(E, H, 32).state_dict())
    enc = sa.TransformerEncoder(sa.TransformerEncoderLayer(E, H, 32), 2, enable_nested_tensor=False)
    torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(E, H, 32), 2,
                                enable_nested_tensor=False).load_state_dict(enc.state_dict())


def _layer_pair(torch_cls, ours_cls, dtype, **kw):
    torch.manual_seed(0)
    golden = torch_cls(E, H, 32, dropout=0.0, dtype=torch.float64, **kw)
    ours = ours_cls(E, H, 32, dropout=0.0, dtype=dtype, **kw)
    ours.load_state_dict(golden.state_dict())
    return golden, clone_as(golden, dtype=dtype), ours


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_first, activation, batch_first", [
    (False, "relu", False), (True, "gelu", True), (False, F.silu, True), (True, "relu", False)])
def test_encoder_layer_matches_torch(norm_first, activation, batch_first, dtype):
    golden, ref, ours = _layer_pair(torch.nn.TransformerEncoderLayer, sa.TransformerEncoderLayer,
                                    dtype, norm_first=norm_first, activation=activation,
                                    batch_first=batch_first)
    x = _rand(N, L, E, seed=1) if batch_first else _rand(L, N, E, seed=1)

    def results(m, dt, kpm, am, is_causal):
        return forward_backward(
            lambda s: m(s, src_mask=am, src_key_padding_mask=kpm, is_causal=is_causal),
            [x.to(dt)], list(m.parameters()))

    for kind in ["none", "kpm_suffix", "bool_2d+kpm", "causal_hint"]:
        masks = _masks(kind, L, L, dtype)
        assert_golden(results(ours, dtype, *masks), results(ref, dtype, *masks),
                      results(golden, torch.float64, *masks))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_first, batch_first", [(False, False), (True, True)])
def test_decoder_layer_matches_torch(norm_first, batch_first, dtype):
    golden, ref, ours = _layer_pair(torch.nn.TransformerDecoderLayer, sa.TransformerDecoderLayer,
                                    dtype, norm_first=norm_first, batch_first=batch_first)
    tgt = _rand(N, L, E, seed=1) if batch_first else _rand(L, N, E, seed=1)
    mem = _rand(N, S, E, seed=2) if batch_first else _rand(S, N, E, seed=2)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    tgt_kpm, _, _ = _masks("kpm_suffix", L, L, dtype)
    mem_kpm, _, _ = _masks("kpm_general", L, S, dtype)

    def results(m, dt):
        return forward_backward(
            lambda t, s: m(t, s, tgt_mask=causal.to(dt), tgt_is_causal=True,
                           tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=mem_kpm),
            [tgt.to(dt), mem.to(dt)], list(m.parameters()))

    assert_golden(results(ours, dtype), results(ref, dtype), results(golden, torch.float64))


def test_encoder_decoder_stacks_match_torch():
    dtype = torch.float64
    torch.manual_seed(0)
    t_enc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True, dtype=dtype), 2,
        norm=torch.nn.LayerNorm(E, dtype=dtype), enable_nested_tensor=False)
    t_dec = torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(E, H, 32, 0.0, batch_first=True, dtype=dtype), 2)
    o_enc = sa.TransformerEncoder(sa.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True,
                                                             dtype=dtype), 2,
                                  norm=torch.nn.LayerNorm(E, dtype=dtype))
    o_dec = sa.TransformerDecoder(sa.TransformerDecoderLayer(E, H, 32, 0.0, batch_first=True,
                                                             dtype=dtype), 2)
    o_enc.load_state_dict(t_enc.state_dict())
    o_dec.load_state_dict(t_dec.state_dict())
    src, tgt = _rand(N, S, E, seed=1), _rand(N, L, E, seed=2)
    kpm, _, _ = _masks("kpm_suffix", L, S, dtype)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)

    def model(enc, dec):
        return lambda s, t: dec(t, enc(s, src_key_padding_mask=kpm), tgt_mask=causal,
                                memory_key_padding_mask=kpm)

    ours = forward_backward(model(o_enc, o_dec), [src, tgt], list(o_enc.parameters()))
    ref = forward_backward(model(t_enc, t_dec), [src, tgt], list(t_enc.parameters()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    o_enc.eval()
    with torch.no_grad():  # torch's nested-tensor path zeroes padded outputs; compare the rest
        valid = ~kpm
        torch.testing.assert_close(o_enc(src, src_key_padding_mask=kpm)[valid],
                                   t_enc.eval()(src, src_key_padding_mask=kpm)[valid])


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = sa.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
        self.gpt = sa.CausalSelfAttention(E, H, rotary=True)
        self.mha = sa.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, kpm):
        x = self.enc(x, src_key_padding_mask=kpm)
        x = x + self.gpt(x)
        return self.mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = _TinyModel()
    x = torch.randn(2, 6, E)
    kpm = torch.arange(6) >= torch.tensor([[6], [4]])
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, kpm)
    expected = model(x, kpm)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_encoder_layer_inference_matches_torch_fast_path():
    golden, ref, ours = _layer_pair(torch.nn.TransformerEncoderLayer, sa.TransformerEncoderLayer,
                                    torch.float32, batch_first=True)
    x = _rand(N, L, E, seed=1).float()
    ref.eval(), ours.eval()
    with torch.no_grad():  # torch takes its fused inference path here, selfattn its kernel
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-4)
