// Tensor-core forward in FlashAttention-2's design (CUDA_FACTS 9): one CTA per
// (query block of kBr rows, head, batch); each warp owns 16 query rows. Q stays
// in shared memory; K and V tiles of kBc keys stream through two cp.async
// stages (tile n + 1 loads while tile n is used). Per tile: S = Q K^T with
// ldmatrix + mma.sync m16n8k16 (fp32 accumulators), soft-cap and ALiBi bias
// per element when asked, masks and window applied element-wise only on tiles
// that need them, online softmax in registers
// (log2 domain), dropout, then O += P V with P taken straight from the S
// fragments. The epilogue writes out = O / l (times the dropout scale) and
// lse = max + ln(l); rows that see no key get 0 and -inf. With split-KV
// (params.h: SplitKV) the CTAs of a query block share its key tiles and
// write those to float32 workspaces, which split_kv_combine_kernel merges.
// Included by flash_fwd_{fp16,bf16}.cu, which instantiate run_flash_fwd.
#pragma once
#include "device_utils.cuh"
#include "kernels.h"

namespace selfattn {
namespace cuda {

template <typename T, int kD, bool kMods>
__global__ void __launch_bounds__(FwdConfig<kD>::kWarps * 32, 1)
    flash_fwd_kernel(const AttnParams p, const SplitKV split) {
  using Cfg = FwdConfig<kD>;
  constexpr int kBr = Cfg::kBr, kBc = Cfg::kBc, kThreads = Cfg::kWarps * 32;
  constexpr int kNTs = kBc / 8;  // n-tiles of a score row slab
  constexpr int kNTo = kD / 8;   // n-tiles of an output row slab
  static_assert(kBr == 16 * Cfg::kWarps, "one 16-row slab per warp");

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // (kBr, kD)
  T* sK = sQ + kBr * kD;               // 2 stages x (kBc, kD)
  T* sV = sK + 2 * kBc * kD;           // 2 stages x (kBc, kD)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z / split.splits, h = blockIdx.y, hk = h / (p.Hq / p.Hkv);
  const int64_t m_start = int64_t(blockIdx.x) * kBr;
  const int64_t row0 = m_start + warp * 16;  // first query row of this warp's slab

  const Visibility vis = make_visibility(p, b);
  int64_t j_lo, j_hi, n_lo, n_hi;
  vis.key_range(m_start, min(m_start + kBr, p.Sq) - 1, j_lo, j_hi);
  block_range(j_lo, j_hi, kBc, n_lo, n_hi);
  if (split.splits > 1) {  // this split's share of the tiles (maybe none)
    const int64_t per = (n_hi - n_lo + split.splits - 1) / split.splits;
    n_lo = min(n_hi, n_lo + int64_t(blockIdx.z % split.splits) * per);
    n_hi = min(n_hi, n_lo + per);
  }

  float acc_o[kNTo][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY};  // running row max (log2 domain), rows g and g + 8
  float l_run[2] = {0.f, 0.f};              // this thread's part of the row sums

  if (n_lo < n_hi) {  // uniform over the CTA
    const T* q_head = static_cast<const T*>(p.q.ptr) + b * p.q.batch + h * p.q.head;
    const ScoreCtx sc = make_score_ctx(p, vis, b, h);
    const Dropout drop = make_dropout(p, b * p.Hq + h);

    // A tile of keys lies in one page of a paged pool (page_size % kBc == 0,
    // cuda_backend.cpp), so its rows are p.k.row apart either way.
    auto load_kv = [&](int64_t n, int stage) {
      const int64_t n0 = n * kBc;  // rows >= kv_len are zero-filled (never NaN * 0)
      const T* k_tile = static_cast<const T*>(p.k.ptr) + key_row(p, p.k, b, n0) + hk * p.k.head;
      const T* v_tile = static_cast<const T*>(p.v.ptr) + key_row(p, p.v, b, n0) + hk * p.v.head;
      load_tile_async<kBc, kD, kThreads>(sK + stage * kBc * kD, k_tile, p.k.row,
                                         vis.kv_len - n0, int(p.D), k_tile, tid);
      load_tile_async<kBc, kD, kThreads>(sV + stage * kBc * kD, v_tile, p.v.row,
                                         vis.kv_len - n0, int(p.Dv), v_tile, tid);
    };
    load_tile_async<kBr, kD, kThreads>(sQ, q_head + m_start * p.q.row, p.q.row, p.Sq - m_start,
                                       int(p.D), q_head, tid);
    load_kv(n_lo, 0);
    cp_async_commit();

    for (int64_t n = n_lo; n < n_hi; ++n) {
      const int stage = int(n - n_lo) & 1;
      // Tile n has landed for every thread, and every warp is done with tile n - 1,
      // whose stage the next prefetch overwrites.
      cp_async_wait<0>();
      __syncthreads();
      if (n + 1 < n_hi) load_kv(n + 1, stage ^ 1);
      cp_async_commit();
      const T* sKs = sK + stage * kBc * kD;
      const T* sVs = sV + stage * kBc * kD;
      const int64_t n0 = n * kBc;

      float s[kNTs][4] = {};  // (16, kBc) scores of this warp's rows
      warp_gemm_ss<T, kBc, kD, kD, kD>(s, sQ, warp * 16, sKs, 0, int(p.D), lane);
      const bool full = p.mask.kind == MaskKind::None &&
                        vis.all(m_start, m_start + kBr - 1, n0, n0 + kBc - 1);
      for_each_score<true, kNTs>(sc, row0, n0, lane, [&](int nt, int e, int64_t i, int64_t j,
                                                          float dist) {
        s[nt][e] = score_log2<T, kMods>(s[nt][e], sc, i, j, dist, full, nullptr);
      });

      // Online softmax: a row max of -inf (nothing visible yet) is used as 0 so
      // that exp2 gives 0 instead of NaN (CUDA_FACTS 10.1).
      float m_use[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_run[r];
#pragma unroll
        for (int nt = 0; nt < kNTs; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = quad_max(mx);
        m_use[r] = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m_run[r] - m_use[r]);
        m_run[r] = mx;
        l_run[r] *= alpha;
#pragma unroll
        for (int nt = 0; nt < kNTo; ++nt) {
          acc_o[nt][2 * r] *= alpha;
          acc_o[nt][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNTs; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = exp2f(s[nt][e] - m_use[e >> 1]);
          l_run[e >> 1] += s[nt][e];  // l sums the probabilities before dropout
        }
      }
      if (drop.threshold != 0) {
        const uint32_t keep = dropout_keep_bits<true, kNTs>(drop, row0, n0, lane);
#pragma unroll
        for (int nt = 0; nt < kNTs; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!((keep >> (nt * 4 + e)) & 1u)) s[nt][e] = 0.f;
          }
        }
      }
      warp_gemm_rs<T, kD, kBc, kD>(acc_o, s, sVs, 0, 0, int(p.Dv), lane);
    }
    cp_async_wait<0>();
  }

