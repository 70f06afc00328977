// Tensor-core backward in FlashAttention-2's design (CUDA_FACTS 9), after the
// delta = rowsum(dout * out) pass (run_bwd_delta):
//  - dK/dV kernel: one CTA per (key block of kBc keys, kv head, batch, column
//    slice); each warp owns 16 keys. K and V stay in shared memory; the CTA
//    loops over every query head of its kv head (GQA sums dK, dV over them) and
//    every query block that sees the key block, with Q, dO, lse and delta in two
//    cp.async stages. It computes the transposed tiles S^T = K Q^T and
//    dP^T = V dO^T, so that P^T and dS^T come out as A operands of
//    dV += P^T dO and dK += dS^T Q without leaving registers. dQ += dS K is
//    accumulated in fp32 with atomics (dS^T goes through shared memory for
//    the other warp partition), or -
//  - in deterministic mode, by a dQ kernel per query block (forward-shaped:
//    S = Q K^T, dP = dO V^T, dQ += dS K in registers), with no atomics.
//  - a float attn_mask's gradient is atomically accumulated from dS by the
//    dK/dV kernel (each element once when the mask is not broadcast);
//  - with soft-capping (the kMods instantiations), dS carries the factor
//    1 - tanh², folded into P right after dV's use of it; a float mask's
//    gradient, which is dS before that factor, then runs on the fallback
//    kernels (cuda_backend.cpp).
// P = exp2(S * scale * log2e - lse * log2e) with lse = -inf read as +inf, so
// rows that see no key get P = 0 and zero gradients.
// Included by flash_bwd_{fp16,bf16}.cu, which instantiate run_flash_bwd.
#pragma once
#include <algorithm>

#include "device_utils.cuh"
#include "kernels.h"

namespace selfattn {
namespace cuda {

// lse in the log2 domain, +inf for rows that see no key (so P = exp2(s - L) = 0).
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

template <typename T, int kD, bool kMods>
__global__ void __launch_bounds__(BwdConfig<kD, kMods>::kWarps * 32, 1)
    flash_bwd_dkv_kernel(const AttnBwdParams p, float* dq_accum) {
  using Cfg = BwdConfig<kD, kMods>;
  constexpr int kBr = Cfg::kBr, kBc = Cfg::kBc, kWarps = Cfg::kWarps, kThreads = kWarps * 32;
  constexpr int kDOut = kD / Cfg::kSplit;       // dK/dV/dQ columns of this CTA
  constexpr int kNTs = kBr / 8, kNTo = kDOut / 8;
  // dQ partition: kRowGroups slabs of 16 query rows x kDChunks column chunks.
  constexpr int kRowGroups = kBr / 16, kDChunks = kWarps / kRowGroups, kDQ = kDOut / kDChunks;
  static_assert(kBc == 16 * kWarps, "one 16-key slab per warp");
  static_assert(kWarps % kRowGroups == 0 && kDQ % 16 == 0, "dQ warp partition");

  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);  // (kBc, kD)
  T* sV = sK + kBc * kD;               // (kBc, kD)
  T* sQ = sV + kBc * kD;               // 2 stages x (kBr, kD)
  T* sdO = sQ + 2 * kBr * kD;          // 2 stages x (kBr, kD)
  T* sdS = sdO + 2 * kBr * kD;         // (kBc, kBr): dS^T
  float* sL = reinterpret_cast<float*>(sdS + kBc * kBr);  // 2 stages x kBr: lse_log2
  float* sDelta = sL + 2 * kBr;                            // 2 stages x kBr

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int slice = blockIdx.x % Cfg::kSplit;
  const int64_t n0 = int64_t(blockIdx.x / Cfg::kSplit) * kBc;
  const int64_t hk = blockIdx.y, b = blockIdx.z, G = p.Hq / p.Hkv;
  const int64_t key0 = n0 + warp * 16;  // first key of this warp's slab
  const int col_out = slice * kDOut;    // first dK/dV/dQ column of this CTA

  const Visibility vis = make_visibility(p, b);
  int64_t i_lo, i_hi, m_lo, m_hi;
  vis.query_range(n0, n0 + kBc - 1, p.Sq, i_lo, i_hi);
  block_range(i_lo, i_hi, kBr, m_lo, m_hi);
  const int64_t n_m = m_hi - m_lo;  // query blocks per head
  const int64_t n_iter = G * n_m;   // (head, query block) pairs, head-major

