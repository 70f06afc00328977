"""The examples run as users run them: examples/train_gpt.py (selfattn vs
torch attention from one seed, and its 2-process DDP variant),
examples/train_ring.py (the sequence sharded over 2 and 4 processes by
torchrun, against one process), examples/generate.py (the same tokens with
and without selfattn's KV cache) and the C++
example examples/cpp (configured, built and run against the built ops;
skipped without cmake or a compiled selfattn._C)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from selfattn import ops

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _env():
    """The environment of a child process that imports this same selfattn."""
    env = dict(os.environ)
    package_parent = str(Path(selfattn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


def _run(cmd, timeout, cwd=None):
    proc = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_train_gpt_compare(tmp_path):
    curves_file = tmp_path / "curves.json"
    out = _run([sys.executable, str(EXAMPLES / "train_gpt.py"), "--steps", "30", "--batch", "8",
                "--block", "32", "--compare",
                "--json", str(curves_file)], timeout=300)
    assert "max |loss difference|" in out
    curves = json.loads(curves_file.read_text())
    ours, ref = curves["selfattn"], curves["torch"]
    assert len(ours) == len(ref) == 30
    # Same model, seed and batches: only rounding separates the curves.
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-3
    assert sum(ours[-10:]) / 10 < ours[0] - 0.5  # it learns


def test_train_gpt_ddp(tmp_path):
    curves_file = tmp_path / "curves.json"
    out = _run([sys.executable, str(EXAMPLES / "train_gpt.py"), "--ddp", "--steps", "8",
                "--batch", "4", "--block", "32",
                "--json", str(curves_file)], timeout=300)
    assert "ddp: 2 processes, parameters in sync" in out
    losses = json.loads(curves_file.read_text())["selfattn"]
    assert len(losses) == 8 and losses[-1] < losses[0]


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (4, "contiguous")])
def test_train_ring_matches_one_process(tmp_path, world, layout):
    """examples/train_ring.py under torchrun: the sequence sharded over `world`
    CPU processes trains with the loss curve of one process."""
    curves_file = tmp_path / "curves.json"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={world}", str(EXAMPLES / "train_ring.py"), "--compare",
                "--steps", "12", "--layout", layout, "--json", str(curves_file)], timeout=300)
    assert "max |loss difference|" in out
    curves = json.loads(curves_file.read_text())
    ring, one = curves[f"ring ({world} ranks)"], curves["one process"]
    assert len(ring) == len(one) == 12
    assert max(abs(a - b) for a, b in zip(ring, one)) < 1e-3
    assert ring[-1] < ring[0] - 0.3  # it learns


def test_generate_with_and_without_the_kv_cache():
    out = _run([sys.executable, str(EXAMPLES / "generate.py"), "--new", "24", "--d-model", "64"],
               timeout=300)
    assert "same tokens: True" in out


def test_cpp_example(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if Path(ops._C.__file__).suffix != ".so":
        pytest.skip("selfattn._C is not a compiled extension")
    libraries = _run([sys.executable, str(EXAMPLES / "cpp" / "selfattn_libs.py")], timeout=60).split()
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(EXAMPLES / "cpp"), "-B", str(build), *generator,
          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], timeout=120)
    _run(["cmake", "--build", str(build)], timeout=400)
    out = _run([str(build / "selfattn_example"), *libraries], timeout=60)
    assert "OK" in out
