"""Proof that the emulator bites (issue 13): deliberately broken copies of the
kernels, each of which it must report.

Each mutant is one edit to a copy of csrc/ (a barrier removed, a
cp.async.wait_group that retires too early, a swapped fragment register, an
off-by-one in a visibility or row bound, a tile's zero-fill skipped); only the translation unit that
runs the broken kernel is recompiled and linked with the other objects of
the main emulated build (tests/simt/simt_build.py). The mutant library
registers the same op library as the main one, so it runs in a subprocess
on one case of test_simt_attention.py, which must end in the expected
report: an emulator error (race, in-flight cp.async, uninitialized shared
memory, out-of-bounds access) or a wrong answer against the float64 reference.
"""
import json
import os
import re
import subprocess
import sys

import pytest

import simt_build

pytestmark = pytest.mark.simt

HERE = os.path.dirname(os.path.abspath(__file__))
FWD, BWD = "csrc/cuda/flash_fwd.cuh", "csrc/cuda/flash_bwd.cuh"
DEVICE, FALLBACK = "csrc/cuda/device_utils.cuh", "csrc/cuda/fallback.cu"
FWD_TU, BWD_TU = "csrc/cuda/flash_fwd_fp16.cu", "csrc/cuda/flash_bwd_fp16.cu"
FALLBACK_TU = FALLBACK

# A missing barrier shows as a race, or, when the reader runs before the
# writer (the thread order is random), as a read of unwritten shared memory.
RACE = "shared-memory race|no thread of this block has written"

# name: (translation unit, [(file, old, new)], case of test_simt_attention,
#        "wrong answer" or a pattern of the emulator's report)
MUTANTS = {
    "fwd_barrier_removed": (
        FWD_TU, [(FWD, "      cp_async_wait<0>();\n      __syncthreads();\n",
                  "      cp_async_wait<0>();\n")],
        dict(dtype="float16", family="flash", Sq=70, Sk=150), RACE),
    "bwd_dq_barrier_removed": (
        BWD_TU, [(BWD, "        __syncthreads();\n        const int q_row",
                  "        const int q_row")],
        dict(dtype="float16", family="flash", Sq=70), RACE),
    "wait_group_too_early": (
        FWD_TU, [(FWD, "      cp_async_wait<0>();\n      __syncthreads();\n",
                  "      cp_async_wait<1>();\n      __syncthreads();\n")],
        dict(dtype="float16", family="flash", Sq=70, Sk=150), "in flight"),
    "fragment_registers_swapped": (
        FWD_TU, [(DEVICE,
                  "{pack2<T>(pa[2 * s][0], pa[2 * s][1]), pack2<T>(pa[2 * s][2], pa[2 * s][3]),",
                  "{pack2<T>(pa[2 * s][2], pa[2 * s][3]), pack2<T>(pa[2 * s][0], pa[2 * s][1]),")],
        dict(dtype="float16", family="flash", Sq=40), "wrong answer"),
    "window_bound_off_by_one": (
        FALLBACK_TU, [(DEVICE, "(left < 0 || j >= i + off - left)",
                       "(left < 0 || j > i + off - left)")],
        dict(dtype="float32", family="fallback", Sq=40, window=(5, 5)), "wrong answer"),
    "key_range_off_by_one": (
        FWD_TU, [(DEVICE, "hi = right >= 0 ? min(kv_len, i1 + off + right + 1) : kv_len;",
                  "hi = right >= 0 ? min(kv_len, i1 + off + right) : kv_len;")],
        dict(dtype="float16", family="flash", Sq=65, causal=True), "wrong answer"),
    "zero_fill_skipped": (  # rows past the keys left unwritten (CUDA_FACTS 10.3)
        FWD_TU, [(DEVICE,
                  "cp_async_16(smem + swz<kCols>(r, c), ok ? gmem + r * stride + c : fallback, "
                  "ok);",
                  "if (ok) cp_async_16(smem + swz<kCols>(r, c), gmem + r * stride + c, true);")],
        dict(dtype="float16", family="flash", Sq=40), "no thread of this block has written"),
    "shared_row_overrun": (  # warp 3 writes past the kernel's s_k[4][512]
        FALLBACK_TU, [(FALLBACK, "acc_t* sk = s_k[warp];", "acc_t* sk = s_k[warp + 1];")],
        dict(dtype="float32", family="fallback", Sq=40),
        RACE + "|past the end of __shared__|not one of this kernel's __shared__ arrays"),
    "row_bound_off_by_one": (
        FWD_TU, [(FWD, "    if (i < p.Sq) {\n      const float inv",
                  "    if (i <= p.Sq) {\n      const float inv")],
        dict(dtype="float16", family="flash", Sq=17), "outside every buffer"),
}

RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {here!r})
torch.ops.load_library({lib!r})
import test_simt_attention as t
kw = json.loads({case!r})
kw["dtype"] = getattr(torch, kw["dtype"])
if "window" in kw:
    kw["window"] = tuple(kw["window"])
try:
    t.check_case(torch.ops.selfattn_simt, t.Case(**kw), 0)
    result = ("passed", "")
except AssertionError as e:
    result = ("wrong answer", str(e))
except RuntimeError as e:
    result = ("reported", str(e))
print("MUTANT-RESULT " + json.dumps(result))
"""


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(simt_lib, name):
    tu, edits, case, expected = MUTANTS[name]
    lib = simt_build.build_mutant(name, tu, edits)
    script = RUNNER.format(here=HERE, lib=lib, case=json.dumps(case))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MUTANT-RESULT ")]
    assert lines, f"mutant run crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    outcome, message = json.loads(lines[-1][len("MUTANT-RESULT "):])
    if expected == "wrong answer":
        assert outcome == "wrong answer", (outcome, message)
    else:
        assert outcome == "reported" and re.search(expected, message), (outcome, message)