  float acc_dk[kNTo][4] = {};
  float acc_dv[kNTo][4] = {};

  if (n_iter > 0) {  // uniform over the CTA
    const T* k_head = static_cast<const T*>(p.k.ptr) + b * p.k.batch + hk * p.k.head;
    const T* v_head = static_cast<const T*>(p.v.ptr) + b * p.v.batch + hk * p.v.head;
    load_tile_async<kBc, kD, kThreads>(sK, k_head + n0 * p.k.row, p.k.row, vis.kv_len - n0,
                                       int(p.D), k_head, tid);
    load_tile_async<kBc, kD, kThreads>(sV, v_head + n0 * p.v.row, p.v.row, vis.kv_len - n0,
                                       int(p.Dv), v_head, tid);

    auto load_q = [&](int64_t it, int stage) {
      const int64_t h = hk * G + it / n_m, m0 = (m_lo + it % n_m) * kBr;
      const T* q_head = static_cast<const T*>(p.q.ptr) + b * p.q.batch + h * p.q.head;
      const T* do_head = static_cast<const T*>(p.dout.ptr) + b * p.dout.batch + h * p.dout.head;
      load_tile_async<kBr, kD, kThreads>(sQ + stage * kBr * kD, q_head + m0 * p.q.row, p.q.row,
                                         p.Sq - m0, int(p.D), q_head, tid);
      load_tile_async<kBr, kD, kThreads>(sdO + stage * kBr * kD, do_head + m0 * p.dout.row,
                                         p.dout.row, p.Sq - m0, int(p.Dv), do_head, tid);
      const float* lse = static_cast<const float*>(p.lse) + (b * p.Hq + h) * p.Sq;
      const float* delta = static_cast<const float*>(p.delta) + (b * p.Hq + h) * p.Sq;
      for (int r = tid; r < kBr; r += kThreads) {
        const int64_t i = m0 + r;
        sL[stage * kBr + r] = i < p.Sq ? lse_log2(lse[i]) : INFINITY;
        sDelta[stage * kBr + r] = i < p.Sq ? delta[i] : 0.f;
      }
    };
    load_q(0, 0);
    cp_async_commit();

    const float dscale = float(p.dropout_scale);
    for (int64_t it = 0; it < n_iter; ++it) {
      const int stage = int(it & 1);
      const int64_t h = hk * G + it / n_m, m0 = (m_lo + it % n_m) * kBr;
      // Stage `stage` has landed (cp.async and the plain lse/delta stores), and
      // every warp is done with the other stage and with sdS.
      cp_async_wait<0>();
      __syncthreads();
      if (it + 1 < n_iter) load_q(it + 1, stage ^ 1);
      cp_async_commit();
      const T* sQs = sQ + stage * kBr * kD;
      const T* sdOs = sdO + stage * kBr * kD;
      const float* sLs = sL + stage * kBr;
      const float* sDs = sDelta + stage * kBr;

      // P^T (16 keys, kBr queries) of this warp.
      float pt[kNTs][4] = {};
      warp_gemm_ss<T, kBr, kD, kD, kD>(pt, sK, warp * 16, sQs, 0, int(p.D), lane);
      const ScoreCtx sc = make_score_ctx(p, vis, b, h);
      const bool full = p.mask.kind == MaskKind::None &&
                        vis.all(m0, m0 + kBr - 1, n0, n0 + kBc - 1);
      // Dropout factor per element: dscale when kept, 0 when dropped.
      uint32_t keep = 0xffffffffu;
      const Dropout drop = make_dropout(p, b * p.Hq + h);
      if (drop.threshold != 0) keep = dropout_keep_bits<false, kNTs>(drop, key0, m0, lane);

      // P^T, then P^T * Z / (1 - p) for dV and, with soft-capping, P^T * (1 - tanh²)
      // as dS^T's factor (so a float mask's gradient, which is dS^T before the
      // soft-cap's derivative, is left to the fallback kernels when soft-capping).
      float pd[kNTs][4];
      for_each_score<false, kNTs>(sc, key0, m0, lane, [&](int nt, int e, int64_t i, int64_t j,
                                                          float dist) {
        float dtanh = 1.f;
        const float x = score_log2<T, kMods>(pt[nt][e], sc, i, j, dist, full, &dtanh);
        const float prob = exp2f(x - sLs[nt * 8 + 2 * t + (e & 1)]);
        pd[nt][e] = ((keep >> (nt * 4 + e)) & 1u) ? prob * dscale : 0.f;
        pt[nt][e] = prob * dtanh;
      });

      // dV += (P^T * Z / (1 - p)) dO
      warp_gemm_rs<T, kDOut, kBr, kD>(acc_dv, pd, sdOs, 0, col_out, int(p.Dv), lane);

      // dS^T = P^T * (dP^T * Z / (1 - p) - delta), dP^T = V dO^T
      float ds[kNTs][4] = {};
      warp_gemm_ss<T, kBr, kD, kD, kD>(ds, sV, warp * 16, sdOs, 0, int(p.Dv), lane);
#pragma unroll
      for (int nt = 0; nt < kNTs; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float dp = ((keep >> (nt * 4 + e)) & 1u) ? ds[nt][e] * dscale : 0.f;
          ds[nt][e] = pt[nt][e] * (dp - sDs[nt * 8 + 2 * t + (e & 1)]);
        }
      }
      if (p.dmask.ptr != nullptr && slice == 0) {  // never with soft-capping (above)
        add_mask_grad<false, kNTs>(p.dmask, b * p.dmask.batch + h * p.dmask.head, ds, key0, m0,
                                   p.Sq, vis.kv_len, lane);
      }
      // dK += dS^T Q (scaled in the epilogue)
      warp_gemm_rs<T, kDOut, kBr, kD>(acc_dk, ds, sQs, 0, col_out, int(p.D), lane);

      if (dq_accum != nullptr) {  // uniform: dQ (kBr, kDOut) += dS K via fp32 atomics
#pragma unroll
        for (int nt = 0; nt < kNTs; ++nt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            *reinterpret_cast<uint32_t*>(sdS + swz<kBr>(warp * 16 + g + 8 * r, nt * 8 + 2 * t)) =
                pack2<T>(ds[nt][2 * r], ds[nt][2 * r + 1]);
          }
        }
        __syncthreads();
        const int q_row = 16 * (warp % kRowGroups);
        const int q_col = col_out + (warp / kRowGroups) * kDQ;
        float dq[kDQ / 8][4] = {};
        warp_gemm_ts<T, kDQ, kBc, kBr, kD>(dq, sdS, q_row, sK, q_col, int(p.D), lane);
#pragma unroll
        for (int nt = 0; nt < kDQ / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t i = m0 + q_row + g + 8 * (e >> 1);
            const int c = q_col + nt * 8 + 2 * t + (e & 1);
            if (i < p.Sq && c < p.D) {
              atomicAdd(dq_accum + ((b * p.Sq + i) * p.Hq + h) * p.D + c, dq[nt][e]);
            }
          }
        }
      }
    }
    cp_async_wait<0>();
  }

  // Epilogue: dK = scale * acc_dk, dV = acc_dv (zeros for keys no query sees).
  T* dk_head = static_cast<T*>(p.dk.ptr) + b * p.dk.batch + hk * p.dk.head;
  T* dv_head = static_cast<T*>(p.dv.ptr) + b * p.dv.batch + hk * p.dv.head;
  const float scale = float(p.scale);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = key0 + g + 8 * r;
    if (j < p.Sk) {
#pragma unroll
      for (int nt = 0; nt < kNTo; ++nt) {
        const int c = col_out + nt * 8 + 2 * t;
        if (c < p.D) {
          *reinterpret_cast<uint32_t*>(dk_head + j * p.dk.row + c) =
              pack2<T>(acc_dk[nt][2 * r] * scale, acc_dk[nt][2 * r + 1] * scale);
        }
        if (c < p.Dv) {
          *reinterpret_cast<uint32_t*>(dv_head + j * p.dv.row + c) =
              pack2<T>(acc_dv[nt][2 * r], acc_dv[nt][2 * r + 1]);
        }
      }
    }
  }
}

