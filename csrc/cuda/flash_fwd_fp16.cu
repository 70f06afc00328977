// Instantiations of the flash forward (flash_fwd.cuh) for float16,
// head-dim buckets 64, 128 and 256, each with and without the score modifiers
// (kMods): one file per dtype so the builds run in parallel.
#include "flash_fwd.cuh"

namespace selfattn {
namespace cuda {

template void run_flash_fwd<__half, 64>(const AttnParams&, const SplitKV&, cudaStream_t);
template void run_flash_fwd<__half, 128>(const AttnParams&, const SplitKV&, cudaStream_t);
template void run_flash_fwd<__half, 256>(const AttnParams&, const SplitKV&, cudaStream_t);

}  // namespace cuda
}  // namespace selfattn
