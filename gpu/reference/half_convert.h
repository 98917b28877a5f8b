#pragma once

// Scalar bf16 / f16 <-> f32 conversions for the CPU references and the GPU
// tests (round to nearest even; NaN stays NaN). Plain C++: no CUDA, no
// common/ (gpu/ depends on the CUDA runtime alone).

#include <cmath>
#include <cstdint>
#include <cstring>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu::reference {

inline float Bf16BitsToFloat(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t FloatToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float F16BitsToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exp = (bits >> 10) & 0x1fu;
  const uint32_t man = bits & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: value = man * 2^-24
      const float f = std::ldexp(static_cast<float>(man), -24);
      return sign != 0 ? -f : f;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t FloatToF16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf (>= 65520)
  if (abs < 0x38800000u) {  // below the smallest normal 2^-14: subnormal or zero
    float a;
    std::memcpy(&a, &abs, sizeof(a));
    const float scaled = a * 16777216.0f;  // units of 2^-24, exact
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));  // round half to even
    return static_cast<uint16_t>(sign | m);
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t v = abs - 0x38000000u;  // exponent - 112
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

inline float HalfBitsToFloat(uint16_t bits, DType dtype) {
  return dtype == DType::kBf16 ? Bf16BitsToFloat(bits) : F16BitsToFloat(bits);
}

inline uint16_t FloatToHalfBits(float f, DType dtype) {
  return dtype == DType::kBf16 ? FloatToBf16Bits(f) : FloatToF16Bits(f);
}

}  // namespace kvrecall::gpu::reference
