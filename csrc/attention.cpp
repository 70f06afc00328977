// Checks, output allocation and parameter filling shared by the CPU and CUDA
// backends (see attention.h). Messages name the argument and the expectation.
#include "attention.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace selfattn {
namespace {

constexpr int64_t kMaxHeadDim = 512;

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

BSHD bshd(const at::Tensor& t) {
  return BSHD{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

void check_bshd(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "selfattn: ", name, " must be 4-D (B, S, H, D), got ", t.dim(),
              "-D");
  TORCH_CHECK(t.numel() == 0 || t.size(3) == 1 || t.stride(3) == 1, "selfattn: ", name,
              " must have a contiguous last dim (stride 1), got stride ", t.stride(3));
}

// q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv); for `paged` keys,
// k and v are pools (num_pages, page_size, Hkv, D|Dv) instead.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               bool paged = false) {
  check_bshd("q", q);
  check_bshd("k", k);
  check_bshd("v", v);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "selfattn: q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype,
              "selfattn: q, k and v must have one dtype, got ", dtype, ", ", k.scalar_type(),
              " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "selfattn: q, k and v must be on one device, got ", q.device(), ", ", k.device(),
              " and ", v.device());
  if (paged) {
    TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && k.size(1) >= 1,
                "selfattn: the k and v pools must have one number of pages and one page size "
                ">= 1, got ", k.sizes(), " and ", v.sizes());
  } else {
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                "selfattn: q, k and v must have one batch size, got ", q.size(0), ", ",
                k.size(0), " and ", v.size(0));
    TORCH_CHECK(v.size(1) == k.size(1), "selfattn: v has ", v.size(1),
                " keys, which differs from k's ", k.size(1));
  }
  TORCH_CHECK(v.size(2) == k.size(2), "selfattn: v has ", v.size(2),
              " heads, which differs from k's ", k.size(2));
  TORCH_CHECK(k.size(3) == q.size(3), "selfattn: k has head dim ", k.size(3),
              ", which differs from q's ", q.size(3));
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, "selfattn: k has ", k.size(2),
              " heads, which does not divide q's ", q.size(2), " heads");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "selfattn: head dim of q must be in [1, ",
              kMaxHeadDim, "], got ", q.size(3));
  TORCH_CHECK(v.size(3) >= 1 && v.size(3) <= kMaxHeadDim, "selfattn: head dim of v must be in [1, ",
              kMaxHeadDim, "], got ", v.size(3));
}

// Strides that read `t` (right-aligned, up to 4 dims) as (B, Hq, Sq, Sk).
void broadcast_strides(const at::Tensor& t, const int64_t (&target)[4], int64_t (&out)[4]) {
  const int64_t lead = 4 - t.dim();
  for (int64_t d = 0; d < 4; ++d) {
    if (d < lead || t.size(d - lead) == 1) {
      out[d] = 0;
    } else {
      out[d] = t.stride(d - lead);
    }
  }
  (void)target;
}

MaskView mask_view(const std::optional<at::Tensor>& attn_mask, const at::Tensor& q,
                   int64_t Sk) {
  MaskView view;
  if (!attn_mask.has_value()) return view;
  const at::Tensor& m = *attn_mask;
  const int64_t target[4] = {q.size(0), q.size(2), q.size(1), Sk};
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
              "selfattn: attn_mask must be bool or have q's dtype ", q.scalar_type(), ", got ",
              m.scalar_type());
  TORCH_CHECK(m.device() == q.device(), "selfattn: attn_mask must be on q's device ", q.device(),
              ", got ", m.device());
  TORCH_CHECK(m.dim() <= 4, "selfattn: attn_mask must have at most 4 dims, got ", m.dim());
  const int64_t lead = 4 - m.dim();
  for (int64_t d = lead; d < 4; ++d) {
    TORCH_CHECK(m.size(d - lead) == 1 || m.size(d - lead) == target[d],
                "selfattn: attn_mask of shape ", m.sizes(),
                " is not broadcastable to (B, Hq, Sq, Sk) = ", at::IntArrayRef(target));
  }
  int64_t s[4];
  broadcast_strides(m, target, s);
  view.ptr = m.data_ptr();
  view.kind = m.scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Float;
  view.batch = s[0];
  view.head = s[1];
  view.row = s[2];
  view.col = s[3];
  return view;
}

