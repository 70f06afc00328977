// Small kernels that probe the SIMT emulator itself (tests/simt/test_simt_runtime.py):
// the emulated PTX instructions through device_utils.cuh's wrappers, lane by
// lane against plain data prepared in Python, and the emulator's error
// reports (races, in-flight cp.async, out-of-bounds, uninitialized shared
// memory, divergence). Compiled into libselfattn_simt.so only; exposed as
//   selfattn_simt::simt_probe(str kernel, Tensor[] inputs, Tensor out) -> ()
// with every input and `out` contiguous CPU tensors; `inputs` are read-only.
#include <torch/library.h>

#include <string>

#include "device_utils.cuh"
#include "kernels.h"

namespace selfattn {
namespace probe {

struct Params {
  const void* in[3] = {nullptr, nullptr, nullptr};
  int64_t in_bytes[3] = {0, 0, 0};
  void* out = nullptr;
  int64_t out_bytes = 0;
};

std::vector<simt::Buffer> launch_buffers(const Params& p) {
  std::vector<simt::Buffer> v;
  static const char* names[3] = {"in0", "in1", "in2"};
  for (int i = 0; i < 3; ++i) {
    v.push_back(simt_ops::flat(names[i], p.in[i], p.in_bytes[i], 1, false));
  }
  v.push_back(simt_ops::flat("out", p.out, p.out_bytes, 1, true));
  return v;
}

template <typename T> __device__ const T* in(const Params& p, int i) {
  return static_cast<const T*>(p.in[i]);
}
template <typename T> __device__ T* out(const Params& p) { return static_cast<T*>(p.out); }

// ---- PTX, one warp: registers in, registers out, as the lanes hold them.

// in0: a (32 lanes x 4 regs), in1: b (32 x 2), in2: c (32 x 4 float); out: d (32 x 4 float).
template <typename T> __global__ void mma_kernel(const Params p) {
  const int lane = threadIdx.x;
  uint32_t a[4];
  float d[4];
  for (int i = 0; i < 4; ++i) a[i] = in<uint32_t>(p, 0)[lane * 4 + i];
  for (int i = 0; i < 4; ++i) d[i] = in<float>(p, 2)[lane * 4 + i];
  cuda::mma_16816<T>(d, a, in<uint32_t>(p, 1)[lane * 2], in<uint32_t>(p, 1)[lane * 2 + 1]);
  for (int i = 0; i < 4; ++i) out<float>(p)[lane * 4 + i] = d[i];
}

// in0: 32 rows of 8 x 16 bits; in1: the row each lane gives (int32 x 32);
// out: the 4 registers of each lane (32 x 4).
template <bool kTrans> __global__ void ldmatrix_kernel(const Params p) {
  __shared__ __align__(16) uint16_t tile[32 * 8];
  const int lane = threadIdx.x;
  for (int i = 0; i < 8; ++i) tile[lane * 8 + i] = in<uint16_t>(p, 0)[lane * 8 + i];
  __syncwarp();
  uint32_t r[4];
  const uint16_t* row = tile + 8 * in<int32_t>(p, 1)[lane];
  if (kTrans) {
    cuda::ldsm_x4_trans(r, row);
  } else {
    cuda::ldsm_x4(r, row);
  }
  for (int i = 0; i < 4; ++i) out<uint32_t>(p)[lane * 4 + i] = r[i];
}

// 64 threads; in0: 128 chunks of 16 bytes; in1: valid flag per chunk (int32).
// Thread t copies chunks t (group 1) and 64 + t (group 2), waits for group 1
// with wait_group 1, then for both; out: the shared tile after a barrier.
__global__ void cp_async_kernel(const Params p) {
  __shared__ __align__(16) unsigned char tile[128 * 16];
  const int t = threadIdx.x;
  const unsigned char* src = in<unsigned char>(p, 0);
  const int32_t* valid = in<int32_t>(p, 1);
  cuda::cp_async_16(tile + 16 * t, src + 16 * t, valid[t] != 0);
  cuda::cp_async_commit();
  cuda::cp_async_16(tile + 16 * (64 + t), src + 16 * (64 + t), valid[64 + t] != 0);
  cuda::cp_async_commit();
  cuda::cp_async_wait<1>();
  const unsigned char first = tile[16 * t];  // group 1 has landed for this thread
  cuda::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 32; ++i) out<unsigned char>(p)[32 * t + i] = tile[32 * t + i];
  if (first != tile[16 * t]) out<unsigned char>(p)[0] = 0xee;
}

// ---- collectives, one warp: out (32 x 5 int32): shfl idx (lane 31 - l),
// xor 5, up 3, down 2, ballot of odd lanes; in0 holds each lane's value.
__global__ void shfl_kernel(const Params p) {
  const int lane = threadIdx.x;
  const int v = in<int32_t>(p, 0)[lane];
  int32_t* o = out<int32_t>(p) + lane * 5;
  o[0] = __shfl_sync(0xffffffffu, v, 31 - lane);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[2] = __shfl_up_sync(0xffffffffu, v, 3);
  o[3] = __shfl_down_sync(0xffffffffu, v, 2);
  o[4] = int32_t(__ballot_sync(0xffffffffu, lane & 1));
}

// ---- conversions, 32 threads over n values: in0 float32 -> out 16-bit patterns
// (round to nearest even), or in0 16-bit patterns -> out float32.
template <typename T> __global__ void to_16bit_kernel(const Params p) {
  const int64_t n = p.in_bytes[0] / 4;
  for (int64_t i = threadIdx.x; i < n; i += 32) {
    out<T>(p)[i] = cuda::TypeTraits<T>::from_acc(in<float>(p, 0)[i]);
  }
}
template <typename T> __global__ void from_16bit_kernel(const Params p) {
  const int64_t n = p.in_bytes[0] / 2;
  for (int64_t i = threadIdx.x; i < n; i += 32) {
    out<float>(p)[i] = cuda::TypeTraits<T>::to_acc(in<T>(p, 0)[i]);
  }
}

// ---- thread order: every thread of 4 warps writes its index to out[0]; the
// last one to run wins (global memory has no race detector).
__global__ void last_writer(const Params p) { out<int32_t>(p)[0] = int32_t(threadIdx.x); }

// ---- what the emulator must report (each writes out[0] so that it does something).

__global__ void race_across_warps(const Params p) {  // 64 threads
  __shared__ int32_t x;
  if (threadIdx.x == 0) x = 1;
  __syncthreads();
  if (threadIdx.x == 0) out<int32_t>(p)[0] = x;
  if (threadIdx.x == 32) x = 2;  // no barrier since thread 0's read
}
__global__ void race_within_warp(const Params p) {  // 32 threads; a shuffle orders no memory
  __shared__ int32_t x[32];
  x[threadIdx.x] = int32_t(threadIdx.x);
  const int32_t y = __shfl_xor_sync(0xffffffffu, int32_t(threadIdx.x), 1);
  out<int32_t>(p)[threadIdx.x] = x[(threadIdx.x + 1) % 32] + y;
}
__global__ void synced_within_warp(const Params p) {  // the same with __syncwarp: no report
  __shared__ int32_t x[32];
  x[threadIdx.x] = int32_t(threadIdx.x);
  const int32_t y = __shfl_xor_sync(0xffffffffu, int32_t(threadIdx.x), 1);
  __syncwarp();
  out<int32_t>(p)[threadIdx.x] = x[(threadIdx.x + 1) % 32] + y;
}
__global__ void read_before_wait(const Params p) {  // 32 threads
  __shared__ __align__(16) unsigned char tile[32 * 16];
  cuda::cp_async_16(tile + 16 * threadIdx.x, in<unsigned char>(p, 0) + 16 * threadIdx.x, true);
  cuda::cp_async_commit();
  out<unsigned char>(p)[threadIdx.x] = tile[16 * threadIdx.x];
  cuda::cp_async_wait<0>();
}
__global__ void global_out_of_bounds(const Params p) {  // in0 has 32 int32
  out<int32_t>(p)[threadIdx.x] = in<int32_t>(p, 0)[threadIdx.x + 1];
}
__global__ void write_to_input(const Params p) {
  const_cast<int32_t*>(in<int32_t>(p, 0))[threadIdx.x] = 0;
}
__global__ void uninitialized_shared(const Params p) {
  __shared__ int32_t x[32];
  if (threadIdx.x > 0) x[threadIdx.x] = 1;
  __syncthreads();
  out<int32_t>(p)[threadIdx.x] = x[threadIdx.x];
}
__global__ void divergent_barrier(const Params p) {  // 64 threads
  if (threadIdx.x < 32) __syncthreads();
  out<int32_t>(p)[threadIdx.x] = 1;
}
__global__ void partial_warp_shuffle(const Params p) {  // lanes 16-31 leave
  if (threadIdx.x >= 16) return;
  out<int32_t>(p)[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

struct Probe {
  const char* name;
  void (*kernel)(const Params);
  unsigned threads;
};
const Probe kProbes[] = {
    {"mma_f16", mma_kernel<__half>, 32},
    {"mma_bf16", mma_kernel<__nv_bfloat16>, 32},
    {"ldmatrix", ldmatrix_kernel<false>, 32},
    {"ldmatrix_trans", ldmatrix_kernel<true>, 32},
    {"cp_async", cp_async_kernel, 64},
    {"shfl", shfl_kernel, 32},
    {"to_half", to_16bit_kernel<__half>, 32},
    {"to_bf16", to_16bit_kernel<__nv_bfloat16>, 32},
    {"from_half", from_16bit_kernel<__half>, 32},
    {"from_bf16", from_16bit_kernel<__nv_bfloat16>, 32},
    {"last_writer", last_writer, 128},
    {"race_across_warps", race_across_warps, 64},
    {"race_within_warp", race_within_warp, 32},
    {"synced_within_warp", synced_within_warp, 32},
    {"read_before_wait", read_before_wait, 32},
    {"global_out_of_bounds", global_out_of_bounds, 32},
    {"write_to_input", write_to_input, 32},
    {"uninitialized_shared", uninitialized_shared, 32},
    {"divergent_barrier", divergent_barrier, 64},
    {"partial_warp_shuffle", partial_warp_shuffle, 32},
};

void run(const std::string& name, const std::vector<at::Tensor>& inputs, const at::Tensor& out) {
  TORCH_CHECK(inputs.size() <= 3 && out.is_contiguous() && out.is_cpu(),
              "simt_probe: bad arguments");
  Params p;
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK(inputs[i].is_contiguous() && inputs[i].is_cpu(), "simt_probe: bad input");
    p.in[i] = inputs[i].data_ptr();
    p.in_bytes[i] = inputs[i].nbytes();
  }
  p.out = out.data_ptr();
  p.out_bytes = out.nbytes();
  simt_ops::op_types() = simt_ops::OpTypes{1, 1};
  for (const Probe& k : kProbes) {
    if (name == k.name) {
      cuda::launch(k.kernel, 1, k.threads, 0, nullptr, p);
      return;
    }
  }
  TORCH_CHECK(false, "simt_probe: no probe kernel ", name);
}

}  // namespace probe
}  // namespace selfattn

TORCH_LIBRARY_FRAGMENT(selfattn, m) {
  m.def("simt_probe(str kernel, Tensor[] inputs, Tensor out) -> ()", &::selfattn::probe::run);
}
