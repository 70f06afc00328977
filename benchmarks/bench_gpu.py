"""GPU benchmark of selfattn.attention against torch's attention kernels.

    python benchmarks/bench_gpu.py OUT_DIR [--seqlens 512,2048,8192,16384] [--quick]

Forward and backward are timed separately (the backward alone, as
autograd.grad over a retained graph). Peers, in the same process on the same
inputs, interleaved round by round: SDPA's flash, cuDNN, efficient and math
backends and FlexAttention (torch.compile'd); each in its native layout
((B, S, H, D) for selfattn, (B, H, S, D) for the others). Grid: bfloat16 and
float16, D in {64, 128}, S in 512..16384 with B * S = 16384 tokens and
2048 hidden (H = 2048 / D), causal and not.

FLOPs (DESIGN.md section 6): forward 4 * B * H * S^2 * D, halved when causal;
backward 2.5 x forward. Times are medians of triton.testing.do_bench (CUDA
events, L2 flushed between runs) over 3 interleaved rounds. Writes
OUT_DIR/bench_gpu.json and OUT_DIR/bench_gpu.md and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import selfattn  # noqa: E402  (the in-place build of this checkout)

# FlexAttention is compiled once per shape: allow one compile per config.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)

SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
MATH_MAX_S = 4096  # the math path materializes B * H * S^2 scores


def bench_ms(fn) -> float:
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    except ImportError:
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        times = []
        for _ in range(25):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times[5:])


def providers(cfg):
    """name -> builder; a builder returns (fwd, bwd) callables on fresh inputs, or raises."""
    B, S, H, D, dtype, causal = (cfg[k] for k in ("B", "S", "H", "D", "dtype", "causal"))

    def make(layout_bshd):
        shape = (B, S, H, D) if layout_bshd else (B, H, S, D)
        xs = [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
        return xs, torch.randn(shape, device="cuda", dtype=dtype)

    def pair(f, xs, dout):
        out = f(*xs)
        return (lambda: f(*xs)), (lambda: torch.autograd.grad(out, xs, dout, retain_graph=True))

    def ours():
        xs, dout = make(True)
        return pair(lambda q, k, v: selfattn.attention(q, k, v, causal=causal), xs, dout)

    def sdpa(backend):
        def build():
            if backend == SDPBackend.MATH and S > MATH_MAX_S:
                raise RuntimeError(f"skipped: S > {MATH_MAX_S}")
            xs, dout = make(False)

            def f(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            return pair(f, xs, dout)
        return build

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        xs, dout = make(False)
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S)
        compiled = torch.compile(flex_attention, dynamic=False)
        return pair(lambda q, k, v: compiled(q, k, v, block_mask=block_mask), xs, dout)

    table = {"selfattn": ours, "flex": flex}
    table.update({name: sdpa(b) for name, b in SDPA_BACKENDS.items()})
    return table


def run_config(cfg, rounds=3):
    flops_fwd = 4 * cfg["B"] * cfg["H"] * cfg["S"] ** 2 * cfg["D"] * (0.5 if cfg["causal"] else 1)
    result = {"config": {**cfg, "dtype": str(cfg["dtype"]).replace("torch.", "")},
              "flops_fwd": flops_fwd, "flops_bwd": 2.5 * flops_fwd, "providers": {}}
    fns, times = {}, {}
    for name, build in providers(cfg).items():
        try:
            fwd, bwd = build()
            fwd(), bwd()
            torch.cuda.synchronize()
            fns[name] = (fwd, bwd)
            times[name] = {"fwd": [], "bwd": []}
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape
            result["providers"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    for _ in range(rounds):  # interleaved: every provider once per round
        for name, (fwd, bwd) in fns.items():
            times[name]["fwd"].append(bench_ms(fwd))
            times[name]["bwd"].append(bench_ms(bwd))
    for name, t in times.items():
        fwd_ms, bwd_ms = statistics.median(t["fwd"]), statistics.median(t["bwd"])
        result["providers"][name] = {
            "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
            "fwd_tflops": flops_fwd / fwd_ms / 1e9, "bwd_tflops": 2.5 * flops_fwd / bwd_ms / 1e9}
    del fns
    torch.cuda.empty_cache()
    return result


def markdown(results, device):
    peers = ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex"]
    lines = [f"GPU attention benchmark on {device}: TFLOP/s of selfattn and its ratio to each "
             "peer (selfattn / peer; > 1 = selfattn faster; - = peer unavailable)", "",
             "| dtype | D | S | B | H | causal | pass | selfattn TFLOP/s | "
             + " | ".join(peers) + " |",
             "|" + "---|" * (8 + len(peers))]
    for r in results:
        c, prov = r["config"], r["providers"]
        ours = prov.get("selfattn", {})
        for pas in ("fwd", "bwd"):
            if f"{pas}_ms" not in ours:
                lines.append(f"| {c['dtype']} | {c['D']} | {c['S']} | {c['B']} | {c['H']} | "
                             f"{c['causal']} | {pas} | error: {ours.get('error', '?')} |")
                continue
            ratios = []
            for p in peers:
                t = prov.get(p, {}).get(f"{pas}_ms")
                ratios.append(f"{t / ours[f'{pas}_ms']:.2f}" if t else "-")
            lines.append(f"| {c['dtype']} | {c['D']} | {c['S']} | {c['B']} | {c['H']} | "
                         f"{c['causal']} | {pas} | {ours[f'{pas}_tflops']:.1f} | "
                         + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--time-budget", type=float, default=1e9,
                    help="seconds; configs not started within it are skipped")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    device = torch.cuda.get_device_name()
    start = time.time()
    results = []
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        for D in (int(d) for d in args.head_dims.split(",")):
            for S in (int(s) for s in args.seqlens.split(",")):
                for causal in (False, True):
                    cfg = dict(B=max(1, 16384 // S), S=S, H=2048 // D, D=D, dtype=dtype,
                               causal=causal)
                    if time.time() - start > args.time_budget:
                        print(f"time budget spent, skipping {cfg}", file=sys.stderr)
                        continue
                    r = run_config(cfg)
                    results.append(r)
                    ours = r["providers"].get("selfattn", {})
                    print(f"{cfg['dtype']} D={D} S={S} causal={causal}: "
                          f"fwd {ours.get('fwd_tflops', float('nan')):.1f} "
                          f"bwd {ours.get('bwd_tflops', float('nan')):.1f} TFLOP/s",
                          file=sys.stderr, flush=True)
    with open(os.path.join(args.out_dir, "bench_gpu.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "results": results}, f, indent=1)
    table = markdown(results, device)
    with open(os.path.join(args.out_dir, "bench_gpu.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
