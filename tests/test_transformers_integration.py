"""attn_implementation="selfattn" in Hugging Face transformers: small randomly
initialised GPT-2, LLaMA (GQA + RoPE) and BERT (padding) models built from
configs (no hub access), in float64, must give eager's logits and gradients
(to 1e-5: some models' eager softmax rounds to float32) and sdpa's (to 1e-9),
and generation with a KV cache must give eager's tokens. Skipped without
transformers."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfattn.integrations.transformers import NAME, register  # noqa: E402

register()


def _models(config_cls, model_cls, **cfg):
    """The same randomly initialised float64 model with eager, sdpa and selfattn
    attention."""
    models = []
    for impl in ("eager", "sdpa", NAME):
        torch.manual_seed(0)
        m = model_cls(config_cls(**cfg)).to(torch.float64)
        m.set_attn_implementation(impl)
        assert m.config._attn_implementation == impl
        models.append(m.eval())
    return models


def _logits_and_grads(model, mask, **inputs):
    """Logits and parameter gradients for a random cotangent that is zero on
    padded positions (whose outputs are arbitrary: eager gives them uniform
    attention, selfattn zeros)."""
    model.zero_grad()
    logits = model(**inputs).logits
    g = torch.Generator().manual_seed(0)
    cotangent = torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    if mask is not None:
        cotangent = cotangent * mask.unsqueeze(-1)
    (logits * cotangent).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def _assert_same(models, mask=None, with_eager=True, **inputs):
    (le, ge), (ls, gs), (lo, go) = (_logits_and_grads(m, mask, **inputs) for m in models)
    if mask is not None:
        le, ls, lo = le[mask], ls[mask], lo[mask]
    for (lr, gr), tol in (((le, ge), 1e-5), ((ls, gs), 1e-9))[0 if with_eager else 1:]:
        torch.testing.assert_close(lo, lr, atol=tol, rtol=tol)
        assert gr.keys() == go.keys()
        for name in gr:
            torch.testing.assert_close(go[name], gr[name], atol=tol, rtol=tol, msg=name)


def _ids(B, S, vocab, seed=0):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def test_gpt2_causal_lm():
    models = _models(transformers.GPT2Config, transformers.GPT2LMHeadModel, vocab_size=97,
                     bos_token_id=1, eos_token_id=2, n_positions=64, n_embd=32, n_layer=2,
                     n_head=4)
    ids = _ids(2, 12, 97)
    _assert_same(models, input_ids=ids)
    # left padding, as in batched generation
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    _assert_same(models, mask=mask.bool(), input_ids=ids, attention_mask=mask)


def test_llama_gqa_rope_and_generation():
    models = _models(transformers.LlamaConfig, transformers.LlamaForCausalLM, vocab_size=101,
                     hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = _ids(2, 10, 101)
    _assert_same(models, input_ids=ids)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    # LLaMA's eager path turns a float64 padded row into NaN (float64 min mask,
    # float32 softmax), which then spreads: compare with sdpa only here.
    _assert_same(models, mask=mask.bool(), with_eager=False, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        eager, _, ours = models
        torch.testing.assert_close(ours.generate(ids[:, :5], **kw), eager.generate(ids[:, :5], **kw))


def test_bert_encoder_with_padding():
    models = _models(transformers.BertConfig, transformers.BertForMaskedLM, vocab_size=90,
                     hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    ids = _ids(3, 9, 90)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    _assert_same(models, mask=mask.bool(), input_ids=ids, attention_mask=mask)
    _assert_same(models, input_ids=ids)


def test_llama_packed_batch_runs_varlen():
    """Padding-free packed training: three sequences in one row with restarting
    position_ids, as DataCollatorWithFlattening builds them, no cache.
    selfattn runs the packed varlen op and its logits and gradients equal the
    sdpa model's on the same packed row (transformers builds sdpa a
    block-diagonal causal mask there), and each sequence's logits equal the
    model run on that sequence alone; with the flash-attention kwargs
    (cu_seq_lens_q/k) the same. With a cache transformers does not pack, and
    neither does selfattn."""
    _, sdpa, ours = _models(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                            vocab_size=101, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
    lengths = [5, 9, 3]
    ids = _ids(1, sum(lengths), 101)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.profiler.profile() as prof:
        logits, grads = _logits_and_grads(ours, None, input_ids=ids, position_ids=position_ids,
                                          use_cache=False)
    assert "selfattn::varlen_forward" in {e.name for e in prof.events()}
    ref_logits, ref_grads = _logits_and_grads(sdpa, None, input_ids=ids,
                                              position_ids=position_ids, use_cache=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-9, rtol=1e-9)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-9, rtol=1e-9, msg=name)
    start = 0
    with torch.no_grad():
        for n in lengths:
            alone = ours(input_ids=ids[:, start:start + n]).logits
            torch.testing.assert_close(logits[:, start:start + n], alone, atol=1e-9, rtol=1e-9)
            start += n
        cu = torch.tensor([0, 5, 14, 17])
        explicit = ours(input_ids=ids, position_ids=position_ids, use_cache=False,
                        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9).logits
        torch.testing.assert_close(explicit, logits, atol=1e-9, rtol=1e-9)
        cached = [m(input_ids=ids, position_ids=position_ids).logits for m in (ours, sdpa)]
        torch.testing.assert_close(*cached, atol=1e-9, rtol=1e-9)


def test_generation_with_selfattn_cache_writes_in_place():
    """make_cache: greedy generation gives eager's tokens (with transformers'
    own DynamicCache), the layers' buffers never move (no per-step copy), and
    a prompt that does not fit is refused."""
    from selfattn.integrations.transformers import make_cache

    eager, _, ours = _models(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                             vocab_size=101, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
    ids = _ids(2, 5, 101)
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    cache = make_cache(ours.config, 16)
    with torch.no_grad():
        want = eager.generate(ids, **kw)
        ours(ids[:, :1], past_key_values=cache, use_cache=True)  # allocates the buffers
        ptrs = [(layer._k.data_ptr(), layer._v.data_ptr()) for layer in cache.layers]
        cache.reset()
        got = ours.generate(ids, past_key_values=cache, **kw)
    torch.testing.assert_close(got, want)
    assert [(layer._k.data_ptr(), layer._v.data_ptr()) for layer in cache.layers] == ptrs
    assert cache.get_seq_length() == 5 + 7 - 1
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len = 4"):
        ours.generate(ids, past_key_values=make_cache(ours.config, 4), **kw)
    with pytest.raises(ValueError, match="max_cache_len must be"):
        make_cache(ours.config, 0)
