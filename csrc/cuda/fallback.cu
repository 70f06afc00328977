// Simple CUDA kernels for every dtype (float32, float64, float16, bfloat16)
// and every shape the flash kernels do not take (head dims not a multiple of
// 8 or above 256, unaligned rows, pre-sm80 GPUs), plus the two passes both
// backward paths share (delta) and the probabilities op. Plain loads, fp32
// (fp64 for float64) arithmetic, no tensor cores; written to be obviously
// right rather than fast:
//  - forward: one warp per query row; lanes take 32 keys at a time (scores by
//    serial dot products against the q row in shared memory), online softmax
//    over the chunks, lanes then split the head dim to accumulate P V;
//  - backward dq (and the attn_mask gradient): one warp per query row, the same
//    way: dS over key chunks, dq += dS k;
//  - backward dk, dv: one warp per key row, chunks of 32 query rows of every
//    query head of its kv head: dv += P~ dout, dk += dS q. No atomics on
//    dq/dk/dv, so the fallback backward is deterministic;
//  - probs: one warp per query row, lanes over keys, from the saved lse.
// Scores are soft-capped and ALiBi-biased per element when asked (score());
// the backward multiplies dS by the soft-cap's derivative after the
// attn_mask gradient has taken it.
#include <c10/util/Exception.h>

#include <algorithm>

#include "device_utils.cuh"
#include "kernels.h"

namespace selfattn {
namespace cuda {
namespace {

constexpr int kWarps = 4;                    // warps (rows) per block
constexpr int kMaxD = 512;                   // largest head dim (attention.cpp's limit)
constexpr int kPerLane = kMaxD / 32;         // head-dim elements per lane

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename acc_t> __device__ __forceinline__ acc_t neg_inf() {
  return -acc_t(INFINITY);
}

// Row of a (B, S, H, D) tensor.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const BSHD& t, int64_t b, int64_t s, int64_t h) {
  return static_cast<const T*>(t.ptr) + b * t.batch + s * t.row + h * t.head;
}
// Key j of batch entry b in k or v (`t`), paged or not (params.h).
template <typename T>
__device__ __forceinline__ const T* key_ptr(const AttnParams& p, const BSHD& t, int64_t b,
                                            int64_t j, int64_t h) {
  return static_cast<const T*>(t.ptr) + key_row(p, t, b, j) + h * t.head;
}
template <typename T>
__device__ __forceinline__ T* row_ptr_mut(const BSHD& t, int64_t b, int64_t s, int64_t h) {
  return static_cast<T*>(t.ptr) + b * t.batch + s * t.row + h * t.head;
}

// Copies n elements of a global row into this warp's shared row.
template <typename T, typename acc_t>
__device__ __forceinline__ void load_row(acc_t* dst, const T* src, int64_t n, int lane) {
  for (int64_t d = lane; d < n; d += 32) dst[d] = TypeTraits<T>::to_acc(src[d]);
  __syncwarp();
}

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t* s_row, const T* g_row, int64_t n) {
  acc_t sum = 0;
  for (int64_t d = 0; d < n; ++d) sum += s_row[d] * TypeTraits<T>::to_acc(g_row[d]);
  return sum;
}

// Scaled, modified, masked score of query i and key j (one of the two rows in
// shared memory, the other in global memory); -inf when j is not visible to
// i. With soft-capping, *dtanh (when dtanh is not null) receives 1 - tanh².
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t score(const AttnParams& p, const Visibility& vis,
                                       const Modifiers<acc_t>& mods, int64_t mask_base,
                                       const acc_t* s_row, const T* g_row, int64_t i, int64_t j,
                                       acc_t* dtanh) {
  if (!vis(i, j)) return neg_inf<acc_t>();
  acc_t s = dot<T, acc_t>(s_row, g_row, p.D) * acc_t(p.scale);
  if (mods.any()) s = mods.apply(s, acc_t(i + vis.off - j), dtanh);
  if (p.mask.kind != MaskKind::None &&
      !apply_attn_mask<T, acc_t>(p.mask, mask_base, i, j, acc_t(1), s)) {
    return neg_inf<acc_t>();
  }
  return s;
}

// Decomposes a flat (b, h, s) row index, s fastest.
struct RowIndex {
  int64_t b, h, s;
};
__device__ __forceinline__ RowIndex split_row(int64_t row, int64_t H, int64_t S) {
  return RowIndex{row / (S * H), (row / S) % H, row % S};
}

// ---------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) fallback_fwd_kernel(const AttnParams p) {
  using acc_t = typename TypeTraits<T>::acc;
  __shared__ acc_t s_q[kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= p.B * p.Hq * p.Sq) return;  // whole warp; no block barriers below
  const RowIndex r = split_row(row, p.Hq, p.Sq);
  const int64_t b = r.b, h = r.h, i = r.s, hk = h / (p.Hq / p.Hkv);
  acc_t* sq = s_q[warp];
  load_row<T, acc_t>(sq, row_ptr<T>(p.q, b, i, h), p.D, lane);

