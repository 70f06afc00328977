"""The SIMT emulator itself (issue 13), through the probe kernels of
tests/simt/probe_kernels.cu:

- each emulated PTX instruction, called through device_utils.cuh's wrappers,
  against plain data for every lane: mma.m16n8k16 (f16, bf16) against a
  float64 matmul, ldmatrix .x4 / .x4.trans against the element each lane
  must receive, cp.async against a plain copy (zero-fill, groups). The lane
  layouts here are written from shared/CUDA_FACTS.md 1-2, independently of
  the emulator's (csrc/cuda/simt/ptx.cpp, from the PTX ISA tables);
- shuffles and ballot; float <-> float16/bfloat16 conversions bit for bit
  against torch's (round to nearest even);
- the thread order between barriers follows the seed;
- each class of error the emulator must report, with the source lines.
"""
import os
import re

import pytest
import torch

from conftest import configure

pytestmark = pytest.mark.simt

HERE = os.path.dirname(os.path.abspath(__file__))


def probe(simt, name, inputs, out):
    simt.simt_probe(name, inputs, out)
    return out


def pack(lo, hi):
    """Two 16-bit tensors -> int32 with lo in the low half."""
    lo = lo.view(torch.int16).to(torch.int32) & 0xFFFF
    hi = hi.view(torch.int16).to(torch.int32) & 0xFFFF
    return (lo | (hi << 16)).to(torch.int32)


# ---------------------------------------------------------------------------
# mma.m16n8k16: A (16 x 16), B (16 x 8, k x n), C, D (16 x 8). Lane l,
# g = l // 4, t = l % 4 (CUDA_FACTS 1): A regs: (g, 2t..2t+1), (g+8, 2t..),
# (g, 2t+8..), (g+8, 2t+8..); B regs: (k = 2t..2t+1, n = g), (k = 2t+8.., n = g);
# C/D: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).

def a_registers(g, t):
    """(row, col) of the lower element of each of a lane's A registers."""
    return [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]


def c_elements(g, t):
    """(row, col) of each of a lane's C/D elements."""
    return [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]


