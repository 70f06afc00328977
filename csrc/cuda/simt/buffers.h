// The global memory each kind of selfattn kernel may touch, for the
// emulator's bounds checks (launch.h passes launch_buffers(args...) to
// simt::launch): the tensors behind the pointers of AttnParams /
// AttnBwdParams, with their sizes and strides, writable only where that kind
// of kernel writes. Element sizes come from the op being emulated
// (simt/backend.cpp sets them), since the params structs do not carry dtypes.
#pragma once
#include <vector>

#include "../../params.h"
#include "host.h"

namespace selfattn {
namespace simt_ops {

// Bytes per element of q (and k, v, out, float masks) and of the
// accumulation dtype (lse, delta, mask gradient) of the running op.
struct OpTypes {
  int elem = 0, acc = 0;
};
inline OpTypes& op_types() {
  static OpTypes types;
  return types;
}

inline simt::Buffer bshd(const char* name, const BSHD& t, int64_t B, int64_t S, int64_t H,
                         int64_t D, bool writable) {
  simt::Buffer b;
  b.name = name;
  b.base = t.ptr;
  b.esize = op_types().elem;
  b.ndim = 4;
  const int64_t size[4] = {B, S, H, D}, stride[4] = {t.batch, t.row, t.head, 1};
  for (int d = 0; d < 4; ++d) b.size[d] = size[d], b.stride[d] = stride[d];
  b.writable = writable;
  return b;
}

// A contiguous array of n elements of esize bytes.
inline simt::Buffer flat(const char* name, const void* ptr, int64_t n, int esize, bool writable) {
  simt::Buffer b;
  b.name = name;
  b.base = ptr;
  b.esize = esize;
  b.ndim = 1;
  b.size[0] = n;
  b.stride[0] = 1;
  b.writable = writable;
  return b;
}

inline simt::Buffer mask(const char* name, const MaskView& m, const AttnParams& p, int esize,
                         bool writable) {
  simt::Buffer b;
  b.name = name;
  b.base = m.ptr;
  b.esize = esize;
  b.ndim = 4;
  const int64_t size[4] = {p.B, p.Hq, p.Sq, p.Sk}, stride[4] = {m.batch, m.head, m.row, m.col};
  for (int d = 0; d < 4; ++d) b.size[d] = size[d], b.stride[d] = stride[d];
  b.writable = writable;
  return b;
}

// The block table's rows of the batch, as far as the longest sequence's
// pages (Sk keys); none without pages.
inline simt::Buffer block_table(const AttnParams& p) {
  simt::Buffer b = flat("block_table", p.pages, p.B, 4, false);
  b.ndim = 2;
  b.stride[0] = p.pages_batch;
  b.size[1] = p.pages != nullptr ? (p.Sk + p.page_size - 1) / p.page_size : 0;
  b.stride[1] = 1;
  return b;
}

// What every kernel reads: q, k, v (or their pools of pages and the pages
// of the sequence's keys), the mask, key lengths, ALiBi slopes, dropout state.
inline std::vector<simt::Buffer> inputs(const AttnParams& p) {
  const OpTypes t = op_types();
  const bool paged = p.pages != nullptr;
  const int64_t kv_b = paged ? p.num_pages : p.B, kv_s = paged ? p.page_size : p.Sk;
  std::vector<simt::Buffer> v = {
      bshd("q", p.q, p.B, p.Sq, p.Hq, p.D, false),
      bshd("k", p.k, kv_b, kv_s, p.Hkv, p.D, false),
      bshd("v", p.v, kv_b, kv_s, p.Hkv, p.Dv, false),
      block_table(p),
      flat("key_lengths", p.key_lengths, p.B, 8, false),
      flat("alibi_slopes", p.alibi_slopes, p.alibi_batch != 0 ? p.B * p.Hq : p.Hq, 4, false),
      flat("rng_state", p.rng_state, 2, 8, false),
  };
  if (p.mask.kind != MaskKind::None) {
    v.push_back(mask("attn_mask", p.mask, p, p.mask.kind == MaskKind::Bool ? 1 : t.elem, false));
  }
  return v;
}

// Backward kernels: also out, dout, lse; writes dq, dk, dv, the mask gradient, delta.
inline std::vector<simt::Buffer> backward(const AttnBwdParams& p, bool writes_dq, bool writes_dkv) {
  const OpTypes t = op_types();
  std::vector<simt::Buffer> v = inputs(p);
  const int64_t rows = p.B * p.Hq * p.Sq;
  v.push_back(bshd("out", p.out, p.B, p.Sq, p.Hq, p.Dv, false));
  v.push_back(bshd("dout", p.dout, p.B, p.Sq, p.Hq, p.Dv, false));
  v.push_back(flat("lse", p.lse, rows, t.acc, false));
  v.push_back(flat("delta", p.delta, rows, t.acc, true));
  v.push_back(bshd("dq", p.dq, p.B, p.Sq, p.Hq, p.D, writes_dq));
  v.push_back(bshd("dk", p.dk, p.B, p.Sk, p.Hkv, p.D, writes_dkv));
  v.push_back(bshd("dv", p.dv, p.B, p.Sk, p.Hkv, p.Dv, writes_dkv));
  if (p.dmask.ptr != nullptr) v.push_back(mask("attn_mask grad", p.dmask, p, t.acc, writes_dkv));
  return v;
}

}  // namespace simt_ops

// Forward kernels (flash and fallback): write out (when given) and lse.
inline std::vector<simt::Buffer> launch_buffers(const AttnParams& p) {
  std::vector<simt::Buffer> v = simt_ops::inputs(p);
  v.push_back(simt_ops::bshd("out", p.out, p.B, p.Sq, p.Hq, p.Dv, true));
  v.push_back(simt_ops::flat("lse", p.lse, p.B * p.Hq * p.Sq, simt_ops::op_types().acc, true));
  return v;
}

// Split-KV flash forward and its merge: also the float32 workspaces.
inline std::vector<simt::Buffer> launch_buffers(const AttnParams& p, const SplitKV& split) {
  std::vector<simt::Buffer> v = launch_buffers(p);
  const int64_t rows = split.splits > 1 ? split.splits * p.B * p.Hq * p.Sq : 0;
  v.push_back(simt_ops::flat("split-KV o", split.o, rows * p.Dv, 4, true));
  v.push_back(simt_ops::flat("split-KV lse", split.lse, rows, 4, true));
  return v;
}

// Probabilities kernel: reads lse, writes probs (B, Hq, Sq, Sk).
template <typename T>
std::vector<simt::Buffer> launch_buffers(const AttnParams& p, T* probs) {
  std::vector<simt::Buffer> v = simt_ops::inputs(p);
  v.push_back(simt_ops::flat("lse", p.lse, p.B * p.Hq * p.Sq, simt_ops::op_types().acc, false));
  v.push_back(simt_ops::flat("probs", probs, p.B * p.Hq * p.Sq * p.Sk, int(sizeof(T)), true));
  return v;
}

// delta, fallback dq and dk/dv, flash dq kernels.
inline std::vector<simt::Buffer> launch_buffers(const AttnBwdParams& p) {
  return simt_ops::backward(p, true, true);
}

// Flash dK/dV kernel: dQ goes to the float32 (B, Sq, Hq, D) accumulator, when given.
inline std::vector<simt::Buffer> launch_buffers(const AttnBwdParams& p, float* dq_accum) {
  std::vector<simt::Buffer> v = simt_ops::backward(p, false, true);
  v.push_back(simt_ops::flat("dq_accum", dq_accum, p.B * p.Sq * p.Hq * p.D, 4, true));
  return v;
}

// dQ conversion kernel: dq = scale * dq_accum.
inline std::vector<simt::Buffer> launch_buffers(const AttnBwdParams& p, const float* dq_accum) {
  std::vector<simt::Buffer> v = simt_ops::backward(p, true, false);
  v.push_back(simt_ops::flat("dq_accum", dq_accum, p.B * p.Sq * p.Hq * p.D, 4, false));
  return v;
}

}  // namespace selfattn
