"""GPU self-tests of the CUDA kernels' building blocks and small sanitizer cases.

    python benchmarks/gpu_selftest.py facts     # CUDA_FACTS.md "first minutes on a GPU"
    python benchmarks/gpu_selftest.py sanitize  # small end-to-end cases, meant to run under
                                                # compute-sanitizer (memcheck/racecheck/synccheck)

`facts` compiles (torch.utils.cpp_extension.load_inline) a few one-warp
kernels built from csrc/cuda/device_utils.cuh, the helpers the flash kernels
use, and checks them exactly against the CPU:
  1. ldmatrix x4 / x4.trans on a swizzled tile holding 100 * row + col: every
     lane receives the elements CUDA_FACTS section 2 predicts;
  2. cp.async zero-fill: rows past the valid count read as 0 in a tile
     poisoned with 0xFF, the rest is the exact data;
  3. S = A B^T (ldmatrix + mma), O = S V with S reused from the C fragments,
     and O again with S read back transposed from shared memory, on small
     integers (exact in fp16/bf16 and fp32), for both dtypes;
  4. quad max / sum: all four lanes of a quad agree with the CPU.
It also prints the device's compute capability and opt-in shared memory.
Exit status 1 on any failure.
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUDA_SRC = r"""
#include <torch/extension.h>
#include "device_utils.cuh"

using namespace selfattn::cuda;

// 1. ldmatrix: tile (16, 64) of T with value 100 * r + c, swizzled; each lane
// reads x4 at row lane % 16, column 8 * (lane / 16) (+ .trans) and stores its
// 4 registers (8 halves) to out[lane][trans][8].
template <typename T>
__global__ void ldsm_kernel(const T* tile, T* out) {
  __shared__ __align__(128) T s[16 * 64];
  const int lane = threadIdx.x;
  for (int idx = lane; idx < 16 * 64; idx += 32) {
    const int r = idx / 64, c = idx % 64;
    s[swz<64>(r, c)] = tile[idx];
  }
  __syncwarp();
  uint32_t a[4], b[4];
  ldsm_x4(a, s + swz<64>(lane % 16, 8 * (lane / 16)));
  ldsm_x4_trans(b, s + swz<64>(lane % 16, 8 * (lane / 16)));
  uint32_t* o = reinterpret_cast<uint32_t*>(out) + lane * 8;
  for (int i = 0; i < 4; ++i) { o[i] = a[i]; o[4 + i] = b[i]; }
}

// 2 + 3. One warp: A (16, 64), B (64, 64) stored [n][k] with `b_rows` valid
// rows (cp.async zero-fill past them), V (64, 64) stored [k][n].
// s_out = A B^T (fp32), o_out = S V (S rounded to T), o2_out = S V with S
// written transposed to shared memory and read back with ldmatrix .trans;
// b_smem = the B tile as it sits in shared memory after a 0xFF poison.
template <typename T>
__global__ void gemm_kernel(const T* A, const T* B, const T* V, int b_rows, float* s_out,
                            float* o_out, float* o2_out, T* b_smem) {
  __shared__ __align__(128) T sA[16 * 64];
  __shared__ __align__(128) T sB[64 * 64];
  __shared__ __align__(128) T sV[64 * 64];
  __shared__ __align__(128) T sST[64 * 32];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 64 * 64; i += 32) reinterpret_cast<uint16_t*>(sB)[i] = 0xFFFF;
  __syncwarp();
  load_tile_async<16, 64, 32>(sA, A, 64, 16, 64, A, lane);
  load_tile_async<64, 64, 32>(sB, B, 64, b_rows, 64, B, lane);
  load_tile_async<64, 64, 32>(sV, V, 64, 64, 64, V, lane);
  cp_async_commit();
  cp_async_wait<0>();
  __syncwarp();
  for (int i = lane; i < 64 * 64; i += 32) b_smem[i] = sB[swz<64>(i / 64, i % 64)];
  float s[8][4] = {};
  warp_gemm_ss<T, 64, 64, 64, 64>(s, sA, 0, sB, 0, 64, lane);
  float o[8][4] = {};
  warp_gemm_rs<T, 64, 64, 64>(o, s, sV, 0, 0, 64, lane);
  for (int nt = 0; nt < 8; ++nt) {
    for (int r = 0; r < 2; ++r) {
      for (int e = 0; e < 2; ++e) {
        const int row = g + 8 * r, col = nt * 8 + 2 * t + e;
        s_out[row * 64 + col] = s[nt][2 * r + e];
        o_out[row * 64 + col] = o[nt][2 * r + e];
      }
    }
  }
  __syncwarp();
  for (int nt = 0; nt < 8; ++nt) {
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = nt * 8 + 2 * t + (e % 2);
      sST[swz<32>(col, row)] = TypeTraits<T>::from_acc(s[nt][e]);
    }
  }
  __syncwarp();
  float o2[8][4] = {};
  warp_gemm_ts<T, 64, 64, 32, 64>(o2, sST, 0, sV, 0, 64, lane);
  for (int nt = 0; nt < 8; ++nt) {
    for (int e = 0; e < 4; ++e) {
      o2_out[(g + 8 * (e / 2)) * 64 + nt * 8 + 2 * t + (e % 2)] = o2[nt][e];
    }
  }
}

