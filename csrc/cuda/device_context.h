// What cuda_backend.cpp needs from c10/cuda and the CUDA runtime: a device
// guard, the current stream, device attributes, where its temporary buffers
// live, and the registration of the backend for its dispatch key. The
// emulated build (SELFATTN_SIMT) takes simt/backend.h's stand-ins instead,
// so the kernel choice in cuda_backend.cpp is the same code in both builds.
#pragma once
#ifdef SELFATTN_SIMT
#include "simt/backend.h"
#else
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace selfattn {
namespace cuda {

// Makes the tensors' device current for the scope (CUDA_FACTS 8).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : guard_(checked(device)) {}

 private:
  static c10::DeviceIndex checked(int device) {
    TORCH_CHECK(device >= 0, "selfattn: CUDA kernel called without a CUDA device index");
    return static_cast<c10::DeviceIndex>(device);
  }
  c10::cuda::CUDAGuard guard_;
};

// torch's current stream of the current device.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Attribute of a device (cheap: the driver caches them; ATen's
// getDeviceProperties would pull in headers of cuBLAS and cuSPARSE).
inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Options of a temporary buffer on the kernels' device.
inline at::TensorOptions device_options(int device) {
  return at::TensorOptions().device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
}

}  // namespace cuda
}  // namespace selfattn

#define SELFATTN_REGISTER_CUDA_BACKEND(backend) \
  TORCH_LIBRARY_IMPL(selfattn, CUDA, m) { SELFATTN_REGISTER_BACKEND(m, backend); }
#endif
