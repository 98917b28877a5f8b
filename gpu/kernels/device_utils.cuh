#pragma once

// Device helpers shared by the kernels: 16-byte loads of 8 bf16/f16 values
// and their conversion to f32, output conversion, warp reductions and the
// order-preserving key of an f32 used by the radix top-k. Device code: include
// only from .cu / .cuh files.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace kvrecall::gpu::kernels {

// Sets `kernel`'s dynamic shared-memory limit to `bytes` once per device
// (needed whenever static + dynamic shared memory exceeds 48 KiB; the
// attribute is per device; `done` holds one bit per device id < 64). Host
// code; safe to call from several threads.
template <typename Kernel>
cudaError_t EnsureDynamicSmem(Kernel* kernel, int bytes, std::atomic<uint64_t>* done) {
  if (bytes <= 0) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (done->load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  done->fetch_or(bit, std::memory_order_acq_rel);
  return cudaSuccess;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// Loads 16 bytes through the read-only path. REQUIRES: p 16-byte aligned.
__device__ __forceinline__ uint4 Load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Converts 8 packed 16-bit values (element 2i in the low half of word i).
template <typename T>
__device__ __forceinline__ void ToFloat8(const uint4& u, float (&f)[8]);

template <>
__device__ __forceinline__ void ToFloat8<__nv_bfloat16>(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void ToFloat8<__half>(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    static_assert(sizeof(h) == sizeof(uint32_t), "half2 is 4 bytes");
    memcpy(&h, &w[i], sizeof(h));
    const float2 t = __half22float2(h);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float WarpMax(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// Sum over aligned groups of kWidth lanes (kWidth a power of two <= 32);
// every lane of the group gets the group's sum.
template <int kWidth>
__device__ __forceinline__ float GroupSum(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Order-preserving key: larger float -> larger key; every NaN -> the largest key.
__device__ __forceinline__ uint32_t OrderKey(float x) {
  const uint32_t u = __float_as_uint(x);
  const uint32_t key = (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
  return isnan(x) ? 0xffffffffu : key;
}

__device__ __forceinline__ float NegInf() { return __int_as_float(0xff800000); }

}  // namespace kvrecall::gpu::kernels
