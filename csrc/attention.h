// Device-independent half of every op: checks the tensors (so that a direct
// torch.ops.selfattn call with bad input raises instead of crashing),
// allocates the outputs and fills the parameter structs. Each backend passes
// the function that runs its kernel on the filled params.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

#include "params.h"

namespace selfattn {

// Kernel entry points of one backend; `dtype` is the dtype of q, k, v.
struct Backend {
  void (*forward)(const AttnParams& p, at::ScalarType dtype);
  void (*backward)(const AttnBwdParams& p, at::ScalarType dtype);
  // probs (B, Hq, Sq, Sk) contiguous in q's dtype; p.lse may be filled first
  // by the backend when `compute_lse` is true.
  void (*probs)(const AttnParams& p, void* probs, bool compute_lse, at::ScalarType dtype);
  // The forward takes AttnParams::diag_per_batch and batches of paged
  // sequences, so that a KV cache step is one call (CUDA: one launch instead
  // of one per sequence); otherwise it runs sequence by sequence.
  bool per_batch_diag = false;
};

// The arguments the three ops share after their tensors, in schema order
// (csrc/ops.cpp); num_splits comes from the varlen and kvcache ops only.
struct OpArgs {
  const std::optional<at::Tensor>& attn_mask;
  const std::optional<at::Tensor>& key_lengths;
  const std::optional<at::Tensor>& rng_state;
  double scale;
  int64_t window_left, window_right, diag_offset;
  double dropout_p;
  const std::optional<at::Tensor>& alibi_slopes;
  double softcap;
  int64_t q_start, k_start;
  int64_t num_splits = 0;       // AttnParams::num_splits
  bool diag_per_batch = false;  // AttnParams::diag_per_batch (Backend::per_batch_diag only)
};

// Keys and values of paged sequences in a pool (k, v of shape (num_pages,
// page_size, Hkv, D|Dv)): batch entry b's keys, `len` at most, lie in the
// pages listed at pages + b * batch (int32, on the tensors' device; checked by
// the caller).
struct PagedKeys {
  const int32_t* pages = nullptr;
  int64_t len = 0, batch = 0;
};

std::tuple<at::Tensor, at::Tensor> forward_op(const Backend& backend, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& v,
                                              const OpArgs& a, const PagedKeys& paged = {});

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const Backend& backend, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const OpArgs& a,
    bool mask_grad);

at::Tensor probs_op(const Backend& backend, const at::Tensor& q, const at::Tensor& k,
                    const std::optional<at::Tensor>& lse, const OpArgs& a);

// Packed variable-length batches (attention.cpp): q (Tq, Hq, D), k (Tk, Hkv, D),
// v (Tk, Hkv, Dv), offsets cu_q/cu_k (N + 1,) -> out (Tq, Hq, Dv), lse (Hq, Tq).
std::tuple<at::Tensor, at::Tensor> varlen_forward_op(
    const Backend& backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_q, const at::Tensor& cu_k, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& rng_state, double scale, int64_t window_left,
    int64_t window_right, double dropout_p, const std::optional<at::Tensor>& block_table,
    int64_t num_splits);

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_op(
    const Backend& backend, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
    const at::Tensor& cu_k, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& rng_state, double scale, int64_t window_left,
    int64_t window_right, double dropout_p);

// A KV cache step (attention.cpp): k, v (B, n_new, Hkv, D|Dv) written into the
// caches at cache_seqlens, then q (B, n, Hq, D) attends -> out (B, n, Hq, Dv),
// lse (B, Hq, n).
std::tuple<at::Tensor, at::Tensor> kvcache_forward_op(
    const Backend& backend, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& block_table, double scale, int64_t window_left,
    int64_t window_right, int64_t num_splits);

// Registers the ops of `backend` for a dispatch key (used by the
// TORCH_LIBRARY_IMPL blocks of the CPU and CUDA files).
#define SELFATTN_OP_ARGS                                                                       \
  const std::optional<at::Tensor>&mask, const std::optional<at::Tensor>&kl,                    \
      const std::optional<at::Tensor>&rng, double scale, int64_t wl, int64_t wr, int64_t off, \
      double p, const std::optional<at::Tensor>&slopes, double softcap, int64_t q0, int64_t k0
#define SELFATTN_OP_ARGS_STRUCT \
  ::selfattn::OpArgs { mask, kl, rng, scale, wl, wr, off, p, slopes, softcap, q0, k0 }

#define SELFATTN_VARLEN_ARGS                                                                  \
  const std::optional<at::Tensor>&used, const std::optional<at::Tensor>&rng, double scale,    \
      int64_t wl, int64_t wr, double p

#define SELFATTN_REGISTER_BACKEND(m, backend)                                                 \
  m.impl("attention_forward", [](const at::Tensor& q, const at::Tensor& k,                   \
                                 const at::Tensor& v, SELFATTN_OP_ARGS) {                    \
    return ::selfattn::forward_op(backend, q, k, v, SELFATTN_OP_ARGS_STRUCT);               \
  });                                                                                         \
  m.impl("attention_backward",                                                               \
         [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,                \
            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,               \
            SELFATTN_OP_ARGS, bool mask_grad) {                                               \
           return ::selfattn::backward_op(backend, dout, q, k, v, out, lse,                  \
                                          SELFATTN_OP_ARGS_STRUCT, mask_grad);               \
         });                                                                                  \
  m.impl("attention_probs", [](const at::Tensor& q, const at::Tensor& k,                     \
                               const std::optional<at::Tensor>& lse, SELFATTN_OP_ARGS) {     \
    return ::selfattn::probs_op(backend, q, k, lse, SELFATTN_OP_ARGS_STRUCT);               \
  });                                                                                         \
  m.impl("varlen_forward",                                                                   \
         [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                   \
            const at::Tensor& cu_q, const at::Tensor& cu_k, SELFATTN_VARLEN_ARGS,            \
            const std::optional<at::Tensor>& block_table, int64_t splits) {                  \
           return ::selfattn::varlen_forward_op(backend, q, k, v, cu_q, cu_k, used, rng, scale, \
                                                wl, wr, p, block_table, splits);              \
         });                                                                                  \
  m.impl("varlen_backward",                                                                  \
         [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,                \
            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,               \
            const at::Tensor& cu_q, const at::Tensor& cu_k, SELFATTN_VARLEN_ARGS) {          \
           return ::selfattn::varlen_backward_op(backend, dout, q, k, v, out, lse, cu_q, cu_k, \
                                                 used, rng, scale, wl, wr, p);                \
         });                                                                                  \
  m.impl("kvcache_forward",                                                                  \
         [](const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,       \
            const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,          \
            const at::Tensor& lens, const std::optional<at::Tensor>& block_table,            \
            double scale, int64_t wl, int64_t wr, int64_t splits) {                           \
           return ::selfattn::kvcache_forward_op(backend, q, k_cache, v_cache, k, v, lens,   \
                                                 block_table, scale, wl, wr, splits);         \
         })

}  // namespace selfattn
