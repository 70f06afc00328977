// Host entry points of the CUDA kernels (defined in the .cu files of this
// folder) and the tile configurations of the tensor-core ("flash") kernels.
// Plain C++: included by cuda_backend.cpp, which never sees a kernel, and by
// the .cu files, which never see ATen. Every entry point launches on `stream`
// and checks each launch; the caller holds the device guard.
#pragma once
#include <cstddef>

#include "../params.h"
#include "launch.h"

namespace selfattn {
namespace cuda {

enum class DType { F32, F64, F16, BF16 };

// ---- Tile configurations of the flash kernels (16-bit T, head-dim bucket kD)
// Each warp owns 16 rows of its CTA's tile; shared-memory tiles are
// (rows, kD) halves, XOR-swizzled (device_utils.cuh).

// Forward: kBr query rows per CTA; K and V tiles of kBc keys, two cp.async stages.
template <int kD> struct FwdConfig;
template <> struct FwdConfig<64> { static constexpr int kWarps = 8, kBr = 128, kBc = 64; };
template <> struct FwdConfig<128> { static constexpr int kWarps = 8, kBr = 128, kBc = 64; };
template <> struct FwdConfig<256> { static constexpr int kWarps = 4, kBr = 64, kBc = 32; };
template <int kD> constexpr size_t fwd_smem_bytes() {
  return size_t(FwdConfig<kD>::kBr + 4 * FwdConfig<kD>::kBc) * kD * 2;  // Q + 2 x (K + V)
}

// Backward dK/dV: kBc keys per CTA (resident K, V), query tiles of kBr rows in
// two cp.async stages (Q, dO, lse, delta). kSplit CTAs share a key block, each
// producing kD / kSplit columns of dK, dV (and dQ), so that the dK and dV
// accumulators fit in registers for kD = 256 (4 CTAs with the score
// modifiers, kMods, whose registers they need).
template <int kD, bool kMods = false> struct BwdConfig;
template <bool kMods> struct BwdConfig<64, kMods> {
  static constexpr int kWarps = 4, kBc = 64, kBr = 64, kSplit = 1;
};
template <bool kMods> struct BwdConfig<128, kMods> {
  static constexpr int kWarps = 4, kBc = 64, kBr = 32, kSplit = 1;
};
template <bool kMods> struct BwdConfig<256, kMods> {
  static constexpr int kWarps = 4, kBc = 64, kBr = 32, kSplit = kMods ? 4 : 2;
};
template <int kD> constexpr size_t bwd_smem_bytes() {
  using C = BwdConfig<kD>;
  // K + V + 2 x (Q + dO) + dS^T + 2 x (lse + delta)
  return size_t(2 * C::kBc + 4 * C::kBr) * kD * 2 + size_t(C::kBc) * C::kBr * 2 +
         size_t(4 * C::kBr) * sizeof(float);
}

// Backward dQ without atomics (deterministic mode): kBr query rows per CTA,
// K and V tiles of kBc keys in two stages (32 for kD = 128 with the score
// modifiers: registers again, so that instantiation needs less shared memory
// than the plain one, whose size cuda_backend.cpp checks).
template <int kD, bool kMods = false> struct DqConfig;
template <bool kMods> struct DqConfig<64, kMods> {
  static constexpr int kWarps = 4, kBr = 64, kBc = 64;
};
template <bool kMods> struct DqConfig<128, kMods> {
  static constexpr int kWarps = 4, kBr = 64, kBc = kMods ? 32 : 64;
};
template <bool kMods> struct DqConfig<256, kMods> {
  static constexpr int kWarps = 4, kBr = 64, kBc = 16;
};
template <int kD, bool kMods = false> constexpr size_t dq_smem_bytes() {
  using C = DqConfig<kD, kMods>;
  return size_t(2 * C::kBr + 4 * C::kBc) * kD * 2;  // Q + dO + 2 x (K + V)
}

// ---- Flash kernels (flash_{fwd,bwd}_{fp16,bf16}.cu), T = __half or __nv_bfloat16.
// Need: sm80+, D and Dv multiples of 8 with max(D, Dv) <= kD, 16-byte aligned
// rows (pointers and strides) of every (B, S, H, D) tensor. Each comes in two
// instantiations, with and without the score modifiers (soft-cap, ALiBi): the
// kernels use every register already, and a runtime branch for the modifiers
// made ptxas spill in the plain kernels too.

inline bool has_modifiers(const AttnParams& p) {
  return p.softcap > 0 || p.alibi_slopes != nullptr;
}

// out and lse; with split.splits > 1 through split's workspaces (params.h: SplitKV).
template <typename T, int kD>
void run_flash_fwd(const AttnParams& p, const SplitKV& split, cudaStream_t stream);

// dq, dk, dv (and dmask). p.delta must hold rowsum(dout * out) (run_bwd_delta).
// dq_accum: zeroed float32 (B, Sq, Hq, D) buffer for the atomic dQ path, or
// nullptr for the deterministic path (a second kernel recomputes dS per query block).
template <typename T, int kD>
void run_flash_bwd(const AttnBwdParams& p, float* dq_accum, cudaStream_t stream);

// ---- Simple kernels for every dtype and shape (fallback.cu)

// lse, and out when p.out.ptr is not null: one warp per query row.
void run_fallback_fwd(const AttnParams& p, DType dtype, cudaStream_t stream);
// dq, dk, dv (and dmask); p.delta must be filled first. Deterministic.
void run_fallback_bwd(const AttnBwdParams& p, DType dtype, cudaStream_t stream);
// p.delta = rowsum(dout * out) in the accumulation dtype (both backward paths).
void run_bwd_delta(const AttnBwdParams& p, DType dtype, cudaStream_t stream);
// probs (B, Hq, Sq, Sk) contiguous in the input dtype, from p.lse.
void run_probs(const AttnParams& p, void* probs, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace selfattn
