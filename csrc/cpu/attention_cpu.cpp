// CPU kernels of the selfattn ops: FlashAttention's algorithm on tiles.
//
// Forward: one task per (b, hq, block of query rows: kTaskRows, or kBlockM
// on small problems), or per (b, hkv, rows) for the query heads of a GQA
// group when there are few rows (decoding), and then, when such tasks leave
// threads idle, per range of keys too (split-KV: partial results merged
// through their logsumexp after the parallel loop). A task streams the
// visible key tiles (kBlockN keys, contiguous or through a paged cache's
// block table) past its rows, copying each once into dense tiles (KVTile), and for each
// sub-block of kBlockM rows computes S = (scale Q) Kᵀ, soft-caps it and
// adds the ALiBi bias (from the indices, per tile) and the mask, keeps the
// running row max and sum (online softmax) and accumulates O += P V.
// Backward: delta = rowsum(dO ∘ O); then one task per (b, hkv) (or per key
// block of it when there are fewer heads than threads) that visits every
// query head of the group, its key blocks and the query tiles that see them,
// recomputes P = exp(S - lse) on transposed tiles (keys as rows, so no
// product needs a transposed operand) and accumulates dK, dV per key block
// and dQᵀ per head (or per chunk of tasks when key blocks are split:
// parallel_chunks); with a soft-cap, dS carries its derivative 1 - tanh² (kept
// per tile). Deterministic for a given thread count, also when run inline in
// another parallel region (varlen's short sequences side by side). Probs: one
// task per query block, computing lse first when it is not given.
//
// Tiles are converted to the accumulation type (float, or double for float64)
// and multiplied by `matmul`: for float, oneDNN's batch-reduce GEMM
// micro-kernel through ATen's cpublas::brgemm (JIT-compiled for the running
// CPU), else a register-blocked micro-kernel (gemm_acc). The softmax
// arithmetic is at::vec, with an AVX-512 exp and 16 x 16 transpose of our
// own. Extra memory is O(B·H·S) plus per-thread tiles (whose buffers each
// thread keeps for its next call, up to 1 MiB: TileCache) and, in the
// backward, a (D, Sq) dQᵀ accumulator per thread or, when key blocks are
// split, a (B, Hq, D, Sq) one per chunk of tasks: no Sq x Sk buffer and no
// per-thread copy of K, V, Q or dO. Dropout bits come from philox.h,
// keyed by (b, h, q_start + i, k_start + j), so the backward regenerates the
// forward's mask and a block of a larger attention draws the whole's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "../philox.h"

