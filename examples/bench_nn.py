"""Time and peak memory of selfattn.nn layers against torch's, forward + backward
(float32, CPU), as ratios from one run.

    python examples/bench_nn.py                     # batch 8, S 1024, d_model 512, 8 heads
    python examples/bench_nn.py --seq 256 --batch 2 # smaller

Cases: MultiheadAttention self-attention with need_weights=False (torch runs
SDPA's fused CPU kernel) and need_weights=True (torch's default: the math path,
returning the weights), and TransformerEncoderLayer (post-norm, ReLU, dropout
0). Both modules of a pair hold the same weights and see the same inputs.

Time: medians of torch.utils.benchmark runs, selfattn and torch alternating
for three rounds so that drifting machine load hits both
(selfattn._measure.median_seconds, as in benchmarks/bench_attention.py). Peak
memory: each case runs once in a fresh subprocess, which resets its peak
resident set (VmHWM, via /proc/self/clear_refs) before the step and reports
how far the step raised it (selfattn._measure.peak_bytes): everything the step
allocates (activations saved for backward, temporaries, gradients), which
torch's own counters do not offer on CPU. Linux only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from selfattn import nn as sa
from selfattn._measure import median_seconds, peak_bytes

CASES = {
    "MultiheadAttention need_weights=False": ("mha", False),
    "MultiheadAttention need_weights=True": ("mha", True),
    "TransformerEncoderLayer": ("encoder", False),
}


def build(kind, impl, args):
    """(module, step): step() runs one forward + backward on fixed inputs."""
    torch.manual_seed(0)
    E, H = args.d_model, args.heads
    if kind == "mha":
        cls = sa.MultiheadAttention if impl == "selfattn" else torch.nn.MultiheadAttention
        module = cls(E, H, batch_first=True)
    else:
        cls = sa.TransformerEncoderLayer if impl == "selfattn" else torch.nn.TransformerEncoderLayer
        module = cls(E, H, 4 * E, dropout=0.0, batch_first=True)
    x = torch.randn(args.batch, args.seq, E, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    return module, x


def step_fn(kind, need_weights, module, x):
    if kind == "mha":
        def step():
            out, _ = module(x, x, x, need_weights=need_weights)
            out.sum().backward()
    else:
        def step():
            module(x).sum().backward()
    return step


def peak_memory_child(case, impl, args):
    """Runs in a subprocess: MiB the peak RSS grows during one step."""
    kind, need_weights = CASES[case]
    return peak_bytes(step_fn(kind, need_weights, *build(kind, impl, args))) / 2**20


def peak_memory(case, impl, args):
    cmd = [sys.executable, __file__, "--memory-child", case, impl, "--batch", str(args.batch),
           "--seq", str(args.seq), "--d-model", str(args.d_model), "--heads", str(args.heads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_pair(case, args, rounds=3):
    """Median seconds per step of (selfattn, torch), alternating."""
    kind, need_weights = CASES[case]
    t = median_seconds({impl: step_fn(kind, need_weights, *build(kind, impl, args))
                        for impl in ("selfattn", "torch")},
                       rounds=rounds, min_run_time=args.min_run_time)
    return t["selfattn"], t["torch"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timing block")
    p.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(peak_memory_child(*args.memory_child, args)))
        return
    print(f"float32 forward+backward, batch {args.batch}, S {args.seq}, d_model {args.d_model}, "
          f"{args.heads} heads, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'case':40} {'selfattn':>10} {'torch':>10} {'ratio':>7}   {'selfattn':>9} "
          f"{'torch':>9} {'ratio':>7}")
    print(f"{'':40} {'time (ms)':>21} {'':>7}   {'peak mem (MiB)':>19}")
    for case in CASES:
        t_ours, t_torch = time_pair(case, args)
        m_ours, m_torch = peak_memory(case, "selfattn", args), peak_memory(case, "torch", args)
        print(f"{case:40} {t_ours * 1e3:10.1f} {t_torch * 1e3:10.1f} {t_ours / t_torch:7.2f}   "
              f"{m_ours:9.0f} {m_torch:9.0f} {m_ours / m_torch:7.2f}")
    print("ratio = selfattn / torch (below 1: selfattn faster / smaller)")


if __name__ == "__main__":
    main()
