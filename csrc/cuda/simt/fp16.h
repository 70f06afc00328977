// The 16-bit float types of cuda_fp16.h / cuda_bf16.h for the emulated build
// (SELFATTN_SIMT): __half, __nv_bfloat16, their pairs, and the conversions
// the kernels call, bit-exact with CUDA's: float -> 16 bit rounds to nearest
// even (overflow to inf, subnormals kept, NaN stays NaN), 16 bit -> float is
// exact. Plain structs holding the bits, so that reinterpret_cast to
// uint32_t of a pair gives the low element in the low half, as on the GPU.
#pragma once
#include <cstdint>
#include <cstring>

namespace simt {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16, round to nearest even.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
    // value = abs_float; in units of 2^-24 it is mant * 2^(exp - 150 + 24)
    const int exp = int(abs >> 23);
    if (exp < 102) return sign;  // below 2^-25: rounds to 0 (2^-25 itself ties to even 0)
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - exp;  // 14..24
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  // normal: rebias the exponent (127 -> 15) and round the 13 dropped bits
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // subnormal: mant * 2^-24
  float f = float(mant) * 5.9604644775390625e-08f;
  return sign ? -f : f;
}

// bfloat16: the high 16 bits of a float, round to nearest even; NaN -> 0x7fff
// (CUDA's canonical bfloat16 NaN, sign kept).
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t(((x >> 16) & 0x8000u) | 0x7fffu);
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

}  // namespace simt

struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) { return simt::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{simt::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return simt::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{simt::float_to_bf16_bits(f)};
}
// (lo, hi) -> pair with lo in the low 16 bits.
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{__float2half_rn(lo), __float2half_rn(hi)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
