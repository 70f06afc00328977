// The one path by which every kernel of this folder is launched, and the
// CUDA headers the host and kernel code build on. A GPU build compiles
// launch() as kernel<<<grid, block, smem, stream>>> with the launch checks;
// the emulated build (SELFATTN_SIMT, tests/simt) runs the kernel on the CPU
// through simt::launch, handing it the global buffers the kernel may touch
// (simt/buffers.h). The launchers in the .cu files and the kernel choice in
// cuda_backend.cpp are the same code in both builds.
#pragma once
#include <cstddef>
#include <type_traits>

#ifdef SELFATTN_SIMT
#include "simt/buffers.h"
#include "simt/host.h"
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

namespace selfattn {
namespace cuda {

#if defined(SELFATTN_SIMT)
// The buffers are those of the kernel's parameter types (a const pointer is read-only).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
            const A&... args) {
  simt::launch(kernel, grid, block, smem,
               launch_buffers(static_cast<const std::decay_t<P>&>(args)...), args...);
}
#elif defined(__CUDACC__)
// smem: bytes of dynamic shared memory; above 48 KB the kernel must be allowed
// to take them first (CUDA_FACTS 7), which is done for every dynamic size.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const A&... args) {
  if (smem > 0) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  kernel<<<grid, block, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace cuda
}  // namespace selfattn
