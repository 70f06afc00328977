"""Benchmark suite: selfattn against PyTorch on the same inputs, in one process.

For each grid point (dtype, S with B·S fixed, D, causal, forward or
forward+backward, plus a GQA, a sliding-window and a layer case) it times
selfattn and its peers interleaved (selfattn._measure: torch.utils.benchmark,
medians; on CUDA synchronised), reports median ms, GFLOP/s (DESIGN.md
section 6: 4·B·Hq·D per visible (query, key) pair forward, 2.5x that
backward) and peak memory, and the ratio selfattn / peer (< 1: selfattn is
faster or smaller).

Peers: `sdpa` (F.scaled_dot_product_attention, torch's default fused kernel),
`math` (SDPA's math backend), `reference` (selfattn.reference), and for the
layer case nn.MultiheadAttention. The math and reference peers hold an S x S
matrix, so they are skipped above --max-dense-s.

On CPU the run names the CPU and selfattn's kernel module, and measures the
machine's float32 GEMM throughput (a 2048^3 torch.mm, before and after the
grid): each float32 point's GFLOP/s is also given as a fraction of it, the
roofline a fused attention kernel can approach. --isa runs the grid with a
given CPU kernel module, or with each module this CPU can execute (`all`),
each in a subprocess (SELFATTN_CPU_ISA is read at import).

    python benchmarks/bench_attention.py                 # full CPU grid, the module selfattn loads
    python benchmarks/bench_attention.py --isa all       # ... once per module this CPU runs
    python benchmarks/bench_attention.py --quick         # a few points
    python benchmarks/bench_attention.py --check         # regression check (CI): fails when a
                                                         # point exceeds 1.25x SDPA's time
    python benchmarks/bench_attention.py --device cuda
    python benchmarks/bench_attention.py --plot          # also a PNG

Writes <out>/cpu_<module>.json and .md (cuda.json, cuda.md on CUDA; default
out: benchmarks/results); while it runs, the points finished so far go to
<out>/cpu_<module>.partial.json (removed at the end), which a run cut short
keeps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import selfattn
from selfattn import nn as sa_nn
from selfattn import reference
from selfattn._measure import Progress, median_seconds, peak_bytes, with_backward


@dataclass
class Point:
    case: str  # attention | gqa | window | mha
    dtype: str
    mode: str  # fwd | fwd+bwd
    B: int
    S: int
    Hq: int
    Hkv: int
    D: int
    causal: bool
    window: Optional[int] = None
    gflop: float = 0.0
    ms: Dict[str, float] = field(default_factory=dict)
    peak_mib: Dict[str, Optional[float]] = field(default_factory=dict)

    def label(self) -> str:
        extra = " causal" if self.causal else ""
        extra += f" window {self.window}" if self.window else ""
        extra += f" GQA {self.Hq}/{self.Hkv}" if self.Hq != self.Hkv else ""
        return f"{self.case} {self.dtype} S{self.S} D{self.D}{extra} {self.mode}"


def visible_pairs(S: int, causal: bool, window: Optional[int]) -> int:
    pairs = 0
    for i in range(S):
        lo = max(0, i - window) if window is not None else 0
        hi = i + 1 if causal else S
        pairs += hi - lo
    return pairs


def grid(args) -> List[Point]:
    dtypes = ["float32", "bfloat16"]
    points = []
    if args.check:  # a small grid of the cases torch also runs fused: a regression check
        for dtype in dtypes:
            for causal in (False, True):
                for mode in ("fwd", "fwd+bwd"):
                    points.append(Point("attention", dtype, mode, 4, 1024, args.heads,
                                        args.heads, 64, causal))
        for mode in ("fwd", "fwd+bwd"):  # D = 128 read K/V in place once, 1.26x on Zen 1
            points.append(Point("attention", "float32", mode, 4, 1024, args.heads, args.heads,
                                128, False))
        return _with_flops(points)
    seqs = [512, 1024, 2048, 4096, 8192] if not args.quick else [1024, 2048]
    dims = [64, 128] if not args.quick else [64]
    for dtype in dtypes:
        for S in seqs:
            for D in dims:
                for causal in (False, True):
                    for mode in ("fwd", "fwd+bwd"):
                        points.append(Point("attention", dtype, mode, max(1, args.tokens // S), S,
                                            args.heads, args.heads, D, causal))
        for mode in ("fwd", "fwd+bwd"):
            S = 2048
            points.append(Point("gqa", dtype, mode, max(1, args.tokens // S), S, args.heads,
                                max(1, args.heads // 4), 64, True))
            S = 4096 if not args.quick else 2048
            points.append(Point("window", dtype, mode, max(1, args.tokens // S), S, args.heads,
                                args.heads, 64, True, window=256))
    for mode in ("fwd", "fwd+bwd"):
        S = 1024
        points.append(Point("mha", "float32", mode, max(1, args.tokens // S), S, args.heads,
                            args.heads, 64, False))
    return _with_flops(points)


def _with_flops(points: List[Point]) -> List[Point]:
    for p in points:
        fwd = 4 * p.B * p.Hq * p.D * visible_pairs(p.S, p.causal, p.window) / 1e9
        p.gflop = fwd * (3.5 if p.mode == "fwd+bwd" else 1.0)
    return points


def make_fns(p: Point, device: str, max_dense_s: int) -> Dict[str, Callable[[], torch.Tensor]]:
    """Callables returning an output tensor, one per implementation."""
    dtype = getattr(torch, p.dtype)
    grad = p.mode == "fwd+bwd"
    if p.case == "mha":
        E = p.Hq * p.D
        theirs = torch.nn.MultiheadAttention(E, p.Hq, batch_first=True, device=device, dtype=dtype)
        ours = sa_nn.MultiheadAttention(E, p.Hq, batch_first=True, device=device, dtype=dtype)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(p.B, p.S, E, device=device, dtype=dtype, requires_grad=grad)
        return {
            "selfattn": lambda: ours(x, x, x, need_weights=False)[0],
            "nn.MultiheadAttention": lambda: theirs(x, x, x, need_weights=False)[0],
        }

    def t(H, D):  # (B, H, S, D) for torch; selfattn reads the (B, S, H, D) view of a copy
        return torch.randn(p.B, H, p.S, D, device=device, dtype=dtype, requires_grad=grad)

    q, k, v = t(p.Hq, p.D), t(p.Hkv, p.D), t(p.Hkv, p.D)
    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_(grad) for x in (q, k, v))
    gqa = p.Hq != p.Hkv
    mask = None
    window = None
    if p.window is not None:
        window = (p.window, 0)
        i = torch.arange(p.S, device=device)
        mask = (i.view(-1, 1) - i.view(1, -1) <= p.window) & (i.view(1, -1) <= i.view(-1, 1))
    causal_torch = p.causal and mask is None

    def ours():
        return selfattn.attention(qs, ks, vs, causal=p.causal, window=window)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal_torch,
                                              enable_gqa=gqa)

    fns = {"selfattn": ours, "sdpa": sdpa}
    if p.S <= max_dense_s:  # max_dense_s = 0: no dense peers
        def math_path():
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                      is_causal=causal_torch, enable_gqa=gqa)

        def ref():
            return reference.attention(qs, ks, vs, causal=p.causal, window=window)
        fns["math"] = math_path
        fns["reference"] = ref
    return fns


def run_point(p: Point, device: str, args, rounds: Optional[int] = None) -> None:
    fns = make_fns(p, device, args.max_dense_s)
    rounds = rounds or args.rounds
    measure_peaks = not args.check
    if p.mode == "fwd+bwd":
        fns = {name: with_backward(fn) for name, fn in fns.items()}
        times = median_seconds(fns, rounds=rounds, min_run_time=args.min_run_time)
        peaks = {name: peak_bytes(fn, device) if measure_peaks else None
                 for name, fn in fns.items()}
    else:
        with torch.no_grad():
            times = median_seconds(fns, rounds=rounds, min_run_time=args.min_run_time)
            peaks = {name: peak_bytes(fn, device) if measure_peaks else None
                     for name, fn in fns.items()}
    p.ms = {name: s * 1e3 for name, s in times.items()}
    p.peak_mib = {name: (b / 2**20 if b is not None else None) for name, b in peaks.items()}


def machine_info(device: str) -> Dict[str, str]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "selfattn": selfattn.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu_kernels": selfattn.ops.CPU_KERNELS,
        "python": platform.python_version(),
    }
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        info["commit"] = "unknown"
    if device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name()
    else:
        model, flags = platform.processor(), ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                    if line.startswith("flags"):
                        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile",
                                  "amx_bf16")
                        flags = " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
                        break
        except OSError:
            pass
        info["device"] = f"{model} ({os.cpu_count()} cores; {flags})"
    return info


def gemm_gflops(device: str, n: int = 2048) -> float:
    """float32 GEMM throughput of this machine: an n x n x n torch.mm."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    seconds = median_seconds({"mm": lambda: torch.mm(a, b)}, rounds=3, min_run_time=0.2)["mm"]
    return 2 * n**3 / seconds / 1e9


