// Device helpers shared by every CUDA kernel of selfattn:
//  - the semantics all kernels share: visibility window and key lengths,
//    score modifiers (soft-cap, ALiBi), attn_mask reads, dropout bits
//    (philox.h), dtype conversions;
//  - for the tensor-core kernels: PTX wrappers (cp.async, ldmatrix,
//    mma.sync m16n8k16 with fp32 accumulators), the XOR-swizzled shared-memory
//    tile layout and warp-level GEMMs on m16n8k16 fragments.
// Fragment layouts, ldmatrix addressing and swizzle: shared/CUDA_FACTS.md 1-6.
// Notation: lane = threadIdx.x % 32, g = lane / 4, t = lane % 4. A warp's
// C fragment element e of n-tile nt sits at row g + 8 * (e / 2), column
// 8 * nt + 2 * t + e % 2.
// In the emulated build (SELFATTN_SIMT, tests/simt) simt/device.h stands in
// for CUDA, and the PTX wrappers below call the emulator instead of asm.
#pragma once
#ifdef SELFATTN_SIMT
#include "simt/device.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <type_traits>

#include "../params.h"
#include "../philox.h"

namespace selfattn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------
// Dtypes: accumulation type and conversions.

template <typename T> struct TypeTraits;
template <> struct TypeTraits<float> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
};
template <> struct TypeTraits<double> {
  using acc = double;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
};
template <> struct TypeTraits<__half> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
};
template <> struct TypeTraits<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) {
    return __float2bfloat16_rn(x);
  }
};

// Two floats rounded to T and packed into 32 bits, `lo` in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------
// Visibility: key j is visible to query i when j < kv_len and
// i + off - left <= j <= i + off + right (a negative side is unbounded).

struct Visibility {
  int64_t off, left, right, kv_len;

  __device__ __forceinline__ bool operator()(int64_t i, int64_t j) const {
    return j < kv_len && (left < 0 || j >= i + off - left) && (right < 0 || j <= i + off + right);
  }
  // Every (i, j) of rows [i0, i1] x keys [j0, j1] visible.
  __device__ __forceinline__ bool all(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return j1 < kv_len && (left < 0 || j0 >= i1 + off - left) && (right < 0 || j1 <= i0 + off + right);
  }
  // Keys [lo, hi) that some row of [i0, i1] sees; lo = hi when none.
  __device__ __forceinline__ void key_range(int64_t i0, int64_t i1, int64_t& lo, int64_t& hi) const {
    lo = left >= 0 ? max(int64_t(0), i0 + off - left) : 0;
    hi = right >= 0 ? min(kv_len, i1 + off + right + 1) : kv_len;
    if (hi <= lo) lo = hi = 0;
  }
  // Query rows [lo, hi) within [0, Sq) that see some key of [j0, j1]; lo = hi when none.
  __device__ __forceinline__ void query_range(int64_t j0, int64_t j1, int64_t Sq, int64_t& lo,
                                              int64_t& hi) const {
    j1 = min(j1, kv_len - 1);
    lo = right >= 0 ? max(int64_t(0), j0 - off - right) : 0;
    hi = left >= 0 ? min(Sq, j1 - off + left + 1) : Sq;
    if (j1 < j0 || hi <= lo) lo = hi = 0;
  }
};

// key_lengths values are not checked on CUDA: clamp them to [0, Sk]. With
// diag_per_batch, batch entry b is aligned bottom-right to its key length.
__device__ __forceinline__ Visibility make_visibility(const AttnParams& p, int64_t b) {
  int64_t kv_len = p.Sk;
  if (p.key_lengths != nullptr) kv_len = min(max(p.key_lengths[b], int64_t(0)), p.Sk);
  const int64_t off = p.diag_per_batch ? kv_len - p.Sq : p.diag_offset;
  return Visibility{off, p.window_left, p.window_right, kv_len};
}

// Blocks [blo, bhi) of `blk` positions that cover [lo, hi).
__device__ __forceinline__ void block_range(int64_t lo, int64_t hi, int blk, int64_t& blo,
                                            int64_t& bhi) {
  blo = hi > lo ? lo / blk : 0;
  bhi = hi > lo ? (hi + blk - 1) / blk : 0;
}

// ---------------------------------------------------------------------------
// Score modifiers (params.h) of one (b, h): the scaled score s of query i and
// key j becomes softcap * tanh(s / softcap) - slope * |i + off - j| (off:
// Visibility::off, the batch entry's diagonal offset),
// before the attn_mask. softcap 0 is off; without ALiBi slopes the slope is 0,
// which adds nothing.

