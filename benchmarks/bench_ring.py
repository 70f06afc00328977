"""Ring attention on this machine: peak memory per rank and time of a causal
forward+backward, selfattn.distributed.ring_attention on N gloo processes
(one thread each, loopback) against selfattn.attention in one process with
N threads, on the same whole sequence (B = 1, H = 8, D = 64, float32).

Memory per process is its inputs (q, k, v: the whole sequence's, or the
rank's shard, 1/N of it) plus the peak of its resident set during the call
above the set before it (selfattn._measure.peak_bytes): outputs, gradients,
the ring's passing blocks and the kernels' buffers.
Times are medians of interleaved-free repeated calls in each configuration
(the processes of a ring run together, so they cannot interleave with the
one-process run).

    python benchmarks/bench_ring.py                # S = 8192 and 16384, N = 2 and 4
    python benchmarks/bench_ring.py --quick

Writes <out>/ring.md (default benchmarks/results) and prints it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import selfattn
from selfattn import distributed as sad
from selfattn._measure import peak_bytes

B, H, D = 1, 8, 64


def _inputs(S):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, S, H, D, generator=g) for _ in range(3)]


def _step(fn, xs):
    xs = [x.detach().requires_grad_() for x in xs]
    fn(*xs).sum().backward()


def _time(fn, xs, repeats):
    _step(fn, xs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(fn, xs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ring_worker(rank, world, port, S, layout, repeats, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shards = [sad.shard_sequence(x, layout=layout) for x in _inputs(S)]

        def ring(q, k, v):
            return sad.ring_attention(q, k, v, causal=True, layout=layout)

        seconds = _time(ring, shards, repeats)
        dist.barrier()
        peak = peak_bytes(lambda: _step(ring, shards))
        results.put((rank, seconds, peak))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ring(world, S, layout, repeats):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_ring_worker, args=(world, _free_port(), S, layout, repeats, results),
                       nprocs=world, join=True, start_method="spawn")
    rows = [results.get() for _ in range(world)]
    return max(r[1] for r in rows), max(r[2] for r in rows)


def run_single(threads, S, repeats):
    torch.set_num_threads(threads)
    xs = _inputs(S)

    def whole(q, k, v):
        return selfattn.attention(q, k, v, causal=True)

    return _time(whole, xs, repeats), peak_bytes(lambda: _step(whole, xs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    lengths = [4096] if args.quick else [8192, 16384]
    worlds = [2] if args.quick else [2, 4]
    lines = ["# Ring attention: memory per rank and time", "",
             f"{datetime.date.today()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"selfattn CPU module `{selfattn.ops.CPU_KERNELS}`; causal forward+backward, "
             f"float32, B = {B}, H = {H}, D = {D}; ring ranks on gloo over loopback, one thread "
             "each; one process with as many threads as ranks.", "",
             "| S | configuration | time (s) | MiB per process: inputs + peak of the call | "
             "memory vs one process |", "| --- | --- | --- | --- | --- |"]
    for S in lengths:
        for world in worlds:
            inputs = 3 * B * S * H * D * 4  # float32 q, k, v of the whole sequence
            single_s, single_peak = run_single(world, S, args.repeats)
            single = inputs + single_peak
            lines.append(f"| {S} | one process, {world} threads | {single_s:.2f} | "
                         f"{inputs / 2**20:.0f} + {single_peak / 2**20:.0f} | 1.00 |")
            for layout in sad.LAYOUTS:
                ring_s, ring_peak = run_ring(world, S, layout, args.repeats)
                ring = inputs / world + ring_peak
                lines.append(f"| {S} | ring, {world} ranks, {layout} | {ring_s:.2f} | "
                             f"{inputs / world / 2**20:.0f} + {ring_peak / 2**20:.0f} | "
                             f"{ring / single:.2f} |")
            print(lines[-3:], flush=True)
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ring.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