// 4. quad reductions of x[lane]
__global__ void quad_kernel(const float* x, float* mx, float* sm) {
  const int lane = threadIdx.x;
  mx[lane] = quad_max(x[lane]);
  sm[lane] = quad_sum(x[lane]);
}

template <typename T> T* ptr(torch::Tensor t) { return reinterpret_cast<T*>(t.data_ptr()); }

torch::Tensor ldsm(torch::Tensor tile) {
  auto out = torch::empty({32, 2, 8}, tile.options());
  if (tile.scalar_type() == torch::kHalf) {
    ldsm_kernel<__half><<<1, 32>>>(ptr<__half>(tile), ptr<__half>(out));
  } else {
    ldsm_kernel<__nv_bfloat16><<<1, 32>>>(ptr<__nv_bfloat16>(tile), ptr<__nv_bfloat16>(out));
  }
  return out;
}

std::vector<torch::Tensor> gemm(torch::Tensor A, torch::Tensor B, torch::Tensor V, int64_t b_rows) {
  auto f = A.options().dtype(torch::kFloat);
  auto s = torch::empty({16, 64}, f), o = torch::empty({16, 64}, f), o2 = torch::empty({16, 64}, f);
  auto b_smem = torch::empty({64, 64}, A.options());
  if (A.scalar_type() == torch::kHalf) {
    gemm_kernel<__half><<<1, 32>>>(ptr<__half>(A), ptr<__half>(B), ptr<__half>(V), int(b_rows),
                                   ptr<float>(s), ptr<float>(o), ptr<float>(o2), ptr<__half>(b_smem));
  } else {
    gemm_kernel<__nv_bfloat16><<<1, 32>>>(ptr<__nv_bfloat16>(A), ptr<__nv_bfloat16>(B),
                                          ptr<__nv_bfloat16>(V), int(b_rows), ptr<float>(s),
                                          ptr<float>(o), ptr<float>(o2), ptr<__nv_bfloat16>(b_smem));
  }
  return {s, o, o2, b_smem};
}

