// CUDA backend of the selfattn ops: registers the three entry points for the
// CUDA dispatch key and, per call, picks the kernel family and launches it on
// torch's current stream under a device guard:
//  - flash kernels (tensor cores) for float16/bfloat16 on sm80+ when both head
//    dims are multiples of 8 and at most 256 (padded to the bucket 64, 128 or
//    256), every (B, S, H, D) row is 16-byte aligned, the grid fits and the
//    tiles fit the device's shared memory;
//    paged keys (a block table) go there when each key tile lies in one
//    page (page_size a multiple of the tile's kBc keys);
//  - otherwise the simple fallback kernels (fallback.cu), which take every
//    dtype and shape (and the backward of a soft-cap with a float mask's
//    gradient);
//    with split-KV when its CTAs would leave SMs idle over many keys
//    (decoding: key_splits below);
//  - probabilities always through the simple probs kernel.
// The backward's dQ uses fp32 atomics, or a second kernel without atomics
// when torch.use_deterministic_algorithms(True) is on.
// The device guard, stream, attributes and registration come from
// device_context.h, so that the emulated build (tests/simt) runs this same
// kernel choice on the CPU.
#include <ATen/Context.h>

#include <algorithm>
#include <type_traits>

#include "../attention.h"
#include "device_context.h"
#include "kernels.h"

namespace selfattn {
namespace cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: break;
  }
  TORCH_CHECK(false, "selfattn: unsupported dtype ", t);
}

// Windows that bound nothing made unbounded (params.h), so that the kernels'
// index arithmetic cannot overflow whoever filled the params.
AttnParams normalized(const AttnParams& p) {
  AttnParams n = p;
  normalize_window(n);
  return n;
}

// 16-byte aligned rows of a (B, S, H, 16-bit D) tensor; strides of size-1 dims are never used.
bool aligned16(const BSHD& t, int64_t B, int64_t S, int64_t H) {
  return reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && (B == 1 || t.batch % 8 == 0) &&
         (S == 1 || t.row % 8 == 0) && (H == 1 || t.head % 8 == 0);
}

// Head-dim bucket of the flash kernels for q/k/v/out, or 0 when they do not apply.
int flash_bucket(const AttnParams& p, at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return 0;
  if (device_attribute(cudaDevAttrComputeCapabilityMajor, p.device) < 8) return 0;
  if (p.D % 8 != 0 || p.Dv % 8 != 0) return 0;
  const int64_t d = std::max(p.D, p.Dv);
  if (d > 256) return 0;
  if (p.B > 65535 || p.Hq > 65535) return 0;  // grid dims y and z
  const int64_t kv_batches = p.pages != nullptr ? p.num_pages : p.B;  // pages of a pool
  if (!aligned16(p.q, p.B, p.Sq, p.Hq) || !aligned16(p.k, kv_batches, p.Sk, p.Hkv) ||
      !aligned16(p.v, kv_batches, p.Sk, p.Hkv)) {
    return 0;
  }
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

// f(std::integral_constant<int, kD>{}) for the head dim kD of a bucket: the
// one place where a bucket becomes a template argument.
template <typename F>
decltype(auto) with_bucket(int bucket, F f) {
  switch (bucket) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(std::integral_constant<int, 256>{});
  }
}

// Keys per tile, and query rows per CTA, of the flash forward of a bucket.
int fwd_key_tile(int bucket) {
  return with_bucket(bucket, [](auto d) { return FwdConfig<decltype(d)::value>::kBc; });
}
int fwd_query_tile(int bucket) {
  return with_bucket(bucket, [](auto d) { return FwdConfig<decltype(d)::value>::kBr; });
}

bool smem_fits(const AttnParams& p, size_t bytes) {
  return bytes <= size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device));
}

size_t fwd_smem(int bucket) {
  return with_bucket(bucket, [](auto d) { return fwd_smem_bytes<decltype(d)::value>(); });
}
size_t bwd_smem(int bucket, bool deterministic) {
  return with_bucket(bucket, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    return deterministic ? std::max(bwd_smem_bytes<kD>(), dq_smem_bytes<kD>())
                         : bwd_smem_bytes<kD>();
  });
}

// Split-KV count of the flash forward (params.h: SplitKV): when its CTAs fill
// less than half a wave of the SMs, each CTA's key tiles are split across as
// many CTAs as still fit in one wave, with at least kMinSplitTiles tiles per
// split (below that the merge costs more than the parallelism brings). A
// window bounding both sides bounds the tiles a CTA sees. p.num_splits > 0
// overrides the choice (at most one split per tile, within kMaxSplits).
int key_splits(const AttnParams& p, int bucket) {
  constexpr int64_t kMinSplitTiles = 4, kMaxSplits = 64;
  const int64_t rows = fwd_query_tile(bucket);
  const int64_t ctas = (p.Sq + rows - 1) / rows * p.Hq * p.B;
  const int64_t keys = p.window_left >= 0 && p.window_right >= 0
                           ? std::min(p.Sk, p.window_left + p.window_right + rows)
                           : p.Sk;
  const int64_t tiles = (keys + fwd_key_tile(bucket) - 1) / fwd_key_tile(bucket);
  const int64_t most = std::min(kMaxSplits, int64_t(65535) / p.B);  // grid dim z = B * splits
  if (p.num_splits > 0) return int(std::min({p.num_splits, tiles, most}));
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, p.device);
  const int64_t splits = std::min({sms / ctas, tiles / kMinSplitTiles, most});
  return splits >= 2 ? int(splits) : 1;
}

