"""Greedy generation with the small GPT of examples/train_gpt.py, with and
without selfattn's KV cache (selfattn.nn.KVCache: keys and values written in
place, each step attends one new token to the cache), in one process: both
must give the same tokens, and it prints tokens per second of each.

    python examples/generate.py                       # random weights, 256 new tokens
    python examples/generate.py --new 512 --d-model 256 --n-layer 4

Without a cache each step re-runs the whole sequence so far (O(S) tokens of
work per new token); with it a step runs the new token only.
"""
from __future__ import annotations

import argparse
import time

import torch

from selfattn import nn as sa
from train_gpt import GPT


def step_with_cache(model, ids, caches):
    """Logits of the last of `ids` (B, n) given the caches of the tokens before."""
    x = model.embed(ids)
    for block, cache in zip(model.blocks, caches):
        x = x + block.attn(block.ln1(x), cache=cache)
        x = x + block.mlp(block.ln2(x))
    return (model.ln_f(x) @ model.embed.weight.T)[:, -1]


@torch.inference_mode()
def generate(model, prompt, new, cached):
    ids = prompt
    caches = None
    if cached:
        attn = model.blocks[0].attn
        caches = [sa.KVCache(prompt.shape[0], prompt.shape[1] + new, attn.num_kv_heads,
                             attn.head_dim) for _ in model.blocks]
        logits = step_with_cache(model, prompt, caches)
    for i in range(new):
        if not cached:
            logits = model(ids)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if cached and i + 1 < new:
            logits = step_with_cache(model, nxt, caches)
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new", type=int, default=256, help="tokens to generate")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = GPT(args.vocab, args.d_model, args.n_head, args.n_layer).eval()
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt))
    results = {}
    for cached in (False, True):
        start = time.perf_counter()
        ids = generate(model, prompt, args.new, cached)
        seconds = time.perf_counter() - start
        results[cached] = ids
        name = "selfattn KV cache" if cached else "no cache (re-run the sequence)"
        print(f"{name:32s} {args.batch * args.new / seconds:10.1f} tokens/s")
    same = torch.equal(results[False], results[True])
    print(f"same tokens: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