def mma_fragments(A, B, C):
    a = torch.empty(32, 4, dtype=torch.int32)
    b = torch.empty(32, 2, dtype=torch.int32)
    c = torch.empty(32, 4, dtype=torch.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r, (row, col) in enumerate(a_registers(g, t)):
            a[lane, r] = pack(A[row, col].reshape(1), A[row, col + 1].reshape(1))[0]
        for r, k in enumerate([2 * t, 2 * t + 8]):
            b[lane, r] = pack(B[k, g].reshape(1), B[k + 1, g].reshape(1))[0]
        for i, (row, col) in enumerate(c_elements(g, t)):
            c[lane, i] = C[row, col]
    return a, b, c


def mma_unpack(d):
    D = torch.empty(16, 8, dtype=torch.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i, (row, col) in enumerate(c_elements(g, t)):
            D[row, col] = d[lane, i]
    return D


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("values", ["integers", "random"])
def test_mma_every_lane(simt, dtype, values):
    g = torch.Generator().manual_seed(1)
    if values == "integers":  # exact in both dtypes and in the float32 result
        A = torch.randint(-8, 9, (16, 16), generator=g).to(dtype)
        B = torch.randint(-8, 9, (16, 8), generator=g).to(dtype)
        C = torch.randint(-64, 65, (16, 8), generator=g).float() / 4
    else:
        A = torch.randn(16, 16, generator=g).to(dtype)
        B = torch.randn(16, 8, generator=g).to(dtype)
        C = torch.randn(16, 8, generator=g)
    a, b, c = mma_fragments(A, B, C)
    d = probe(simt, "mma_f16" if dtype == torch.float16 else "mma_bf16", [a, b, c],
              torch.empty(32, 4))
    expect = (A.double() @ B.double() + C.double()).float()
    got = mma_unpack(d)
    if values == "integers":
        assert torch.equal(got, expect)
    else:
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# ldmatrix .x4: lanes 8i..8i+7 give the rows of matrix i (here: tile rows
# perm[8i + r]); register i of lane l gets (row l // 4, cols 2(l % 4), +1) of
# matrix i, or with .trans (rows 2(l % 4), +1 of col l // 4) (CUDA_FACTS 2).

@pytest.mark.parametrize("trans", [False, True], ids=["x4", "x4_trans"])
def test_ldmatrix_every_lane(simt, trans):
    rows = torch.arange(32).view(32, 1) * 100 + torch.arange(8).view(1, 8)
    tile = rows.to(torch.int16)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(2)).to(torch.int32)
    regs = probe(simt, "ldmatrix_trans" if trans else "ldmatrix", [tile, perm],
                 torch.empty(32, 4, dtype=torch.int32))
    for lane in range(32):
        for i in range(4):
            m = tile[perm[8 * i: 8 * i + 8].long()]  # matrix i as stored (8 x 8)
            r, c = lane // 4, 2 * (lane % 4)
            lo, hi = (m[c, r], m[c + 1, r]) if trans else (m[r, c], m[r, c + 1])
            assert regs[lane, i] == pack(lo.reshape(1), hi.reshape(1))[0], (lane, i)


# ---------------------------------------------------------------------------
# cp.async: two groups per thread; zero-fill where src-size is 0.

def test_cp_async_copy_zero_fill_and_groups(simt):
    g = torch.Generator().manual_seed(3)
    src = torch.randint(1, 255, (128, 16), generator=g, dtype=torch.uint8)
    valid = (torch.rand(128, generator=g) < 0.7).to(torch.int32)
    out = probe(simt, "cp_async", [src, valid], torch.empty(128, 16, dtype=torch.uint8))
    expect = torch.where(valid.bool().view(128, 1), src, torch.zeros_like(src))
    assert torch.equal(out, expect)


def test_shuffles_and_ballot(simt):
    v = torch.arange(32, dtype=torch.int32) * 7 + 3
    out = probe(simt, "shfl", [v], torch.empty(32, 5, dtype=torch.int32))
    lane = torch.arange(32)
    assert torch.equal(out[:, 0], v[31 - lane])
    assert torch.equal(out[:, 1], v[lane ^ 5])
    assert torch.equal(out[:, 2], torch.where(lane >= 3, v[(lane - 3).clamp(min=0)], v))
    assert torch.equal(out[:, 3], torch.where(lane < 30, v[(lane + 2).clamp(max=31)], v))
    assert (out[:, 4] == -0x55555556).all()  # 0xAAAAAAAA (the odd lanes) as an int32


# ---------------------------------------------------------------------------
# Conversions: CUDA's __float2half_rn / __float2bfloat16_rn round to nearest
# even, as torch's CPU casts; 16 bit -> float is exact.

def conversion_inputs():
    g = torch.Generator().manual_seed(4)
    exponents = torch.randint(-30, 20, (20000,), generator=g).float()
    x = torch.randn(20000, generator=g) * torch.pow(2.0, exponents)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    every_half = bits.view(torch.float16).float()
    # ties between neighbouring halves and bfloat16s, and the overflow edge
    ties = (every_half[:-1] + every_half[1:]) / 2
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 1e6, 2.0 ** -24, 2.0 ** -25,
                          2.0 ** -25 * 1.01, 0.0, -0.0, float("inf"), float("-inf"),
                          float("nan"), 3.4e38])
    return torch.cat([x, every_half, ties, edges, -edges])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_float_to_16bit_rounds_like_torch(simt, dtype):
    x = conversion_inputs()
    x = x[torch.isfinite(x) | torch.isinf(x)]
    got = probe(simt, "to_half" if dtype == torch.float16 else "to_bf16", [x],
                torch.empty(x.numel(), dtype=torch.int16))
    assert torch.equal(got, x.to(dtype).view(torch.int16))
    nan = torch.full((4,), float("nan"))
    got_nan = probe(simt, "to_half" if dtype == torch.float16 else "to_bf16", [nan],
                    torch.empty(4, dtype=torch.int16))
    assert torch.isnan(got_nan.view(dtype)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16bit_to_float_exact(simt, dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    got = probe(simt, "from_half" if dtype == torch.float16 else "from_bf16", [bits],
                torch.empty(bits.numel(), dtype=torch.float32))
    expect = bits.view(dtype).float()
    same = (got == expect) | (torch.isnan(got) & torch.isnan(expect))
    assert same.all()


def test_thread_order_follows_the_seed(simt):
    def last(seed):
        configure(seed)
        return int(probe(simt, "last_writer", [], torch.empty(1, dtype=torch.int32))[0])

    runs = {seed: last(seed) for seed in range(6)}
    assert len(set(runs.values())) > 1, runs  # the order varies with the seed ...
    assert all(last(seed) == value for seed, value in runs.items())  # ... and only with it


# ---------------------------------------------------------------------------
# What the emulator must report, with the source lines involved.

def line_of(text):
    """1-based line of `text` in probe_kernels.cu."""
    with open(os.path.join(HERE, "probe_kernels.cu")) as f:
        for n, line in enumerate(f, 1):
            if text in line:
                return n
    raise AssertionError(text)


REPORTS = {
    # probe: (inputs, patterns that must all be in the message)
    "race_across_warps": (lambda: [], [
        r"shared-memory race", r"warp 0 lane 0", r"warp 1 lane 0",
        f"probe_kernels.cu:{line_of('if (threadIdx.x == 0) out<int32_t>(p)[0] = x;')}",
        f"probe_kernels.cu:{line_of('if (threadIdx.x == 32) x = 2;')}",
        "no __syncthreads between them"]),
    "race_within_warp": (lambda: [], [
        r"shared-memory race", "no __syncwarp or __syncthreads between them",
        f"probe_kernels.cu:{line_of('x[threadIdx.x] = int32_t(threadIdx.x);')}",
        "probe_kernels.cu:"
        f"{line_of('out<int32_t>(p)[threadIdx.x] = x[(threadIdx.x + 1) % 32] + y;')}"]),
    "read_before_wait": (lambda: [torch.zeros(512, dtype=torch.uint8)], [
        "while a cp.async of", "in flight", "device_utils.cuh",
        "probe_kernels.cu:"
        f"{line_of('out<unsigned char>(p)[threadIdx.x] = tile[16 * threadIdx.x];')}"]),
    "global_out_of_bounds": (lambda: [torch.zeros(32, dtype=torch.int32)], [
        "reads 4 bytes", "past the end of in0",
        f"probe_kernels.cu:{line_of('in<int32_t>(p, 0)[threadIdx.x + 1]')}"]),
    "write_to_input": (lambda: [torch.zeros(32, dtype=torch.int32)], ["in0 is read-only"]),
    "uninitialized_shared": (lambda: [], [
        "which no thread of this block has written",
        f"probe_kernels.cu:{line_of('out<int32_t>(p)[threadIdx.x] = x[threadIdx.x];')}"]),
    "divergent_barrier": (lambda: [], ["__syncthreads", "divergent"]),
    "partial_warp_shuffle": (lambda: [], ["partial-warp collective", "__shfl_"]),
}


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_error_is_reported(simt, name):
    make_inputs, patterns = REPORTS[name]
    with pytest.raises(RuntimeError) as err:
        probe(simt, name, make_inputs(), torch.zeros(64, dtype=torch.int32))
    message = str(err.value)
    for pattern in patterns:
        assert re.search(pattern, message) or pattern in message, (pattern, message)


def test_synchronized_warp_is_not_reported(simt):
    out = probe(simt, "synced_within_warp", [], torch.zeros(32, dtype=torch.int32))
    lane = torch.arange(32)
    assert torch.equal(out, ((lane + 1) % 32 + (lane ^ 1)).to(torch.int32))