  // Epilogue: out = O * dropout_scale / l, lse = max + ln(l); 0 and -inf when l = 0.
  // A split writes its rows (b, h, i) of the float32 workspaces instead.
  const int64_t rows0 = (int64_t(blockIdx.z % split.splits) * p.B + b) * p.Hq * p.Sq + h * p.Sq;
  T* o_head = static_cast<T*>(p.out.ptr) + b * p.out.batch + h * p.out.head;
  float* lse = split.splits > 1 ? split.lse + rows0
                                : static_cast<float*>(p.lse) + (b * p.Hq + h) * p.Sq;
  const float dscale = float(p.dropout_scale);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    const int64_t i = row0 + g + 8 * r;
    if (i < p.Sq) {
      const float inv = l > 0.f ? dscale / l : 0.f;
      T* o_row = o_head + i * p.out.row;
#pragma unroll
      for (int nt = 0; nt < kNTo; ++nt) {
        const int d = nt * 8 + 2 * t;
        if (d < p.Dv) {
          const float o0 = acc_o[nt][2 * r] * inv, o1 = acc_o[nt][2 * r + 1] * inv;
          if (split.splits > 1) {
            float* o_part = split.o + (rows0 + i) * p.Dv + d;
            o_part[0] = o0;
            o_part[1] = o1;
          } else {
            *reinterpret_cast<uint32_t*>(o_row + d) = pack2<T>(o0, o1);
          }
        }
      }
      if (t == 0) lse[i] = l > 0.f ? m_run[r] * kLn2 + logf(l) : -INFINITY;
    }
  }
}

// Split-KV merge: one warp per row (b, h, i) of the split forward's
// workspaces: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) O_s
// (O_s already divided by its l_s); 0 and -inf where no split saw a key.
template <typename T>
__global__ void __launch_bounds__(128) split_kv_combine_kernel(const AttnParams p,
                                                               const SplitKV split) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.B * p.Hq * p.Sq;
  const int64_t row = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= rows) return;
  float m = -INFINITY;  // the splits' lse are finite or -inf (the epilogue above)
  for (int s = 0; s < split.splits; ++s) m = fmaxf(m, split.lse[s * rows + row]);
  float sum = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < split.splits; ++s) sum += expf(split.lse[s * rows + row] - m);
  }
  const float lse = sum > 0.f ? m + logf(sum) : -INFINITY;
  const int64_t i = row % p.Sq, h = row / p.Sq % p.Hq, b = row / (p.Sq * p.Hq);
  T* o_row = static_cast<T*>(p.out.ptr) + b * p.out.batch + i * p.out.row + h * p.out.head;
  for (int64_t d = lane; d < p.Dv; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < split.splits && sum > 0.f; ++s) {
      const float w = expf(split.lse[s * rows + row] - lse);  // 0 for a split without keys
      acc += w * split.o[(s * rows + row) * p.Dv + d];
    }
    o_row[d] = TypeTraits<T>::from_acc(acc);
  }
  if (lane == 0) static_cast<float*>(p.lse)[row] = lse;
}

template <typename T, int kD>
void run_flash_fwd(const AttnParams& p, const SplitKV& split, cudaStream_t stream) {
  using Cfg = FwdConfig<kD>;
  const dim3 grid(unsigned((p.Sq + Cfg::kBr - 1) / Cfg::kBr), unsigned(p.Hq),
                  unsigned(p.B * split.splits));
  if (has_modifiers(p)) {
    launch(flash_fwd_kernel<T, kD, true>, grid, Cfg::kWarps * 32, fwd_smem_bytes<kD>(), stream,
           p, split);
  } else {
    launch(flash_fwd_kernel<T, kD, false>, grid, Cfg::kWarps * 32, fwd_smem_bytes<kD>(), stream,
           p, split);
  }
  if (split.splits > 1) {
    const int64_t rows = p.B * p.Hq * p.Sq;
    launch(split_kv_combine_kernel<T>, dim3(unsigned((rows + 3) / 4)), 128, 0, stream, p, split);
  }
}

}  // namespace cuda
}  // namespace selfattn
