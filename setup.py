"""Build of selfattn's C++/CUDA extension `selfattn._C`.

Environment:
  SELFATTN_BUILD_CUDA  auto (default) | 0 | 1. auto builds the CUDA sources when
                       nvcc and a CUDA-enabled torch are present (never decided
                       by torch.cuda.is_available(), so GPU-less machines build
                       the same package); 1 fails when they are missing.
  SELFATTN_CUDA_ARCHS  ';'-separated compute capabilities, default "8.0;9.0";
                       PTX for the newest is embedded too.
  MAX_JOBS             parallel compile jobs (ninja), as for any torch extension.
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

# The toolkit root, when the nvcc on PATH is a wrapper script outside it.
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402



def want_cuda():
    mode = os.environ.get("SELFATTN_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"SELFATTN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    have_nvcc = CUDA_HOME is not None and (
        os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None
    )
    have = torch.version.cuda is not None and have_nvcc
    if mode == "1" and not have:
        raise RuntimeError(
            "SELFATTN_BUILD_CUDA=1 but "
            + ("torch is a CPU-only build" if torch.version.cuda is None else "nvcc was not found")
        )
    return have


def gencode_flags():
    archs = os.environ.get("SELFATTN_CUDA_ARCHS", "8.0;9.0")
    caps = [a.strip().replace(".", "") for a in archs.split(";") if a.strip()]
    if not caps or not all(c.isdigit() for c in caps):
        raise RuntimeError(f"SELFATTN_CUDA_ARCHS must look like '8.0;9.0', got {archs!r}")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    newest = max(caps, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


# CPU kernels: one extension module per instruction set, all from the same
# sources; selfattn/ops.py imports the best one the running CPU supports (so
# no AVX-512 code is ever loaded on a CPU without it). The generic module,
# the only one on other architectures, is built on x86 too, so that its code
# path is tested there (SELFATTN_CPU_ISA=generic).
GENERIC_VARIANT = {"_cpu_generic": []}
X86_VARIANTS = {
    "_cpu_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                    "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "_cpu_avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    **GENERIC_VARIANT,
}


def cpu_extensions():
    sources = ["csrc/attention.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if platform.machine().lower() in ("x86_64", "amd64"):
        variants = X86_VARIANTS
    else:
        variants = GENERIC_VARIANT
    # at::parallel_for is inline OpenMP code when torch uses OpenMP: without
    # -fopenmp it would run serially. (libgomp is torch's own, already loaded.)
    openmp = ["-fopenmp"] if torch._C.has_openmp and sys.platform.startswith("linux") else []
    return [
        CppExtension(f"selfattn.{name}", sources,
                     extra_compile_args={"cxx": ["-O3"] + openmp + flags},
                     extra_link_args=openmp)
        for name, flags in variants.items()
    ]


def main_extension():
    """selfattn._C: the op schemas, and the CUDA kernels when built."""
    sources = ["csrc/ops.cpp", "csrc/module.cpp"]
    if not want_cuda():
        return CppExtension("selfattn._C", sources, extra_compile_args={"cxx": ["-O3"]})
    sources += ["csrc/attention.cpp"]
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc = [
        "-O3",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-Xptxas=-v",  # resource report (registers, spills, smem) in the build log
        "-DSELFATTN_WITH_CUDA",
    ] + gencode_flags()
    return CUDAExtension(
        "selfattn._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-DSELFATTN_WITH_CUDA"], "nvcc": nvcc},
    )


setup(
    ext_modules=[main_extension()] + cpu_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
