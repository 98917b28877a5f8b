#include "common/half.h"

#include <cpuid.h>

#include <immintrin.h>

namespace kvrecall {
namespace {

__attribute__((target("avx2,f16c"))) void HalfToFloatF16c(const uint16_t* src, size_t n,
                                                           float* dst) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}

__attribute__((target("avx2"))) void Bf16ToFloatAvx2(const uint16_t* src, size_t n, float* dst) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
  }
  for (; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

}  // namespace

bool CpuHasAvx2F16c() {
  // F16C from CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports
  // does not know "f16c", GCC's does; CPUID works under both.
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

bool CpuHasAvx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

void ConvertToFloat(const void* src, DType dtype, size_t n, float* dst) {
  const auto* s16 = static_cast<const uint16_t*>(src);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kF16:
      if (CpuHasAvx2F16c()) {
        HalfToFloatF16c(s16, n, dst);
      } else {
        for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(s16[i]);
      }
      return;
    case DType::kBf16:
      if (CpuHasAvx2F16c()) {
        Bf16ToFloatAvx2(s16, n, dst);
      } else {
        for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(s16[i]);
      }
      return;
  }
}

void ConvertFromFloat(const float* src, size_t n, DType dtype, void* dst) {
  auto* d16 = static_cast<uint16_t*>(dst);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) d16[i] = FloatToHalf(src[i]);
      return;
    case DType::kBf16:
      for (size_t i = 0; i < n; ++i) d16[i] = FloatToBf16(src[i]);
      return;
  }
}

}  // namespace kvrecall
