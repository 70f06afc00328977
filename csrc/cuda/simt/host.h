// What selfattn's host code (cuda_backend.cpp, the launchers in the .cu
// files) takes from the CUDA runtime, for the emulated build
// (SELFATTN_SIMT): dim3, streams, device attributes of an emulated device,
// and simt::launch, which runs a kernel block by block on the CPU
// (runtime.cpp). The folder never enters the shipped extension: setup.py
// compiles csrc/cuda/*.cu and *.cpp only, and tests/simt/simt_build.py builds
// the emulated library.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fp16.h"

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct simt_stream*;

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace simt {

// A global-memory buffer handed to a launch: a strided array of up to 4
// dims (sizes and strides in elements; size-1 and stride-0 dims never
// matter). Every global access of the kernel must land on an element of one
// of the launch's buffers, and writes on a writable one.
struct Buffer {
  const char* name = "";
  const void* base = nullptr;
  int esize = 1;  // bytes per element
  int ndim = 0;
  int64_t size[4] = {1, 1, 1, 1};
  int64_t stride[4] = {0, 0, 0, 0};
  bool writable = false;
};

// The emulated device: what device_attribute reports (cuda_backend.cpp's
// kernel choice reads it) and the shared-memory limit launches are held to.
struct DeviceConfig {
  int cc_major = 8;
  int smem_optin = 166912;  // A100: 163 KB per block (CUDA_FACTS 7)
  int sm_count = 108;       // A100's SMs (the split-KV choice reads it)
};
DeviceConfig& device();
// Seed of the order in which threads run between barriers: the launches
// after a call run in the same orders for the same seed.
void configure(uint64_t seed);
// Names of the kernels launched since the last call, in launch order.
std::vector<std::string> take_log();

// One kernel launch as the runtime sees it: `body(ctx)` runs the kernel for
// the calling fiber (a CUDA thread).
struct Launch {
  const void* kernel = nullptr;  // for its name in reports
  dim3 grid, block;
  size_t smem = 0;
  std::vector<Buffer> buffers;
  void (*body)(const void* ctx) = nullptr;
  const void* ctx = nullptr;
};
// Runs every block of `l`; throws std::runtime_error with a report when the
// emulator finds an error (race, uninitialized or out-of-bounds access,
// divergent collective, ...).
void run(const Launch& l);
// Called by each fiber right before the kernel body: from here on its
// memory accesses are checked.
void enter_kernel();

template <typename Kernel, typename Params>
void fiber_body(const void* ctx) {
  const auto& c = *static_cast<const std::pair<Kernel, const Params*>*>(ctx);
  const Kernel kernel = c.first;
  Params local = *c.second;  // the fiber's copy of the arguments, on its own stack
  enter_kernel();
  std::apply(kernel, local);
}

// kernel<<<grid, block, smem>>>(args...) with `buffers` the global memory it may touch.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
            std::vector<Buffer> buffers, const A&... args) {
  using Kernel = void (*)(P...);
  using Params = std::tuple<std::decay_t<P>...>;
  const Params params(args...);
  const std::pair<Kernel, const Params*> ctx(kernel, &params);
  Launch l;
  l.kernel = reinterpret_cast<const void*>(kernel);
  l.grid = grid;
  l.block = block;
  l.smem = smem;
  l.buffers = std::move(buffers);
  l.body = &fiber_body<Kernel, Params>;
  l.ctx = &ctx;
  run(l);
}

}  // namespace simt