namespace selfattn {
namespace {

// Tile sizes (query rows x keys) of the forward and probs kernels, and of the backward.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 256;
constexpr int64_t kTaskRows = 512;  // query rows per forward task (sub-blocks of kBlockM)
constexpr int64_t kBwdBlockM = 64;
constexpr int64_t kBwdBlockN = 256;

template <typename T>
using Vec = at::vec::Vectorized<T>;

// ---------------------------------------------------------------------------
// Micro-kernel: C (M x N, row stride ldc) (+)= A (M x K) * B (K x N, row stride ldb).
// A is read element-wise through (a_rs, a_cs) strides, so transposed A costs
// nothing; B and C rows are contiguous. kRows rows of C and two vectors of
// columns stay in registers across the K loop.

template <typename T, int kRows>
void gemm_rows(int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t kVec = Vec<T>::size();
  int64_t n = 0;
  for (; n + 2 * kVec <= N; n += 2 * kVec) {
    Vec<T> c0[kRows], c1[kRows];
    for (int r = 0; r < kRows; ++r) {
      c0[r] = accumulate ? Vec<T>::loadu(C + r * ldc + n) : Vec<T>(T(0));
      c1[r] = accumulate ? Vec<T>::loadu(C + r * ldc + n + kVec) : Vec<T>(T(0));
    }
    for (int64_t k = 0; k < K; ++k) {
      const Vec<T> b0 = Vec<T>::loadu(B + k * ldb + n);
      const Vec<T> b1 = Vec<T>::loadu(B + k * ldb + n + kVec);
      for (int r = 0; r < kRows; ++r) {
        const Vec<T> a(A[r * a_rs + k * a_cs]);
        c0[r] = at::vec::fmadd(a, b0, c0[r]);
        c1[r] = at::vec::fmadd(a, b1, c1[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      c0[r].store(C + r * ldc + n);
      c1[r].store(C + r * ldc + n + kVec);
    }
  }
  for (; n < N; n += kVec) {
    const int64_t count = std::min<int64_t>(kVec, N - n);
    Vec<T> c[kRows];
    for (int r = 0; r < kRows; ++r) {
      c[r] = accumulate ? Vec<T>::loadu(C + r * ldc + n, count) : Vec<T>(T(0));
    }
    for (int64_t k = 0; k < K; ++k) {
      const Vec<T> b = Vec<T>::loadu(B + k * ldb + n, count);
      for (int r = 0; r < kRows; ++r) {
        c[r] = at::vec::fmadd(Vec<T>(A[r * a_rs + k * a_cs]), b, c[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) c[r].store(C + r * ldc + n, count);
  }
}

template <typename T>
void gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
              const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    gemm_rows<T, 4>(N, K, A + m * a_rs, a_rs, a_cs, B, ldb, C + m * ldc, ldc, accumulate);
  }
  const T* a = A + m * a_rs;
  T* c = C + m * ldc;
  switch (M - m) {
    case 3: gemm_rows<T, 3>(N, K, a, a_rs, a_cs, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_rows<T, 2>(N, K, a, a_rs, a_cs, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_rows<T, 1>(N, K, a, a_rs, a_cs, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

// C (M x N, ldc) (+)= A (M x K, lda) * B (K x N, ldb), all row-major.
bool brgemm_available() {
  static const bool ok = [] {
    try {
      float a[16] = {}, b[16 * 16] = {}, c[16 * 16];
      at::native::cpublas::brgemm(16, 16, 1, 1, 16, 16, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

inline void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                   int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (brgemm_available()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
  } else {
    gemm_acc<float>(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate);
  }
}

inline void matmul(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                   const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_acc<double>(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate);
}

// Ends a parallel chunk that used matmul (releases brgemm's per-thread state).
inline void matmul_release() {
  if (brgemm_available()) at::native::cpublas::brgemm_release(false);
}

// Each thread keeps the buffers of its last tiles, up to kTileCacheBytes, and
// hands one back when a tile of the same size is asked for. A kernel's tiles
// have the same sizes on every call of a shape, so a warm call allocates (and
// faults in) no tile memory, as MKL and oneDNN keep their GEMM packing
// buffers between calls. Bounded: bigger buffers and any surplus are freed.
// Off under AddressSanitizer, so that it sees every tile freed.
class TileCache {
 public:
  static constexpr std::align_val_t kAlign{64};
#if defined(__SANITIZE_ADDRESS__)
  static constexpr size_t kTileCacheBytes = 0;
#else
  static constexpr size_t kTileCacheBytes = size_t(1) << 20;
#endif
  static constexpr size_t kMaxBlocks = 32;

  TileCache() { blocks_.reserve(kMaxBlocks); }  // so that give() never allocates
  TileCache(const TileCache&) = delete;
  TileCache& operator=(const TileCache&) = delete;
  ~TileCache() {
    for (const Block& block : blocks_) ::operator delete(block.ptr, kAlign);
  }

  void* take(size_t bytes) {
    for (size_t i = blocks_.size(); i-- > 0;) {
      if (blocks_[i].bytes == bytes) {
        void* ptr = blocks_[i].ptr;
        held_ -= bytes;
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(i));
        return ptr;
      }
    }
    return ::operator new(bytes, kAlign);
  }

  void give(void* ptr, size_t bytes) {
    if (bytes > kTileCacheBytes) {
      ::operator delete(ptr, kAlign);
      return;
    }
    while (held_ + bytes > kTileCacheBytes || blocks_.size() == kMaxBlocks) {  // free the oldest
      ::operator delete(blocks_.front().ptr, kAlign);
      held_ -= blocks_.front().bytes;
      blocks_.erase(blocks_.begin());
    }
    blocks_.push_back({ptr, bytes});
    held_ += bytes;
  }

  static TileCache& of_this_thread() {
    thread_local TileCache cache;
    return cache;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  std::vector<Block> blocks_;
  size_t held_ = 0;
};

// Tiles live in 64-byte aligned buffers (rows of 16 floats are whole cache
// lines) from the thread's TileCache.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(TileCache::of_this_thread().take(n * sizeof(T))); }
  void deallocate(T* ptr, size_t n) { TileCache::of_this_thread().give(ptr, n * sizeof(T)); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
template <typename T>
using Tile = std::vector<T, AlignedAllocator<T>>;

#if defined(CPU_CAPABILITY_AVX512)
// dst (16 x 16) = src (16 x 16) transposed, in registers: interleave 32-bit
// pairs, then 64-bit pairs, then 128-bit lanes twice (64 shuffles). Inlined,
// unlike at::vec's general m x n version, which goes through the stack.
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    for (int j = 0; j < 2; ++j) {
      const __m512d lo = _mm512_castps_pd(b[i + j]), hi = _mm512_castps_pd(b[i + j + 2]);
      a[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
      a[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
    }
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      b[i + j] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0x88);
      b[i + j + 4] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_ps(dst + i * ldd, _mm512_shuffle_f32x4(b[i], b[i + 8], 0x88));
    _mm512_storeu_ps(dst + (i + 8) * ldd, _mm512_shuffle_f32x4(b[i], b[i + 8], 0xdd));
  }
}
#endif

// dst (cols x rows, row stride ldd) = src (rows x cols, row stride lds)
// transposed, in 16 x 16 blocks: whole float blocks in registers (our
// transpose16 on AVX-512, at::vec's four 8 x 8 shuffles on AVX2), the rest
// through at::vec's element-wise transpose_mxn.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kTile = 16;
  for (int64_t r = 0; r < rows; r += kTile) {
    for (int64_t c = 0; c < cols; c += kTile) {
      const int64_t m = std::min(kTile, rows - r), n = std::min(kTile, cols - c);
      if constexpr (std::is_same_v<T, float>) {
        if (m == kTile && n == kTile) {
#if defined(CPU_CAPABILITY_AVX512)
          transpose16(src + r * lds + c, lds, dst + c * ldd + r, ldd);
          continue;
#elif defined(CPU_CAPABILITY_AVX2)
          at::vec::transpose_mxn<float, 16, 16>(src + r * lds + c, lds, dst + c * ldd + r, ldd);
          continue;
#endif
        }
      }
      at::vec::transpose_mxn<T>(src + r * lds + c, lds, dst + c * ldd + r, ldd,
                                static_cast<int>(m), static_cast<int>(n));
    }
  }
}

// ---------------------------------------------------------------------------
// Element helpers.

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) = 2^n · p(r) with n = round(x log2 e), r = x - n ln 2 (ln 2 in two
// parts) and p the degree-6 Taylor polynomial (|r| <= ln(2)/2; error < 3 ulp);
// vscalefps applies 2^n, and overflow gives +inf. Below ln(FLT_MIN) the result
// is 0 (as at::vec's exp_u20): x is clamped there first, because a denormal
// result costs a microcode assist (masked scores are -inf, so this is common).
// The clamps keep ±inf out of r; NaN passes them and stays NaN.
inline Vec<float> vexp(const Vec<float>& v) {
  const __m512 lo = _mm512_set1_ps(-87.33654475f);  // ln(FLT_MIN)
  const __mmask16 keep = _mm512_cmp_ps_mask(v, lo, _CMP_NLT_UQ);  // x >= lo, or NaN
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(lo, v));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}
#else
inline Vec<float> vexp(const Vec<float>& x) { return x.exp_u20(); }
#endif
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }

// An estimate r of 1 / x for x in [1, 2^20]: the hardware's (12 bits) on x86,
// where r · (2 - x r), one Newton step, is then within 2 ulp of 1 / x and
// cheaper than a division (a 256-bit division takes ~5-10 cycles of
// throughput on AMD Zen 1-2); elsewhere the division itself (the Newton
// factor is then 1).
inline Vec<float> vrecip_estimate(const Vec<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec<float>(_mm512_rcp14_ps(x));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec<float>(_mm256_rcp_ps(x));
#else
  return Vec<float>(1.f) / x;
#endif
}

// The soft-cap c · tanh(x / c), and tanh(x / c) itself in *t when asked (the
// backward's 1 - tanh²). For float, with y = x / c and u = y²:
//  - when every lane has |y| <= 1/2 (scores within ±c/2, most of them in
//    practice: the cap is a safety net), tanh(y) = y · R(u) with R a degree-4
//    polynomial, R(0) = 1, fitted to tanh(y)/y on u in [0, 1/4] (Lawson-weighted
//    least squares; relative error 1.5e-8, float evaluation within 1.3 ulp of
//    tanh): 7 vector operations and the test instead of ~17;
//  - else tanh(y) = y · P(u) / Q(u) on |y| <= 9 (tanh(9) rounds to 1), with
//    P and Q of degree 4 and P(0) = Q(0) = 1 (so Q lies in [1, 420]): a
//    rational fit to tanh(y)/y on [0, 9], within 9 ulp of tanh (6 with an
//    exact 1 / Q). Beyond 9, u is clamped to 81 and x to ±9c, so the result
//    is ±c; NaN stays NaN; a result may round 1 ulp beyond ±c. P and Q are
//    evaluated in Estrin's scheme and x · P is formed while 1 / Q is refined.
// A lane's result thus depends on its neighbours (which branch), within the
// two fits' errors. benchmarks/NOTES.md, sections 14 and 15: the costs on an
// AVX2 Zen 1; Sleef's tanh made soft-capping cost up to +80 % of the forward.
inline Vec<float> vsoftcap(const Vec<float>& x, float c, float inv_c, Vec<float>* t) {
  using V = Vec<float>;
  constexpr int kAllLanes = (1 << V::size()) - 1;
  const V one(1.f);
  const V y = x * V(inv_c);
  const V yy = y * y;
  if ((yy > V(0.25f)).zero_mask() == kAllLanes) {  // no lane beyond |y| = 1/2 (NaN: none)
    const V r = at::vec::fmadd(
        at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(V(1.724181115e-02f), yy,
                                                     V(-5.304562671e-02f)),
                                      yy, V(1.332588054e-01f)),
                       yy, V(-3.333314395e-01f)),
        yy, one);
    if (t != nullptr) *t = y * r;
    return x * r;
  }
  const V u = at::vec::clamp_max(yy, V(81.f));
  const V u2 = u * u;
  const V p2 = at::vec::fmadd(V(2.066036905e-05f), u, V(3.498948878e-03f));
  const V q2 = at::vec::fmadd(V(3.290955792e-04f), u, V(2.589003555e-02f));
  const V p = at::vec::fmadd(at::vec::fmadd(V(1.341840328e-08f), u2, p2), u2,
                             at::vec::fmadd(V(1.338394284e-01f), u, one));
  const V q = at::vec::fmadd(at::vec::fmadd(V(7.804184179e-07f), u2, q2), u2,
                             at::vec::fmadd(V(4.671726525e-01f), u, one));
  const V xp = at::vec::clamp(x, V(-9.f * c), V(9.f * c)) * p;  // NaN stays NaN
  const V r = vrecip_estimate(q);
  const V out = (xp * r) * at::vec::fnmadd(q, r, V(2.f));
  if (t != nullptr) *t = out * V(inv_c);
  return out;
}
inline Vec<double> vsoftcap(const Vec<double>& x, double c, double inv_c, Vec<double>* t) {
  const Vec<double> th = (x * Vec<double>(inv_c)).tanh();
  if (t != nullptr) *t = th;
  return th * Vec<double>(c);
}

template <typename S, typename T>
void from_acc(const T* src, S* dst, int64_t n, T factor) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i] * factor);
}

// rows x cols at `src` (row stride ld), times `factor`, as a dense acc tile.
template <typename S, typename T>
void convert_rows(const S* src, int64_t ld, int64_t rows, int64_t cols, T* dst,
                  T factor = T(1)) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* row = src + r * ld;
    T* d = dst + r * cols;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<T>(row[c]) * factor;
  }
}

// rows x cols of a (B, S, H, D) tensor at (b, s0, h), times `factor`, as a dense acc tile.
template <typename S, typename T>
void load_tile(const BSHD& t, int64_t b, int64_t s0, int64_t h, int64_t rows, int64_t cols,
               T* dst, T factor = T(1)) {
  convert_rows(static_cast<const S*>(t.ptr) + b * t.batch + s0 * t.row + h * t.head, t.row, rows,
               cols, dst, factor);
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// A row whose softmax is NaN: its scores held a NaN or +inf (max = +inf, and
// inf - inf = NaN in the reference), which leaves lse NaN or +inf. The AVX2
// build's exp (exp_u20) maps NaN to inf, so such rows are set to NaN explicitly.
template <typename T>
bool nan_row(T lse) {
  return std::isnan(lse) || lse == std::numeric_limits<T>::infinity();
}

// logsumexp of a row from its max and its sum of exp(s - max): -inf when the
// row sees no key, +inf when a score is +inf (as the reference's logsumexp).
template <typename T>
T lse_of(T max, T sum) {
  if (sum == T(0)) return neg_inf<T>();
  if (max == std::numeric_limits<T>::infinity()) return max;
  return max + std::log(sum);
}

// ---------------------------------------------------------------------------
// Visibility: window, causal alignment and key_lengths as key ranges.

struct Visibility {
  const AttnParams& p;

  int64_t kv_len(int64_t b) const {
    if (p.key_lengths == nullptr) return p.Sk;
    return std::clamp<int64_t>(p.key_lengths[b], 0, p.Sk);
  }
  // First visible key of query row i (may exceed the last).
  int64_t lo(int64_t i) const {
    return p.window_left >= 0 ? std::max<int64_t>(0, i + p.diag_offset - p.window_left) : 0;
  }
  // One past the last visible key of query row i in batch entry b.
  int64_t hi(int64_t b, int64_t i) const {
    const int64_t len = kv_len(b);
    return p.window_right >= 0 ? std::clamp<int64_t>(i + p.diag_offset + p.window_right + 1, 0, len)
                               : len;
  }
  // Query rows [first, last) that see at least one key of [j0, j1).
  int64_t first_row(int64_t j0) const {
    return p.window_right >= 0 ? std::max<int64_t>(0, j0 - p.diag_offset - p.window_right) : 0;
  }
  int64_t last_row(int64_t j1) const {
    return p.window_left >= 0 ? std::clamp<int64_t>(j1 - p.diag_offset + p.window_left, 0, p.Sq)
                              : p.Sq;
  }
};

// ---------------------------------------------------------------------------
// Score modifiers (params.h) of one (b, h) on one line of scaled scores
// s[0, count), before the mask: soft-capping s -> softcap * tanh(s / softcap),
// then the ALiBi bias -slope * |i + diag_offset - j|, where element e of the
// line has i + diag_offset - j = d0 + step * e (step -1 along a row of keys,
// +1 along a transposed line of queries). `dtanh`, when given, receives the
// soft-cap's derivative 1 - tanh² (the backward's factor of dS).

template <typename T>
struct Modifiers {
  T softcap = 0, inv_softcap = 0;  // 0: off
  T slope = 0;
  bool alibi = false;

  Modifiers(const AttnParams& p, int64_t b, int64_t h) {
    if (p.softcap > 0) {
      softcap = static_cast<T>(p.softcap);
      inv_softcap = static_cast<T>(1.0 / p.softcap);
    }
    if (p.alibi_slopes != nullptr) {
      alibi = true;
      slope = static_cast<T>(p.alibi_slopes[b * p.alibi_batch + h]);
    }
  }

  bool any() const { return softcap != T(0) || alibi; }

  void apply(T* s, int64_t count, int64_t d0, int64_t step, T* dtanh) const {
    constexpr int64_t kVec = Vec<T>::size();
    const Vec<T> iota = Vec<T>::arange(T(0), T(step));
    for (int64_t e = 0; e < count; e += kVec) {
      const int64_t n = std::min(kVec, count - e);
      Vec<T> x = n == kVec ? Vec<T>::loadu(s + e) : Vec<T>::loadu(s + e, n);
      if (softcap != T(0)) {
        if (dtanh != nullptr) {
          Vec<T> t;
          x = vsoftcap(x, softcap, inv_softcap, &t);
          const Vec<T> dt = at::vec::fnmadd(t, t, Vec<T>(T(1)));
          n == kVec ? dt.store(dtanh + e) : dt.store(dtanh + e, n);
        } else {
          x = vsoftcap(x, softcap, inv_softcap, nullptr);
        }
      }
      if (alibi) {
        const Vec<T> dist = (Vec<T>(static_cast<T>(d0 + step * e)) + iota).abs();
        x = at::vec::fnmadd(Vec<T>(slope), dist, x);
      }
      n == kVec ? x.store(s + e) : x.store(s + e, n);
    }
  }
};

// ---------------------------------------------------------------------------
// Scores of a tile, in either orientation. One line s[0, count) of scores has
// its mask elements at mask offset `first` + e * `step`, and is visible on
// [lo, hi) (relative to the line): adds a float mask, hides where a bool mask
// is false, and hides what the window, causality or key_lengths hide.
template <typename S, typename T>
void mask_line(const MaskView& mk, int64_t first, int64_t step, int64_t lo, int64_t hi, T* s,
               int64_t count) {
  if (mk.kind == MaskKind::Float) {
    const S* m = static_cast<const S*>(mk.ptr) + first;
    for (int64_t e = 0; e < count; ++e) s[e] += static_cast<T>(m[e * step]);
  } else if (mk.kind == MaskKind::Bool) {
    const bool* m = static_cast<const bool*>(mk.ptr) + first;
    for (int64_t e = 0; e < count; ++e) {
      if (!m[e * step]) s[e] = neg_inf<T>();
    }
  }
  lo = std::clamp<int64_t>(lo, 0, count);
  hi = std::clamp<int64_t>(hi, lo, count);
  std::fill(s, s + lo, neg_inf<T>());
  std::fill(s + hi, s + count, neg_inf<T>());
}

// S (m x n, row stride lds) = Qs Kᵀ, modified, + mask for queries i0.. and
// keys j0..; Qs is scale * Q (m x D, dense), Kt is Kᵀ (D x n, row stride ldk).
template <typename S, typename T>
void score_tile(const AttnParams& p, const Visibility& vis, int64_t b, int64_t h, int64_t i0,
                int64_t m, int64_t j0, int64_t n, const T* Q, const T* Kt, int64_t ldk, T* Sc,
                int64_t lds) {
  matmul(m, n, p.D, Q, p.D, Kt, ldk, Sc, lds, false);
  const MaskView& mk = p.mask;
  const Modifiers<T> mods(p, b, h);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r;
    if (mods.any()) mods.apply(Sc + r * lds, n, i + p.diag_offset - j0, -1, nullptr);
    mask_line<S>(mk, b * mk.batch + h * mk.head + i * mk.row + j0 * mk.col, mk.col,
                 vis.lo(i) - j0, vis.hi(b, i) - j0, Sc + r * lds, n);
  }
}

// The transposed tile: St (n x m, row stride lds) = K Qsᵀ, modified, + maskᵀ;
// K is n x D (row stride ldk), Qt is (scale Q)ᵀ (D x m, row stride ldq). With
// a soft-cap, its derivative goes to dtanh (n x m, row stride lds).
template <typename S, typename T>
void score_tile_t(const AttnParams& p, const Visibility& vis, int64_t b, int64_t h, int64_t i0,
                  int64_t m, int64_t j0, int64_t n, const T* K, int64_t ldk, const T* Qt,
                  int64_t ldq, T* St, int64_t lds, T* dtanh) {
  matmul(n, m, p.D, K, ldk, Qt, ldq, St, lds, false);
  const MaskView& mk = p.mask;
  const Modifiers<T> mods(p, b, h);
  for (int64_t c = 0; c < n; ++c) {
    const int64_t j = j0 + c;
    if (mods.any()) {
      mods.apply(St + c * lds, m, i0 + p.diag_offset - j, 1,
                 dtanh != nullptr ? dtanh + c * lds : nullptr);
    }
    mask_line<S>(mk, b * mk.batch + h * mk.head + i0 * mk.row + j * mk.col, mk.row,
                 vis.first_row(j) - i0, vis.last_row(j + 1) - i0, St + c * lds, m);
  }
}

// z[c] = dropout_scale if element (b, h, i, j0 + c) is kept, else 0; rows and
// keys are counted from q_start and k_start (philox.h).
template <typename T>
void dropout_row(const AttnParams& p, int64_t bh, int64_t i, int64_t j0, int64_t n, T* z) {
  const uint64_t seed = uint64_t(p.rng_state[0]);
  const uint64_t offset = uint64_t(p.rng_state[1]);
  const uint64_t row = dropout_position(p.q_start, i);
  const uint64_t key0 = dropout_position(p.k_start, j0);
  const T keep = static_cast<T>(p.dropout_scale);
  Philox4 bits{};
  for (int64_t c = 0; c < n; ++c) {
    const uint64_t key = key0 + uint64_t(c);
    if (c == 0 || (key & 3) == 0) bits = dropout_bits(seed, offset, bh, row, key);
    z[c] = bits.x[key & 3] >= p.dropout_threshold ? keep : T(0);
  }
}

// Max of s[0, n); NaN when the row holds a NaN and no finite value (a NaN next
// to finite values reaches the output through the exp that follows).
template <typename T>
__attribute__((flatten)) T row_max(const T* s, int64_t n) {
  constexpr int64_t kVec = Vec<T>::size();
  Vec<T> acc(neg_inf<T>());
  int64_t c = 0;
  for (; c + kVec <= n; c += kVec) {
    acc = at::vec::clamp_min(Vec<T>::loadu(s + c), acc);  // max(acc, x), one instruction
  }
  T best = neg_inf<T>();
  alignas(64) T lanes[kVec];
  acc.store(lanes);
  for (int64_t l = 0; l < kVec; ++l) best = std::max(best, lanes[l]);
  for (; c < n; ++c) best = std::max(best, s[c]);
  if (best == neg_inf<T>()) {  // all -inf, or NaN hidden by the max: NaN must propagate
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(s[i])) return s[i];
    }
  }
  return best;
}

// The running max after a tile: NaN sticks (std::max would drop it).
template <typename T>
T next_max(T running, T tile_max) {
  return std::isnan(tile_max) ? tile_max : std::max(running, tile_max);
}

// s = exp(s - shift) in place; returns the sum.
template <typename T>
__attribute__((flatten)) T exp_shift_sum(T* s, int64_t n, T shift) {
  constexpr int64_t kVec = Vec<T>::size();
  const Vec<T> vshift(shift);
  Vec<T> acc(T(0));
  int64_t c = 0;
  for (; c + kVec <= n; c += kVec) {
    const Vec<T> x = vexp(Vec<T>::loadu(s + c) - vshift);
    x.store(s + c);
    acc = acc + x;
  }
  if (c < n) {
    const Vec<T> x = vexp(Vec<T>::loadu(s + c, n - c) - vshift);
    x.store(s + c, n - c);
    acc = acc + Vec<T>::set(Vec<T>(T(0)), x, n - c);
  }
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
}

// On a transposed tile (n keys x m queries, row stride ld): St = Pᵀ =
// exp(Sᵀ - shift) and dPt = dSᵀ = Pᵀ ∘ (dPᵀ - delta), in place; shift and
// delta are per query (column). One pass, the column vectors held in registers.
template <typename T>
__attribute__((flatten)) void softmax_grad_tile(T* St, T* dPt, int64_t n, int64_t m, int64_t ld,
                                                const T* shift, const T* delta) {
  constexpr int64_t kVec = Vec<T>::size();
  for (int64_t r = 0; r < m; r += kVec) {
    const int64_t cnt = std::min(kVec, m - r);
    const Vec<T> sh = Vec<T>::loadu(shift + r, cnt), dl = Vec<T>::loadu(delta + r, cnt);
    for (int64_t c = 0; c < n; ++c) {
      T* pr = St + c * ld + r;
      T* dpr = dPt + c * ld + r;
      if (cnt == kVec) {
        const Vec<T> pv = vexp(Vec<T>::loadu(pr) - sh);
        pv.store(pr);
        (pv * (Vec<T>::loadu(dpr) - dl)).store(dpr);
      } else {
        const Vec<T> pv = vexp(Vec<T>::loadu(pr, cnt) - sh);
        pv.store(pr, cnt);
        (pv * (Vec<T>::loadu(dpr, cnt) - dl)).store(dpr, cnt);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Keys j0 .. j0 + n (n <= max_keys) of one (b, hkv) in the forms the tile
// products read, as dense tiles of the accumulation type: Kᵀ (D x n, row
// stride max_keys + kPad), V rows (n x Dv) if `values` and K rows (n x D) if
// `key_rows`, copied (converted, gathered across a paged cache's pages) run
// by run; without `key_rows` K goes 16 rows at a time on its way to Kᵀ. The
// products never read K or V in place, even in float32: rows H·D apart
// (4 KiB at H = 8, D = 128) fall into a few cache sets, which cost the D = 128
// forward 25 % on an AVX2 Zen 1 (benchmarks/NOTES.md, section 14). A thread
// converts a tile once for all the query rows of its task, so the extra
// memory is O(tile), never O(S).

template <typename S, typename T>
class KVTile {
 public:
  KVTile(const AttnParams& p, int64_t max_keys, bool key_rows, bool values)
      : p_(p), max_keys_(max_keys), key_rows_(key_rows), values_(values),
        kt_(p.D * (max_keys + kPad)),
        kc_((key_rows ? max_keys : kChunk) * p.D),
        vc_(values ? max_keys * p.Dv : 0) {}

  void load(int64_t b, int64_t hk, int64_t j0, int64_t n) {
    for (int64_t r0 = 0; r0 < n;) {
      const int64_t run = run_length(j0 + r0, n - r0);
      const S* ks = static_cast<const S*>(p_.k.ptr) + key_row(p_, p_.k, b, j0 + r0) +
                    hk * p_.k.head;
      const int64_t chunk = key_rows_ ? run : kChunk;
      for (int64_t c0 = 0; c0 < run; c0 += chunk) {
        const int64_t rows = std::min(chunk, run - c0);
        T* kc = kc_.data() + (key_rows_ ? (r0 + c0) * p_.D : 0);
        convert_rows(ks + c0 * p_.k.row, p_.k.row, rows, p_.D, kc);
        transpose(kc, rows, p_.D, p_.D, kt_.data() + r0 + c0, max_keys_ + kPad);
      }
      if (values_) {
        convert_rows(static_cast<const S*>(p_.v.ptr) + key_row(p_, p_.v, b, j0 + r0) +
                         hk * p_.v.head,
                     p_.v.row, run, p_.Dv, vc_.data() + r0 * p_.Dv);
      }
      r0 += run;
    }
  }

  const T* k() const { return kc_.data(); }  // with key_rows, row stride D
  const T* kt() const { return kt_.data(); }
  int64_t kt_stride() const { return max_keys_ + kPad; }
  const T* v() const { return vc_.data(); }  // row stride Dv

 private:
  // Keys of [j, j + n) that follow j in memory: all n, or up to j's page end.
  int64_t run_length(int64_t j, int64_t n) const {
    return p_.pages == nullptr ? n : std::min(n, p_.page_size - j % p_.page_size);
  }

  static constexpr int64_t kChunk = 16;
  static constexpr int64_t kPad = 16;  // Kᵀ row padding: rows 1 KiB apart would share cache sets
  const AttnParams& p_;
  const int64_t max_keys_;
  const bool key_rows_, values_;
  Tile<T> kt_, kc_, vc_;
};

// Grain of an at::parallel_for whose tasks cost `work` multiply-adds each:
// problems smaller than kMinParallelWork run on the calling thread, where a
// parallel region would cost more than the work itself.
inline int64_t grain_for(int64_t work) {
  constexpr int64_t kMinParallelWork = int64_t(1) << 20;
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(work, 1));
}

// Chunks of n tasks of `grain` for parallel_chunks: those of the OpenMP
// at::parallel_for, fixed by n, grain and the thread count alone.
inline int64_t chunk_count(int64_t n, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain));
}

// at::parallel_for over [0, n) in `chunks` fixed chunks (chunk_count):
// body(chunk, begin, end). Per-chunk accumulators then sum the same whether
// the chunks run each on its thread or one after another inside another
// parallel region (varlen's short sequences side by side: attention.cpp,
// for_each_sequence), as long as at::get_num_threads() reads the same there
// (it does with libgomp, unless OMP_NUM_THREADS lists a smaller nested count).
template <typename F>
void parallel_chunks(int64_t n, int64_t chunks, F body) {
  const int64_t per = (n + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      if (c * per < n) body(c, c * per, std::min(n, (c + 1) * per));
    }
  });
}

// Query rows per forward task: the rows of a task share each converted K/V
// tile, in sub-blocks of kBlockM rows; kTaskRows when that still gives every
// thread several tasks, else kBlockM, and never more than Sq (the task's tiles
// are sized by it). Sq > 0.
inline int64_t task_rows(int64_t heads, int64_t Sq) {
  const int64_t tasks = heads * ((Sq + kTaskRows - 1) / kTaskRows);
  return std::min(Sq, tasks >= 4 * at::get_num_threads() ? kTaskRows : kBlockM);
}

// Keys per split of split-KV (key_splits below).
constexpr int64_t kSplitKeys = 4 * kBlockN;

// Query heads per forward task: with few query rows (decoding, short chunks)
// converting and transposing K and V costs more than the products, so the
// query heads that share a K/V head (GQA) share one task and each tile is
// converted once for all of them, as long as that leaves a task per thread
// or the keys are many enough for split-KV to make up for it.
inline int64_t task_heads(const AttnParams& p) {
  const int64_t group = p.Hq / p.Hkv;
  const bool enough = p.B * p.Hkv >= at::get_num_threads() || p.Sk >= 2 * kSplitKeys;
  return group > 1 && p.Sq <= kBlockM && enough ? group : 1;
}

// Key splits per forward task (split-KV): when the tasks leave threads idle
// and the query rows are few (decoding a long cache with a small batch),
// each task's keys are split into ranges of at least kSplitKeys, computed by
// tasks of their own and merged through their logsumexp. p.num_splits > 0
// overrides the choice (at most one split per key tile, and kMaxSplits: each
// split holds a partial output the size of out).
inline int64_t key_splits(const AttnParams& p, int64_t tasks) {
  constexpr int64_t kMaxSplits = 64;
  const int64_t Sq = p.Sq, Sk = p.Sk;
  if (p.num_splits > 0) return std::min({p.num_splits, (Sk + kBlockN - 1) / kBlockN, kMaxSplits});
  const int64_t threads = at::get_num_threads();
  if (Sq > kBlockM || tasks >= threads) return 1;
  return std::max<int64_t>(1, std::min((threads + tasks - 1) / tasks, Sk / kSplitKeys));
}

// ---------------------------------------------------------------------------
// Forward.

template <typename S>
void forward_kernel(const AttnParams& p) {
  using T = at::opmath_type<S>;
  const Visibility vis{p};
  const int64_t group = p.Hq / p.Hkv;
  const int64_t heads = task_heads(p);  // consecutive query heads of one K/V head per task
  const int64_t rows = task_rows(p.B * p.Hq / heads, p.Sq);
  const int64_t m_blocks = (p.Sq + rows - 1) / rows;
  const int64_t blocks = p.B * (p.Hq / heads) * m_blocks;
  const int64_t splits = key_splits(p, blocks);
  // split-KV partial results, per split and (b, h, i): unnormalized O, row max and sum
  std::vector<T> part_o(splits > 1 ? splits * p.B * p.Hq * p.Sq * p.Dv : 0);
  std::vector<T> part_m(splits > 1 ? splits * p.B * p.Hq * p.Sq : 0), part_l(part_m.size());
  const bool dropout = p.dropout_threshold > 0;
  const T scale = static_cast<T>(p.scale);
  const int64_t grain = grain_for(heads * rows * p.Sk / splits * (p.D + p.Dv));
  at::parallel_for(0, blocks * splits, grain, [&](int64_t begin, int64_t end) {
    KVTile<S, T> kv(p, kBlockN, false, true);
    Tile<T> Q(heads * rows * p.D), O(heads * rows * p.Dv), Sc(kBlockM * kBlockN), z(kBlockN);
    std::vector<T> row_m(heads * rows), row_l(heads * rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits;
      const int64_t mb = task / splits % m_blocks;
      const int64_t h0 = (task / (splits * m_blocks)) % (p.Hq / heads) * heads;
      const int64_t b = task / (splits * m_blocks * (p.Hq / heads));
      const int64_t hk = h0 / group;
      const int64_t i0 = mb * rows;
      const int64_t mt = std::min(rows, p.Sq - i0);
      int64_t j_begin = vis.lo(i0);
      int64_t j_end = vis.hi(b, i0 + mt - 1);
      if (splits > 1 && j_begin < j_end) {  // this split's whole tiles of the key range
        const int64_t tiles = (j_end - j_begin + kBlockN - 1) / kBlockN;
        const int64_t per = (tiles + splits - 1) / splits;
        const int64_t first = j_begin + split * per * kBlockN;
        j_end = std::min(j_end, first + per * kBlockN);
        j_begin = first;
      }
      std::fill(row_m.begin(), row_m.end(), neg_inf<T>());
      std::fill(row_l.begin(), row_l.end(), T(0));
      std::fill(O.begin(), O.end(), T(0));
      if (j_begin < j_end) {
        for (int64_t t = 0; t < heads; ++t) {
          load_tile<S>(p.q, b, i0, h0 + t, mt, p.D, Q.data() + t * rows * p.D, scale);
        }
      }
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, j_end - j0);
        kv.load(b, hk, j0, n);
        for (int64_t t = 0; t < heads; ++t) {
          const int64_t h = h0 + t;
          T* Qh = Q.data() + t * rows * p.D;
          T* Oh = O.data() + t * rows * p.Dv;
          T* mh = row_m.data() + t * rows;
          T* lh = row_l.data() + t * rows;
          for (int64_t r0 = 0; r0 < mt; r0 += kBlockM) {
            const int64_t m = std::min(kBlockM, mt - r0);
            // the keys of this tile that rows r0 .. r0 + m see
            const int64_t s0 = std::max(j0, vis.lo(i0 + r0));
            const int64_t sn = std::min(j0 + n, vis.hi(b, i0 + r0 + m - 1)) - s0;
            if (sn <= 0) continue;
            score_tile<S>(p, vis, b, h, i0 + r0, m, s0, sn, Qh + r0 * p.D,
                          kv.kt() + (s0 - j0), kv.kt_stride(), Sc.data(), kBlockN);
            for (int64_t r = 0; r < m; ++r) {
              T* s = Sc.data() + r * kBlockN;
              T& row_max_r = mh[r0 + r];
              const T m_new = next_max(row_max_r, row_max(s, sn));
              if (m_new == neg_inf<T>()) {  // nothing visible yet in this row
                std::fill(s, s + sn, T(0));
                continue;
              }
              const T alpha = m_new == row_max_r ? T(1) : std::exp(row_max_r - m_new);
              lh[r0 + r] = lh[r0 + r] * alpha + exp_shift_sum(s, sn, m_new);
              row_max_r = m_new;
              if (alpha != T(1)) {
                T* o = Oh + (r0 + r) * p.Dv;
                at::vec::map([alpha](Vec<T> x) { return x * Vec<T>(alpha); }, o, o, p.Dv);
              }
              if (dropout) {
                dropout_row(p, b * p.Hq + h, i0 + r0 + r, s0, sn, z.data());
                at::vec::map2([](Vec<T> x, Vec<T> y) { return x * y; }, s, s, z.data(), sn);
              }
            }
            matmul(m, p.Dv, sn, Sc.data(), kBlockN, kv.v() + (s0 - j0) * p.Dv, p.Dv,
                   Oh + r0 * p.Dv, p.Dv, true);
          }
        }
      }
      for (int64_t t = 0; t < heads; ++t) {
        const int64_t h = h0 + t;
        const int64_t row0 = (b * p.Hq + h) * p.Sq + i0;  // (b, h, i0) in (B, Hq, Sq)
        if (splits > 1) {
          const int64_t at = split * p.B * p.Hq * p.Sq + row0;
          std::copy_n(O.data() + t * rows * p.Dv, mt * p.Dv, part_o.data() + at * p.Dv);
          std::copy_n(row_m.data() + t * rows, mt, part_m.data() + at);
          std::copy_n(row_l.data() + t * rows, mt, part_l.data() + at);
          continue;
        }
        S* out = static_cast<S*>(p.out.ptr) + b * p.out.batch + i0 * p.out.row + h * p.out.head;
        T* lse = static_cast<T*>(p.lse) + row0;
        for (int64_t r = 0; r < mt; ++r) {
          const T l = row_l[t * rows + r];
          from_acc(O.data() + (t * rows + r) * p.Dv, out + r * p.out.row, p.Dv,
                   l == T(0) ? T(0) : T(1) / l);
          lse[r] = lse_of(row_m[t * rows + r], l);
        }
      }
    }
    matmul_release();
  });
  if (splits == 1) return;
  // merge: out = sum_s exp(m_s - M) O_s / L, L = sum_s exp(m_s - M) l_s, M = max_s m_s
  const int64_t total = p.B * p.Hq * p.Sq;
  at::parallel_for(0, total, grain_for(splits * p.Dv), [&](int64_t begin, int64_t end) {
    std::vector<T> acc(p.Dv);
    for (int64_t row = begin; row < end; ++row) {
      T M = neg_inf<T>();
      for (int64_t sp = 0; sp < splits; ++sp) M = next_max(M, part_m[sp * total + row]);
      std::fill(acc.begin(), acc.end(), T(0));
      T L = 0;
      if (M != neg_inf<T>()) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const T m = part_m[sp * total + row];
          if (m == neg_inf<T>()) continue;  // no visible key in this split
          const T w = std::exp(m - M);
          L += w * part_l[sp * total + row];
          const T* o = part_o.data() + (sp * total + row) * p.Dv;
          for (int64_t d = 0; d < p.Dv; ++d) acc[d] += w * o[d];
        }
      }
      const int64_t i = row % p.Sq, h = row / p.Sq % p.Hq, b = row / (p.Sq * p.Hq);
      S* out = static_cast<S*>(p.out.ptr) + b * p.out.batch + i * p.out.row + h * p.out.head;
      from_acc(acc.data(), out, p.Dv, L == T(0) ? T(0) : T(1) / L);
      static_cast<T*>(p.lse)[row] = lse_of(M, L);
    }
  });
}

