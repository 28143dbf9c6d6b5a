// Device helpers shared by the CUDA kernels (header only; no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace qframe {
namespace cuda {
namespace detail {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Signed value of a 4-bit two's-complement nibble.
__device__ __forceinline__ int sext4(uint32_t q) { return (int)(q ^ 8u) - 8; }

// Four packed bytes (eight int4 values k0..k7, low nibble first) -> two words of signed int8 in
// k order (k0..k3, k4..k7), ready for __dp4a against four consecutive activations.
__device__ __forceinline__ void unpack8(uint32_t p, int& w0123, int& w4567) {
  uint32_t lo = p & 0x0F0F0F0Fu;         // k0 k2 k4 k6
  uint32_t hi = (p >> 4) & 0x0F0F0F0Fu;  // k1 k3 k5 k7
  lo = __vsub4(lo ^ 0x08080808u, 0x08080808u);  // sign-extend every byte's nibble
  hi = __vsub4(hi ^ 0x08080808u, 0x08080808u);
  w0123 = (int)__byte_perm(lo, hi, 0x5140);
  w4567 = (int)__byte_perm(lo, hi, 0x7362);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail
}  // namespace cuda
}  // namespace qframe