__device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float acc_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double acc_abs(double x) { return fabs(x); }

template <typename acc_t> struct Modifiers {
  acc_t softcap, inv_softcap, slope;

  __device__ __forceinline__ bool any() const { return softcap != acc_t(0) || slope != acc_t(0); }
  // s modified; dist = i + off - j. With soft-capping, *dtanh (when
  // dtanh is not null) receives its derivative 1 - tanh², the backward's
  // factor of dS.
  __device__ __forceinline__ acc_t apply(acc_t s, acc_t dist, acc_t* dtanh) const {
    if (softcap != acc_t(0)) {
      const acc_t t = acc_tanh(s * inv_softcap);
      if (dtanh != nullptr) *dtanh = acc_t(1) - t * t;
      s = softcap * t;
    }
    return s - slope * acc_abs(dist);
  }
};

template <typename acc_t>
__device__ __forceinline__ Modifiers<acc_t> make_modifiers(const AttnParams& p, int64_t b,
                                                           int64_t h) {
  Modifiers<acc_t> m{acc_t(p.softcap), 0, 0};
  if (m.softcap != acc_t(0)) m.inv_softcap = acc_t(1) / m.softcap;
  if (p.alibi_slopes != nullptr) m.slope = acc_t(p.alibi_slopes[b * p.alibi_batch + h]);
  return m;
}

// attn_mask at (i, j) of one head (`base` = b * batch + h * head stride):
// false where a bool mask excludes the key; a float mask's value times `mul`
// is added to s.
template <typename T, typename acc_t>
__device__ __forceinline__ bool apply_attn_mask(const MaskView& m, int64_t base, int64_t i,
                                                int64_t j, acc_t mul, acc_t& s) {
  const int64_t idx = base + i * m.row + j * m.col;
  if (m.kind == MaskKind::Bool) return static_cast<const bool*>(m.ptr)[idx];
  if (m.kind == MaskKind::Float) {
    s += mul * acc_t(TypeTraits<T>::to_acc(static_cast<const T*>(m.ptr)[idx]));
  }
  return true;
}

// ---------------------------------------------------------------------------
// Dropout: element (bh, i, j) kept when its Philox draw >= threshold.

__device__ __forceinline__ uint32_t philox_pick(const Philox4& r, int k) {
  return k == 0 ? r.x[0] : k == 1 ? r.x[1] : k == 2 ? r.x[2] : r.x[3];
}

struct Dropout {
  uint64_t seed, offset;
  uint32_t threshold;  // 0: every element is kept (no draw needed)
  int64_t bh;          // b * Hq + h
  int64_t q_start, k_start;  // rows and keys are drawn as q_start + i, k_start + j

  __device__ __forceinline__ bool keep(int64_t i, int64_t j) const {
    const uint64_t key = dropout_position(k_start, j);
    const Philox4 r = dropout_bits(seed, offset, bh, dropout_position(q_start, i), key);
    return philox_pick(r, int(key & 3)) >= threshold;
  }
};

__device__ __forceinline__ Dropout make_dropout(const AttnParams& p, int64_t bh) {
  Dropout d{0, 0, p.dropout_threshold, bh, p.q_start, p.k_start};
  if (d.threshold != 0) {
    d.seed = uint64_t(p.rng_state[0]);
    d.offset = uint64_t(p.rng_state[1]);
  }
  return d;
}

// ---------------------------------------------------------------------------
// Warp reductions.