  const Visibility vis = make_visibility(p, b);
  const Modifiers<acc_t> mods = make_modifiers<acc_t>(p, b, h);
  const Dropout drop = make_dropout(p, b * p.Hq + h);
  const int64_t mask_base = b * p.mask.batch + h * p.mask.head;
  const bool with_out = p.out.ptr != nullptr;
  int64_t j_lo, j_hi;
  vis.key_range(i, i, j_lo, j_hi);

  acc_t acc[kPerLane] = {};
  acc_t m = neg_inf<acc_t>(), l = 0;
  for (int64_t j0 = j_lo; j0 < j_hi; j0 += 32) {
    const int64_t j = j0 + lane;
    const acc_t s = j < j_hi ? score<T, acc_t>(p, vis, mods, mask_base, sq,
                                               key_ptr<T>(p, p.k, b, j, hk), i, j, nullptr)
                             : neg_inf<acc_t>();
    const acc_t m_new = max(m, warp_max(s));
    const acc_t m_use = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;  // no -inf - -inf
    const acc_t alpha = acc_exp(m - m_use);
    acc_t pj = acc_exp(s - m_use);
    l = l * alpha + warp_sum(pj);
    m = m_new;
    if (!with_out) continue;
    if (drop.threshold != 0 && j < j_hi && !drop.keep(i, j)) pj = 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) acc[k] *= alpha;
    const int n = int(min(int64_t(32), j_hi - j0));
    for (int jj = 0; jj < n; ++jj) {
      const acc_t pjj = __shfl_sync(0xffffffffu, pj, jj);
      if (pjj == acc_t(0)) continue;  // uniform over the warp
      const T* v_row = key_ptr<T>(p, p.v, b, j0 + jj, hk);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t d = lane + 32 * k;
        if (d < p.Dv) acc[k] += pjj * TypeTraits<T>::to_acc(v_row[d]);
      }
    }
  }
  if (lane == 0) {
    static_cast<acc_t*>(p.lse)[row] = l > 0 ? m + acc_log(l) : neg_inf<acc_t>();
  }
  if (with_out) {
    const acc_t inv = l > 0 ? acc_t(p.dropout_scale) / l : acc_t(0);
    T* o_row = row_ptr_mut<T>(p.out, b, i, h);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t d = lane + 32 * k;
      if (d < p.Dv) o_row[d] = TypeTraits<T>::from_acc(acc[k] * inv);
    }
  }
}

// delta[b, h, i] = sum_d dout * out (row index b, h, i as lse).
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) bwd_delta_kernel(const AttnBwdParams p) {
  using acc_t = typename TypeTraits<T>::acc;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= p.B * p.Hq * p.Sq) return;
  const RowIndex r = split_row(row, p.Hq, p.Sq);
  const T* o = row_ptr<T>(p.out, r.b, r.s, r.h);
  const T* d_o = row_ptr<T>(p.dout, r.b, r.s, r.h);
  acc_t sum = 0;
  for (int64_t d = lane; d < p.Dv; d += 32) {
    sum += TypeTraits<T>::to_acc(o[d]) * TypeTraits<T>::to_acc(d_o[d]);
  }
  sum = warp_sum(sum);
  if (lane == 0) static_cast<acc_t*>(p.delta)[row] = sum;
}