// Offsets beyond +-2^62 are refused, so that the kernels' index arithmetic
// stays far from int64 overflow (normalize_window, params.h).
constexpr int64_t kMaxDiagOffset = int64_t(1) << 62;

// The scalar arguments that no shape bounds.
void check_scalars(double scale, int64_t window_left, int64_t window_right, int64_t num_splits) {
  TORCH_CHECK(std::isfinite(scale), "selfattn: scale must be finite, got ", scale);
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "selfattn: window sides must be >= 0 or -1 (unbounded), got (", window_left, ", ",
              window_right, ")");
  TORCH_CHECK(num_splits >= 0, "selfattn: num_splits must be >= 0 (0 = automatic), got ",
              num_splits);
}

void fill_params(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const OpArgs& a, const PagedKeys& paged = {}) {
  p.B = q.size(0);
  p.Sq = q.size(1);
  p.Hq = q.size(2);
  p.D = q.size(3);
  p.Sk = k.size(1);
  if (paged.pages != nullptr) {
    p.Sk = paged.len;
    p.pages = paged.pages;
    p.pages_batch = paged.batch;
    p.page_size = k.size(1);
    p.num_pages = k.size(0);
  }
  p.Hkv = k.size(2);
  p.Dv = v.size(3);
  p.q = bshd(q);
  p.k = bshd(k);
  p.v = bshd(v);
  p.device = q.is_cuda() ? q.get_device() : -1;
  check_scalars(a.scale, a.window_left, a.window_right, a.num_splits);
  p.scale = a.scale;
  TORCH_CHECK(a.diag_offset >= -kMaxDiagOffset && a.diag_offset <= kMaxDiagOffset,
              "selfattn: diag_offset must lie in [-2^62, 2^62], got ", a.diag_offset);
  p.diag_offset = a.diag_offset;
  p.window_left = a.window_left;
  p.window_right = a.window_right;
  TORCH_CHECK(!a.diag_per_batch || a.key_lengths.has_value(),
              "selfattn: per-batch alignment needs key_lengths");
  p.diag_per_batch = a.diag_per_batch;
  normalize_window(p);
  p.num_splits = a.num_splits;
  TORCH_CHECK(std::isfinite(a.softcap) && a.softcap >= 0.0,
              "selfattn: softcap must be finite and >= 0 (0 = off), got ", a.softcap);
  p.softcap = a.softcap;
  if (a.alibi_slopes.has_value()) {
    const at::Tensor& s = *a.alibi_slopes;
    TORCH_CHECK(s.scalar_type() == at::kFloat, "selfattn: alibi_slopes must be float32, got ",
                s.scalar_type());
    TORCH_CHECK((s.dim() == 1 && s.size(0) == p.Hq) ||
                    (s.dim() == 2 && s.size(0) == p.B && s.size(1) == p.Hq),
                "selfattn: alibi_slopes must have shape (Hq,) = (", p.Hq, ",) or (B, Hq) = (",
                p.B, ", ", p.Hq, "), got ", s.sizes());
    TORCH_CHECK(s.device() == q.device(), "selfattn: alibi_slopes must be on q's device ",
                q.device(), ", got ", s.device());
    TORCH_CHECK(s.is_contiguous(), "selfattn: alibi_slopes must be contiguous");
    p.alibi_slopes = s.data_ptr<float>();
    p.alibi_batch = s.dim() == 2 ? p.Hq : 0;
  }
  p.mask = mask_view(a.attn_mask, q, p.Sk);
  if (a.key_lengths.has_value()) {
    const at::Tensor& kl = *a.key_lengths;
    TORCH_CHECK(kl.scalar_type() == at::kLong, "selfattn: key_lengths must be int64, got ",
                kl.scalar_type());
    TORCH_CHECK(kl.dim() == 1 && kl.size(0) == p.B, "selfattn: key_lengths must have shape (",
                p.B, ",), got ", kl.sizes());
    TORCH_CHECK(kl.device() == q.device(), "selfattn: key_lengths must be on q's device ",
                q.device(), ", got ", kl.device());
    TORCH_CHECK(kl.is_contiguous(), "selfattn: key_lengths must be contiguous");
    if (kl.is_cpu() && p.B > 0) {
      TORCH_CHECK(kl.min().item<int64_t>() >= 0 && kl.max().item<int64_t>() <= p.Sk,
                  "selfattn: key_lengths must lie in [0, ", p.Sk, "]");
    }
    p.key_lengths = kl.data_ptr<int64_t>();
  }
  TORCH_CHECK(a.dropout_p >= 0.0 && a.dropout_p < 1.0,
              "selfattn: dropout_p must be in [0, 1), got ", a.dropout_p);
  TORCH_CHECK(a.q_start >= 0 && a.k_start >= 0, "selfattn: q_start and k_start must be >= 0, got ",
              a.q_start, " and ", a.k_start);
  p.q_start = a.q_start;
  p.k_start = a.k_start;
  if (a.dropout_p > 0.0) {
    TORCH_CHECK(a.rng_state.has_value(), "selfattn: dropout_p > 0 needs rng_state");
    const at::Tensor& r = *a.rng_state;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.size(0) == 2 &&
                    r.is_contiguous(),
                "selfattn: rng_state must be a contiguous int64 tensor of shape (2,)");
    TORCH_CHECK(r.device() == q.device(), "selfattn: rng_state must be on q's device ",
                q.device(), ", got ", r.device());
    p.rng_state = r.data_ptr<int64_t>();
    p.dropout_threshold = uint32_t(std::min(a.dropout_p * 4294967296.0, 4294967295.0));
    p.dropout_scale = 1.0 / (1.0 - a.dropout_p);
  }
}

