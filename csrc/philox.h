// Counter-based dropout bits shared by the CPU and CUDA kernels.
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
// The bit for probability element (b, h, i, j) depends only on the seed,
// offset and those indices (i and j counted in the whole sequence when the
// call is a block of a larger attention), never on tiling or loop order, so
// the backward regenerates the forward's mask and the CPU and CUDA kernels
// agree bit for bit.
#pragma once
#include <cstdint>

#include "params.h"  // SELFATTN_HD

namespace selfattn {

struct Philox4 {
  uint32_t x[4];
};

SELFATTN_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                  uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four draws of the group of keys 4 * (j / 4) .. 4 * (j / 4) + 3 of row i
// of head bh = b * Hq + h; key j takes draw j % 4. i and j are positions in
// the whole sequence (q_start + row, k_start + key: dropout_position), so a
// block of a larger attention draws the whole's bits. seed and offset are the
// two int64 values of the rng_state tensor.
SELFATTN_HD Philox4 dropout_bits(uint64_t seed, uint64_t offset, int64_t bh, uint64_t i,
                                 uint64_t j) {
  return philox4x32_10(uint32_t(j >> 2), uint32_t(i), uint32_t(bh),
                       uint32_t(offset) ^ uint32_t(offset >> 32),
                       uint32_t(seed), uint32_t(seed >> 32));
}

// Position of row or key `x` of a block starting at `start` of the whole
// sequence (unsigned: wraps instead of overflowing).
SELFATTN_HD uint64_t dropout_position(int64_t start, int64_t x) {
  return uint64_t(start) + uint64_t(x);
}

}  // namespace selfattn