std::vector<torch::Tensor> quad(torch::Tensor x) {
  auto mx = torch::empty_like(x), sm = torch::empty_like(x);
  quad_kernel<<<1, 32>>>(ptr<float>(x), ptr<float>(mx), ptr<float>(sm));
  return {mx, sm};
}
"""

CPP_SRC = """
torch::Tensor ldsm(torch::Tensor tile);
std::vector<torch::Tensor> gemm(torch::Tensor A, torch::Tensor B, torch::Tensor V, int64_t b_rows);
std::vector<torch::Tensor> quad(torch::Tensor x);
"""

FAILURES: list[str] = []


def expect(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        FAILURES.append(what)


def build():
    from torch.utils.cpp_extension import load_inline

    cc = torch.cuda.get_device_capability()
    return load_inline(
        "selfattn_selftest", CPP_SRC, cuda_sources=CUDA_SRC, functions=["ldsm", "gemm", "quad"],
        extra_include_paths=[os.path.join(ROOT, "csrc", "cuda"), os.path.join(ROOT, "csrc")],
        extra_cuda_cflags=["-O2", f"-gencode=arch=compute_{cc[0]}{cc[1]},code=sm_{cc[0]}{cc[1]}"],
        verbose=False)


def facts() -> None:
    props = torch.cuda.get_device_properties(0)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    print(f"device: {props.name}, cc {props.major}.{props.minor}, "
          f"shared memory per block (opt-in): {optin} bytes")
    mod = build()
    for dtype in (torch.float16, torch.bfloat16):
        name = "fp16" if dtype == torch.float16 else "bf16"
        # 1. ldmatrix layouts (CUDA_FACTS 2); values <= 1563 are exact in fp16, bf16 needs < 256
        r = torch.arange(16).view(16, 1)
        c = torch.arange(64).view(1, 64)
        val = (100 * r + c) if dtype == torch.float16 else (16 * r + c) % 256
        got = mod.ldsm(val.to(dtype).cuda()).cpu().float()  # (32 lanes, 2, 8)
        ok = ok_t = True
        for lane in range(32):
            for i in range(4):  # matrix i: rows 8 * (i % 2) .. +7, columns 8 * (i // 2) .. +7
                r0, c0 = 8 * (i % 2), 8 * (i // 2)
                g, t = lane // 4, lane % 4
                plain = [val[r0 + g, c0 + 2 * t], val[r0 + g, c0 + 2 * t + 1]]
                trans = [val[r0 + 2 * t, c0 + g], val[r0 + 2 * t + 1, c0 + g]]
                ok &= got[lane, 0, 2 * i:2 * i + 2].tolist() == [float(x) for x in plain]
                ok_t &= got[lane, 1, 2 * i:2 * i + 2].tolist() == [float(x) for x in trans]
        expect(ok, f"{name} ldmatrix x4 fragment layout")
        expect(ok_t, f"{name} ldmatrix x4.trans fragment layout")
        # 2 + 3. cp.async zero-fill, mma, C->A reuse, transposed A
        gen = torch.Generator().manual_seed(1)
        A, B, V = (torch.randint(-2, 3, shape, generator=gen).float()
                   for shape in ((16, 64), (64, 64), (64, 64)))
        b_rows = 50
        s, o, o2, b_smem = (t.cpu().float() for t in mod.gemm(
            A.to(dtype).cuda(), B.to(dtype).cuda(), V.to(dtype).cuda(), b_rows))
        B_valid = B.clone()
        B_valid[b_rows:] = 0
        expect(torch.equal(b_smem, B_valid), f"{name} cp.async data and zero-fill")
        S = A @ B_valid.T
        expect(torch.equal(s, S), f"{name} mma S = A B^T (ldmatrix + mma.sync, exact)")
        O = S.to(dtype).float() @ V
        expect(torch.equal(o, O), f"{name} O = S V with S from the C fragments (exact)")
        expect(torch.equal(o2, O), f"{name} O = S V with S^T read back by ldmatrix.trans (exact)")
    # 4. quad reductions (CUDA_FACTS 5)
    x = torch.randn(32)
    mx, sm = (t.cpu() for t in mod.quad(x.cuda()))
    quads = x.view(8, 4)
    expect(torch.equal(mx, quads.max(1).values.repeat_interleave(4)), "quad max")
    expect(torch.allclose(sm, quads.sum(1).repeat_interleave(4)), "quad sum")


def sanitize() -> None:
    """Small end-to-end runs touching every kernel family (flash forward, dK/dV
    with atomic dQ, deterministic dQ, D = 256 column split, fallback, probs)."""
    sys.path.insert(0, ROOT)
    import selfattn  # the in-place build of this checkout

    dev = "cuda"
    torch.manual_seed(0)

    def run(B, Sq, Sk, Hq, Hkv, D, dtype, **kw):
        q = torch.randn(B, Sq, Hq, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, Sk, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, Sk, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        out = selfattn.attention(q, k, v, **kw)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        selfattn.attention_weights(q, k, **{n: x for n, x in kw.items() if n != "return_lse"})

    mask = torch.randn(70, 90, device=dev, dtype=torch.float16)
    run(2, 70, 90, 4, 2, 64, torch.float16, causal=True, attn_mask=mask, dropout_p=0.2,
        key_lengths=torch.tensor([90, 33], device=dev))
    run(1, 130, 130, 2, 1, 128, torch.bfloat16, window=(20, 5))
    run(1, 70, 40, 2, 2, 256, torch.bfloat16, causal=True)
    run(1, 33, 33, 2, 2, 20, torch.float32, causal=True, dropout_p=0.1)
    torch.use_deterministic_algorithms(True)
    try:
        run(1, 100, 100, 2, 2, 64, torch.float16, causal=True, dropout_p=0.1)
    finally:
        torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()
    print("sanitize cases ran")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("facts", "sanitize"):
        sys.exit(__doc__)
    if sys.argv[1] == "facts":
        facts()
        if FAILURES:
            sys.exit(f"{len(FAILURES)} self-test(s) failed: {FAILURES}")
    else:
        sanitize()
