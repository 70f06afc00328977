// CPU kernels of the selfattn ops: FlashAttention's algorithm on tiles.
//
// Forward: one task per (b, hq, block of kBlockM query rows); it streams the
// visible key tiles (kBlockN keys) past the block, computes S = (scale Q) Kᵀ
// (+ mask), keeps the running row max and sum (online softmax) and
// accumulates O += P V. Each thread keeps the keys and values of its current
// (b, hkv) packed in a KVPanel.
// Backward: delta = rowsum(dO ∘ O); then one task per (b, hkv) (or per key
// block of it when there are fewer heads than threads) that visits every
// query head of the group and every query block that sees its keys,
// recomputes P = exp(S - lse) on transposed tiles (keys as rows, so no
// product needs a transposed operand) and accumulates dK, dV in the task and
// dQᵀ per head (or per thread when key blocks are split). Deterministic for a
// given thread count. Probs: one task per query block, computing lse first
// when it is not given.
//
// Tiles are converted to the accumulation type (float, or double for float64)
// and multiplied by `matmul`: for float, oneDNN's batch-reduce GEMM
// micro-kernel through ATen's cpublas::brgemm (JIT-compiled for the running
// CPU), else a register-blocked micro-kernel (gemm_acc). The softmax
// arithmetic is at::vec. Extra memory is O(B·H·S) plus per-thread panels of
// O(S·D): no Sq x Sk buffer. Dropout bits come from philox.h, keyed by
// (b, h, i, j), so the backward regenerates the forward's mask.
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
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "../philox.h"

namespace selfattn {
namespace {

// Tile sizes (query rows x keys) of the forward and probs kernels, and of the backward.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 256;
constexpr int64_t kBwdBlockM = 64;
constexpr int64_t kBwdBlockN = 64;

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

// dst (cols x rows, dense) = src (rows x cols, row stride lds) transposed, in
// 16 x 16 blocks (at::vec's register transpose where it has one).
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst) {
  constexpr int64_t kTile = 16;
  for (int64_t r = 0; r < rows; r += kTile) {
    for (int64_t c = 0; c < cols; c += kTile) {
      at::vec::transpose_mxn<T>(src + r * lds + c, lds, dst + c * rows + r, rows,
                                static_cast<int>(std::min(kTile, rows - r)),
                                static_cast<int>(std::min(kTile, cols - c)));
    }
  }
}

// ---------------------------------------------------------------------------
// Element helpers.

inline Vec<float> vexp(const Vec<float>& x) { return x.exp_u20(); }
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }

template <typename S, typename T>
void from_acc(const T* src, S* dst, int64_t n, T factor) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i] * factor);
}

// rows x cols of a (B, S, H, D) tensor at (b, s0, h), times `factor`, as a dense acc tile.
template <typename S, typename T>
void load_tile(const BSHD& t, int64_t b, int64_t s0, int64_t h, int64_t rows, int64_t cols,
               T* dst, T factor = T(1)) {
  const S* base = static_cast<const S*>(t.ptr) + b * t.batch + s0 * t.row + h * t.head;
  for (int64_t r = 0; r < rows; ++r) {
    const S* src = base + r * t.row;
    T* d = dst + r * cols;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<T>(src[c]) * factor;
  }
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// A row whose softmax is NaN: its scores held a NaN or +inf (max = +inf, and
// inf - inf = NaN in the reference), which leaves lse NaN or +inf. The fast
// exp maps NaN to inf, so such rows are set to NaN explicitly.
template <typename T>
bool nan_row(T lse) {
  return std::isnan(lse) || lse == std::numeric_limits<T>::infinity();
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

// S (m x n, row stride lds) = Qs Kᵀ + mask for queries i0.. and keys j0..;
// Qs is scale * Q (m x D, dense), Kt is Kᵀ (D x n, row stride ldk).
template <typename S, typename T>
void score_tile(const AttnParams& p, const Visibility& vis, int64_t b, int64_t h, int64_t i0,
                int64_t m, int64_t j0, int64_t n, const T* Q, const T* Kt, int64_t ldk, T* Sc,
                int64_t lds) {
  matmul(m, n, p.D, Q, p.D, Kt, ldk, Sc, lds, false);
  const MaskView& mk = p.mask;
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r;
    mask_line<S>(mk, b * mk.batch + h * mk.head + i * mk.row + j0 * mk.col, mk.col,
                 vis.lo(i) - j0, vis.hi(b, i) - j0, Sc + r * lds, n);
  }
}

// The transposed tile: St (n x m, row stride lds) = K Qsᵀ + maskᵀ; Kc is K
// (n x D, dense), Qt is (scale Q)ᵀ (D x m, row stride ldq).
template <typename S, typename T>
void score_tile_t(const AttnParams& p, const Visibility& vis, int64_t b, int64_t h, int64_t i0,
                  int64_t m, int64_t j0, int64_t n, const T* Kc, const T* Qt, int64_t ldq, T* St,
                  int64_t lds) {
  matmul(n, m, p.D, Kc, p.D, Qt, ldq, St, lds, false);
  const MaskView& mk = p.mask;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t j = j0 + c;
    mask_line<S>(mk, b * mk.batch + h * mk.head + i0 * mk.row + j * mk.col, mk.row,
                 vis.first_row(j) - i0, vis.last_row(j + 1) - i0, St + c * lds, m);
  }
}

