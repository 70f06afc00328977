"""Prints the shared libraries a C++ program loads to use selfattn's ops, in
load order: selfattn._C (the op schemas) and the CPU kernel module that
selfattn picked for this CPU (selfattn.ops.CPU_KERNELS).

    build/cpp/selfattn_example $(python examples/cpp/selfattn_libs.py)
"""
import importlib

from selfattn import ops

print(ops._C.__file__, importlib.import_module(f"selfattn.{ops.CPU_KERNELS}").__file__)
