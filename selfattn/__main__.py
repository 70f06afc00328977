"""`python -m selfattn [--device cpu|cuda]`: the package's self-check.

1. Checks a handful of configurations (masks, GQA, windows, key_lengths,
   dropout, dtypes) against the float64 reference with the DESIGN.md bound.
2. Times selfattn against torch on this machine, in one process, interleaved,
   medians (torch.utils.benchmark), with peak memory: attention vs
   F.scaled_dot_product_attention, and selfattn.nn.MultiheadAttention vs
   nn.MultiheadAttention, forward and forward+backward.
Exits non-zero when a check fails. Takes well under a minute on a laptop CPU.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import selfattn
from selfattn import reference
from selfattn._measure import Progress, median_seconds, peak_bytes, with_backward
from selfattn.testing import check_against_reference


def _checks(device):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    def case(name, q, k, v, **kw):
        inputs = [q, k, v]
        mask = kw.pop("attn_mask", None)
        if mask is not None:
            inputs.append(mask)
        def fused(q, k, v, *m):
            return selfattn.attention(q, k, v, attn_mask=m[0] if m else None, **kw)
        def ref(q, k, v, *m):
            return reference.attention(q, k, v, attn_mask=m[0] if m else None, **kw)
        return name, lambda: check_against_reference(fused, ref, inputs, name=name)

    yield case("causal, float32", r(2, 128, 4, 64), r(2, 128, 4, 64), r(2, 128, 4, 64), causal=True)
    yield case("GQA + window, Sq != Sk", r(2, 97, 8, 32), r(2, 160, 2, 32), r(2, 160, 2, 32),
               window=(48, 0))
    yield case("float mask with grad, bf16", r(1, 64, 2, 64, dtype=torch.bfloat16),
               r(1, 80, 2, 64, dtype=torch.bfloat16), r(1, 80, 2, 64, dtype=torch.bfloat16),
               attn_mask=r(2, 64, 80, dtype=torch.bfloat16))
    kl = torch.tensor([50, 0], device=device)
    yield case("key_lengths, fully masked rows", r(2, 33, 2, 16), r(2, 64, 2, 16),
               r(2, 64, 2, 24), key_lengths=kl, causal=True, causal_alignment="top_left")
    yield case("bool mask, float64", r(2, 40, 3, 80, dtype=torch.float64),
               r(2, 40, 3, 80, dtype=torch.float64), r(2, 40, 3, 80, dtype=torch.float64),
               attn_mask=torch.rand(40, 40, generator=g).to(device) > 0.5)

    def dropout_repro():
        q, k, v = r(1, 64, 2, 32), r(1, 64, 2, 32), r(1, 64, 2, 32)
        outs = [selfattn.attention(q, k, v, dropout_p=0.25,
                                   generator=torch.Generator(device).manual_seed(3))
                for _ in range(2)]
        if not torch.equal(outs[0], outs[1]):
            raise AssertionError("dropout: same seed gave different outputs")
    yield "dropout reproducible", dropout_repro


def _speed_cases(device):
    B, H, S, D = 2, 8, 1024, 64
    for causal in (False, True):
        def make(causal=causal):
            q, k, v = (torch.randn(B, H, S, D, device=device, requires_grad=True) for _ in range(3))
            qs, ks, vs = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            return {
                "selfattn": lambda: selfattn.attention(qs, ks, vs, causal=causal),
                "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            }
        yield f"attention B{B} H{H} S{S} D{D}" + (" causal" if causal else ""), make
    try:
        from selfattn import nn as sa_nn
    except ImportError:
        return
    E = H * D

    def make_mha():
        torch_mha = torch.nn.MultiheadAttention(E, H, batch_first=True, device=device)
        ours = sa_nn.MultiheadAttention(E, H, batch_first=True, device=device)
        ours.load_state_dict(torch_mha.state_dict())
        x = torch.randn(B, S, E, device=device, requires_grad=True)
        return {
            "selfattn": lambda: ours(x, x, x, need_weights=False)[0],
            "torch": lambda: torch_mha(x, x, x, need_weights=False)[0],
        }
    yield f"MultiheadAttention B{B} S{S} E{E} H{H}", make_mha


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfattn", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("selfattn: --device cuda asked, but torch sees no CUDA device", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"selfattn {selfattn.__version__}, torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads")

    checks = list(_checks(device))
    speed = list(_speed_cases(device))
    progress = Progress(len(checks) + 2 * len(speed))
    failures = []
    for name, run in checks:
        try:
            run()
        except Exception as e:  # report every failing check, not just the first
            failures.append((name, f"{type(e).__name__}: {e}"))
        progress.step(name)

    rows = []
    for name, make in speed:
        for mode in ("fwd", "fwd+bwd"):
            fns = make()
            if mode == "fwd+bwd":
                fns = {k: with_backward(f) for k, f in fns.items()}
                times = median_seconds(fns)
            else:
                with torch.no_grad():
                    times = median_seconds(fns)
            peaks = {}
            for impl, fn in fns.items():
                if mode == "fwd":
                    with torch.no_grad():
                        peaks[impl] = peak_bytes(fn, device)
                else:
                    peaks[impl] = peak_bytes(fn, device)
            rows.append((name, mode, times, peaks))
            progress.step(f"{name} {mode}")

    print()
    for name, _ in checks:
        bad = [msg for n, msg in failures if n == name]
        print(f"  check {name:<34} {'FAIL: ' + bad[0] if bad else 'ok'}")
    print()
    header = (f"{'case':<40} {'pass':<8} {'selfattn ms':>11} {'torch ms':>9} {'time ratio':>10}"
              f" {'selfattn MiB':>12} {'torch MiB':>9} {'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    for name, mode, times, peaks in rows:
        ours, theirs = times["selfattn"] * 1e3, times["torch"] * 1e3
        pm, tm = peaks["selfattn"], peaks["torch"]
        mem = (f"{pm / 2**20:>12.1f} {tm / 2**20:>9.1f} {pm / max(tm, 1):>9.2f}"
               if pm is not None and tm is not None else f"{'n/a':>12} {'n/a':>9} {'n/a':>9}")
        print(f"{name:<40} {mode:<8} {ours:>11.2f} {theirs:>9.2f} {ours / theirs:>10.2f} {mem}")
    print(f"\ntorch = F.scaled_dot_product_attention / nn.MultiheadAttention; ratio < 1 means "
          f"selfattn is faster or smaller. {time.perf_counter() - start:.0f} s in all.")
    if failures:
        print(f"{len(failures)} check(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
