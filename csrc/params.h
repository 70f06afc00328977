// Plain parameter structs between ATen and the kernels: pointers, sizes,
// strides (in elements), scale, visibility window, score modifiers (soft-cap,
// ALiBi), mask and dropout settings.
// Kernels (CPU and CUDA) never see at::Tensor; ops.cpp-side code fills these.
// Naming: B batch, Sq/Sk query/key length, Hq/Hkv query/key-value heads,
// D head dim of q and k, Dv head dim of v and out.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SELFATTN_HD __host__ __device__ __forceinline__
#else
#define SELFATTN_HD inline
#endif

namespace selfattn {

// A (B, S, H, D) tensor: base pointer and strides of its first three dims.
// The last dim is contiguous.
struct BSHD {
  void* ptr = nullptr;
  int64_t batch = 0;  // stride between batch entries
  int64_t row = 0;    // stride between sequence positions
  int64_t head = 0;   // stride between heads
};

enum class MaskKind : int32_t { None = 0, Bool = 1, Float = 2 };

// attn_mask seen as (B, Hq, Sq, Sk) without expanding it: broadcast dims have
// stride 0. A bool mask is True where the key takes part; a float mask is
// added to the scaled scores and has the dtype of q.
struct MaskView {
  const void* ptr = nullptr;
  MaskKind kind = MaskKind::None;
  int64_t batch = 0, head = 0, row = 0, col = 0;  // strides
};

struct AttnParams {
  int64_t B = 0, Sq = 0, Sk = 0, Hq = 0, Hkv = 0, D = 0, Dv = 0;
  BSHD q, k, v, out;
  // (B, Hq, Sq) contiguous logsumexp of the scaled, masked scores: float32,
  // or float64 for float64 inputs. -inf for rows that see no key.
  void* lse = nullptr;
  double scale = 1.0;
  // Key j is visible to query i when
  //   i + diag_offset - window_left <= j <= i + diag_offset + window_right,
  // a negative window side meaning unbounded (causal sets window_right = 0).
  int64_t window_left = -1, window_right = -1;
  // Sk - Sq for bottom-right alignment, 0 for top-left, or the offset of a
  // block of a larger attention; |diag_offset| <= 2^62 (attention.cpp checks).
  int64_t diag_offset = 0;
  // Bottom-right per batch entry (CUDA kernels only: Backend::per_batch_diag):
  // batch entry b's offset is then key_lengths[b] - Sq (diag_offset unused),
  // as a KV cache step over sequences of different lengths needs.
  bool diag_per_batch = false;
  // Score modifiers, applied to the scaled score s of query i and key j in
  // this order, before the attn_mask and the visibility: soft-capping
  // s -> softcap * tanh(s / softcap) (0 = off), then the ALiBi bias
  // -slope * |i + off - j| (off the diagonal offset of batch entry b) with
  // slope = alibi_slopes[b * alibi_batch + h]
  // (float32, contiguous (Hq,) or (B, Hq); null = off).
  double softcap = 0.0;
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch = 0;  // Hq for (B, Hq) slopes, 0 for (Hq,)
  const int64_t* key_lengths = nullptr;  // (B,): keys j >= key_lengths[b] are padding
  MaskView mask;
  // Dropout on the probabilities: element kept when its Philox draw is
  // >= dropout_threshold (= p * 2^32); kept values are scaled by dropout_scale.
  uint32_t dropout_threshold = 0;
  double dropout_scale = 1.0;
  const int64_t* rng_state = nullptr;  // (seed, offset), on the device of q
  // Positions of q's row 0 and k's row 0 in a larger sequence, for dropout
  // only: element (b, h, i, j) draws as element (b, h, q_start + i, k_start + j).
  int64_t q_start = 0, k_start = 0;
  // Paged keys and values (FlashAttention's block_table; forward only):
  // when `pages` is set, k and v are pools of pages (num_pages, page_size,
  // Hkv, D|Dv), k.batch and v.batch are their page strides, and key j of
  // batch entry b is row j % page_size of page pages[b * pages_batch + j /
  // page_size] (key_row below). The caller checks the page indices against
  // the pool's num_pages.
  const int32_t* pages = nullptr;
  int64_t page_size = 0, num_pages = 0, pages_batch = 0;
  // Split-KV of the forward (torch's and FlashAttention's num_splits): 0 lets
  // the backend choose from the shape and the threads or SMs, 1 never splits,
  // n > 1 splits each query block's keys n ways (fewer when they span fewer
  // key tiles).
  int64_t num_splits = 0;
  int device = -1;  // CUDA device index of the tensors, -1 on CPU
};

// Split-KV of the CUDA flash forward, for few query blocks over many keys (a
// decode step of a small batch would leave most SMs idle): each (query block,
// head, batch) gets `splits` CTAs, split s taking its share of the block's key
// tiles and writing O_s / l_s and its logsumexp into the float32 workspaces o
// (splits, B, Hq, Sq, Dv) and lse (splits, B, Hq, Sq); a second kernel merges
// them through their logsumexp into out and lse (FlashAttention's split-KV).
// splits = 1: no workspace, the forward writes out and lse itself.
struct SplitKV {
  int splits = 1;
  float* o = nullptr;
  float* lse = nullptr;
};

// Offset in elements of key j of batch entry b in k or v (`t`), head 0.
SELFATTN_HD int64_t key_row(const AttnParams& p, const BSHD& t, int64_t b, int64_t j) {
  if (p.pages == nullptr) return b * t.batch + j * t.row;
  return int64_t(p.pages[b * p.pages_batch + j / p.page_size]) * t.batch +
         (j % p.page_size) * t.row;
}

// A window side that bounds nothing for any query i in [0, Sq) and key j in
// [0, Sk) at this diag_offset becomes unbounded (-1): the same visibility,
// and the kernels' index arithmetic (i + diag_offset +- window, j -
// diag_offset +- window) then stays within Sq + Sk + |diag_offset|, far from
// int64 overflow for |diag_offset| <= 2^62 and windows up to 2^63 - 1.
// With diag_per_batch the offsets lie in [-Sq, Sk - Sq]: the largest bounds
// the left side, the smallest the right.
inline void normalize_window(AttnParams& p) {
  const int64_t off_max = p.diag_per_batch ? p.Sk - p.Sq : p.diag_offset;
  const int64_t off_min = p.diag_per_batch ? -p.Sq : p.diag_offset;
  if (p.window_left >= p.Sq + off_max) p.window_left = -1;  // j >= i + off - left: always
  if (p.window_right >= p.Sk - off_min) p.window_right = -1;  // j <= i + off + right: always
}

struct AttnBwdParams : AttnParams {
  BSHD dout, dq, dk, dv;
  // Gradient of a float attn_mask, accumulated (summed over broadcast dims)
  // into a contiguous buffer of the mask's own shape in the accumulation
  // dtype; strides as in `mask` (0 on broadcast dims). ptr is null when not asked.
  MaskView dmask;
  void* delta = nullptr;  // (B, Hq, Sq) rowsum(dout * out), accumulation dtype
};

}  // namespace selfattn
