// Operator schemas of the selfattn namespace. Backends register kernels with
// TORCH_LIBRARY_IMPL(selfattn, CPU|CUDA, m); Python registers fake kernels and
// the autograd formula (selfattn/ops.py).
//
// Layout: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), any strides
// with the last dim contiguous. Key j is visible to query i when
// i + diag_offset - window_left <= j <= i + diag_offset + window_right (-1 =
// unbounded side); diag_offset is Sk - Sq for bottom-right alignment, 0 for
// top-left. The scaled score s becomes softcap * tanh(s / softcap) (softcap
// 0 = off), then gets the ALiBi bias -slope * |i + diag_offset - j|
// (alibi_slopes float32 (Hq,) or (B, Hq)), then attn_mask. q_start and
// k_start place q's and k's row 0 in a larger sequence for dropout: element
// (b, h, i, j) draws as (b, h, q_start + i, k_start + j). The modifiers and
// starts have defaults (off, 0) in the forward and probabilities ops.
#include <torch/library.h>

TORCH_LIBRARY(selfattn, m) {
  // -> out (B, Sq, Hq, Dv), lse (B, Hq, Sq) float32 (float64 for float64 inputs)
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
      "Tensor? key_lengths, Tensor? rng_state, float scale, int window_left, "
      "int window_right, int diag_offset, float dropout_p, Tensor? alibi_slopes=None, "
      "float softcap=0.0, int q_start=0, int k_start=0) -> (Tensor out, Tensor lse)");
  // -> dq, dk, dv (shapes of q, k, v) and the attn_mask gradient (mask's shape,
  // or an empty tensor when mask_grad is False)
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? attn_mask, Tensor? key_lengths, Tensor? rng_state, "
      "float scale, int window_left, int window_right, int diag_offset, "
      "float dropout_p, Tensor? alibi_slopes, float softcap, int q_start, int k_start, "
      "bool mask_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  // -> probabilities (B, Hq, Sq, Sk) in q's dtype, after dropout when
  // dropout_p > 0; lse is recomputed when not given.
  m.def(
      "attention_probs(Tensor q, Tensor k, Tensor? lse, Tensor? attn_mask, "
      "Tensor? key_lengths, Tensor? rng_state, float scale, int window_left, "
      "int window_right, int diag_offset, float dropout_p, Tensor? alibi_slopes=None, "
      "float softcap=0.0, int q_start=0, int k_start=0) -> Tensor");
  // Packed variable-length batches: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv),
  // sequence b = rows cu_seq_q[b]..cu_seq_q[b+1] of q and cu_seq_k[b]..cu_seq_k[b+1]
  // of k and v (its first seqused_k[b] keys when given); windows and causal
  // (window_right 0) aligned bottom-right per sequence. With a block_table
  // (N, max_pages) int32 (a paged KV cache; forward only), k and v are pools of
  // pages (num_pages, page_size, Hkv, D|Dv), sequence b's key j lies in page
  // block_table[b, j / page_size], seqused_k gives the key counts and cu_seq_k
  // is not read beyond its shape. num_splits: split-KV of the forward
  // (params.h: AttnParams::num_splits; 0 = automatic).
  // -> out (Tq, Hq, Dv), lse (Hq, Tq) float32 (float64 for float64 inputs)
  m.def(
      "varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seq_q, Tensor cu_seq_k, "
      "Tensor? seqused_k, Tensor? rng_state, float scale, int window_left, "
      "int window_right, float dropout_p, Tensor? block_table=None, int num_splits=0) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seq_q, Tensor cu_seq_k, Tensor? seqused_k, Tensor? rng_state, float scale, "
      "int window_left, int window_right, float dropout_p) -> (Tensor dq, Tensor dk, Tensor dv)");
  // A KV cache step (inference): k, v (B, n_new, Hkv, D|Dv) are written in
  // place into k_cache, v_cache at rows cache_seqlens[b] .. + n_new of sequence
  // b, then q (B, n, Hq, D) attends to its first cache_seqlens[b] + n_new keys,
  // windows and causal aligned bottom-right. The caches are (B, S_max, Hkv,
  // D|Dv), or with a block_table (B, max_pages) int32 pools of pages as in
  // varlen_forward; num_splits as there. -> out (B, n, Hq, Dv), lse (B, Hq, n)
  m.def(
      "kvcache_forward(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor? block_table, float scale, int window_left, "
      "int window_right, int num_splits=0) -> (Tensor out, Tensor lse)");
}
