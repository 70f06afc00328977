"""Build checks of the CUDA kernels (issue #3), no GPU needed.

Reads the compiled selfattn._C extension with cuobjdump: every main kernel
(flash forward, backward dK/dV and dQ) must run without register spills or a
local-memory stack frame, and the forward must use tensor cores (HMMA in its
SASS). Skipped when the extension was built without CUDA code or when no
cuobjdump is found (PATH, CUDA_HOME/bin, or the copy bundled with triton).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

MAIN_KERNELS = ("flash_fwd_kernel", "flash_bwd_dkv_kernel", "flash_bwd_dq_kernel")


def _cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    try:
        import triton.backends.nvidia as tnv

        candidates.append(os.path.join(os.path.dirname(tnv.__file__), "bin", "cuobjdump"))
    except Exception:  # noqa: BLE001 - triton is optional
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _extension_path():
    import selfattn._C as ext

    return ext.__file__


@pytest.fixture(scope="module")
def tool_and_lib():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    lib = _extension_path()
    usage = subprocess.run([tool, "--dump-resource-usage", lib], capture_output=True, text=True)
    if usage.returncode != 0 or "Function" not in usage.stdout:
        pytest.skip("selfattn._C holds no CUDA code (built with SELFATTN_BUILD_CUDA=0 or no nvcc)")
    return tool, lib, usage.stdout


def _resource_usage(text):
    """{(arch, mangled kernel name): {"REG": n, "STACK": n, "LOCAL": n, ...}}"""
    usage, arch, name = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            usage[(arch, name)] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return usage


def test_main_kernels_do_not_spill(tool_and_lib):
    _, _, text = tool_and_lib
    usage = _resource_usage(text)
    main = {key: u for key, u in usage.items() if any(k in key[1] for k in MAIN_KERNELS)}
    for kernel in MAIN_KERNELS:
        assert any(kernel in name for _, name in main), f"{kernel} missing from the extension"
    bad = {f"{arch} {name}": u for (arch, name), u in main.items()
           if u.get("STACK", 0) != 0 or u.get("LOCAL", 0) != 0}
    assert not bad, f"main kernels with a stack frame or local memory (spills): {bad}"


def test_forward_uses_tensor_cores(tool_and_lib):
    tool, lib, _ = tool_and_lib
    sass = subprocess.run([tool, "-sass", lib], capture_output=True, text=True, check=True).stdout
    # SASS listing: "Function : <mangled name>" then its instructions.
    sections = re.split(r"\n\s*Function : ", sass)
    fwd = [s for s in sections if s.split("\n", 1)[0].find("flash_fwd_kernel") >= 0]
    assert fwd, "no flash_fwd_kernel in the SASS"
    for section in fwd:
        name = section.split("\n", 1)[0].strip()
        assert "HMMA" in section, f"{name}: no HMMA (tensor-core) instruction"
