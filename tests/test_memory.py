"""Memory: the fused forward and backward never hold an Sq x Sk matrix
(DESIGN.md section 2, issue #2). At S = 32768, D = 64, one head, float32, one
S x S float32 matrix is 4 GiB; the peak resident set of a fresh process may
grow by far less than that (asserted: < 512 MiB) across forward and backward.

Peak RSS (resource.getrusage ru_maxrss) is measured in a subprocess so that
nothing else the test session allocated counts. A control run shows the probe
does see a quadratic allocation (the reference at S = 16384).

The CPU kernels keep each thread's tile buffers for the next call (TileCache in
csrc/cpu/attention_cpu.cpp), at most 1 MiB per thread: a run through many head
sizes, whose tiles all differ in size, must leave the resident set within that
(float64, whose products need no JIT-compiled kernels that oneDNN would cache).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

MIB = 1024 * 1024

_SCRIPT = textwrap.dedent(r"""
    import json, resource, sys, time
    import torch
    import selfattn
    from selfattn import reference

    def peak():  # bytes (ru_maxrss is KiB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    mode, S = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    # warm-up on a small problem: loads the kernels, starts the thread pool
    w = [torch.randn(1, 64, 1, 64, requires_grad=True) for _ in range(3)]
    selfattn.attention(*w).sum().backward()
    q, k, v = (torch.randn(1, S, 1, 64, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, S, 1, 64)
    before = peak()
    t0 = time.time()
    result = {}
    if mode == "fused":
        out = selfattn.attention(q, k, v)
        out.backward(dout)
        result["seconds"] = time.time() - t0
        result["growth"] = peak() - before
        # cheap correctness checks on the big problem
        with torch.no_grad():
            ref = reference.attention(q[:, :4].double(), k.double(), v.double(),
                                      scale=64 ** -0.5)
        result["out_err"] = (out[:, :4].double() - ref).abs().max().item()
        # rows of P sum to 1, so sum_j dv_j = sum_i dout_i
        result["dv_sum_err"] = (v.grad.double().sum(1) - dout.double().sum(1)).abs().max().item()
        result["finite"] = bool(torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
                                and torch.isfinite(v.grad).all())
    else:  # control: the math path materialises S x S scores
        with torch.no_grad():
            reference.attention(q, k, v)
        result["growth"] = peak() - before
    print(json.dumps(result))
""")


_CACHE_SCRIPT = textwrap.dedent(r"""
    import gc, json
    import torch
    import selfattn
    from selfattn import _measure  # large blocks go back to the system when freed

    def rss():  # bytes
        return _measure._status_kib("VmRSS") * 1024

    torch.manual_seed(0)
    def run(D):
        q, k, v = (torch.randn(2, 512, 4, D, dtype=torch.float64, requires_grad=True)
                   for _ in range(3))
        selfattn.attention(q, k, v, causal=True).sum().backward()

    run(64)  # loads the kernels, starts the thread pool
    gc.collect()
    before = rss()
    tile_bytes = 0  # the forward's Kᵀ tile alone, summed over the shapes
    for D in range(8, 257, 4):
        run(D)
        tile_bytes += D * 272 * 8 * torch.get_num_threads()
    gc.collect()
    print(json.dumps({"growth": rss() - before, "tile_bytes": tile_bytes,
                      "threads": torch.get_num_threads()}))
""")


def _run(mode, S, timeout):
    return _run_script(_SCRIPT, [mode, str(S)], timeout)


def _run_script(script, args, timeout):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
def test_forward_backward_memory_s32768():
    S = 32768
    r = _run("fused", S, timeout=300)
    full_matrix = S * S * 4  # 4 GiB
    assert r["growth"] < 512 * MIB, (
        f"peak RSS grew by {r['growth'] / MIB:.0f} MiB (one S x S float32 matrix is "
        f"{full_matrix / MIB:.0f} MiB)")
    assert r["finite"]
    assert r["out_err"] < 1e-4, r
    assert r["dv_sum_err"] < 1e-1, r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
def test_memory_probe_sees_quadratic_allocation():
    S = 16384  # one S x S float32 matrix: 1 GiB, twice the fused test's bound
    r = _run("control", S, timeout=300)
    assert r["growth"] > 512 * MIB, f"probe saw only {r['growth'] / MIB:.0f} MiB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_tile_cache_is_bounded():
    r = _run_script(_CACHE_SCRIPT, [], timeout=300)
    bound = r["threads"] * MIB + 4 * MIB  # the caches, and slack for torch's own
    assert r["tile_bytes"] > 2 * bound  # so an unbounded cache would exceed the bound
    assert r["growth"] < bound, (
        f"resident set grew by {r['growth'] / MIB:.1f} MiB over 63 head sizes "
        f"({r['threads']} threads)")
