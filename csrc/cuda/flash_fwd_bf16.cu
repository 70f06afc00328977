// Instantiations of the flash forward (flash_fwd.cuh) for bfloat16,
// head-dim buckets 64, 128 and 256, each with and without the score modifiers
// (kMods): one file per dtype so the builds run in parallel.
#include "flash_fwd.cuh"

namespace selfattn {
namespace cuda {

template void run_flash_fwd<__nv_bfloat16, 64>(const AttnParams&, const SplitKV&, cudaStream_t);
template void run_flash_fwd<__nv_bfloat16, 128>(const AttnParams&, const SplitKV&, cudaStream_t);
template void run_flash_fwd<__nv_bfloat16, 256>(const AttnParams&, const SplitKV&, cudaStream_t);

}  // namespace cuda
}  // namespace selfattn
