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
};

std::tuple<at::Tensor, at::Tensor> forward_op(
    const Backend& backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& rng_state, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double dropout_p);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const Backend& backend, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& rng_state, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double dropout_p, bool mask_grad);

at::Tensor probs_op(const Backend& backend, const at::Tensor& q, const at::Tensor& k,
                    const std::optional<at::Tensor>& lse,
                    const std::optional<at::Tensor>& attn_mask,
                    const std::optional<at::Tensor>& key_lengths,
                    const std::optional<at::Tensor>& rng_state, double scale,
                    int64_t window_left, int64_t window_right, bool bottom_right,
                    double dropout_p);

// Registers the three ops of `backend` for a dispatch key (used by the
// TORCH_LIBRARY_IMPL blocks of the CPU and CUDA files).
#define SELFATTN_REGISTER_BACKEND(m, backend)                                                   \
  m.impl("attention_forward",                                                                 \
         [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                    \
            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& kl,       \
            const std::optional<at::Tensor>& rng, double scale, int64_t wl, int64_t wr,       \
            bool br, double p) {                                                              \
           return ::selfattn::forward_op(backend, q, k, v, mask, kl, rng, scale, wl, wr, br,  \
                                         p);                                                  \
         });                                                                                  \
  m.impl("attention_backward",                                                                \
         [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,                 \
            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,                \
            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& kl,       \
            const std::optional<at::Tensor>& rng, double scale, int64_t wl, int64_t wr,       \
            bool br, double p, bool mask_grad) {                                              \
           return ::selfattn::backward_op(backend, dout, q, k, v, out, lse, mask, kl, rng,    \
                                          scale, wl, wr, br, p, mask_grad);                   \
         });                                                                                  \
  m.impl("attention_probs",                                                                   \
         [](const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse,   \
            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& kl,       \
            const std::optional<at::Tensor>& rng, double scale, int64_t wl, int64_t wr,       \
            bool br, double p) {                                                              \
           return ::selfattn::probs_op(backend, q, k, lse, mask, kl, rng, scale, wl, wr, br,  \
                                       p);                                                    \
         })

}  // namespace selfattn