bool empty_problem(const AttnParams& p) {
  return p.B == 0 || p.Sq == 0 || p.Hq == 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_op(const Backend& backend, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& v,
                                              const OpArgs& a, const PagedKeys& paged) {
  check_qkv(q, k, v, paged.pages != nullptr);
  AttnParams p;
  fill_params(p, q, k, v, a, paged);
  auto out = at::empty({p.B, p.Sq, p.Hq, p.Dv}, q.options());
  auto lse = at::empty({p.B, p.Hq, p.Sq}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (empty_problem(p)) return {out, lse};
  if (p.Sk == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  p.out = bshd(out);
  p.lse = lse.data_ptr();
  backend.forward(p, q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const Backend& backend, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const OpArgs& a,
    bool mask_grad) {
  const std::optional<at::Tensor>& attn_mask = a.attn_mask;
  check_qkv(q, k, v);
  check_bshd("dout", dout);
  check_bshd("out", out);
  const std::vector<int64_t> out_shape = {q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK(dout.sizes() == out_shape && out.sizes() == out_shape,
              "selfattn: dout and out must have shape (B, Sq, Hq, Dv) = ",
              at::IntArrayRef(out_shape), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "selfattn: dout and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() &&
                  lse.device() == q.device(),
              "selfattn: dout, out and lse must be on q's device ", q.device());
  TORCH_CHECK(lse.scalar_type() == acc_dtype(q.scalar_type()) && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(2), q.size(1)}),
              "selfattn: lse must be a contiguous ", acc_dtype(q.scalar_type()),
              " tensor of shape (B, Hq, Sq)");
  AttnBwdParams p;
  fill_params(p, q, k, v, a);
  auto dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  auto dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
  auto dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  at::Tensor dmask;
  const bool want_dmask = mask_grad && attn_mask.has_value();
  if (want_dmask) {
    TORCH_CHECK(attn_mask->scalar_type() != at::kBool,
                "selfattn: mask_grad needs a float attn_mask, got a bool one");
    dmask = at::zeros(attn_mask->sizes(), q.options().dtype(acc_dtype(q.scalar_type())));
  } else {
    dmask = at::empty({0}, q.options());
  }
  if (empty_problem(p) || p.Sk == 0) {
    return {dq, dk, dv, want_dmask ? dmask.to(attn_mask->scalar_type()) : dmask};
  }
  p.out = bshd(out);
  p.lse = lse.data_ptr();
  p.dout = bshd(dout);
  p.dq = bshd(dq);
  p.dk = bshd(dk);
  p.dv = bshd(dv);
  if (want_dmask) {
    const int64_t target[4] = {p.B, p.Hq, p.Sq, p.Sk};
    int64_t s[4];
    broadcast_strides(dmask, target, s);
    p.dmask.ptr = dmask.data_ptr();
    p.dmask.kind = MaskKind::Float;
    p.dmask.batch = s[0];
    p.dmask.head = s[1];
    p.dmask.row = s[2];
    p.dmask.col = s[3];
  }
  auto delta = at::empty({p.B, p.Hq, p.Sq}, lse.options());
  p.delta = delta.data_ptr();
  backend.backward(p, q.scalar_type());
  if (want_dmask) dmask = dmask.to(attn_mask->scalar_type());
  return {dq, dk, dv, dmask};
}

at::Tensor probs_op(const Backend& backend, const at::Tensor& q, const at::Tensor& k,
                    const std::optional<at::Tensor>& lse, const OpArgs& a) {
  check_qkv(q, k, k);
  AttnParams p;
  fill_params(p, q, k, k, a);
  auto probs = at::empty({p.B, p.Hq, p.Sq, p.Sk}, q.options());
  if (probs.numel() == 0) return probs;
  at::Tensor lse_buf;
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == acc_dtype(q.scalar_type()) && lse->is_contiguous() &&
                    lse->device() == q.device() &&
                    lse->sizes() == at::IntArrayRef({p.B, p.Hq, p.Sq}),
                "selfattn: lse must be a contiguous ", acc_dtype(q.scalar_type()),
                " tensor of shape (B, Hq, Sq) on q's device");
    lse_buf = *lse;
  } else {
    lse_buf = at::empty({p.B, p.Hq, p.Sq}, q.options().dtype(acc_dtype(q.scalar_type())));
  }
  p.lse = lse_buf.data_ptr();
  backend.probs(p, probs.data_ptr(), !lse.has_value(), q.scalar_type());
  return probs;
}

// ---------------------------------------------------------------------------
// Packed variable-length batches: sequence b is rows [cu_q[b], cu_q[b + 1]) of
// q (Tq, Hq, D) and rows [cu_k[b], cu_k[b + 1]) of k, v (Tk, Hkv, D|Dv), its
// first seqused_k[b] keys only when given. Each sequence runs the backend's
// kernels as a batch of one on views of the packed tensors (short sequences
// side by side on the CPU, forward and backward: for_each_sequence), causal and
// windows aligned bottom-right per sequence (FlashAttention's varlen), its
// dropout drawn at its packed row positions (q_start, k_start), so that no
// two sequences share a mask.

namespace {

struct Sequence {
  int64_t q0, q_len, k0, k_len;
};

std::vector<int64_t> offsets(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 &&
                  (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              "selfattn: ", name, " must be a 1-D int32 or int64 tensor of N + 1 offsets, got ",
              cu.scalar_type(), " of shape ", cu.sizes());
  const at::Tensor host = cu.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> v(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  TORCH_CHECK(v.front() == 0, "selfattn: ", name, " must start at 0, got ", v.front());
  for (size_t i = 1; i < v.size(); ++i) {
    TORCH_CHECK(v[i] >= v[i - 1], "selfattn: ", name, " must not decrease, got ", v[i - 1],
                " then ", v[i], " at ", i);
  }
  TORCH_CHECK(v.back() == total, "selfattn: ", name, " must end at the packed length ", total,
              ", got ", v.back());
  return v;
}

// The sequences of a packed batch; with `paged` keys (k a pool of pages),
// cu_k is checked for its shape only and seqused_k gives the key counts.
std::vector<Sequence> sequences(const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& cu_q, const at::Tensor& cu_k,
                                const std::optional<at::Tensor>& seqused_k, bool paged = false) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == (paged ? 4 : 3), "selfattn: varlen q must be 3-D (T, "
              "H, D) and k ", paged ? "4-D (num_pages, page_size, H, D)" : "3-D (T, H, D)",
              ", got ", q.dim(), "-D and ", k.dim(), "-D");
  const auto oq = offsets(cu_q, "cu_seq_q", q.size(0));
  const int64_t n = int64_t(oq.size()) - 1;
  std::vector<int64_t> ok(n + 1, 0);
  if (paged) {
    TORCH_CHECK(cu_k.dim() == 1 && cu_k.size(0) == n + 1, "selfattn: cu_seq_k must have ",
                n + 1, " offsets like cu_seq_q, got shape ", cu_k.sizes());
    TORCH_CHECK(seqused_k.has_value(), "selfattn: a block_table needs seqused_k (the key count "
                "of each sequence)");
  } else {
    ok = offsets(cu_k, "cu_seq_k", k.size(0));
    TORCH_CHECK(oq.size() == ok.size(), "selfattn: cu_seq_q and cu_seq_k must describe one "
                "number of sequences, got ", oq.size() - 1, " and ", ok.size() - 1);
  }
  std::vector<int64_t> used;
  if (seqused_k.has_value()) {
    const at::Tensor& u = *seqused_k;
    TORCH_CHECK(u.dim() == 1 && u.size(0) == n &&
                    (u.scalar_type() == at::kInt || u.scalar_type() == at::kLong),
                "selfattn: seqused_k must be a 1-D int32 or int64 tensor of ", n,
                " lengths, got ", u.scalar_type(), " of shape ", u.sizes());
    const at::Tensor host = u.to(at::kCPU, at::kLong).contiguous();
    used.assign(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + n);
  }
  std::vector<Sequence> seqs;
  for (int64_t b = 0; b < n; ++b) {
    int64_t k_len = ok[b + 1] - ok[b];
    if (!used.empty()) {  // paged: the block table bounds the count (check_block_table)
      TORCH_CHECK(used[b] >= 0, "selfattn: seqused_k[", b, "] = ", used[b], " must be >= 0");
      TORCH_CHECK(paged || used[b] <= k_len, "selfattn: seqused_k[", b, "] = ", used[b],
                  " must lie in [0, ", k_len, "], the sequence's keys");
      k_len = used[b];
    }
    seqs.push_back({oq[b], oq[b + 1] - oq[b], ok[b], k_len});
  }
  return seqs;
}

// Sequence s of a packed (T, H, X) tensor as a (1, len, H, X) view.
at::Tensor rows(const at::Tensor& t, int64_t start, int64_t len) {
  return t.narrow(0, start, len).unsqueeze(0);
}

// A paged cache's block table (N, max_pages) int32, read on the host: the
// pages that hold each sequence's keys exist and lie in the pool. Returns the
// table on the host (contiguous). `lengths` names the key counts in messages.
at::Tensor check_block_table(const at::Tensor& table, const at::Tensor& q, const at::Tensor& k,
                             const std::vector<Sequence>& seqs, const char* lengths) {
  const int64_t n = int64_t(seqs.size());
  TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == n &&
                  (table.size(1) <= 1 || table.stride(1) == 1),
              "selfattn: block_table must be an int32 tensor of shape (N, max_pages) = (", n,
              ", max_pages) with a contiguous last dim, got ", table.scalar_type(), " of shape ",
              table.sizes());
  TORCH_CHECK(table.device() == q.device(), "selfattn: block_table must be on q's device ",
              q.device(), ", got ", table.device());
  const at::Tensor host = table.to(at::kCPU).contiguous();
  const int64_t page_size = k.size(1), num_pages = k.size(0), max_pages = table.size(1);
  for (int64_t b = 0; b < n; ++b) {
    const int64_t needed = seqs[b].k_len / page_size + (seqs[b].k_len % page_size != 0);
    TORCH_CHECK(needed <= max_pages, "selfattn: sequence ", b, " has ", seqs[b].k_len,
                " keys (", lengths, "), which needs ", needed, " pages of ", page_size,
                " keys, but block_table has ", max_pages, " per sequence");
    const int32_t* row = host.data_ptr<int32_t>() + b * max_pages;
    for (int64_t i = 0; i < needed; ++i) {
      TORCH_CHECK(row[i] >= 0 && row[i] < num_pages, "selfattn: block_table[", b, ", ", i,
                  "] = ", row[i], " is not a page of the pool (", num_pages, " pages)");
    }
  }
  return host;
}

