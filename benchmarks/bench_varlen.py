"""Packed variable-length attention against what a user has without it, on CPU.

One batch of 16 sequences whose lengths follow a long tail from 32 to 4096
tokens (the issue's example), H = 8, D = 64, causal, forward and
forward+backward, in interleaved rounds (selfattn._measure: medians):

  varlen     selfattn.varlen_attention on the packed (T, H, D) tensors
  sdpa pad   F.scaled_dot_product_attention on the batch padded to the
             longest sequence, is_causal=True and no mask (the padding sits
             after each sequence, so causality hides it from the real rows:
             torch's fastest path for this batch; the padded rows' outputs
             are computed and thrown away)
  loop       selfattn.attention called once per sequence (what a user could
             write today without the packed op)

Reports time, time per real token, the ratio to `sdpa pad` and peak memory;
names the CPU and selfattn's CPU kernel module.

    python benchmarks/bench_varlen.py [--out results.md] [--rounds 5]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

import selfattn
from selfattn import ops
from selfattn._measure import cpu_name, median_seconds, peak_bytes, with_backward

H, D = 8, 64
# 16 lengths from 32 to 4096 with a long tail (most short, a few long)
LENGTHS = [32, 37, 45, 52, 64, 80, 96, 128, 160, 200, 256, 384, 512, 1024, 2048, 4096]


def calls(dtype, backward):
    g = torch.Generator().manual_seed(0)
    T, S, B = sum(LENGTHS), max(LENGTHS), len(LENGTHS)
    q, k, v = (torch.randn(T, H, D, generator=g).to(dtype).requires_grad_(backward)
               for _ in range(3))
    cu = torch.tensor([0] + list(itertools.accumulate(LENGTHS)), dtype=torch.int32)

    def padded(t):  # (T, H, D) -> (B, H, S, D), zeros after each sequence
        out = t.new_zeros(B, S, H, D)
        for b, (s, n) in enumerate(zip(cu.tolist(), LENGTHS)):
            out[b, :n] = t[s:s + n]
        return out.transpose(1, 2)

    qp, kp, vp = (padded(t.detach()).requires_grad_(backward) for t in (q, k, v))

    def sdpa_pad():  # the padding sits after each sequence: causality hides it from real rows
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)

    def loop():
        outs = [selfattn.attention(q[s:s + n][None], k[s:s + n][None], v[s:s + n][None],
                                   causal=True)[0]
                for s, n in zip(cu.tolist(), LENGTHS)]
        return torch.cat(outs)

    fns = {
        "varlen": lambda: selfattn.varlen_attention(q, k, v, cu, cu, S, S, window_size=(-1, 0)),
        "sdpa pad": sdpa_pad,
        "loop": loop,
    }
    return {n: with_backward(fn) for n, fn in fns.items()} if backward else fns


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="also write the table to this file")
    a = ap.parse_args()
    T = sum(LENGTHS)
    lines = [
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; selfattn CPU module "
        f"{ops.CPU_KERNELS}; torch {torch.__version__}",
        f"16 sequences, lengths {LENGTHS[0]} to {LENGTHS[-1]} ({T} real tokens; padded: "
        f"{len(LENGTHS) * max(LENGTHS)}), H = {H}, D = {D}, causal; median ms of interleaved "
        "rounds; peak MiB of one call",
        "",
        "| dtype | pass | varlen ms | sdpa pad ms | loop ms | varlen / sdpa pad | "
        "µs per real token (varlen) | peak MiB varlen / sdpa pad |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for backward in (False, True):
            fns = calls(dtype, backward)
            t = median_seconds(fns, rounds=a.rounds, min_run_time=0.3)
            m = {n: peak_bytes(fn) for n, fn in fns.items()}
            lines.append(
                f"| {str(dtype).replace('torch.', '')} | {'fwd+bwd' if backward else 'fwd'} | "
                f"{1e3 * t['varlen']:.1f} | {1e3 * t['sdpa pad']:.1f} | {1e3 * t['loop']:.1f} | "
                f"{t['varlen'] / t['sdpa pad']:.2f} | {1e6 * t['varlen'] / T:.1f} | "
                f"{m['varlen'] / 2**20:.0f} / {m['sdpa pad'] / 2**20:.0f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