// ---------------------------------------------------------------------------
// Backward.

template <typename S>
void backward_kernel(const AttnBwdParams& p) {
  using T = at::opmath_type<S>;
  const Visibility vis{p};
  const int64_t group = p.Hq / p.Hkv;
  const bool dropout = p.dropout_threshold > 0;
  const T scale = static_cast<T>(p.scale);
  T* delta = static_cast<T*>(p.delta);
  const T* lse_all = static_cast<const T*>(p.lse);

  // delta = rowsum(dO ∘ O), (B, Hq, Sq)
  at::parallel_for(0, p.B * p.Hq * p.Sq, grain_for(p.Dv), [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx % p.Sq;
      const int64_t h = (idx / p.Sq) % p.Hq;
      const int64_t b = idx / (p.Sq * p.Hq);
      const S* o = static_cast<const S*>(p.out.ptr) + b * p.out.batch + i * p.out.row +
                   h * p.out.head;
      const S* d = static_cast<const S*>(p.dout.ptr) + b * p.dout.batch + i * p.dout.row +
                   h * p.dout.head;
      T acc = 0;
      for (int64_t c = 0; c < p.Dv; ++c) acc += static_cast<T>(o[c]) * static_cast<T>(d[c]);
      delta[idx] = acc;
    }
  });

  // Tasks: one per (b, hkv) when that gives every thread work or the keys are
  // one block, else one per (b, hkv, key block). A task visits the heads of
  // its group in turn, and for each its key blocks (converted once per block)
  // and, inside, the query tiles that see them (converted per tile, so
  // nothing of size S is held). Every
  // tile is computed transposed (keys as rows), so that no product needs a
  // transposed operand: Sᵀ = K (scale Q)ᵀ, dPᵀ = V dOᵀ, dV += (P∘Z)ᵀ dO,
  // dK += dSᵀ (scale Q), dQᵀ += Kᵀ dSᵀ (scaled at the end). dK, dV are summed
  // over the group's heads per key block (over the task's keys when the group
  // has several heads) and written after its last head. dQᵀ is accumulated in
  // the accumulation type: with one task per (b, hkv) the task owns its heads,
  // so a (D, Sq) buffer per thread serves and is written to dq when the head
  // is done; with split key blocks each chunk of tasks (parallel_chunks) sums
  // into its own (B, Hq, D, Sq) buffer, added in chunk order at the end. The
  // mask gradient, which broadcast dims may share between heads, always goes
  // through per-chunk buffers. Deterministic for a given thread count, inline
  // in another parallel region too.
  const int64_t threads = at::get_num_threads();
  const int64_t n_blocks = (p.Sk + kBwdBlockN - 1) / kBwdBlockN;
  const bool split_keys = p.B * p.Hkv < 2 * threads && n_blocks > 1;
  const int64_t blocks_per_task = split_keys ? 1 : n_blocks;
  const int64_t tasks_per_head = n_blocks / blocks_per_task;
  const int64_t task_keys = blocks_per_task * kBwdBlockN;
  const int64_t tasks = p.B * p.Hkv * tasks_per_head;
  const int64_t grain = grain_for(task_keys * p.Sq * (p.D + p.Dv) * 2 * group);
  const int64_t chunks = chunk_count(tasks, grain);
  const int64_t dq_size = p.B * p.Hq * p.D * p.Sq;
  std::vector<T> dqt_acc(split_keys ? chunks * dq_size : 0, T(0));
  S* dq = static_cast<S*>(p.dq.ptr);
  // dq rows [i_begin, i_end) of head (b, h) = scale * dqt (D, Sq)ᵀ, kBwdBlockM
  // rows at a time through `rows` (kBwdBlockM x D scratch).
  auto store_dq = [&](const T* dqt, int64_t b, int64_t h, int64_t i_begin, int64_t i_end,
                      T* rows) {
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kBwdBlockM) {
      const int64_t m = std::min(kBwdBlockM, i_end - i0);
      transpose(dqt + i0, p.D, m, p.Sq, rows, p.D);
      for (int64_t r = 0; r < m; ++r) {
        from_acc(rows + r * p.D, dq + ((b * p.Sq + i0 + r) * p.Hq + h) * p.D, p.D, scale);
      }
    }
  };
  const bool want_dmask = p.dmask.ptr != nullptr;
  // dmask buffer extent: the largest offset reachable through its strides + 1.
  const int64_t dmask_size =
      want_dmask ? (p.B - 1) * p.dmask.batch + (p.Hq - 1) * p.dmask.head +
                       (p.Sq - 1) * p.dmask.row + (p.Sk - 1) * p.dmask.col + 1
                 : 0;
  std::vector<T> dmask_acc(chunks * dmask_size, T(0));

  // dK, dV accumulators: one key block, or the task's keys when heads share them.
  const int64_t acc_keys = group > 1 ? task_keys : kBwdBlockN;
  parallel_chunks(tasks, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    Tile<T> dqt_head(split_keys ? 0 : p.D * p.Sq), dq_rows(kBwdBlockM * p.D);
    T* dmask_t = dmask_acc.data() + chunk * dmask_size;
    KVTile<S, T> kv(p, kBwdBlockN, true, true);
    Tile<T> Qc(kBwdBlockM * p.D), Qt(p.D * kBwdBlockM);
    Tile<T> dOc(kBwdBlockM * p.Dv), dOt(p.Dv * kBwdBlockM);
    Tile<T> dK(acc_keys * p.D), dV(acc_keys * p.Dv);
    Tile<T> St(kBwdBlockN * kBwdBlockM), dPt(kBwdBlockN * kBwdBlockM);
    Tile<T> Z(kBwdBlockM * kBwdBlockN), shift(kBwdBlockM);
    Tile<T> dtanh(p.softcap > 0 ? kBwdBlockN * kBwdBlockM : 0);  // 1 - tanh² of the soft-cap
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = (task / tasks_per_head) % p.Hkv;
      const int64_t b = task / (tasks_per_head * p.Hkv);
      const int64_t j_lo = (task % tasks_per_head) * task_keys;
      const int64_t j_hi = std::min(j_lo + task_keys, vis.kv_len(b));
      if (j_lo >= j_hi) continue;  // padding keys: dK, dV stay 0
      const int64_t i_begin = vis.first_row(j_lo);
      const int64_t i_end = vis.last_row(j_hi);
      if (i_begin >= i_end) continue;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const T* lse = lse_all + (b * p.Hq + h) * p.Sq;
        const T* dl = delta + (b * p.Hq + h) * p.Sq;
        T* dqt = split_keys ? dqt_acc.data() + chunk * dq_size + (b * p.Hq + h) * p.D * p.Sq
                            : dqt_head.data();
        if (!split_keys) std::fill(dqt_head.begin(), dqt_head.end(), T(0));
        for (int64_t j0 = j_lo; j0 < j_hi; j0 += kBwdBlockN) {
          const int64_t n = std::min(kBwdBlockN, j_hi - j0);
          T* dKb = dK.data() + (group > 1 ? j0 - j_lo : 0) * p.D;
          T* dVb = dV.data() + (group > 1 ? j0 - j_lo : 0) * p.Dv;
          if (h == hk * group) {
            std::fill(dKb, dKb + n * p.D, T(0));
            std::fill(dVb, dVb + n * p.Dv, T(0));
          }
          const int64_t bi_begin = std::max(i_begin, vis.first_row(j0));
          const int64_t bi_end = std::min(i_end, vis.last_row(j0 + n));
          if (bi_begin < bi_end) kv.load(b, hk, j0, n);
          for (int64_t i0 = bi_begin; i0 < bi_end; i0 += kBwdBlockM) {
            const int64_t m = std::min(kBwdBlockM, bi_end - i0);
            load_tile<S>(p.q, b, i0, h, m, p.D, Qc.data(), scale);
            load_tile<S>(p.dout, b, i0, h, m, p.Dv, dOc.data());
            transpose(Qc.data(), m, p.D, p.D, Qt.data(), m);
            transpose(dOc.data(), m, p.Dv, p.Dv, dOt.data(), m);
            score_tile_t<S>(p, vis, b, h, i0, m, j0, n, kv.k(), p.D, Qt.data(), m,
                            St.data(), kBwdBlockM, dtanh.empty() ? nullptr : dtanh.data());
            matmul(n, m, p.Dv, kv.v(), p.Dv, dOt.data(), m, dPt.data(), kBwdBlockM,
                   false);
            // P = exp(S - lse), forced to 0 on rows that see no key (lse = -inf).
            bool nan_rows = false;
            for (int64_t r = 0; r < m; ++r) {
              const T l = lse[i0 + r];
              shift[r] = nan_row(l) ? std::numeric_limits<T>::quiet_NaN()
                         : l == neg_inf<T>() ? std::numeric_limits<T>::infinity()
                                             : l;
              nan_rows |= nan_row(l);
            }
            if (dropout) {
              for (int64_t r = 0; r < m; ++r) {
                dropout_row(p, b * p.Hq + h, i0 + r, j0, n, Z.data() + r * kBwdBlockN);
              }
            }
            // Z ∘ dPᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ - delta) in dPt and Pᵀ in St, then (P∘Z)ᵀ
            // in St for dV. A float mask, added after the soft-cap, takes dS as its
            // gradient; q and k take dS ∘ (1 - tanh²).
            auto each = [&](auto fn) {
              for (int64_t c = 0; c < n; ++c) {
                for (int64_t r = 0; r < m; ++r) fn(c, r, c * kBwdBlockM + r);
              }
            };
            if (dropout) {
              each([&](int64_t c, int64_t r, int64_t e) { dPt[e] *= Z[r * kBwdBlockN + c]; });
            }
            softmax_grad_tile(St.data(), dPt.data(), n, m, kBwdBlockM, shift.data(), dl + i0);
            if (nan_rows) {
              each([&](int64_t, int64_t r, int64_t e) {
                if (std::isnan(shift[r])) St[e] = dPt[e] = shift[r];
              });
            }
            if (dropout) {
              each([&](int64_t c, int64_t r, int64_t e) { St[e] *= Z[r * kBwdBlockN + c]; });
            }
            if (want_dmask) {
              each([&](int64_t c, int64_t r, int64_t e) {
                dmask_t[b * p.dmask.batch + h * p.dmask.head + (i0 + r) * p.dmask.row +
                        (j0 + c) * p.dmask.col] += dPt[e];
              });
            }
            if (!dtanh.empty()) {
              for (int64_t c = 0; c < n; ++c) {
                T* ds = dPt.data() + c * kBwdBlockM;
                at::vec::map2([](Vec<T> x, Vec<T> y) { return x * y; }, ds, ds,
                              dtanh.data() + c * kBwdBlockM, m);
              }
            }
            matmul(n, p.Dv, m, St.data(), kBwdBlockM, dOc.data(), p.Dv, dVb, p.Dv, true);
            matmul(n, p.D, m, dPt.data(), kBwdBlockM, Qc.data(), p.D, dKb, p.D, true);
            matmul(p.D, m, n, kv.kt(), kv.kt_stride(), dPt.data(), kBwdBlockM, dqt + i0, p.Sq,
                   true);
          }
          if (h == (hk + 1) * group - 1) {  // the group's last head: dK, dV of the block are done
            S* dk = static_cast<S*>(p.dk.ptr) + b * p.dk.batch + j0 * p.dk.row + hk * p.dk.head;
            S* dv = static_cast<S*>(p.dv.ptr) + b * p.dv.batch + j0 * p.dv.row + hk * p.dv.head;
            for (int64_t c = 0; c < n; ++c) {
              from_acc(dKb + c * p.D, dk + c * p.dk.row, p.D, T(1));
              from_acc(dVb + c * p.Dv, dv + c * p.dv.row, p.Dv, T(1));
            }
          }
        }
        if (!split_keys) store_dq(dqt, b, h, i_begin, i_end, dq_rows.data());
      }
    }
    matmul_release();
  });

  // Split key blocks: dq = scale * the chunks' accumulators summed in chunk order.
  if (split_keys) {
    at::parallel_for(0, p.B * p.Hq, grain_for(chunks * p.D * p.Sq), [&](int64_t begin,
                                                                         int64_t end) {
      Tile<T> rows(kBwdBlockM * p.D);
      for (int64_t bh = begin; bh < end; ++bh) {
        T* sum = dqt_acc.data() + bh * p.D * p.Sq;
        for (int64_t c = 1; c < chunks; ++c) {
          const T* acc = sum + c * dq_size;
          for (int64_t idx = 0; idx < p.D * p.Sq; ++idx) sum[idx] += acc[idx];
        }
        store_dq(sum, bh / p.Hq, bh % p.Hq, 0, p.Sq, rows.data());
      }
    });
  }
  if (want_dmask) {
    T* dmask = static_cast<T*>(const_cast<void*>(p.dmask.ptr));
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t idx = 0; idx < dmask_size; ++idx) dmask[idx] += dmask_acc[c * dmask_size + idx];
    }
  }
}

