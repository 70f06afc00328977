"""selfattn: fused self-attention operators for PyTorch.

    selfattn.attention(q, k, v, ...)                    # (B, S, H, D) layout
    selfattn.scaled_dot_product_attention(q, k, v, ...) # torch's SDPA signature
    selfattn.attention_weights(q, k, ...)               # probabilities
    selfattn.reference                                  # plain-PyTorch oracle
"""
import platform as _platform
import sys as _sys


def _check_cpu():
    # The CPU kernels are compiled for AVX2 + FMA on x86-64: refuse to load
    # with a clear message rather than fault on an older CPU.
    if _sys.platform != "linux" or _platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return
    if flags and not {"avx2", "fma"} <= set(flags):
        raise ImportError("selfattn: this x86-64 CPU lacks AVX2/FMA, which the CPU kernels need")


_check_cpu()

import torch  # noqa: E402,F401

from . import ops, reference  # noqa: E402
from .functional import attention, attention_weights, scaled_dot_product_attention  # noqa: E402

__all__ = ["attention", "scaled_dot_product_attention", "attention_weights", "reference", "ops"]
__version__ = "0.1.0"
