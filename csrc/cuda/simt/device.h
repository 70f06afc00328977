// What selfattn's kernels see of CUDA in the emulated build (SELFATTN_SIMT),
// included by device_utils.cuh in place of cuda_fp16.h / cuda_bf16.h: the
// qualifiers, the built-in variables, the intrinsics the kernels call, and
// the entry points of the emulated PTX (cp.async, ldmatrix, mma.sync), which
// device_utils.cuh's PTX wrappers call instead of their inline asm.
//
// Each CUDA thread is a fiber (runtime.cpp); every function below that
// involves other threads (barriers, warp collectives) parks the calling
// fiber until its partners arrive. __shared__ variables are thread_local:
// the runtime treats this library's TLS block as the block's shared memory
// (one block runs at a time), so static __shared__ arrays and the
// `extern __shared__` array keep their CUDA spelling. Memory accesses of the
// kernels are seen through GCC's -fsanitize=thread instrumentation, whose
// hooks the runtime implements (no TSan runtime is linked).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "host.h"

#define __global__ __attribute__((noinline))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local

namespace simt {

// ---- built-in variables of the calling fiber
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// ---- barriers and warp collectives (every lane of `mask` must call the same one)
void syncthreads();
void syncwarp(unsigned mask);
enum class Shfl { Idx, Xor, Up, Down };
uint64_t shfl(Shfl mode, unsigned mask, uint64_t bits, int arg, int width);
unsigned ballot(unsigned mask, bool pred);

// ---- emulated PTX (ptx.cpp)
void cp_async(void* dst, const void* src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix(uint32_t* regs, int num, bool trans, const void* row_addr);
enum class MmaType { F16, BF16 };
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, MmaType type);

// ---- global atomics
float atomic_add(float* addr, float v);
double atomic_add(double* addr, double v);

// The kernels' dynamic shared memory array (device_utils.cuh): `addr`
// returns it for the calling OS thread.
bool register_dynamic_shared(unsigned char* (*addr)(), size_t bytes);

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace simt

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

inline void __syncthreads() { ::simt::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::simt::syncwarp(mask); }

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return simt::from_bits<T>(simt::shfl(simt::Shfl::Idx, mask, simt::to_bits(v), src, width));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return simt::from_bits<T>(simt::shfl(simt::Shfl::Xor, mask, simt::to_bits(v), lane_mask, width));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::from_bits<T>(simt::shfl(simt::Shfl::Up, mask, simt::to_bits(v), int(delta), width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::from_bits<T>(
      simt::shfl(simt::Shfl::Down, mask, simt::to_bits(v), int(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return simt::ballot(mask, pred != 0); }

inline float atomicAdd(float* addr, float v) { return simt::atomic_add(addr, v); }
inline double atomicAdd(double* addr, double v) { return simt::atomic_add(addr, v); }

// ---- math: CUDA's overloads of max/min, and intrinsics with host equivalents.
// (exp2f, expf, logf, exp, log, fmaxf come from <cmath>: correctly rounded or
// nearly so on the host, within a few ulp on the GPU.)
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a < b ? b : a; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
// Rounded on its own: the empty asm keeps g++ (-ffp-contract=fast, see
// tests/simt/simt_build.py) from fusing it into an fma, as nvcc never does.
inline float __fmul_rn(float a, float b) {
  float r = a * b;
  asm("" : "+x"(r));
  return r;
}