// dq of one query row (and its attn_mask gradient).
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) fallback_bwd_dq_kernel(const AttnBwdParams p) {
  using acc_t = typename TypeTraits<T>::acc;
  __shared__ acc_t s_q[kWarps][kMaxD];
  __shared__ acc_t s_do[kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= p.B * p.Hq * p.Sq) return;
  const RowIndex r = split_row(row, p.Hq, p.Sq);
  const int64_t b = r.b, h = r.h, i = r.s, hk = h / (p.Hq / p.Hkv);
  acc_t* sq = s_q[warp];
  acc_t* sdo = s_do[warp];
  load_row<T, acc_t>(sq, row_ptr<T>(p.q, b, i, h), p.D, lane);
  load_row<T, acc_t>(sdo, row_ptr<T>(p.dout, b, i, h), p.Dv, lane);

  const Visibility vis = make_visibility(p, b);
  const Modifiers<acc_t> mods = make_modifiers<acc_t>(p, b, h);
  const Dropout drop = make_dropout(p, b * p.Hq + h);
  const int64_t mask_base = b * p.mask.batch + h * p.mask.head;
  const acc_t lse = static_cast<const acc_t*>(p.lse)[row];
  const acc_t delta = static_cast<const acc_t*>(p.delta)[row];
  int64_t j_lo = 0, j_hi = 0;
  if (lse != neg_inf<acc_t>()) vis.key_range(i, i, j_lo, j_hi);  // no key seen: dq = 0

  acc_t acc[kPerLane] = {};
  for (int64_t j0 = j_lo; j0 < j_hi; j0 += 32) {
    const int64_t j = j0 + lane;
    acc_t ds = 0;
    if (j < j_hi) {
      acc_t dtanh = 1;
      const acc_t s =
          score<T, acc_t>(p, vis, mods, mask_base, sq, row_ptr<T>(p.k, b, j, hk), i, j, &dtanh);
      const acc_t prob = acc_exp(s - lse);  // 0 where s = -inf
      if (prob != acc_t(0)) {
        const acc_t keep = drop.threshold == 0 || drop.keep(i, j) ? acc_t(p.dropout_scale) : 0;
        const acc_t dp = dot<T, acc_t>(sdo, row_ptr<T>(p.v, b, j, hk), p.Dv) * keep;
        ds = prob * (dp - delta);
        if (p.dmask.ptr != nullptr) {  // the mask is added after the soft-cap
          atomicAdd(static_cast<acc_t*>(const_cast<void*>(p.dmask.ptr)) + b * p.dmask.batch +
                        h * p.dmask.head + i * p.dmask.row + j * p.dmask.col,
                    ds);
        }
        ds *= dtanh;
      }
    }
    const int n = int(min(int64_t(32), j_hi - j0));
    for (int jj = 0; jj < n; ++jj) {
      const acc_t dsj = __shfl_sync(0xffffffffu, ds, jj);
      if (dsj == acc_t(0)) continue;  // uniform over the warp
      const T* k_row = row_ptr<T>(p.k, b, j0 + jj, hk);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t d = lane + 32 * k;
        if (d < p.D) acc[k] += dsj * TypeTraits<T>::to_acc(k_row[d]);
      }
    }
  }
  T* dq_row = row_ptr_mut<T>(p.dq, b, i, h);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t d = lane + 32 * k;
    if (d < p.D) dq_row[d] = TypeTraits<T>::from_acc(acc[k] * acc_t(p.scale));
  }
}

// dk, dv of one key row, summed over the query heads of its kv head.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) fallback_bwd_dkv_kernel(const AttnBwdParams p) {
  using acc_t = typename TypeTraits<T>::acc;
  __shared__ acc_t s_k[kWarps][kMaxD];
  __shared__ acc_t s_v[kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= p.B * p.Hkv * p.Sk) return;
  const RowIndex r = split_row(row, p.Hkv, p.Sk);
  const int64_t b = r.b, hk = r.h, j = r.s, G = p.Hq / p.Hkv;
  acc_t* sk = s_k[warp];
  acc_t* sv = s_v[warp];
  load_row<T, acc_t>(sk, row_ptr<T>(p.k, b, j, hk), p.D, lane);
  load_row<T, acc_t>(sv, row_ptr<T>(p.v, b, j, hk), p.Dv, lane);

  const Visibility vis = make_visibility(p, b);
  int64_t i_lo, i_hi;
  vis.query_range(j, j, p.Sq, i_lo, i_hi);

  acc_t dk[kPerLane] = {}, dv[kPerLane] = {};
  for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
    const Modifiers<acc_t> mods = make_modifiers<acc_t>(p, b, h);
    const Dropout drop = make_dropout(p, b * p.Hq + h);
    const int64_t mask_base = b * p.mask.batch + h * p.mask.head;
    const acc_t* lse = static_cast<const acc_t*>(p.lse) + (b * p.Hq + h) * p.Sq;
    const acc_t* delta = static_cast<const acc_t*>(p.delta) + (b * p.Hq + h) * p.Sq;
    for (int64_t i0 = i_lo; i0 < i_hi; i0 += 32) {
      const int64_t i = i0 + lane;
      acc_t pd = 0, ds = 0;  // dropped-out probability and score gradient of (i, j)
      if (i < i_hi && lse[i] != neg_inf<acc_t>()) {
        acc_t dtanh = 1;
        const acc_t s = score<T, acc_t>(p, vis, mods, mask_base, sk, row_ptr<T>(p.q, b, i, h),
                                        i, j, &dtanh);
        const acc_t prob = acc_exp(s - lse[i]);
        if (prob != acc_t(0)) {
          const acc_t keep =
              drop.threshold == 0 || drop.keep(i, j) ? acc_t(p.dropout_scale) : 0;
          const acc_t dp = dot<T, acc_t>(sv, row_ptr<T>(p.dout, b, i, h), p.Dv) * keep;
          pd = prob * keep;
          ds = prob * (dp - delta[i]) * dtanh;
        }
      }
      const int n = int(min(int64_t(32), i_hi - i0));
      for (int ii = 0; ii < n; ++ii) {
        const acc_t pdi = __shfl_sync(0xffffffffu, pd, ii);
        const acc_t dsi = __shfl_sync(0xffffffffu, ds, ii);
        if (pdi == acc_t(0) && dsi == acc_t(0)) continue;  // uniform over the warp
        const T* do_row = row_ptr<T>(p.dout, b, i0 + ii, h);
        const T* q_row = row_ptr<T>(p.q, b, i0 + ii, h);
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          const int64_t d = lane + 32 * k;
          if (d < p.Dv) dv[k] += pdi * TypeTraits<T>::to_acc(do_row[d]);
          if (d < p.D) dk[k] += dsi * TypeTraits<T>::to_acc(q_row[d]);
        }
      }
    }
  }
  T* dk_row = row_ptr_mut<T>(p.dk, b, j, hk);
  T* dv_row = row_ptr_mut<T>(p.dv, b, j, hk);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t d = lane + 32 * k;
    if (d < p.D) dk_row[d] = TypeTraits<T>::from_acc(dk[k] * acc_t(p.scale));
    if (d < p.Dv) dv_row[d] = TypeTraits<T>::from_acc(dv[k]);
  }
}

