"""The CPU kernel modules this process did not load (issues #6, #16).

The import loads one CPU kernel module: `_cpu_avx512` on CPUs with AVX-512,
else `_cpu_avx2`; `_cpu_generic` is what other architectures load. All are
built from one source but differ where a build has code of its own (the
AVX-512 exp and 16 x 16 transpose; at::vec's generic vectors), so each module
this CPU can run besides the loaded one is run here, in a subprocess with
SELFATTN_CPU_ISA forcing it, through the accuracy grid and the NaN/inf edge
cases.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfattn import ops

TESTS = Path(__file__).resolve().parent


def _other_isas():
    runs = {"_cpu_avx512": ["avx2", "generic"], "_cpu_avx2": ["generic"]}
    return runs.get(ops.CPU_KERNELS, [])  # an AVX2-only CPU cannot run the AVX-512 build


@pytest.mark.parametrize("isa", _other_isas() or [None])
def test_other_cpu_module_passes_accuracy_and_edge_cases(isa):
    if isa is None:
        pytest.skip("this CPU runs only the loaded CPU module")
    env = dict(os.environ, SELFATTN_CPU_ISA=isa)
    probe = subprocess.run([sys.executable, "-c", "from selfattn import ops; print(ops.CPU_KERNELS)"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == f"_cpu_{isa}"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(TESTS / "test_attention.py"), str(TESTS / "test_edge_cases.py")],
        env=env, capture_output=True, text=True, cwd=TESTS.parent)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
