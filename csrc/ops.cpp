// Operator schemas of the selfattn namespace. Backends register kernels with
// TORCH_LIBRARY_IMPL(selfattn, CPU|CUDA, m); Python registers fake kernels and
// the autograd formula (selfattn/ops.py).
//
// Layout: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), any strides
// with the last dim contiguous. Visibility window: -1 = unbounded side.
#include <torch/library.h>

TORCH_LIBRARY(selfattn, m) {
  // -> out (B, Sq, Hq, Dv), lse (B, Hq, Sq) float32 (float64 for float64 inputs)
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
      "Tensor? key_lengths, Tensor? rng_state, float scale, int window_left, "
      "int window_right, bool bottom_right, float dropout_p) -> (Tensor, Tensor)");
  // -> dq, dk, dv (shapes of q, k, v) and the attn_mask gradient (mask's shape,
  // or an empty tensor when mask_grad is False)
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? attn_mask, Tensor? key_lengths, Tensor? rng_state, "
      "float scale, int window_left, int window_right, bool bottom_right, "
      "float dropout_p, bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> probabilities (B, Hq, Sq, Sk) in q's dtype, after dropout when
  // dropout_p > 0; lse is recomputed when not given.
  m.def(
      "attention_probs(Tensor q, Tensor k, Tensor? lse, Tensor? attn_mask, "
      "Tensor? key_lengths, Tensor? rng_state, float scale, int window_left, "
      "int window_right, bool bottom_right, float dropout_p) -> Tensor");
}