// probs[b, h, i, j] = exp(score - lse) (dropped out), 0 where not visible.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) probs_kernel(const AttnParams p, T* probs) {
  using acc_t = typename TypeTraits<T>::acc;
  __shared__ acc_t s_q[kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= p.B * p.Hq * p.Sq) return;
  const RowIndex r = split_row(row, p.Hq, p.Sq);
  const int64_t b = r.b, h = r.h, i = r.s, hk = h / (p.Hq / p.Hkv);
  acc_t* sq = s_q[warp];
  load_row<T, acc_t>(sq, row_ptr<T>(p.q, b, i, h), p.D, lane);

  const Visibility vis = make_visibility(p, b);
  const Modifiers<acc_t> mods = make_modifiers<acc_t>(p, b, h);
  const Dropout drop = make_dropout(p, b * p.Hq + h);
  const int64_t mask_base = b * p.mask.batch + h * p.mask.head;
  const acc_t lse = static_cast<const acc_t*>(p.lse)[row];
  T* out = probs + row * p.Sk;
  for (int64_t j = lane; j < p.Sk; j += 32) {
    acc_t prob = 0;
    if (lse != neg_inf<acc_t>()) {
      prob = acc_exp(score<T, acc_t>(p, vis, mods, mask_base, sq, row_ptr<T>(p.k, b, j, hk), i, j,
                                     nullptr) -
                     lse);
      if (prob != acc_t(0)) {
        prob *= drop.threshold == 0 || drop.keep(i, j) ? acc_t(p.dropout_scale) : 0;
      }
    }
    out[j] = TypeTraits<T>::from_acc(prob);
  }
}

// ---------------------------------------------------------------------------

unsigned row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks <= 0x7fffffff, "selfattn: too many rows for the CUDA fallback kernels");
  return unsigned(blocks);
}

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F> void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(float{}); break;
    case DType::F64: f(double{}); break;
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace

void run_fallback_fwd(const AttnParams& p, DType dtype, cudaStream_t stream) {
  TORCH_CHECK(p.D <= kMaxD && p.Dv <= kMaxD, "selfattn: head dim above ", kMaxD);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(fallback_fwd_kernel<T>, row_blocks(p.B * p.Hq * p.Sq), kWarps * 32, 0, stream, p);
  });
}

void run_bwd_delta(const AttnBwdParams& p, DType dtype, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(bwd_delta_kernel<T>, row_blocks(p.B * p.Hq * p.Sq), kWarps * 32, 0, stream, p);
  });
}

void run_fallback_bwd(const AttnBwdParams& p, DType dtype, cudaStream_t stream) {
  TORCH_CHECK(p.D <= kMaxD && p.Dv <= kMaxD, "selfattn: head dim above ", kMaxD);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(fallback_bwd_dq_kernel<T>, row_blocks(p.B * p.Hq * p.Sq), kWarps * 32, 0, stream, p);
    launch(fallback_bwd_dkv_kernel<T>, row_blocks(p.B * p.Hkv * p.Sk), kWarps * 32, 0, stream, p);
  });
}

void run_probs(const AttnParams& p, void* probs, DType dtype, cudaStream_t stream) {
  TORCH_CHECK(p.D <= kMaxD, "selfattn: head dim above ", kMaxD);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(probs_kernel<T>, row_blocks(p.B * p.Hq * p.Sq), kWarps * 32, 0, stream, p,
           static_cast<T*>(probs));
  });
}

}  // namespace cuda
}  // namespace selfattn
