"""Time and peak memory of callables, for `python -m selfattn` and benchmarks/.

Times: torch.utils.benchmark, implementations measured in interleaved rounds
(so a slow phase of a shared machine hits all of them), median reported.
Peak memory (CPU): the process's peak resident set (VmHWM) above the resident
set before the call, with the peak reset through /proc/self/clear_refs and
glibc told to return large blocks to the system at once, so the number is what
the call itself held at its worst. Linux only; None elsewhere. (Importing this
module sets those glibc options for the whole process: it is for benchmarks.) On CUDA:
torch.cuda.max_memory_allocated above the memory allocated before the call.
"""
from __future__ import annotations

import ctypes
import gc
import platform
import statistics
import subprocess
import sys
from typing import Callable, Dict, Optional

import torch
import torch.utils.benchmark as tbench

def cpu_name() -> str:
    """The CPU's model name (lscpu), for naming the machine of every figure."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.done, self.width = total, 0, width

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label[:48]:<48}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def median_seconds(fns: Dict[str, Callable[[], object]], rounds: int = 3,
                   min_run_time: float = 0.05) -> Dict[str, float]:
    """Median time per call of each function, measured in interleaved rounds."""
    timers = {name: tbench.Timer(stmt="fn()", globals={"fn": fn},
                                 num_threads=torch.get_num_threads())
              for name, fn in fns.items()}
    samples: Dict[str, list] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].extend(timer.blocked_autorange(min_run_time=min_run_time).times)
    return {name: statistics.median(s) for name, s in samples.items()}


def with_backward(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """fn() followed by the backward of its output (with a gradient of ones)."""
    def run() -> None:
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def _tune_malloc() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    # A fixed threshold: large blocks are always mmap'ed and unmapped on free.
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


_tune_malloc()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> Optional[int]:
    """Peak memory held by one call of fn, beyond what was held before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not sys.platform.startswith("linux"):
        return None
    try:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        fn()
        return max(0, _status_kib("VmHWM") - before) * 1024
    except OSError:
        return None