template <typename acc_t> __device__ __forceinline__ acc_t warp_max(acc_t x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <typename acc_t> __device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// Over the 4 lanes of a quad, which hold one fragment row (CUDA_FACTS 5).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------
// PTX wrappers (sm80+): every inline asm of the kernels is here; the emulated
// build (SELFATTN_SIMT) swaps them for the emulator's instructions.
//  - cp_async_16(dst, src, valid): 16-byte async copy; when !valid the 16
//    destination bytes are zero-filled (src-size 0) and `src` must still be a
//    valid global address. cp_async_commit, cp_async_wait<N>: commit_group,
//    wait_group N (CUDA_FACTS 3).
//  - ldsm_x4, ldsm_x4_trans: ldmatrix .x4 (.trans) (CUDA_FACTS 2).
//  - mma_16816<T>: d += a * b for one 16x8x16 tile (CUDA_FACTS 1).

#ifdef SELFATTN_SIMT
// The array behind the flash kernels' `extern __shared__ ... smem[]`
// (__shared__ is thread_local in the emulator), registered with the emulator.
inline thread_local __align__(128) unsigned char smem[228 * 1024];
inline unsigned char* dynamic_smem() { return smem; }
inline const bool dynamic_smem_registered =
    ::simt::register_dynamic_shared(&dynamic_smem, sizeof(smem));

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  ::simt::cp_async(dst, src, 16, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { ::simt::cp_async_commit(); }
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  ::simt::cp_async_wait(kPending);
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  ::simt::ldmatrix(r, 4, false, p);
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  ::simt::ldmatrix(r, 4, true, p);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  constexpr bool kF16 = std::is_same<T, __half>::value;
  ::simt::mma_m16n8k16(d, a, b, kF16 ? ::simt::MmaType::F16 : ::simt::MmaType::BF16);
}
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // SELFATTN_SIMT

// ---------------------------------------------------------------------------
// Shared-memory tiles: (rows, kCols) row-major, 16-byte chunks XOR-swizzled
// so that the 8 rows of one ldmatrix matrix hit distinct banks (CUDA_FACTS 4):
// kCols a multiple of 64: chunk j of row r -> j ^ (r % 8) within each 64-column
// page (cute Swizzle<3,3,3>); kCols = 32: j -> j ^ ((r / 2) % 4) (Swizzle<2,3,3>).
// Element offset of (r, c); an 8-aligned chunk stays contiguous and 16-B aligned.
template <int kCols> __device__ __forceinline__ int swz(int r, int c) {
  static_assert(kCols == 32 || kCols % 64 == 0, "tile width must be 32 or a multiple of 64");
  if constexpr (kCols == 32) {
    return r * 32 + ((((c >> 3) ^ (r >> 1)) & 3) << 3) + (c & 7);
  } else {
    return r * kCols + (c & ~63) + ((((c >> 3) ^ r) & 7) << 3) + (c & 7);
  }
}

// Async copy of rows [0, rows) x columns [0, cols) of a global tile (row
// stride `stride` elements, 16-byte aligned rows, cols a multiple of 8) into
// a (kRows, kCols) swizzled tile; the rest is zero-filled, reading from
// `fallback`, any valid global address. All kThreads threads call it.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t stride,
                                                int64_t rows, int cols, const T* fallback,
                                                int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int k = 0; k < kChunks / kThreads; ++k) {
    const int idx = tid + k * kThreads;
    const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
    const bool ok = r < rows && c < cols;
    cp_async_16(smem + swz<kCols>(r, c), ok ? gmem + r * stride + c : fallback, ok);
  }
}

// ---------------------------------------------------------------------------
// Warp GEMMs on a warp's 16-row slab; acc holds kN / 8 C fragments (n-tiles).
// k-steps at or beyond k_valid (n-tile pairs at or beyond n_valid) hold only
// zero padding and are skipped; both bounds are warp-uniform.

// acc (16, kN) += A (16, kK) * B^T: A rows [a_row0, a_row0 + 16) of a
// (., kACols) tile, B rows [b_row0, b_row0 + kN) of a (., kBCols) tile, both
// stored (row, k) (CUDA_FACTS 2: A x4; B [n][k] without .trans, x4 = 2 n-tiles).
template <typename T, int kN, int kK, int kACols, int kBCols>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[kN / 8][4], const T* sA, int a_row0,
                                             const T* sB, int b_row0, int k_valid, int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "GEMM tile sizes");
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    if (kk * 16 < k_valid) {
      uint32_t a[4];
      ldsm_x4(a, sA + swz<kACols>(a_row0 + (lane & 15), kk * 16 + 8 * (lane >> 4)));
#pragma unroll
      for (int nt = 0; nt < kN / 8; nt += 2) {
        uint32_t b[4];
        ldsm_x4(b, sB + swz<kBCols>(b_row0 + nt * 8 + (lane & 7) + 8 * (lane >> 4),
                                    kk * 16 + 8 * ((lane >> 3) & 1)));
        mma_16816<T>(acc[nt], a, b[0], b[1]);
        mma_16816<T>(acc[nt + 1], a, b[2], b[3]);
      }
    }
  }
}

