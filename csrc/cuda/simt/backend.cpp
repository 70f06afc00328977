// The emulated CUDA backend's side of the op library (see backend.h): the
// stand-ins of the device guard and attributes, the output poisoning around
// each op, and the ops with which tests steer the emulator:
//   simt_configure(seed, cc_major, smem_optin, sm_count): thread-order seed
//     and the emulated device (what cuda_backend.cpp's kernel choice sees);
//   simt_take_log() -> names of the kernels launched since the last call.
#include "backend.h"

#include <cstring>

#include "buffers.h"

namespace selfattn {
namespace cuda {

DeviceGuard::DeviceGuard(int device) {
  TORCH_CHECK(device == -1, "selfattn_simt: the emulated CUDA kernels take CPU tensors");
}

int device_attribute(cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: return simt::device().cc_major;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return simt::device().smem_optin;
    case cudaDevAttrMultiProcessorCount: return simt::device().sm_count;
  }
  TORCH_CHECK(false, "selfattn_simt: device attribute ", int(attr), " is not emulated");
}

at::TensorOptions device_options(int) { return at::TensorOptions().device(at::kCPU); }

namespace {

// A region of an output: `count` runs of `run` bytes, run r at base + r * step
// (enumerated by rows of a (B, S, H, D) tensor, or one flat run).
struct Region {
  const char* name;
  unsigned char* base;
  std::vector<int64_t> offsets;  // byte offset of each run
  int64_t run;
  int esize;
};

Region bshd_region(const char* name, const BSHD& t, int64_t B, int64_t S, int64_t H, int64_t D,
                   int esize) {
  Region r{name, static_cast<unsigned char*>(t.ptr), {}, D * esize, esize};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t h = 0; h < H; ++h) {
        r.offsets.push_back((b * t.batch + s * t.row + h * t.head) * esize);
      }
    }
  }
  return r;
}

Region flat_region(const char* name, void* ptr, int64_t n, int esize) {
  return Region{name, static_cast<unsigned char*>(ptr), {0}, n * esize, esize};
}

void poison(const std::vector<Region>& regions) {
  for (const auto& r : regions) {
    for (int64_t off : r.offsets) std::memset(r.base + off, 0xff, size_t(r.run));
  }
}

// Every element must have been written: none may still be all poison bytes.
void check_written(const std::vector<Region>& regions, const char* op) {
  for (const auto& r : regions) {
    for (int64_t off : r.offsets) {
      for (int64_t e = 0; e < r.run; e += r.esize) {
        const unsigned char* p = r.base + off + e;
        bool poisoned = true;
        for (int i = 0; i < r.esize && poisoned; ++i) poisoned = p[i] == 0xff;
        TORCH_CHECK(!poisoned, "selfattn_simt: ", op, " left element ", (off + e) / r.esize,
                    " (memory offset) of ", r.name, " unwritten (still poison)");
      }
    }
  }
}

int element_size(at::ScalarType t) { return int(c10::elementSize(t)); }
int acc_size(at::ScalarType t) { return t == at::kDouble ? 8 : 4; }

void set_types(at::ScalarType t) {
  simt_ops::op_types() = simt_ops::OpTypes{element_size(t), acc_size(t)};
}

const Backend* g_inner = nullptr;

void forward(const AttnParams& p, at::ScalarType t) {
  set_types(t);
  const std::vector<Region> out = {
      bshd_region("out", p.out, p.B, p.Sq, p.Hq, p.Dv, element_size(t)),
      flat_region("lse", p.lse, p.B * p.Hq * p.Sq, acc_size(t))};
  poison(out);
  g_inner->forward(p, t);
  check_written(out, "attention_forward");
}

void backward(const AttnBwdParams& p, at::ScalarType t) {
  set_types(t);
  // dmask is accumulated into (zeros from attention.cpp), so it is not poisoned.
  const std::vector<Region> out = {
      bshd_region("dq", p.dq, p.B, p.Sq, p.Hq, p.D, element_size(t)),
      bshd_region("dk", p.dk, p.B, p.Sk, p.Hkv, p.D, element_size(t)),
      bshd_region("dv", p.dv, p.B, p.Sk, p.Hkv, p.Dv, element_size(t)),
      flat_region("delta", p.delta, p.B * p.Hq * p.Sq, acc_size(t))};
  poison(out);
  g_inner->backward(p, t);
  check_written(out, "attention_backward");
}

void probs(const AttnParams& p, void* out, bool compute_lse, at::ScalarType t) {
  set_types(t);
  std::vector<Region> regions = {
      flat_region("probs", out, p.B * p.Hq * p.Sq * p.Sk, element_size(t))};
  if (compute_lse) regions.push_back(flat_region("lse", p.lse, p.B * p.Hq * p.Sq, acc_size(t)));
  poison(regions);
  g_inner->probs(p, out, compute_lse, t);
  check_written(regions, "attention_probs");
}

void configure(int64_t seed, int64_t cc_major, int64_t smem_optin, int64_t sm_count) {
  simt::configure(uint64_t(seed));
  simt::device() = simt::DeviceConfig{int(cc_major), int(smem_optin), int(sm_count)};
}

std::vector<std::string> take_log() { return simt::take_log(); }

}  // namespace

const Backend& emulated(const Backend& inner) {
  static const Backend wrapped{forward, backward, probs, inner.per_batch_diag};
  g_inner = &inner;
  return wrapped;
}

}  // namespace cuda
}  // namespace selfattn

TORCH_LIBRARY_FRAGMENT(selfattn, m) {
  m.def("simt_configure(int seed, int cc_major, int smem_optin, int sm_count=108) -> ()",
        &::selfattn::cuda::configure);
  m.def("simt_take_log() -> str[]", &::selfattn::cuda::take_log);
}
