// Instantiations of the flash backward (flash_bwd.cuh) for float16,
// head-dim buckets 64, 128 and 256, each with and without the score modifiers
// (kMods): one file per dtype so the builds run in parallel.
#include "flash_bwd.cuh"

namespace selfattn {
namespace cuda {

template void run_flash_bwd<__half, 64>(const AttnBwdParams&, float*, cudaStream_t);
template void run_flash_bwd<__half, 128>(const AttnBwdParams&, float*, cudaStream_t);
template void run_flash_bwd<__half, 256>(const AttnBwdParams&, float*, cudaStream_t);

}  // namespace cuda
}  // namespace selfattn
