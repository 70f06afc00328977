"""What the score modifiers (ALiBi slopes, logit soft-capping) cost on CPU.

For each point (dtype, S with B·S fixed, H = 8, D, causal) it times, in
interleaved rounds (selfattn._measure: torch.utils.benchmark, medians), the
forward and forward+backward of

  plain    selfattn.attention
  alibi    ... with alibi_slopes (Hq,)
  softcap  ... with softcap=30
  both     ... with both
  sdpa     F.scaled_dot_product_attention given the ALiBi bias as a dense float
           mask (B, H, S, S), built inside the timed call: what a user has
           without in-kernel ALiBi (it also carries the causal mask then)

and reports the times, each modifier's cost against `plain` (the issue's
target: under 10% at S >= 1024, D = 64 and 128) and peak memory against
`sdpa`'s. Names the CPU and selfattn's CPU kernel module.

    python benchmarks/bench_modifiers.py                  # the grid below
    python benchmarks/bench_modifiers.py --quick          # one point
    python benchmarks/bench_modifiers.py --lengths 1024   # S = 1024 only
    python benchmarks/bench_modifiers.py --out results.md
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import selfattn
from selfattn import ops
from selfattn._measure import Progress, cpu_name, median_seconds, peak_bytes, with_backward

VARIANTS = ("plain", "alibi", "softcap", "both", "sdpa")
TOKENS, HEADS, SOFTCAP = 4096, 8, 30.0


def alibi_slopes(H):
    """The ALiBi paper's geometric slopes 2^(-8 (h + 1) / H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])


def dense_alibi_mask(slopes, S, causal, dtype):
    """(H, S, S) float mask: -slope * |i - j|, -inf above the diagonal when causal."""
    i = torch.arange(S).view(-1, 1)
    bias = -slopes.view(-1, 1, 1) * (i - torch.arange(S).view(1, -1)).abs()
    if causal:
        bias = bias.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return bias.to(dtype)


def calls(dtype, S, D, causal, backward):
    B = TOKENS // S
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, HEADS, D, generator=g).to(dtype).requires_grad_(backward)
               for _ in range(3))
    s = alibi_slopes(HEADS)
    kw = dict(plain={}, alibi=dict(alibi_slopes=s), softcap=dict(softcap=SOFTCAP),
              both=dict(alibi_slopes=s, softcap=SOFTCAP))
    fns = {name: (lambda kw=kw[name]: selfattn.attention(q, k, v, causal=causal, **kw))
           for name in kw}
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(backward)
                  for t in (q, k, v))
    # the mask is built in the call: a model has to build (or keep) it
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=dense_alibi_mask(s, S, causal, dtype))
    if backward:
        fns = {name: with_backward(fn) for name, fn in fns.items()}
    return fns


def run(points, rounds):
    rows = []
    progress = Progress(len(points))
    for dtype, S, D, causal, backward in points:
        fns = calls(dtype, S, D, causal, backward)
        times = median_seconds(fns, rounds=rounds, min_run_time=0.3)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
        rows.append((dtype, S, D, causal, backward, times, peaks))
        progress.step(f"{dtype} S={S} D={D}")
    return rows


def report(rows):
    lines = [
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; selfattn CPU module "
        f"{ops.CPU_KERNELS}; torch {torch.__version__}",
        f"B·S = {TOKENS}, H = {HEADS}, softcap = {SOFTCAP:g}, ALiBi slopes 2^(-8(h+1)/H); "
        "median ms; cost = time / plain - 1; memory = peak / sdpa's peak",
        "",
        "| dtype | S | D | causal | pass | plain ms | alibi | softcap | both | sdpa + dense ALiBi "
        "mask | peak MiB both / sdpa |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dtype, S, D, causal, backward, t, m in rows:
        cost = {n: f"{100 * (t[n] / t['plain'] - 1):+.1f}%" for n in ("alibi", "softcap", "both")}
        mem = "n/a"
        if m["both"] is not None and m["sdpa"]:
            mem = f"{m['both'] / 2**20:.1f} / {m['sdpa'] / 2**20:.1f}"
        lines.append(
            f"| {str(dtype).replace('torch.', '')} | {S} | {D} | {causal} | "
            f"{'fwd+bwd' if backward else 'fwd'} | {1e3 * t['plain']:.1f} | {cost['alibi']} | "
            f"{cost['softcap']} | {cost['both']} | {1e3 * t['sdpa']:.1f} "
            f"({t['sdpa'] / t['both']:.2f}x both) | {mem} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one point")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per point")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048],
                    help="sequence lengths S of the grid")
    ap.add_argument("--out", help="also write the table to this file")
    a = ap.parse_args()
    if a.quick:
        points = [(torch.float32, 1024, 64, True, False)]
    else:
        points = [(dt, S, D, causal, bwd) for dt in (torch.float32, torch.bfloat16)
                  for S in a.lengths for D in (64, 128) for causal in (True, False)
                  for bwd in (False, True)]
    table = report(run(points, a.rounds))
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
