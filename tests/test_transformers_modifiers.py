"""Score modifiers through the Hugging Face integration (issue 18).

A tiny Gemma-2 model (config only, random weights, float64: attention logit
soft-capping, sliding-window layers, grouped-query heads) with
attn_implementation="selfattn" must give its eager implementation's logits,
gradients and generated tokens. ALiBi slopes reach the kernel when a model
passes `alibi_slopes` through the attention kwargs (transformers' own ALiBi
models run their own attention code and never call the attention
interface): a LLaMA model given them must match eager attention with the
dense ALiBi bias added, in prefill and in a cached decoding step. Generation
with selfattn's cache (make_cache) on the sliding-window layers. Attention
sinks (s_aux) are refused. Tolerance 1e-5 of the largest entry: the eager
softmax rounds to float32. Skipped without transformers.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfattn.integrations.transformers import NAME, register, selfattn_attention_forward  # noqa: E402
from selfattn import reference  # noqa: E402

register()

F64 = torch.float64


def _model(config_cls, model_cls, impl, **cfg):
    torch.manual_seed(0)
    m = model_cls(config_cls(**cfg)).to(F64)
    m.set_attn_implementation(impl)
    assert m.config._attn_implementation == impl
    return m.eval()


def _logits_and_grads(model, ids, mask=None, **kw):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask, **kw).logits
    cotangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    if mask is not None:
        cotangent = cotangent * mask.unsqueeze(-1)
    (logits * cotangent).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def _close(a, b, tol, msg=None):
    """|a - b| <= tol * max(1, max |b|) (the eager softmax's float32 rounding
    is relative to the largest entries)."""
    torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=0, msg=msg)


def _assert_same(a, b, mask=None, tol=1e-5):
    (la, ga), (lb, gb) = a, b
    if mask is not None:
        la, lb = la[mask.bool()], lb[mask.bool()]
    _close(la, lb, tol)
    assert ga.keys() == gb.keys()
    for name in ga:
        _close(ga[name], gb[name], tol, msg=name)


GEMMA = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=2,
             attn_logit_softcapping=3.0, final_logit_softcapping=30.0, initializer_range=0.3)


def _gemma(impl, **over):
    return _model(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, impl,
                  **dict(GEMMA, **over))


def _ids(B, S, seed=0):
    return torch.randint(0, 97, (B, S), generator=torch.Generator().manual_seed(seed))


def test_gemma2_softcap_matches_eager():
    eager, ours = _gemma("eager"), _gemma(NAME)
    assert eager.config.layer_types == ["sliding_attention", "full_attention"]
    ids = _ids(2, 14)
    _assert_same(_logits_and_grads(ours, ids), _logits_and_grads(eager, ids))
    # the soft-cap matters here: without it the logits are elsewhere
    uncapped = _gemma("eager", attn_logit_softcapping=None)
    assert not torch.allclose(_logits_and_grads(uncapped, ids)[0],
                              _logits_and_grads(eager, ids)[0], atol=1e-3)


def test_gemma2_softcap_with_padding_and_generation():
    """Right padding (with left padding Gemma-2's eager attention itself
    returns NaN on the padded sequence in float64), and greedy generation
    with a KV cache."""
    eager, ours = _gemma("eager"), _gemma(NAME)
    ids = _ids(2, 11, seed=3)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    _assert_same(_logits_and_grads(ours, ids, mask), _logits_and_grads(eager, ids, mask), mask)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))


def test_gemma2_sliding_layers_decode_with_selfattn_cache():
    """make_cache on a model with sliding-window layers: a prompt longer than
    the window, then tokens one by one, give eager's logits (with
    transformers' own DynamicCache) at every step; the window matters here."""
    from transformers.cache_utils import DynamicCache

    from selfattn.integrations.transformers import make_cache

    ids = _ids(2, 16, seed=3)

    def steps(model, cache):
        logits = [model(ids[:, :9], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(9, 16):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache,
                                use_cache=True).logits[:, -1])
        return torch.stack(logits, 1)

    eager, ours, wide = _gemma("eager"), _gemma(NAME), _gemma("eager", sliding_window=64)
    with torch.no_grad():
        want = steps(eager, DynamicCache(config=eager.config))
        got = steps(ours, make_cache(ours.config, 16))
        unwindowed = steps(wide, DynamicCache(config=wide.config))
    _close(got, want, 1e-5)
    assert (unwindowed - want).abs().max() > 1e-2
    with pytest.raises(ValueError, match="full and sliding-window"):
        make_cache(transformers.Gemma2Config(**dict(GEMMA, layer_types=[
            "chunked_attention", "full_attention"])), 16)


# ---------------------------------------------------------------------------
# ALiBi slopes passed through the attention kwargs.

def _eager_with_alibi(module, query, key, value, attention_mask, alibi_slopes=None, **kwargs):
    """The oracle: LLaMA's eager attention with the dense ALiBi bias
    -slope * |i + Sk - Sq - j| added to its float mask."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    Sq, Sk = query.shape[2], key.shape[2]
    bias = reference.alibi_bias(alibi_slopes, Sq, Sk, Sk - Sq, query.dtype)
    if attention_mask is None:
        causal = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
        attention_mask = torch.zeros(Sq, Sk, dtype=query.dtype).masked_fill(~causal, float("-inf"))
    return eager_attention_forward(module, query, key, value, attention_mask + bias, **kwargs)


transformers.AttentionInterface.register("eager_alibi_oracle", _eager_with_alibi)
transformers.masking_utils.AttentionMaskInterface.register(
    "eager_alibi_oracle", transformers.masking_utils.eager_mask)

LLAMA = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_h", "slopes_bh"])
def test_alibi_slopes_through_the_kwargs(per_batch):
    oracle = _model(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                    "eager_alibi_oracle", **LLAMA)
    ours = _model(transformers.LlamaConfig, transformers.LlamaForCausalLM, NAME, **LLAMA)
    shape = (2, 4) if per_batch else (4,)
    slopes = 0.1 + torch.rand(shape, generator=torch.Generator().manual_seed(2))
    ids = _ids(2, 10, seed=5)
    _assert_same(_logits_and_grads(ours, ids, alibi_slopes=slopes),
                 _logits_and_grads(oracle, ids, alibi_slopes=slopes))
    # a cached decoding step: the new query is the last position
    with torch.no_grad():
        logits = []
        for m in (ours, oracle):
            cache = m(input_ids=ids[:, :7], use_cache=True, alibi_slopes=slopes).past_key_values
            step = m(input_ids=ids[:, 7:8], past_key_values=cache, alibi_slopes=slopes)
            logits.append(step.logits)
    _close(logits[0], logits[1], 1e-5)
    # the slopes matter here
    with torch.no_grad():
        plain = ours(input_ids=ids).logits
    assert not torch.allclose(plain, _logits_and_grads(ours, ids, alibi_slopes=slopes)[0],
                              atol=1e-3)


def test_causal_prefill_of_a_longer_cache_crops_the_keys():
    """is_causal without a mask and more keys than queries (the prefill of an
    empty static cache): as SDPA, the queries see keys 0..i only."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=F64)
    k, v = (torch.randn(2, 4, 10, 8, generator=g, dtype=F64) for _ in range(2))
    ours, _ = selfattn_attention_forward(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(ours, want)


def test_attention_sinks_are_refused():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="attention sinks"):
        selfattn_attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))