// ---------------------------------------------------------------------------
// Probabilities (B, Hq, Sq, Sk) contiguous.

template <typename S>
void probs_kernel(const AttnParams& p, S* probs, bool compute_lse) {
  using T = at::opmath_type<S>;
  const Visibility vis{p};
  const int64_t group = p.Hq / p.Hkv;
  const int64_t m_blocks = (p.Sq + kBlockM - 1) / kBlockM;
  const bool dropout = p.dropout_threshold > 0;
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, p.B * p.Hq * m_blocks, grain_for(kBlockM * p.Sk * p.D),
                   [&](int64_t begin, int64_t end) {
    KVTile<S, T> kv(p, kBlockN, false, false);
    Tile<T> Q(kBlockM * p.D), Sc(kBlockM * kBlockN), z(kBlockN);
    std::vector<T> row_m(kBlockM), row_l(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t mb = task % m_blocks;
      const int64_t h = (task / m_blocks) % p.Hq;
      const int64_t b = task / (m_blocks * p.Hq);
      const int64_t hk = h / group;
      const int64_t i0 = mb * kBlockM;
      const int64_t m = std::min(kBlockM, p.Sq - i0);
      const int64_t j_begin = vis.lo(i0);
      const int64_t j_end = vis.hi(b, i0 + m - 1);
      T* lse = static_cast<T*>(p.lse) + (b * p.Hq + h) * p.Sq + i0;
      S* out = probs + ((b * p.Hq + h) * p.Sq + i0) * p.Sk;
      std::fill(out, out + m * p.Sk, S(0));
      if (j_begin >= j_end) {
        if (compute_lse) std::fill(lse, lse + m, neg_inf<T>());
        continue;
      }
      load_tile<S>(p.q, b, i0, h, m, p.D, Q.data(), scale);
      if (compute_lse) {
        std::fill(row_m.begin(), row_m.end(), neg_inf<T>());
        std::fill(row_l.begin(), row_l.end(), T(0));
        for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
          const int64_t n = std::min(kBlockN, j_end - j0);
          kv.load(b, hk, j0, n);
          score_tile<S>(p, vis, b, h, i0, m, j0, n, Q.data(), kv.kt(), kv.kt_stride(),
                        Sc.data(), kBlockN);
          for (int64_t r = 0; r < m; ++r) {
            T* s = Sc.data() + r * kBlockN;
            const T m_new = next_max(row_m[r], row_max(s, n));
            if (m_new == neg_inf<T>()) continue;
            row_l[r] = row_l[r] * std::exp(row_m[r] - m_new) + exp_shift_sum(s, n, m_new);
            row_m[r] = m_new;
          }
        }
        for (int64_t r = 0; r < m; ++r) {
          lse[r] = lse_of(row_m[r], row_l[r]);
        }
      }
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, j_end - j0);
        kv.load(b, hk, j0, n);
        score_tile<S>(p, vis, b, h, i0, m, j0, n, Q.data(), kv.kt(), kv.kt_stride(),
                      Sc.data(), kBlockN);
        for (int64_t r = 0; r < m; ++r) {
          if (lse[r] == neg_inf<T>()) continue;
          T* s = Sc.data() + r * kBlockN;
          const T shift = lse[r];
          at::vec::map([shift](Vec<T> x) { return vexp(x - Vec<T>(shift)); }, s, s, n);
          if (nan_row(shift)) std::fill(s, s + n, std::numeric_limits<T>::quiet_NaN());
          if (dropout) {
            dropout_row(p, b * p.Hq + h, i0 + r, j0, n, z.data());
            at::vec::map2([](Vec<T> x, Vec<T> y) { return x * y; }, s, s, z.data(), n);
          }
          from_acc(s, out + r * p.Sk + j0, n, T(1));
        }
      }
    }
    matmul_release();
  });
}

// ---------------------------------------------------------------------------
// Backend entry points.

void forward_cpu(const AttnParams& p, at::ScalarType dtype) {
  TORCH_CHECK(!p.diag_per_batch, "selfattn: the CPU kernels align one diagonal per call");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "selfattn_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(p); });
}

void backward_cpu(const AttnBwdParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "selfattn_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(p); });
}

void probs_cpu(const AttnParams& p, void* probs, bool compute_lse, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "selfattn_probs_cpu", [&] {
    probs_kernel<scalar_t>(p, static_cast<scalar_t*>(probs), compute_lse);
  });
}

const Backend kCpuBackend{forward_cpu, backward_cpu, probs_cpu};

}  // namespace
}  // namespace selfattn

TORCH_LIBRARY_IMPL(selfattn, CPU, m) { SELFATTN_REGISTER_BACKEND(m, selfattn::kCpuBackend); }