template <typename T, int kD, bool kMods>
__global__ void __launch_bounds__(DqConfig<kD, kMods>::kWarps * 32, 1)
    flash_bwd_dq_kernel(const AttnBwdParams p) {
  using Cfg = DqConfig<kD, kMods>;
  constexpr int kBr = Cfg::kBr, kBc = Cfg::kBc, kThreads = Cfg::kWarps * 32;
  constexpr int kNTs = kBc / 8, kNTo = kD / 8;
  static_assert(kBr == 16 * Cfg::kWarps, "one 16-row slab per warp");

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // (kBr, kD)
  T* sdO = sQ + kBr * kD;              // (kBr, kD)
  T* sK = sdO + kBr * kD;              // 2 stages x (kBc, kD)
  T* sV = sK + 2 * kBc * kD;           // 2 stages x (kBc, kD)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.Hq / p.Hkv);
  const int64_t m_start = int64_t(blockIdx.x) * kBr;
  const int64_t row0 = m_start + warp * 16;

  const Visibility vis = make_visibility(p, b);
  int64_t j_lo, j_hi, n_lo, n_hi;
  vis.key_range(m_start, min(m_start + kBr, p.Sq) - 1, j_lo, j_hi);
  block_range(j_lo, j_hi, kBc, n_lo, n_hi);

  float acc_dq[kNTo][4] = {};
  if (n_lo < n_hi) {  // uniform over the CTA
    const T* q_head = static_cast<const T*>(p.q.ptr) + b * p.q.batch + h * p.q.head;
    const T* do_head = static_cast<const T*>(p.dout.ptr) + b * p.dout.batch + h * p.dout.head;
    const T* k_head = static_cast<const T*>(p.k.ptr) + b * p.k.batch + hk * p.k.head;
    const T* v_head = static_cast<const T*>(p.v.ptr) + b * p.v.batch + hk * p.v.head;
    const ScoreCtx sc = make_score_ctx(p, vis, b, h);
    const Dropout drop = make_dropout(p, b * p.Hq + h);
    const float dscale = float(p.dropout_scale);
    float L[2], delta[2];  // rows g and g + 8
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = row0 + g + 8 * r, idx = (b * p.Hq + h) * p.Sq + i;
      L[r] = i < p.Sq ? lse_log2(static_cast<const float*>(p.lse)[idx]) : INFINITY;
      delta[r] = i < p.Sq ? static_cast<const float*>(p.delta)[idx] : 0.f;
    }

    auto load_kv = [&](int64_t n, int stage) {
      const int64_t n0 = n * kBc;
      load_tile_async<kBc, kD, kThreads>(sK + stage * kBc * kD, k_head + n0 * p.k.row, p.k.row,
                                         vis.kv_len - n0, int(p.D), k_head, tid);
      load_tile_async<kBc, kD, kThreads>(sV + stage * kBc * kD, v_head + n0 * p.v.row, p.v.row,
                                         vis.kv_len - n0, int(p.Dv), v_head, tid);
    };
    load_tile_async<kBr, kD, kThreads>(sQ, q_head + m_start * p.q.row, p.q.row, p.Sq - m_start,
                                       int(p.D), q_head, tid);
    load_tile_async<kBr, kD, kThreads>(sdO, do_head + m_start * p.dout.row, p.dout.row,
                                       p.Sq - m_start, int(p.Dv), do_head, tid);
    load_kv(n_lo, 0);
    cp_async_commit();

    for (int64_t n = n_lo; n < n_hi; ++n) {
      const int stage = int(n - n_lo) & 1;
      cp_async_wait<0>();
      __syncthreads();
      if (n + 1 < n_hi) load_kv(n + 1, stage ^ 1);
      cp_async_commit();
      const T* sKs = sK + stage * kBc * kD;
      const T* sVs = sV + stage * kBc * kD;
      const int64_t n0 = n * kBc;

      float ps[kNTs][4] = {};  // P (16 queries, kBc keys)
      warp_gemm_ss<T, kBc, kD, kD, kD>(ps, sQ, warp * 16, sKs, 0, int(p.D), lane);
      const bool full = p.mask.kind == MaskKind::None &&
                        vis.all(m_start, m_start + kBr - 1, n0, n0 + kBc - 1);
      // P, times 1 - tanh² with soft-capping: dS's factor.
      for_each_score<true, kNTs>(sc, row0, n0, lane, [&](int nt, int e, int64_t i, int64_t j,
                                                         float dist) {
        float dtanh = 1.f;
        const float prob =
            exp2f(score_log2<T, kMods>(ps[nt][e], sc, i, j, dist, full, &dtanh) - L[e >> 1]);
        ps[nt][e] = prob * dtanh;
      });
      uint32_t keep = 0xffffffffu;
      if (drop.threshold != 0) keep = dropout_keep_bits<true, kNTs>(drop, row0, n0, lane);

      float ds[kNTs][4] = {};  // dP = dO V^T, then dS = P * (dP * Z / (1 - p) - delta)
      warp_gemm_ss<T, kBc, kD, kD, kD>(ds, sdO, warp * 16, sVs, 0, int(p.Dv), lane);
#pragma unroll
      for (int nt = 0; nt < kNTs; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float dp = ((keep >> (nt * 4 + e)) & 1u) ? ds[nt][e] * dscale : 0.f;
          ds[nt][e] = ps[nt][e] * (dp - delta[e >> 1]);
        }
      }
      warp_gemm_rs<T, kD, kBc, kD>(acc_dq, ds, sKs, 0, 0, int(p.D), lane);
    }
    cp_async_wait<0>();
  }

  T* dq_head = static_cast<T*>(p.dq.ptr) + b * p.dq.batch + h * p.dq.head;
  const float scale = float(p.scale);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row0 + g + 8 * r;
    if (i < p.Sq) {
#pragma unroll
      for (int nt = 0; nt < kNTo; ++nt) {
        const int c = nt * 8 + 2 * t;
        if (c < p.D) {
          *reinterpret_cast<uint32_t*>(dq_head + i * p.dq.row + c) =
              pack2<T>(acc_dq[nt][2 * r] * scale, acc_dq[nt][2 * r + 1] * scale);
        }
      }
    }
  }
}