// Runs attend(b) for every sequence b, of work[b] (any unit, e.g. score
// elements). On the CPU, a sequence whose work is at most an even share of
// the threads' runs on one thread, beside the other such sequences (longest
// first, each to the least loaded thread; the kernels run inline there, with
// the same tiling and results as alone), so that many short sequences cost
// one parallel region and a batch of one long and many short ones balances;
// the others run one after another, each with every thread. Elsewhere (CUDA:
// asynchronous launches), one after another.
template <typename F>
void for_each_sequence(const at::Tensor& q, const std::vector<int64_t>& work, F attend) {
  const int64_t n = int64_t(work.size());
  const int64_t threads = q.is_cpu() && !at::in_parallel_region() ? at::get_num_threads() : 1;
  const int64_t total = std::accumulate(work.begin(), work.end(), int64_t(0));
  std::vector<int64_t> shared;  // sequences that run beside others
  for (int64_t b = 0; b < n; ++b) {
    if (threads > 1 && work[b] * threads <= total) {
      shared.push_back(b);
    } else {
      attend(b);
    }
  }
  if (shared.empty()) return;
  std::stable_sort(shared.begin(), shared.end(),
                   [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  std::vector<std::vector<int64_t>> runs(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t b : shared) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    runs[t].push_back(b);
    load[t] += work[b];
  }
  const at::ThreadLocalState caller;  // grad / inference mode and dispatch state for the workers
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t b : runs[t]) attend(b);
    }
  });
}