// z[c] = dropout_scale if element (b, h, i, j0 + c) is kept, else 0.
template <typename T>
void dropout_row(const AttnParams& p, int64_t bh, int64_t i, int64_t j0, int64_t n, T* z) {
  const uint64_t seed = uint64_t(p.rng_state[0]);
  const uint64_t offset = uint64_t(p.rng_state[1]);
  const T keep = static_cast<T>(p.dropout_scale);
  Philox4 bits{};
  for (int64_t c = 0; c < n; ++c) {
    const int64_t j = j0 + c;
    if (c == 0 || (j & 3) == 0) bits = dropout_bits(seed, offset, bh, i, j & ~int64_t(3));
    z[c] = bits.x[j & 3] >= p.dropout_threshold ? keep : T(0);
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

// ---------------------------------------------------------------------------
// The keys and values of one (b, hkv) in the form the tile products read: Kᵀ
// in the accumulation type in blocks of kBlockN keys (n_blocks, D, kBlockN),
// and V rows (in place when the input dtype is the accumulation type, else
// converted). Each thread keeps one panel and repacks it only when its tasks
// move on to another (b, hkv), so the query blocks of a head share it and the
// extra memory is O(threads · Sk · D).

template <typename S, typename T>
class KVPanel {
 public:
  KVPanel(const AttnParams& p, bool with_v) : p_(p) {
    kt_.resize(((p.Sk + kBlockN - 1) / kBlockN) * p.D * kBlockN);
    if (with_v && !std::is_same_v<S, T>) v_.resize(p.Sk * p.Dv);
  }

  void load(int64_t b, int64_t hk) {
    if (b == b_ && hk == hk_) return;
    b_ = b;
    hk_ = hk;
    const S* k = static_cast<const S*>(p_.k.ptr) + b * p_.k.batch + hk * p_.k.head;
    constexpr int64_t kChunk = 16;  // keys transposed together: contiguous writes
    static_assert(kBlockN % kChunk == 0, "a chunk must not straddle key blocks");
    for (int64_t j0 = 0; j0 < p_.Sk; j0 += kChunk) {
      const int64_t n = std::min(kChunk, p_.Sk - j0);
      T* kt = kt_.data() + (j0 / kBlockN) * p_.D * kBlockN + j0 % kBlockN;
      for (int64_t d = 0; d < p_.D; ++d) {
        for (int64_t jj = 0; jj < n; ++jj) {
          kt[d * kBlockN + jj] = static_cast<T>(k[(j0 + jj) * p_.k.row + d]);
        }
      }
    }
    if (!v_.empty()) load_tile<S>(p_.v, b, 0, hk, p_.Sk, p_.Dv, v_.data());
  }

  // Kᵀ tile (D x kBlockN, row stride kBlockN) of the key block starting at j0.
  const T* kt_tile(int64_t j0) const { return kt_.data() + (j0 / kBlockN) * p_.D * kBlockN; }

  // V rows from key j0 on, and their row stride.
  const T* v_rows(int64_t j0) const {
    if (!v_.empty()) return v_.data() + j0 * p_.Dv;
    return static_cast<const T*>(p_.v.ptr) + b_ * p_.v.batch + j0 * p_.v.row + hk_ * p_.v.head;
  }
  int64_t v_stride() const { return v_.empty() ? p_.v.row : p_.Dv; }

 private:
  const AttnParams& p_;
  int64_t b_ = -1, hk_ = -1;
  std::vector<T> kt_, v_;
};

// Grain of an at::parallel_for whose tasks cost `work` multiply-adds each:
// problems smaller than kMinParallelWork run on the calling thread, where a
// parallel region would cost more than the work itself.
inline int64_t grain_for(int64_t work) {
  constexpr int64_t kMinParallelWork = int64_t(1) << 20;
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(work, 1));
}

// First key of the kBlockN-aligned tile that holds key j.
inline int64_t tile_start(int64_t j) { return j / kBlockN * kBlockN; }

// ---------------------------------------------------------------------------
// Forward.

template <typename S>
void forward_kernel(const AttnParams& p) {
  using T = at::opmath_type<S>;
  const Visibility vis{p};
  const int64_t group = p.Hq / p.Hkv;
  const int64_t m_blocks = (p.Sq + kBlockM - 1) / kBlockM;
  const bool dropout = p.dropout_threshold > 0;
  const T scale = static_cast<T>(p.scale);
  const int64_t grain = grain_for(kBlockM * p.Sk * (p.D + p.Dv));
  at::parallel_for(0, p.B * p.Hq * m_blocks, grain, [&](int64_t begin, int64_t end) {
    KVPanel<S, T> kv(p, true);
    std::vector<T> Q(kBlockM * p.D), Sc(kBlockM * kBlockN), O(kBlockM * p.Dv), z(kBlockN);
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
      std::fill(row_m.begin(), row_m.end(), neg_inf<T>());
      std::fill(row_l.begin(), row_l.end(), T(0));
      std::fill(O.begin(), O.end(), T(0));
      const int64_t j_first = j_begin < j_end ? tile_start(j_begin) : j_end;  // no tile if empty
      if (j_first < j_end) {
        load_tile<S>(p.q, b, i0, h, m, p.D, Q.data(), scale);
        kv.load(b, hk);
      }
      for (int64_t j0 = j_first; j0 < j_end; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, j_end - j0);
        score_tile<S>(p, vis, b, h, i0, m, j0, n, Q.data(), kv.kt_tile(j0), kBlockN, Sc.data(),
                      kBlockN);
        for (int64_t r = 0; r < m; ++r) {
          T* s = Sc.data() + r * kBlockN;
          const T m_new = next_max(row_m[r], row_max(s, n));
          if (m_new == neg_inf<T>()) {  // nothing visible yet in this row
            std::fill(s, s + n, T(0));
            continue;
          }
          const T alpha = m_new == row_m[r] ? T(1) : std::exp(row_m[r] - m_new);
          row_l[r] = row_l[r] * alpha + exp_shift_sum(s, n, m_new);
          row_m[r] = m_new;
          if (alpha != T(1)) {
            T* o = O.data() + r * p.Dv;
            at::vec::map([alpha](Vec<T> x) { return x * Vec<T>(alpha); }, o, o, p.Dv);
          }
          if (dropout) {
            dropout_row(p, b * p.Hq + h, i0 + r, j0, n, z.data());
            at::vec::map2([](Vec<T> x, Vec<T> y) { return x * y; }, s, s, z.data(), n);
          }
        }
        matmul(m, p.Dv, n, Sc.data(), kBlockN, kv.v_rows(j0), kv.v_stride(), O.data(), p.Dv, true);
      }
      S* out = static_cast<S*>(p.out.ptr) + b * p.out.batch + h * p.out.head;
      T* lse = static_cast<T*>(p.lse) + (b * p.Hq + h) * p.Sq;
      for (int64_t r = 0; r < m; ++r) {
        const bool dead = row_l[r] == T(0);
        from_acc(O.data() + r * p.Dv, out + (i0 + r) * p.out.row, p.Dv,
                 dead ? T(0) : T(1) / row_l[r]);
        lse[i0 + r] = dead ? neg_inf<T>() : row_m[r] + std::log(row_l[r]);
      }
    }
    matmul_release();
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

  // Tasks: one per (b, hkv) when that gives every thread work, else one per
  // (b, hkv, key block). Every tile is computed transposed (keys as rows), so
  // that no product needs a transposed operand: Sᵀ = K (scale Q)ᵀ, dPᵀ = V dOᵀ,
  // dV += (P∘Z)ᵀ dO, dK += dSᵀ (scale Q), dQᵀ += Kᵀ dSᵀ (scaled at the end). A
  // task converts its head's Q and dO rows (and their transposes) once.
  // dQᵀ is accumulated in the accumulation type: with one task per (b, hkv)
  // the task owns its heads, so a (D, Sq) buffer per thread serves and is
  // written to dq when the head is done; with split key blocks each thread
  // sums into its own (B, Hq, D, Sq) buffer, added in thread order at the
  // end. The mask gradient, which broadcast dims may share between heads,
  // always goes through per-thread buffers. Deterministic for a given thread
  // count.
  const int64_t threads = at::get_num_threads();
  const int64_t n_blocks = (p.Sk + kBwdBlockN - 1) / kBwdBlockN;
  const bool split_keys = p.B * p.Hkv < 2 * threads;
  const int64_t blocks_per_task = split_keys ? 1 : n_blocks;
  const int64_t tasks_per_head = n_blocks / blocks_per_task;
  const int64_t dq_size = p.B * p.Hq * p.D * p.Sq;
  std::vector<T> dqt_acc(split_keys ? threads * dq_size : 0, T(0));
  S* dq = static_cast<S*>(p.dq.ptr);
  // dq rows [i_begin, i_end) of head (b, h) = scale * dqt (D, Sq)ᵀ; rows is scratch.
  auto store_dq = [&](const T* dqt, int64_t b, int64_t h, int64_t i_begin, int64_t i_end,
                      T* rows) {
    transpose(dqt + i_begin, p.D, i_end - i_begin, p.Sq, rows);
    for (int64_t i = i_begin; i < i_end; ++i) {
      from_acc(rows + (i - i_begin) * p.D, dq + ((b * p.Sq + i) * p.Hq + h) * p.D, p.D, scale);
    }
  };
  const bool want_dmask = p.dmask.ptr != nullptr;
  // dmask buffer extent: the largest offset reachable through its strides + 1.
  const int64_t dmask_size =
      want_dmask ? (p.B - 1) * p.dmask.batch + (p.Hq - 1) * p.dmask.head +
                       (p.Sq - 1) * p.dmask.row + (p.Sk - 1) * p.dmask.col + 1
                 : 0;
  std::vector<T> dmask_acc(threads * dmask_size, T(0));

  const int64_t grain = grain_for(blocks_per_task * kBwdBlockN * p.Sq * (p.D + p.Dv) * 2 * group);
  at::parallel_for(0, p.B * p.Hkv * tasks_per_head, grain, [&](int64_t begin, int64_t end) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
    std::vector<T> dqt_head(split_keys ? 0 : p.D * p.Sq), dq_rows(p.Sq * p.D);
    T* dmask_t = dmask_acc.data() + tid * dmask_size;
    const int64_t task_keys = blocks_per_task * kBwdBlockN;
    std::vector<T> Qh(p.Sq * p.D), Qt(p.D * p.Sq), dOh(p.Sq * p.Dv), dOt(p.Dv * p.Sq);
    std::vector<T> Kc(kBwdBlockN * p.D), Kt(p.D * kBwdBlockN), Vc(kBwdBlockN * p.Dv);
    std::vector<T> dK(task_keys * p.D), dV(task_keys * p.Dv);
    std::vector<T> St(kBwdBlockN * kBwdBlockM), dPt(kBwdBlockN * kBwdBlockM);
    std::vector<T> Z(kBwdBlockM * kBwdBlockN), shift(kBwdBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = (task / tasks_per_head) % p.Hkv;
      const int64_t b = task / (tasks_per_head * p.Hkv);
      const int64_t j_lo = (task % tasks_per_head) * task_keys;
      const int64_t j_hi = std::min(j_lo + task_keys, vis.kv_len(b));
      if (j_lo >= j_hi) continue;  // padding keys: dK, dV stay 0
      const int64_t i_begin = vis.first_row(j_lo);
      const int64_t i_end = vis.last_row(j_hi);
      if (i_begin >= i_end) continue;
      const int64_t rows = i_end - i_begin;
      std::fill(dK.begin(), dK.end(), T(0));
      std::fill(dV.begin(), dV.end(), T(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const T* lse = lse_all + (b * p.Hq + h) * p.Sq;
        const T* dl = delta + (b * p.Hq + h) * p.Sq;
        load_tile<S>(p.q, b, i_begin, h, rows, p.D, Qh.data(), scale);
        load_tile<S>(p.dout, b, i_begin, h, rows, p.Dv, dOh.data());
        transpose(Qh.data(), rows, p.D, p.D, Qt.data());
        transpose(dOh.data(), rows, p.Dv, p.Dv, dOt.data());
        T* dqt = split_keys ? dqt_acc.data() + tid * dq_size + (b * p.Hq + h) * p.D * p.Sq
                            : dqt_head.data();
        if (!split_keys) std::fill(dqt_head.begin(), dqt_head.end(), T(0));
        for (int64_t j0 = j_lo; j0 < j_hi; j0 += kBwdBlockN) {
          const int64_t n = std::min(kBwdBlockN, j_hi - j0);
          const int64_t bi_begin = std::max(i_begin, vis.first_row(j0));
          const int64_t bi_end = std::min(i_end, vis.last_row(j0 + n));
          if (bi_begin >= bi_end) continue;
          load_tile<S>(p.k, b, j0, hk, n, p.D, Kc.data());
          load_tile<S>(p.v, b, j0, hk, n, p.Dv, Vc.data());
          transpose(Kc.data(), n, p.D, p.D, Kt.data());
          T* dKb = dK.data() + (j0 - j_lo) * p.D;
          T* dVb = dV.data() + (j0 - j_lo) * p.Dv;
          for (int64_t i0 = bi_begin; i0 < bi_end; i0 += kBwdBlockM) {
            const int64_t m = std::min(kBwdBlockM, bi_end - i0);
            const int64_t r0 = i0 - i_begin;  // first row of the tile in Qh, dOh
            score_tile_t<S>(p, vis, b, h, i0, m, j0, n, Kc.data(), Qt.data() + r0, rows,
                            St.data(), kBwdBlockM);
            matmul(n, m, p.Dv, Vc.data(), p.Dv, dOt.data() + r0, rows, dPt.data(), kBwdBlockM,
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
            for (int64_t c = 0; c < n; ++c) {
              T* pr = St.data() + c * kBwdBlockM;
              T* dpr = dPt.data() + c * kBwdBlockM;
              at::vec::map2([](Vec<T> x, Vec<T> l) { return vexp(x - l); }, pr, pr,
                            shift.data(), m);
              if (nan_rows) {
                for (int64_t r = 0; r < m; ++r) {
                  if (std::isnan(shift[r])) pr[r] = shift[r];
                }
              }
              if (dropout) {
                for (int64_t r = 0; r < m; ++r) {
                  const T z = Z[r * kBwdBlockN + c];
                  dpr[r] *= z;
                }
              }
              // dSᵀ = Pᵀ ∘ (dPᵀ∘Z - delta), kept in dPt; (P∘Z)ᵀ (for dV) kept in St.
              at::vec::map3([](Vec<T> x, Vec<T> y, Vec<T> d) { return x * (y - d); }, dpr, pr,
                            dpr, dl + i0, m);
              if (dropout) {
                for (int64_t r = 0; r < m; ++r) pr[r] *= Z[r * kBwdBlockN + c];
              }
              if (want_dmask) {
                T* dm = dmask_t + b * p.dmask.batch + h * p.dmask.head + i0 * p.dmask.row +
                        (j0 + c) * p.dmask.col;
                for (int64_t r = 0; r < m; ++r) dm[r * p.dmask.row] += dpr[r];
              }
            }
            matmul(n, p.Dv, m, St.data(), kBwdBlockM, dOh.data() + r0 * p.Dv, p.Dv, dVb, p.Dv,
                   true);
            matmul(n, p.D, m, dPt.data(), kBwdBlockM, Qh.data() + r0 * p.D, p.D, dKb, p.D, true);
            matmul(p.D, m, n, Kt.data(), n, dPt.data(), kBwdBlockM, dqt + i0, p.Sq, true);
          }
        }
        if (!split_keys) store_dq(dqt, b, h, i_begin, i_end, dq_rows.data());
      }
      S* dk = static_cast<S*>(p.dk.ptr) + b * p.dk.batch + j_lo * p.dk.row + hk * p.dk.head;
      S* dv = static_cast<S*>(p.dv.ptr) + b * p.dv.batch + j_lo * p.dv.row + hk * p.dv.head;
      for (int64_t c = 0; c < j_hi - j_lo; ++c) {
        from_acc(dK.data() + c * p.D, dk + c * p.dk.row, p.D, T(1));
        from_acc(dV.data() + c * p.Dv, dv + c * p.dv.row, p.Dv, T(1));
      }
    }
    matmul_release();
  });

  // Split key blocks: dq = scale * the threads' accumulators summed in thread order.
  if (split_keys) {
    at::parallel_for(0, p.B * p.Hq, grain_for(threads * p.D * p.Sq), [&](int64_t begin,
                                                                          int64_t end) {
      std::vector<T> sum(p.D * p.Sq), rows(p.Sq * p.D);
      for (int64_t bh = begin; bh < end; ++bh) {
        const T* first = dqt_acc.data() + bh * p.D * p.Sq;
        std::copy(first, first + p.D * p.Sq, sum.begin());
        for (int64_t t = 1; t < threads; ++t) {
          const T* acc = first + t * dq_size;
          for (int64_t idx = 0; idx < p.D * p.Sq; ++idx) sum[idx] += acc[idx];
        }
        store_dq(sum.data(), bh / p.Hq, bh % p.Hq, 0, p.Sq, rows.data());
      }
    });
  }
  if (want_dmask) {
    T* dmask = static_cast<T*>(const_cast<void*>(p.dmask.ptr));
    for (int64_t t = 0; t < threads; ++t) {
      for (int64_t idx = 0; idx < dmask_size; ++idx) dmask[idx] += dmask_acc[t * dmask_size + idx];
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
    KVPanel<S, T> kv(p, false);
    std::vector<T> Q(kBlockM * p.D), Sc(kBlockM * kBlockN), z(kBlockN);
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
      kv.load(b, hk);
      if (compute_lse) {
        std::fill(row_m.begin(), row_m.end(), neg_inf<T>());
        std::fill(row_l.begin(), row_l.end(), T(0));
        for (int64_t j0 = tile_start(j_begin); j0 < j_end; j0 += kBlockN) {
          const int64_t n = std::min(kBlockN, j_end - j0);
          score_tile<S>(p, vis, b, h, i0, m, j0, n, Q.data(), kv.kt_tile(j0), kBlockN,
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
          lse[r] = row_l[r] == T(0) ? neg_inf<T>() : row_m[r] + std::log(row_l[r]);
        }
      }
      for (int64_t j0 = tile_start(j_begin); j0 < j_end; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, j_end - j0);
        score_tile<S>(p, vis, b, h, i0, m, j0, n, Q.data(), kv.kt_tile(j0), kBlockN,
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
