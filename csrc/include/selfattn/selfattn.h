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

// -> out (B, Sq, Hq, Dv), lse (B, Hq, Sq)
inline std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask,
    const OptTensor& key_lengths, const OptTensor& rng_state, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double dropout_p) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selfattn::attention_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
              const OptTensor&, const OptTensor&, double, int64_t, int64_t, bool, double)>();
  return op.call(q, k, v, attn_mask, key_lengths, rng_state, scale, window_left, window_right,
                 bottom_right, dropout_p);
}

// -> dq, dk, dv, and the attn_mask gradient (empty unless mask_grad)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& attn_mask,
    const OptTensor& key_lengths, const OptTensor& rng_state, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double dropout_p, bool mask_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selfattn::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, double, int64_t, int64_t, bool, double, bool)>();
  return op.call(dout, q, k, v, out, lse, attn_mask, key_lengths, rng_state, scale, window_left,
                 window_right, bottom_right, dropout_p, mask_grad);
}

// -> probabilities (B, Hq, Sq, Sk)
inline at::Tensor attention_probs(const at::Tensor& q, const at::Tensor& k, const OptTensor& lse,
                                  const OptTensor& attn_mask, const OptTensor& key_lengths,
                                  const OptTensor& rng_state, double scale, int64_t window_left,
                                  int64_t window_right, bool bottom_right, double dropout_p) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selfattn::attention_probs", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&, double, int64_t,
                            int64_t, bool, double)>();
  return op.call(q, k, lse, attn_mask, key_lengths, rng_state, scale, window_left, window_right,
                 bottom_right, dropout_p);
}

// ---- convenience

// Inference attention without dropout: causal (bottom-right aligned) or full,
// default scale 1 / sqrt(D). -> (B, Sq, Hq, Dv)
inline at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            bool causal = false, const OptTensor& attn_mask = std::nullopt,
                            const OptTensor& key_lengths = std::nullopt) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  return std::get<0>(attention_forward(q, k, v, attn_mask, key_lengths, std::nullopt, scale, -1,
                                       causal ? 0 : -1, true, 0.0));
}

}  // namespace selfattn