// Work per sequence for for_each_sequence: query rows x keys.
std::vector<int64_t> work_of(const std::vector<Sequence>& seqs) {
  std::vector<int64_t> work;
  for (const Sequence& s : seqs) work.push_back(s.q_len * s.k_len);
  return work;
}

OpArgs sequence_args(const Sequence& s, const std::optional<at::Tensor>& none,
                     const std::optional<at::Tensor>& rng_state, double scale, int64_t wl,
                     int64_t wr, double dropout_p, int64_t num_splits = 0) {
  return OpArgs{none, none, rng_state, scale, wl, wr, s.k_len - s.q_len, dropout_p, none, 0.0,
                s.q0, s.k0, num_splits};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_forward_op(
    const Backend& backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_q, const at::Tensor& cu_k, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& rng_state, double scale, int64_t window_left,
    int64_t window_right, double dropout_p, const std::optional<at::Tensor>& block_table,
    int64_t num_splits) {
  const bool paged = block_table.has_value();
  const auto seqs = sequences(q, k, cu_q, cu_k, seqused_k, paged);
  TORCH_CHECK(v.dim() == k.dim(), "selfattn: varlen v must be ", k.dim(), "-D like k, got ",
              v.dim(), "-D");
  if (paged) {
    TORCH_CHECK(dropout_p == 0.0, "selfattn: a paged KV cache (block_table) is for inference: "
                "dropout_p must be 0, got ", dropout_p);
    check_block_table(*block_table, q, k, seqs, "seqused_k");
  }
  const int64_t Tq = q.size(0), Hq = q.size(1), Dv = v.size(-1);
  auto out = at::zeros({Tq, Hq, Dv}, q.options());
  auto lse = at::full({Hq, Tq}, -std::numeric_limits<double>::infinity(),
                      q.options().dtype(acc_dtype(q.scalar_type())));
  const std::optional<at::Tensor> none;
  for_each_sequence(q, work_of(seqs), [&](int64_t b) {
    const Sequence& s = seqs[b];
    if (s.q_len == 0) return;
    const OpArgs args =
        sequence_args(s, none, rng_state, scale, window_left, window_right, dropout_p, num_splits);
    auto [o, l] =
        paged ? forward_op(backend, rows(q, s.q0, s.q_len), k, v, args,
                           PagedKeys{block_table->data_ptr<int32_t>() +
                                         b * block_table->stride(0),
                                     s.k_len})
              : forward_op(backend, rows(q, s.q0, s.q_len), rows(k, s.k0, s.k_len),
                           rows(v, s.k0, s.k_len), args);
    out.narrow(0, s.q0, s.q_len).copy_(o[0]);
    lse.narrow(1, s.q0, s.q_len).copy_(l[0]);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_op(
    const Backend& backend, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
    const at::Tensor& cu_k, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& rng_state, double scale, int64_t window_left,
    int64_t window_right, double dropout_p) {
  const auto seqs = sequences(q, k, cu_q, cu_k, seqused_k);
  TORCH_CHECK(v.dim() == 3 && dout.dim() == 3 && out.dim() == 3 && lse.dim() == 2,
              "selfattn: varlen backward needs 3-D v, dout, out and 2-D lse");
  TORCH_CHECK(dout.sizes() == out.sizes() && out.size(0) == q.size(0) &&
                  lse.size(0) == q.size(1) && lse.size(1) == q.size(0),
              "selfattn: varlen dout and out must be (Tq, Hq, Dv), lse (Hq, Tq)");
  auto dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  auto dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
  auto dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  const std::optional<at::Tensor> none;
  for_each_sequence(q, work_of(seqs), [&](int64_t b) {
    const Sequence& s = seqs[b];
    if (s.q_len == 0 || s.k_len == 0) return;
    auto grads = backward_op(backend, rows(dout, s.q0, s.q_len), rows(q, s.q0, s.q_len),
                             rows(k, s.k0, s.k_len), rows(v, s.k0, s.k_len),
                             rows(out, s.q0, s.q_len),
                             lse.narrow(1, s.q0, s.q_len).unsqueeze(0).contiguous(),
                             sequence_args(s, none, rng_state, scale, window_left, window_right,
                                           dropout_p),
                             false);
    dq.narrow(0, s.q0, s.q_len).copy_(std::get<0>(grads)[0]);
    dk.narrow(0, s.k0, s.k_len).copy_(std::get<1>(grads)[0]);
    dv.narrow(0, s.k0, s.k_len).copy_(std::get<2>(grads)[0]);
  });
  return {dq, dk, dv};
}


// ---------------------------------------------------------------------------
// One step of generation with a KV cache (FlashAttention's
// flash_attn_with_kvcache): k, v (B, n_new, Hkv, D|Dv) are copied into the
// caches at rows cache_seqlens[b] .. cache_seqlens[b] + n_new - 1, then q
// (B, n, Hq, D) attends to the first cache_seqlens[b] + n_new keys of
// sequence b, bottom-right aligned: in one call where the backend aligns per
// batch entry (CUDA: Backend::per_batch_diag), else a batch of one per
// sequence, as varlen (the CPU: sequences side by side, split-KV per sequence).
// The caches are (B, S_max, Hkv, D|Dv), or with a block_table (B, max_pages)
// pools of pages (num_pages, page_size, Hkv, D|Dv). Every check (lengths,
// pages) runs before the first write.
std::tuple<at::Tensor, at::Tensor> kvcache_forward_op(
    const Backend& backend, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& block_table, double scale, int64_t window_left,
    int64_t window_right, int64_t num_splits) {
  const bool paged = block_table.has_value();
  check_qkv(q, k_cache, v_cache, paged);
  const int64_t B = q.size(0), n = q.size(1), Hq = q.size(2), Dv = v_cache.size(3);
  TORCH_CHECK(k.has_value() == v.has_value(), "selfattn: pass both k and v, or neither");
  const int64_t n_new = k.has_value() ? k->size(1) : 0;
  auto check_new = [&](const char* name, const at::Tensor& t, const at::Tensor& cache) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == n_new &&
                    t.sizes().slice(2) == cache.sizes().slice(2),
                "selfattn: ", name, " must be (B, n_new, Hkv, D|Dv) = (", B, ", ", n_new, ", ",
                cache.size(2), ", ", cache.size(3), "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == cache.scalar_type() && t.device() == cache.device(),
                "selfattn: ", name, " must have its cache's dtype and device (",
                cache.scalar_type(), ", ", cache.device(), "), got ", t.scalar_type(), ", ",
                t.device());
  };
  if (k.has_value()) {
    check_new("k", *k, k_cache);
    check_new("v", *v, v_cache);
  }
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  (cache_seqlens.scalar_type() == at::kInt ||
                   cache_seqlens.scalar_type() == at::kLong),
              "selfattn: cache_seqlens must be a 1-D int32 or int64 tensor of ", B,
              " lengths, got ", cache_seqlens.scalar_type(), " of shape ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.device() == q.device(), "selfattn: cache_seqlens must be on q's "
              "device ", q.device(), ", got ", cache_seqlens.device());
  check_scalars(scale, window_left, window_right, num_splits);  // before anything is written
  // keys a sequence can hold: S_max, or the block table's pages (its shape is
  // checked by check_block_table)
  const int64_t cap = !paged                   ? k_cache.size(1)
                      : block_table->dim() == 2 ? block_table->size(1) * k_cache.size(1)
                                                : std::numeric_limits<int64_t>::max();
  const at::Tensor lens = cache_seqlens.to(at::kCPU, at::kLong).contiguous();
  std::vector<Sequence> seqs;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens.data_ptr<int64_t>()[b];
    TORCH_CHECK(len >= 0, "selfattn: cache_seqlens[", b, "] = ", len, " must be >= 0");
    TORCH_CHECK(len <= cap - n_new, "selfattn: cache_seqlens[", b, "] + n_new = ",
                len, " + ", n_new, " must lie in [0, ", paged ? "pages x page_size" : "S_max",
                " = ", cap, "]");
    seqs.push_back({b * n, n, len, len + n_new});  // k0: where the new keys go
  }
  at::Tensor table;  // on the host
  if (paged) table = check_block_table(*block_table, q, k_cache, seqs, "cache_seqlens + n_new");
  const int64_t page_size = k_cache.size(1);
  for (int64_t b = 0; b < B && n_new > 0; ++b) {
    for (int64_t r = 0; r < n_new;) {  // runs of new rows within one page (or the whole cache)
      const int64_t pos = seqs[b].k0 + r;
      int64_t entry = b, row = pos, run = n_new - r;
      if (paged) {
        entry = table.data_ptr<int32_t>()[b * table.size(1) + pos / page_size];
        row = pos % page_size;
        run = std::min(run, page_size - row);
      }
      k_cache.select(0, entry).narrow(0, row, run).copy_(k->select(0, b).narrow(0, r, run));
      v_cache.select(0, entry).narrow(0, row, run).copy_(v->select(0, b).narrow(0, r, run));
      r += run;
    }
  }
  const std::optional<at::Tensor> none;
  int64_t longest = 0;
  for (const Sequence& s : seqs) longest = std::max(longest, s.k_len);
  if (longest == 0) {  // no keys at all (a block table may have no column)
    return {at::zeros({B, n, Hq, Dv}, q.options()),
            at::full({B, Hq, n}, -std::numeric_limits<double>::infinity(),
                     q.options().dtype(acc_dtype(q.scalar_type())))};
  }
  if (backend.per_batch_diag && B > 1) {
    // One call for the batch: the keys past each sequence's length masked
    // (key_lengths), each aligned bottom-right to its own length.
    const std::optional<at::Tensor> lengths = (cache_seqlens.to(at::kLong) + n_new).contiguous();
    const OpArgs args{none, lengths, none, scale, window_left, window_right, 0, 0.0, none, 0.0,
                      0,    0,       num_splits, true};
    if (paged) {
      return forward_op(backend, q, k_cache, v_cache, args,
                        PagedKeys{block_table->data_ptr<int32_t>(), longest,
                                  block_table->stride(0)});
    }
    return forward_op(backend, q, k_cache.narrow(1, 0, longest), v_cache.narrow(1, 0, longest),
                      args);
  }
  auto attend = [&](int64_t b) {
    const Sequence& s = seqs[b];
    const OpArgs args =
        sequence_args(s, none, none, scale, window_left, window_right, 0.0, num_splits);
    const at::Tensor qb = q.narrow(0, b, 1);
    if (paged) {
      return forward_op(backend, qb, k_cache, v_cache, args,
                        PagedKeys{block_table->data_ptr<int32_t>() + b * block_table->stride(0),
                                  s.k_len});
    }
    return forward_op(backend, qb, k_cache.narrow(0, b, 1).narrow(1, 0, s.k_len),
                      v_cache.narrow(0, b, 1).narrow(1, 0, s.k_len), args);
  };
  if (B == 1) return attend(0);
  auto out = at::empty({B, n, Hq, Dv}, q.options());
  auto lse = at::empty({B, Hq, n}, q.options().dtype(acc_dtype(q.scalar_type())));
  for_each_sequence(q, work_of(seqs), [&](int64_t b) {
    auto [o, l] = attend(b);
    out.narrow(0, b, 1).copy_(o);
    lse.narrow(0, b, 1).copy_(l);
  });
  return {out, lse};
}

}  // namespace selfattn