def cpu_isas() -> List[str]:
    """The CPU kernel modules this CPU can execute, the one selfattn loads first."""
    loaded = selfattn.ops.CPU_KERNELS
    return {"_cpu_avx512": ["avx512", "avx2"], "_cpu_avx2": ["avx2"]}.get(loaded, ["generic"])


def geomean(xs: List[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def markdown(points: List[Point], info: Dict[str, str]) -> str:
    lines = [f"# selfattn benchmark: {info['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if k != "device"]
    lines += ["", "Times are medians (ms); ratio = selfattn / peer (< 1: selfattn faster or "
              "smaller). GFLOP/s per DESIGN.md section 6; `of GEMM`: float32 GFLOP/s as a "
              "fraction of this machine's float32 GEMM (gemm_gflops above). Peak = memory "
              "held at the worst moment of one call beyond what was held before it.", ""]
    gemm = float(info["gemm_gflops"]) if "gemm_gflops" in info else None
    lines.append("| case | B | selfattn ms | GFLOP/s | of GEMM | sdpa ms | vs sdpa | math ms "
                 "| vs math | selfattn MiB | sdpa MiB | mem vs sdpa |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in points:
        ours = p.ms["selfattn"]
        peer = "sdpa" if "sdpa" in p.ms else "nn.MultiheadAttention"
        math_ms = p.ms.get("math")
        pm, tm = p.peak_mib.get("selfattn"), p.peak_mib.get(peer)
        mem_ratio = f"{pm / tm:.2f}" if pm is not None and tm else "n/a"
        gflops = p.gflop / (ours / 1e3)
        of_gemm = f"{gflops / gemm:.2f}" if gemm and p.dtype == "float32" else "-"
        lines.append(
            f"| {p.label()}{' (vs nn.MHA)' if peer != 'sdpa' else ''} | {p.B} | {ours:.2f} | "
            f"{gflops:.1f} | {of_gemm} | {p.ms[peer]:.2f} | {ours / p.ms[peer]:.2f} | "
            f"{f'{math_ms:.2f}' if math_ms else '-'} | "
            f"{f'{ours / math_ms:.2f}' if math_ms else '-'} | "
            f"{f'{pm:.1f}' if pm is not None else 'n/a'} | {f'{tm:.1f}' if tm is not None else 'n/a'} "
            f"| {mem_ratio} |")
    lines += ["", "Geometric mean of selfattn / sdpa time:", ""]
    for dtype in sorted({p.dtype for p in points}):
        for mode in ("fwd", "fwd+bwd"):
            rs = [p.ms["selfattn"] / p.ms["sdpa"] for p in points
                  if p.dtype == dtype and p.mode == mode and "sdpa" in p.ms]
            if rs:
                lines.append(f"- {dtype} {mode}: {geomean(rs):.2f} over {len(rs)} points "
                             f"(worst {max(rs):.2f})")
    return "\n".join(lines) + "\n"


def plot(points: List[Point], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for dtype in sorted({p.dtype for p in points}):
        for mode in ("fwd", "fwd+bwd"):
            for causal in (False, True):
                sel = [p for p in points if p.case == "attention" and p.dtype == dtype
                       and p.mode == mode and p.causal == causal and p.D == 64]
                if not sel:
                    continue
                label = f"{dtype} {mode}{' causal' if causal else ''}"
                ax_t.plot([p.S for p in sel], [p.ms["selfattn"] / p.ms["sdpa"] for p in sel],
                          marker="o", label=label)
                mem = [(p.S, p.peak_mib["selfattn"] / p.peak_mib["sdpa"]) for p in sel
                       if p.peak_mib.get("selfattn") and p.peak_mib.get("sdpa")]
                if mem:
                    ax_m.plot(*zip(*mem), marker="o", label=label)
    for ax, title in ((ax_t, "time selfattn / sdpa (D=64)"), (ax_m, "peak memory selfattn / sdpa")):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (B·S fixed)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--isa", default="auto",
                        help="CPU kernel module: auto (the one selfattn loads), avx512, avx2, "
                             "generic, or all (each module this CPU runs)")
    parser.add_argument("--quick", action="store_true", help="a few points only")
    parser.add_argument("--check", action="store_true",
                        help="regression check: a small grid against SDPA only; exit 1 when a "
                             "point takes more than --check-ratio x SDPA's time")
    parser.add_argument("--check-ratio", type=float, default=1.25)
    parser.add_argument("--tokens", type=int, default=8192, help="B·S, fixed across the grid")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--max-dense-s", type=int, default=2048,
                        help="largest S for the peers that hold an S x S matrix")
    parser.add_argument("--only", default=None, help="run points whose label contains this")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--plot", action="store_true", help="also write <out>/<name>.png")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu" and args.isa != "auto" \
            and os.environ.get("SELFATTN_CPU_ISA") != args.isa:
        # the module is chosen at import: one subprocess per module
        isas = cpu_isas() if args.isa == "all" else [args.isa]
        argv = sys.argv[1:] if argv is None else list(argv)
        rest = [a for i, a in enumerate(argv)  # the arguments but --isa
                if not (a.startswith("--isa") or (i > 0 and argv[i - 1] == "--isa"))]
        codes = [subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--isa", isa],
                                env=dict(os.environ, SELFATTN_CPU_ISA=isa)).returncode
                 for isa in isas]
        return max(codes)
    if args.check:
        args.max_dense_s = 0
        args.rounds = min(args.rounds, 2)
        args.min_run_time = min(args.min_run_time, 0.1)
    points = [p for p in grid(args) if args.only is None or args.only in p.label()]
    info = machine_info(device)
    gemm_before = gemm_gflops(device) if device == "cpu" else None
    name = f"cpu_{info['cpu_kernels'].removeprefix('_cpu_')}" if device == "cpu" else "cuda"
    partial = os.path.join(args.out, f"{name}.partial.json")

    def save_json(path: str, done: List[Point]) -> None:
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"info": info, "points": [asdict(p) for p in done]}, f, indent=1)

    progress = Progress(len(points))
    for n, p in enumerate(points, 1):
        run_point(p, device, args)
        progress.step(p.label())
        if not args.check:  # a run cut short keeps the points it finished
            save_json(partial, points[:n])
    if gemm_before is not None:
        gemm_after = gemm_gflops(device)
        info["gemm_gflops"] = f"{(gemm_before + gemm_after) / 2:.0f}"
        info["gemm_gflops_before_after"] = f"{gemm_before:.0f} / {gemm_after:.0f}"
    table = markdown(points, info)
    print(table)
    if args.check:
        def too_slow(p: Point) -> bool:
            return p.ms["selfattn"] > args.check_ratio * p.ms["sdpa"]
        for p in points:  # a shared machine's noise: a slow point is measured again, longer
            if too_slow(p):
                run_point(p, device, args, rounds=2 * args.rounds + 1)
        slow = [p for p in points if too_slow(p)]
        for p in slow:
            print(f"CHECK FAILED ({info['cpu_kernels']}): {p.label()} takes "
                  f"{p.ms['selfattn'] / p.ms['sdpa']:.2f}x SDPA's time "
                  f"(bound {args.check_ratio}x)", file=sys.stderr)
        return 1 if slow else 0
    save_json(os.path.join(args.out, f"{name}.json"), points)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table)
    if os.path.exists(partial):
        os.remove(partial)
    if args.plot:
        plot(points, os.path.join(args.out, f"{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