// acc (16, kN) += A (16, kK) * B: A is the fp32 C fragments `pa` of an
// earlier (16, kK) product, rounded to T (CUDA_FACTS 6); B rows [b_row0,
// b_row0 + kK), columns [b_col0, b_col0 + kN) of a (., kBCols) tile stored
// (k, n), read with ldmatrix .trans.
template <typename T, int kN, int kK, int kBCols>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[kN / 8][4], const float (&pa)[kK / 8][4],
                                             const T* sB, int b_row0, int b_col0, int n_valid,
                                             int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "GEMM tile sizes");
#pragma unroll
  for (int s = 0; s < kK / 16; ++s) {
    const uint32_t a[4] = {pack2<T>(pa[2 * s][0], pa[2 * s][1]), pack2<T>(pa[2 * s][2], pa[2 * s][3]),
                           pack2<T>(pa[2 * s + 1][0], pa[2 * s + 1][1]),
                           pack2<T>(pa[2 * s + 1][2], pa[2 * s + 1][3])};
#pragma unroll
    for (int nt = 0; nt < kN / 8; nt += 2) {
      if (b_col0 + nt * 8 < n_valid) {
        uint32_t b[4];
        ldsm_x4_trans(b, sB + swz<kBCols>(b_row0 + s * 16 + (lane & 15),
                                          b_col0 + nt * 8 + 8 * (lane >> 4)));
        mma_16816<T>(acc[nt], a, b[0], b[1]);
        mma_16816<T>(acc[nt + 1], a, b[2], b[3]);
      }
    }
  }
}

// acc (16, kN) += A (16, kK) * B where A is stored transposed: A^T rows
// [0, kK), columns [a_col0, a_col0 + 16) of a (kK, kATCols) tile (ldmatrix
// .trans); B rows [0, kK), columns [b_col0, b_col0 + kN) of a (kK, kBCols)
// tile stored (k, n) (.trans).
template <typename T, int kN, int kK, int kATCols, int kBCols>
__device__ __forceinline__ void warp_gemm_ts(float (&acc)[kN / 8][4], const T* sAT, int a_col0,
                                             const T* sB, int b_col0, int n_valid, int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "GEMM tile sizes");
