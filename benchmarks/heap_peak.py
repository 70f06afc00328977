"""Exact heap memory of selfattn's CPU forward against torch's SDPA.

bench_attention.py reads peak memory from the resident set, which moves in
pages; on this project's machine repeated readings of one call spread over
about 0.4 MiB, more than the two libraries differ by at S = 512. This script
counts bytes instead: it compiles benchmarks/malloc_peak.c, re-runs itself
with it preloaded and reports, per point,
  - per call: the peak of heap bytes held during a warm call beyond those held
    before it, less the output tensor (so: statistics, scratch, tiles);
  - kept: heap bytes still held after the first call of a fresh process beyond
    those held before it (buffers kept between calls: MKL's, oneDNN's,
    selfattn's TileCache).
Usage: python benchmarks/heap_peak.py [--tokens 4096] [--heads 8]
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
POINTS = [(S, D, dtype) for dtype in ("float32", "bfloat16") for D in (64, 128)
          for S in (512, 1024, 4096)]


def _library() -> str:
    out = os.path.join(tempfile.gettempdir(), f"selfattn_malloc_peak_{os.getuid()}.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", out,
                    os.path.join(HERE, "malloc_peak.c")], check=True)
    return out


def _run(args, library):
    env = dict(os.environ, LD_PRELOAD=library)
    proc = subprocess.run([sys.executable, __file__, *args], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inputs(S, D, dtype, tokens, heads):
    torch.manual_seed(0)
    B = max(1, tokens // S)
    q, k, v = (torch.randn(B, S, heads, D, dtype=getattr(torch, dtype)) for _ in range(3))
    return q, k, v


def _callable(name, q, k, v):
    import torch.nn.functional as F
    import selfattn
    if name == "selfattn":
        return lambda: selfattn.attention(q, k, v)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: F.scaled_dot_product_attention(qt, kt, vt)


def _count(mode, name, S, D, dtype, tokens, heads):
    """Runs under the preloaded counter."""
    lib = ctypes.CDLL(None)
    for fn in (lib.malloc_peak_reset, lib.malloc_peak_get, lib.malloc_held_get):
        fn.restype = ctypes.c_long
    q, k, v = _inputs(S, D, dtype, tokens, heads)
    fn = _callable(name, q, k, v)
    if mode == "kept":
        before = lib.malloc_held_get()
        out = fn()
        del out
        return {"bytes": lib.malloc_held_get() - before}
    fn(), fn()
    peaks = []
    for _ in range(3):
        before = lib.malloc_peak_reset()
        out = fn()
        peaks.append(lib.malloc_peak_get() - before - out.numel() * out.element_size())
        del out
    return {"bytes": max(peaks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="B·S")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.measure:
        mode, name, S, D, dtype = a.measure
        print(json.dumps(_count(mode, name, int(S), int(D), dtype, a.tokens, a.heads)))
        return
    library = _library()
    common = ["--tokens", str(a.tokens), "--heads", str(a.heads), "--measure"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    print("# Heap memory of the CPU forward: selfattn against SDPA\n")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"- date: {date}\n- torch: {torch.__version__}"
          f"\n- threads: {torch.get_num_threads()}\n- commit: {commit}\n")
    print("Bytes held through malloc (counted exactly by benchmarks/malloc_peak.c). Per call: "
          "peak during a warm call beyond what was held before it, less the output. Kept: "
          "still held after the first call of a fresh process.\n")
    print("| case | B | per call, selfattn KiB | per call, sdpa KiB | kept, selfattn KiB | "
          "kept, sdpa KiB |")
    print("|---|---|---|---|---|---|")
    for S, D, dtype in POINTS:
        kib = {(mode, name): _run(common + [mode, name, str(S), str(D), dtype], library)["bytes"]
               / 1024 for mode in ("call", "kept") for name in ("selfattn", "sdpa")}
        print(f"| {dtype} S{S} D{D} fwd | {max(1, a.tokens // S)} | "
              f"{kib['call', 'selfattn']:.0f} | {kib['call', 'sdpa']:.0f} | "
              f"{kib['kept', 'selfattn']:.0f} | {kib['kept', 'sdpa']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