// dq = scale * dq_accum, from the float32 (B, Sq, Hq, D) accumulator.
template <typename T>
__global__ void flash_bwd_dq_convert_kernel(const AttnBwdParams p, const float* dq_accum) {
  const int64_t n = p.B * p.Sq * p.Hq * p.D;
  const float scale = float(p.scale);
  T* dq = static_cast<T*>(p.dq.ptr);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = idx % p.D, h = (idx / p.D) % p.Hq, i = (idx / (p.D * p.Hq)) % p.Sq,
                  b = idx / (p.D * p.Hq * p.Sq);
    dq[b * p.dq.batch + i * p.dq.row + h * p.dq.head + d] =
        TypeTraits<T>::from_acc(dq_accum[idx] * scale);
  }
}

template <typename T, int kD, bool kMods>
void launch_flash_bwd(const AttnBwdParams& p, float* dq_accum, cudaStream_t stream) {
  {
    using Cfg = BwdConfig<kD, kMods>;
    const dim3 grid(unsigned((p.Sk + Cfg::kBc - 1) / Cfg::kBc * Cfg::kSplit), unsigned(p.Hkv),
                    unsigned(p.B));
    launch(flash_bwd_dkv_kernel<T, kD, kMods>, grid, Cfg::kWarps * 32, bwd_smem_bytes<kD>(),
           stream, p, dq_accum);
  }
  if (dq_accum != nullptr) {
    const int64_t n = p.B * p.Sq * p.Hq * p.D;
    const unsigned blocks = unsigned(std::min<int64_t>((n + 255) / 256, 65536));
    launch(flash_bwd_dq_convert_kernel<T>, blocks, 256, 0, stream, p, dq_accum);
  } else {
    using Cfg = DqConfig<kD, kMods>;
    const dim3 grid(unsigned((p.Sq + Cfg::kBr - 1) / Cfg::kBr), unsigned(p.Hq), unsigned(p.B));
    launch(flash_bwd_dq_kernel<T, kD, kMods>, grid, Cfg::kWarps * 32, dq_smem_bytes<kD, kMods>(),
           stream, p);
  }
}

template <typename T, int kD>
void run_flash_bwd(const AttnBwdParams& p, float* dq_accum, cudaStream_t stream) {
  if (has_modifiers(p)) {
    launch_flash_bwd<T, kD, true>(p, dq_accum, stream);
  } else {
    launch_flash_bwd<T, kD, false>(p, dq_accum, stream);
  }
}

}  // namespace cuda
}  // namespace selfattn
