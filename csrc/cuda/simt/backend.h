// What cuda_backend.cpp takes from c10/cuda and the CUDA runtime, for the
// emulated build (SELFATTN_SIMT; see device_context.h): the "device" is the
// CPU (tensors are CPU tensors, the emulated device's attributes come from
// simt::device()), and the backend registers for the CPU dispatch key of the
// selfattn_simt op library, wrapped so that every output starts as poison
// (NaN bytes) and must be written whole.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../../attention.h"
#include "host.h"

namespace selfattn {
namespace cuda {

// The emulated kernels run on CPU tensors: checks that they are.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
};
inline cudaStream_t current_stream() { return nullptr; }
int device_attribute(cudaDeviceAttr attr, int device);
at::TensorOptions device_options(int device);

// `inner` with poisoned outputs and a check that the kernels wrote every element.
const Backend& emulated(const Backend& inner);

}  // namespace cuda
}  // namespace selfattn

#define SELFATTN_REGISTER_CUDA_BACKEND(backend)                           \
  TORCH_LIBRARY_IMPL(selfattn, CPU, m) {                                  \
    SELFATTN_REGISTER_BACKEND(m, ::selfattn::cuda::emulated(backend));    \
  }