// Does the attn_mask gradient sum over a broadcast dim (so atomics add in a
// run-dependent order)?
bool dmask_sums(const AttnBwdParams& p) {
  const MaskView& m = p.dmask;
  return (m.batch == 0 && p.B > 1) || (m.head == 0 && p.Hq > 1) || (m.row == 0 && p.Sq > 1) ||
         (m.col == 0 && p.Sk > 1);
}

// ---- entry points

void forward(const AttnParams& p0, at::ScalarType dtype) {
  const AttnParams p = normalized(p0);
  const DeviceGuard guard(p.device);
  const cudaStream_t stream = current_stream();
  int bucket = flash_bucket(p, dtype);
  if (bucket != 0 && !(aligned16(p.out, p.B, p.Sq, p.Hq) && smem_fits(p, fwd_smem(bucket)) &&
                       (p.pages == nullptr || p.page_size % fwd_key_tile(bucket) == 0))) {
    bucket = 0;
  }
  if (bucket == 0) {
    run_fallback_fwd(p, to_dtype(dtype), stream);
    return;
  }
  SplitKV split;
  split.splits = key_splits(p, bucket);
  at::Tensor workspace;  // float32: o (splits, B, Hq, Sq, Dv), then lse (splits, B, Hq, Sq)
  if (split.splits > 1) {
    const int64_t rows = split.splits * p.B * p.Hq * p.Sq;
    workspace = at::empty({rows * (p.Dv + 1)}, device_options(p.device).dtype(at::kFloat));
    split.o = workspace.data_ptr<float>();
    split.lse = split.o + rows * p.Dv;
  }
  with_bucket(bucket, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    if (dtype == at::kHalf) {
      run_flash_fwd<__half, kD>(p, split, stream);
    } else {
      run_flash_fwd<__nv_bfloat16, kD>(p, split, stream);
    }
  });
}

void backward(const AttnBwdParams& p0, at::ScalarType dtype) {
  AttnBwdParams p = p0;
  static_cast<AttnParams&>(p) = normalized(p0);
  const DeviceGuard guard(p.device);
  const cudaStream_t stream = current_stream();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  if (p.dmask.ptr != nullptr && dmask_sums(p)) {
    at::globalContext().alertNotDeterministic(
        "selfattn attention_backward (gradient of a broadcast attn_mask on CUDA)");
  }
  run_bwd_delta(p, to_dtype(dtype), stream);

  int bucket = flash_bucket(p, dtype);
  if (bucket != 0 &&
      !(aligned16(p.out, p.B, p.Sq, p.Hq) && aligned16(p.dout, p.B, p.Sq, p.Hq) &&
        aligned16(p.dq, p.B, p.Sq, p.Hq) && aligned16(p.dk, p.B, p.Sk, p.Hkv) &&
        aligned16(p.dv, p.B, p.Sk, p.Hkv) && smem_fits(p, bwd_smem(bucket, deterministic)))) {
    bucket = 0;
  }
  // A float mask's gradient is dS before the soft-cap's derivative, which the
  // flash backward folds into P (flash_bwd.cuh): that pair takes the fallback.
  if (p.softcap > 0 && p.dmask.ptr != nullptr) bucket = 0;
  if (bucket == 0) {
    run_fallback_bwd(p, to_dtype(dtype), stream);
    return;
  }
  at::Tensor dq_accum;  // float32 (B, Sq, Hq, D), zeroed: the atomic dQ path
  if (!deterministic) {
    dq_accum = at::zeros({p.B, p.Sq, p.Hq, p.D}, device_options(p.device).dtype(at::kFloat));
  }
  float* acc = deterministic ? nullptr : dq_accum.data_ptr<float>();
  with_bucket(bucket, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    if (dtype == at::kHalf) {
      run_flash_bwd<__half, kD>(p, acc, stream);
    } else {
      run_flash_bwd<__nv_bfloat16, kD>(p, acc, stream);
    }
  });
}

void probs(const AttnParams& p0, void* out, bool compute_lse, at::ScalarType dtype) {
  const AttnParams p = normalized(p0);
  const DeviceGuard guard(p.device);
  const cudaStream_t stream = current_stream();
  if (compute_lse) {
    AttnParams lse_only = p;
    lse_only.out.ptr = nullptr;  // the fallback forward then writes lse only
    run_fallback_fwd(lse_only, to_dtype(dtype), stream);
  }
  run_probs(p, out, to_dtype(dtype), stream);
}

const Backend kCudaBackend{forward, backward, probs, true};

}  // namespace
}  // namespace cuda
}  // namespace selfattn

SELFATTN_REGISTER_CUDA_BACKEND(::selfattn::cuda::kCudaBackend)
