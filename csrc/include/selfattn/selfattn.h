// Public C++ header for programs that link libtorch and use selfattn's ops:
// load the built extension (its static TORCH_LIBRARY registrations run when
// it is loaded) and call the ops through typed dispatcher handles, with no
// Python and no TorchScript. Header-only; link torch and libdl.
//
// Layout: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), last dim
// contiguous; see DESIGN.md section 2 for the masking semantics. The autograd
// formula lives in Python, so C++ callers run attention_backward themselves.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <dlfcn.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

namespace selfattn {

// ---- loading

// Loads one of selfattn's extension libraries: first selfattn/_C*.so (the op
// schemas), then the CPU kernel module selfattn picks for this CPU
// (`python examples/cpp/selfattn_libs.py` prints both paths). Lazy binding:
// the modules' Python entry points (PyInit_*) are never called.
inline void load_library(const std::string& path) {
  if (dlopen(path.c_str(), RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    const char* err = dlerror();
    throw std::runtime_error("selfattn::load_library: cannot load '" + path +
                             "': " + (err ? err : "unknown error"));
  }
}

// ---- typed op handles (signatures mirror the schemas in csrc/ops.cpp)

using OptTensor = std::optional<at::Tensor>;

// Arguments after the tensors, in schema order. diag_offset: Sk - Sq for
// bottom-right alignment, 0 for top-left. alibi_slopes: float32 (Hq,) or
// (B, Hq); softcap 0 = off. q_start, k_start: positions of q's and k's row 0
// in a larger sequence (dropout only).
struct Options {
  OptTensor attn_mask, key_lengths, rng_state;
  double scale = 1.0;
  int64_t window_left = -1, window_right = -1, diag_offset = 0;
  double dropout_p = 0.0;
  OptTensor alibi_slopes;
  double softcap = 0.0;
  int64_t q_start = 0, k_start = 0;
};

// -> out (B, Sq, Hq, Dv), lse (B, Hq, Sq)
inline std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const Options& o) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selfattn::attention_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
              const OptTensor&, const OptTensor&, double, int64_t, int64_t, int64_t, double,
              const OptTensor&, double, int64_t, int64_t)>();
  return op.call(q, k, v, o.attn_mask, o.key_lengths, o.rng_state, o.scale, o.window_left,
                 o.window_right, o.diag_offset, o.dropout_p, o.alibi_slopes, o.softcap,
                 o.q_start, o.k_start);
}

// -> dq, dk, dv, and the attn_mask gradient (empty unless mask_grad)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const Options& o, bool mask_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selfattn::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, double, int64_t, int64_t, int64_t, double, const OptTensor&,
              double, int64_t, int64_t, bool)>();
  return op.call(dout, q, k, v, out, lse, o.attn_mask, o.key_lengths, o.rng_state, o.scale,
                 o.window_left, o.window_right, o.diag_offset, o.dropout_p, o.alibi_slopes,
                 o.softcap, o.q_start, o.k_start, mask_grad);
}

// -> probabilities (B, Hq, Sq, Sk)
inline at::Tensor attention_probs(const at::Tensor& q, const at::Tensor& k, const OptTensor& lse,
                                  const Options& o) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selfattn::attention_probs", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&, double, int64_t,
                            int64_t, int64_t, double, const OptTensor&, double, int64_t,
                            int64_t)>();
  return op.call(q, k, lse, o.attn_mask, o.key_lengths, o.rng_state, o.scale, o.window_left,
                 o.window_right, o.diag_offset, o.dropout_p, o.alibi_slopes, o.softcap,
                 o.q_start, o.k_start);
}

// ---- convenience

// Inference attention without dropout: causal (bottom-right aligned) or full,
// default scale 1 / sqrt(D). -> (B, Sq, Hq, Dv)
inline at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            bool causal = false, const OptTensor& attn_mask = std::nullopt,
                            const OptTensor& key_lengths = std::nullopt) {
  Options o;
  o.attn_mask = attn_mask;
  o.key_lengths = key_lengths;
  o.scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  o.window_right = causal ? 0 : -1;
  o.diag_offset = k.size(1) - q.size(1);
  return std::get<0>(attention_forward(q, k, v, o));
}

}  // namespace selfattn