#pragma unroll
  for (int s = 0; s < kK / 16; ++s) {
    uint32_t a[4];
    ldsm_x4_trans(a, sAT + swz<kATCols>(s * 16 + (lane & 7) + 8 * (lane >> 4),
                                        a_col0 + 8 * ((lane >> 3) & 1)));
#pragma unroll
    for (int nt = 0; nt < kN / 8; nt += 2) {
      if (b_col0 + nt * 8 < n_valid) {
        uint32_t b[4];
        ldsm_x4_trans(b, sB + swz<kBCols>(s * 16 + (lane & 15), b_col0 + nt * 8 + 8 * (lane >> 4)));
        mma_16816<T>(acc[nt], a, b[0], b[1]);
        mma_16816<T>(acc[nt + 1], a, b[2], b[3]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Element-wise passes over a warp's score fragments. The fragment's rows start
// at r0 and its columns at c0 (c0 a multiple of 8); with kRowsAreQueries the
// rows are query positions i and the columns key positions j, else the reverse
// (the backward's transposed S^T tiles). kMods: the kernel instantiation with
// the score modifiers (soft-cap, ALiBi).

struct ScoreCtx {
  float scale_log2;  // scale * log2(e)
  float scale;
  Modifiers<float> mods;
  Visibility vis;
  MaskView mask;
  int64_t mask_base;  // b * mask.batch + h * mask.head
  int64_t Sq;
};

__device__ __forceinline__ ScoreCtx make_score_ctx(const AttnParams& p, const Visibility& vis,
                                                   int64_t b, int64_t h) {
  return ScoreCtx{float(p.scale) * kLog2e, float(p.scale), make_modifiers<float>(p, b, h), vis,
                  p.mask, b * p.mask.batch + h * p.mask.head, p.Sq};
}

// Calls f(nt, e, i, j, dist) for each element e of each n-tile nt of a
// warp's fragment whose rows start at r0 and columns at c0: i and j are its
// query and key, dist = i + off - j as float (exact below 2^24).
template <bool kRowsAreQueries, int kNT, typename F>
__device__ __forceinline__ void for_each_score(const ScoreCtx& c, int64_t r0, int64_t c0,
                                               int lane, F&& f) {
  const int g = lane >> 2, t = lane & 3;
  const float dist0 = float((kRowsAreQueries ? r0 - c0 : c0 - r0) + c.vis.off);
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = nt * 8 + 2 * t + (e & 1);
      if constexpr (kRowsAreQueries) {
        f(nt, e, r0 + row, c0 + col, dist0 + float(row - col));
      } else {
        f(nt, e, c0 + col, r0 + row, dist0 + float(col - row));
      }
    }
  }
}

// A raw q.k product of query i and key j -> its log2-domain score: s * scale
// * log2(e), or with the modifiers (kMods) (softcap * tanh(s * scale /
// softcap) - slope * |dist|) * log2(e), then plus a float mask times log2(e);
// -inf when invisible, bool-masked or i >= Sq. `full` (the whole tile
// visible and no attn_mask) skips the checks. With soft-capping, *dtanh
// (when dtanh is not null) receives 1 - tanh². The product is rounded on its
// own (__fmul_rn cannot be contracted): otherwise nvcc fuses it with the
// later `x - max` / `x - lse` into one fma, whose result for the max element
// is the product's rounding error instead of 0, which for huge scores
// overflows exp2 to inf and gives NaN (CUDA_FACTS 10.2, FA2 UNFUSE_FMA).
template <typename T, bool kMods>
__device__ __forceinline__ float score_log2(float s, const ScoreCtx& c, int64_t i, int64_t j,
                                            float dist, bool full, float* dtanh) {
  float x;
  if constexpr (kMods) {
    x = __fmul_rn(c.mods.apply(s * c.scale, dist, dtanh), kLog2e);
  } else {
    x = __fmul_rn(s, c.scale_log2);
  }
  if (!full) {
    bool visible = i < c.Sq && c.vis(i, j);
    if (visible && c.mask.kind != MaskKind::None) {
      visible = apply_attn_mask<T, float>(c.mask, c.mask_base, i, j, kLog2e, x);
    }
    if (!visible) x = -INFINITY;
  }
  return x;
}

// Dropout keep bits of a fragment: bit 4 * nt + e.
template <bool kRowsAreQueries, int kNT>
__device__ __forceinline__ uint32_t dropout_keep_bits(const Dropout& d, int64_t r0, int64_t c0,
                                                      int lane) {
  static_assert(kNT * 4 <= 32, "keep bits must fit 32 bits");
  const int g = lane >> 2, t = lane & 3;
  // Keys col, col + 1 (col even) share one group of 4 draws when k_start is even.
  const bool pairs = kRowsAreQueries && (d.k_start & 1) == 0;  // uniform
  uint32_t bits = 0;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = r0 + g + 8 * half, col = c0 + nt * 8 + 2 * t;
      bool k0, k1;
      if (pairs) {
        const uint64_t key = dropout_position(d.k_start, col);
        const Philox4 r =
            dropout_bits(d.seed, d.offset, d.bh, dropout_position(d.q_start, row), key);
        const bool upper = (key & 2) != 0;
        k0 = (upper ? r.x[2] : r.x[0]) >= d.threshold;
        k1 = (upper ? r.x[3] : r.x[1]) >= d.threshold;
      } else if (kRowsAreQueries) {
        k0 = d.keep(row, col);
        k1 = d.keep(row, col + 1);
      } else {
        k0 = d.keep(col, row);
        k1 = d.keep(col + 1, row);
      }
      bits |= (uint32_t(k0) << (nt * 4 + 2 * half)) | (uint32_t(k1) << (nt * 4 + 2 * half + 1));
    }
  }
  return bits;
}

// atomicAdd of the score gradient ds into the float32 attn_mask gradient
// (strides of `dm`, 0 on broadcast dims, so broadcast dims are summed).
template <bool kRowsAreQueries, int kNT>
__device__ __forceinline__ void add_mask_grad(const MaskView& dm, int64_t base,
                                              const float (&ds)[kNT][4], int64_t r0, int64_t c0,
                                              int64_t Sq, int64_t kv_len, int lane) {
  const int g = lane >> 2, t = lane & 3;
  float* out = static_cast<float*>(const_cast<void*>(dm.ptr));
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = r0 + g + 8 * (e >> 1), col = c0 + nt * 8 + 2 * t + (e & 1);
      const int64_t i = kRowsAreQueries ? row : col, j = kRowsAreQueries ? col : row;
      if (ds[nt][e] != 0.f && i < Sq && j < kv_len) {
        atomicAdd(out + base + i * dm.row + j * dm.col, ds[nt][e]);
      }
    }
  }
}

}  // namespace cuda
}  // namespace selfattn
