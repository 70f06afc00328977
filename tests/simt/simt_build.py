"""Build of the emulated CUDA backend, libselfattn_simt.so (issue 13).

The library holds selfattn's CUDA sources compiled as host C++ with g++
against the SIMT emulator of csrc/cuda/simt: the same csrc/cuda/*.cu kernels
and launchers and the same cuda_backend.cpp kernel choice as the GPU build,
plus csrc/ops.cpp and csrc/attention.cpp. Compiled with -DSELFATTN_SIMT and
-Dselfattn=selfattn_simt, so its op library is `torch.ops.selfattn_simt`,
registered for CPU tensors, and can live in one process with the real
`selfattn`. Per-file flags, hence a small ninja file instead of
torch.utils.cpp_extension: the kernel translation units (*.cu and the PTX
test kernels) are compiled with -fsanitize=thread, whose memory-access hooks
the emulator implements, and with line tables for its reports; the others
are not instrumented. Builds live under build/simt/ and are incremental
(ninja with depfiles), so reruns only relink what changed.

Mutants (tests/simt/test_simt_mutants.py): a copy of csrc with one edit,
where only the named translation unit is recompiled and linked with the
other objects of the main build.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "build", "simt")
LIB_NAME = "libselfattn_simt.so"

KERNEL_SOURCES = sorted(
    os.path.join("csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
    if f.endswith(".cu")) + [os.path.join("tests", "simt", "probe_kernels.cu")]
HOST_SOURCES = [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "attention.cpp"),
                os.path.join("csrc", "cuda", "cuda_backend.cpp"),
                os.path.join("csrc", "cuda", "simt", "backend.cpp"),
                os.path.join("csrc", "cuda", "simt", "runtime.cpp"),
                os.path.join("csrc", "cuda", "simt", "ptx.cpp")]


def unsupported_reason():
    """Why this host cannot build the emulator, or None."""
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")
    if not sys.platform.startswith("linux") or not x86_64:
        return "the SIMT emulator needs x86-64 Linux (its fibers switch in x86-64 assembly)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) on PATH"
    if _ninja() is None:
        return "ninja is not installed"
    return None


def _ninja():
    found = shutil.which("ninja")
    if found:
        return found
    candidate = os.path.join(sysconfig.get_path("scripts"), "ninja")
    return candidate if os.path.isfile(candidate) else None


def _cpu_has_fma():
    try:
        with open("/proc/cpuinfo") as f:
            return "fma" in next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False


def _flags():
    import torch

    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    common = [
        # CUDA code type-puns through pointers (e.g. a pair of halves stored as
        # one uint32_t), which nvcc tolerates and g++ -O2 may not.
        "-std=c++20", "-fPIC", "-O2", "-fno-strict-aliasing",
        "-DSELFATTN_SIMT", "-Dselfattn=selfattn_simt",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-isystem", inc, "-isystem", os.path.join(inc, "torch", "csrc", "api", "include"),
        "-I", os.path.join(ROOT, "csrc", "cuda"),
        "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
    ]
    # -fno-extern-tls-init: __shared__ is thread_local in the emulator, and the
    # kernels' `extern __shared__` array needs no (TLS) init function.
    kernel = common + ["-x", "c++", "-fsanitize=thread", "-fno-extern-tls-init", "-g1"]
    if _cpu_has_fma():  # contract a * b + c into fma wherever g++ can, as nvcc does by default
        kernel += ["-mfma", "-ffp-contract=fast"]
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = [f"-L{libdir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{libdir}",
            "-Wl,-z,defs"]
    return common, kernel, link


def _escape(path):
    return path.replace(" ", "$ ").replace(":", "$:")


def _object(src):
    return os.path.splitext(src.replace(os.sep, "_"))[0] + ".o"


def _write_ninja(build_dir, compiles, objects, lib):
    """compiles: [(source, object, flags)]; objects: every object to link."""
    cxx = os.environ.get("CXX", "g++")
    _, _, link = _flags()
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $flags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = compile $in",
        "rule link",
        "  command = $cxx -shared -o $out $in $ldflags",
        "  description = link $out",
    ]
    for src, obj, flags in compiles:
        lines.append(f"build {_escape(obj)}: cxx {_escape(src)}")
        lines.append("  flags = " + " ".join(flags))
    lines.append(f"build {_escape(lib)}: link " + " ".join(_escape(o) for o in objects))
    lines.append("  ldflags = " + " ".join(link))
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, "build.ninja")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _run_ninja(build_dir):
    import fcntl  # (Linux only, as the emulator)

    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    with open(os.path.join(build_dir, ".lock"), "w") as lock:  # one build of a directory at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run([_ninja(), "-C", build_dir, "-j", jobs], capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise RuntimeError("building the SIMT emulator failed:\n"
                           f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}")


def build():
    """Builds (or updates) the emulated backend; returns the library's path."""
    reason = unsupported_reason()
    if reason:
        raise RuntimeError(reason)
    common, kernel, _ = _flags()
    build_dir = os.path.join(BUILD, "main")
    compiles = []
    for src in KERNEL_SOURCES:
        compiles.append((os.path.join(ROOT, src), os.path.join(build_dir, _object(src)), kernel))
    for src in HOST_SOURCES:
        compiles.append((os.path.join(ROOT, src), os.path.join(build_dir, _object(src)), common))
    lib = os.path.join(build_dir, LIB_NAME)
    _write_ninja(build_dir, compiles, [obj for _, obj, _ in compiles], lib)
    _run_ninja(build_dir)
    return lib


def build_mutant(name, tu, edits):
    """A library whose translation unit `tu` (a path under the repo) is
    compiled from a copy of csrc/ with `edits` applied: [(path, old, new)],
    each `old` occurring exactly once. Other objects come from the main build."""
    main_lib = build()
    main_dir = os.path.dirname(main_lib)
    build_dir = os.path.join(BUILD, "mutants", name)
    tree = os.path.join(build_dir, "src")
    if os.path.isdir(tree):
        shutil.rmtree(tree)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc"))
    for path, old, new in edits:
        target = os.path.join(tree, path)
        text = open(target).read()
        if text.count(old) != 1:
            raise ValueError(f"mutant {name}: {old!r} occurs {text.count(old)} times in {path}")
        with open(target, "w") as f:
            f.write(text.replace(old, new))
    common, kernel, _ = _flags()
    flags = [f.replace(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc")) for f in
             (kernel if tu.endswith(".cu") else common)]
    mutant_obj = os.path.join(build_dir, _object(tu))
    objects = [mutant_obj] + [os.path.join(main_dir, _object(s))
                              for s in KERNEL_SOURCES + HOST_SOURCES if s != tu]
    lib = os.path.join(build_dir, LIB_NAME)
    _write_ninja(build_dir, [(os.path.join(tree, tu), mutant_obj, flags)], objects, lib)
    _run_ninja(build_dir)
    return lib


if __name__ == "__main__":
    print(build())
