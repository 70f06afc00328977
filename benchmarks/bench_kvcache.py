"""One decoding step (one new token per sequence) on CPU: selfattn's
preallocated KV cache against what a user has without it, in one process,
interleaved rounds, medians (selfattn._measure).

  kvcache        selfattn.attention_with_kvcache: append the new k, v in place
                 at cache_seqlens, attend to the valid prefix
  kvcache paged  the same cache as a pool of pages of PAGE keys in shuffled
                 order, read through the block table
  sdpa concat    the Hugging Face way: torch.cat the new k, v to the cache
                 (a new cache each step), then F.scaled_dot_product_attention
                 (enable_gqa)
  sdpa prealloc  a preallocated (B, H, S_max, D) cache written in place, then
                 SDPA with a bool mask of the valid keys

Hq = 32, Hkv = 8, D = 128, bfloat16; cache lengths 1k, 8k, 32k; batch 1 and
8. Names the CPU and selfattn's CPU kernel module.

    python benchmarks/bench_kvcache.py [--out results.md] [--rounds 5]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import selfattn
from selfattn import ops
from selfattn._measure import cpu_name, median_seconds

HQ, HKV, D = 32, 8, 128
PAGE = 16  # vLLM's default block size
DTYPE = torch.bfloat16


def calls(B, L):
    """One step at cache length L (L - 1 tokens cached, one new)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DTYPE)

    q, k_new, v_new = r(B, 1, HQ, D), r(B, 1, HKV, D), r(B, 1, HKV, D)
    k_cache, v_cache = r(B, L, HKV, D), r(B, L, HKV, D)  # selfattn's (B, S, H, D) cache
    k_prefix = k_cache[:, :L - 1].transpose(1, 2).contiguous()  # HF's (B, H, S, D) cache
    v_prefix = v_cache[:, :L - 1].transpose(1, 2).contiguous()
    k_pre, v_pre = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_new, v_new))
    valid = torch.ones(B, 1, 1, L, dtype=torch.bool)
    per = -(-L // PAGE)
    table = torch.randperm(B * per, generator=g).view(B, per).to(torch.int32)
    k_pool, v_pool = (torch.empty(B * per * PAGE, HKV, D, dtype=DTYPE) for _ in range(2))
    for pool, cache in ((k_pool, k_cache), (v_pool, v_cache)):  # pool rows of sequence b, page i
        rows = (table.long().unsqueeze(-1) * PAGE + torch.arange(PAGE)).flatten(1)[:, :L]
        pool[rows] = cache
    k_pool, v_pool = (t.view(B * per, PAGE, HKV, D) for t in (k_pool, v_pool))

    def kvcache():
        return selfattn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                               cache_seqlens=L - 1)

    def paged():
        return selfattn.attention_with_kvcache(q, k_pool, v_pool, k_new, v_new,
                                               cache_seqlens=L - 1, block_table=table)

    def concat():
        k_all = torch.cat([k_prefix, kt], dim=2)
        v_all = torch.cat([v_prefix, vt], dim=2)
        return F.scaled_dot_product_attention(qt, k_all, v_all, enable_gqa=True)

    def prealloc():
        k_pre[:, :, L - 1:L] = kt
        v_pre[:, :, L - 1:L] = vt
        return F.scaled_dot_product_attention(qt, k_pre, v_pre, attn_mask=valid, enable_gqa=True)

    return {"kvcache": kvcache, "kvcache paged": paged, "sdpa concat": concat,
            "sdpa prealloc": prealloc}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="also write the table to this file")
    a = ap.parse_args()
    lines = [
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; selfattn CPU module "
        f"{ops.CPU_KERNELS}; torch {torch.__version__}",
        f"one decoding step, Hq = {HQ}, Hkv = {HKV}, D = {D}, bfloat16; median ms of "
        "interleaved rounds",
        "",
        f"| B | cache length | kvcache ms | kvcache paged ({PAGE}) ms | sdpa concat ms | "
        "sdpa prealloc ms | best sdpa / kvcache | best sdpa / paged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with torch.inference_mode():
        for B in (1, 8):
            for L in (1024, 8192, 32768):
                t = median_seconds(calls(B, L), rounds=a.rounds, min_run_time=0.2)
                best = min(t["sdpa concat"], t["sdpa prealloc"])
                lines.append(f"| {B} | {L} | {1e3 * t['kvcache']:.2f} | "
                             f"{1e3 * t['kvcache paged']:.2f} | "
                             f"{1e3 * t['sdpa concat']:.2f} | {1e3 * t['sdpa prealloc']:.2f} | "
                             f"{best / t['kvcache']:.2f} | {best / t['kvcache paged']:.2f} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
