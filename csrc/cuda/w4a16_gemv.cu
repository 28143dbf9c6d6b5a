// Packed int4 weights x fp32 / fp16 / bf16 activations, fp32 accumulation, output in the
// activations' dtype.
//
//   M <= 8 (decode, the memory-bound case): one warp per output column streams the packed row
//            once with 16-byte loads (32 k per lane), dequantizes nibble * group scale in
//            registers and FMAs against the activations (vector loads, read through L1/L2).
//   M > 8:   64x64 SIMT tiles: activations and dequantized weights staged as fp32 in shared
//            memory, a 4x4 register block per thread. Any group size (scales applied while
//            dequantizing).
#include "common.cuh"
#include "launchers.h"

namespace qframe {
namespace cuda {
namespace {

using namespace detail;

constexpr int kGemvRows = 8;
constexpr int kGemvWarps = 4;

// Eight consecutive activations from a 16-byte aligned address, as float.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* x);
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* x) {
  const float4 u = __ldg(reinterpret_cast<const float4*>(p));
  const float4 v = __ldg(reinterpret_cast<const float4*>(p) + 1);
  x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w, x[4] = v.x, x[5] = v.y, x[6] = v.z, x[7] = v.w;
}
template <typename H>
__device__ __forceinline__ void load8_half(const H* p, float* x) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const H* h = reinterpret_cast<const H*>(&u);
#pragma unroll
  for (int t = 0; t < 8; ++t) x[t] = to_float<H>(h[t]);
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float* x) { load8_half(p, x); }
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float* x) { load8_half(p, x); }

// VEC: K % 32 == 0, 16-byte aligned rows and (group_size <= 0 or group_size % 8 == 0).
template <typename T, int MR, bool VEC>
__global__ void __launch_bounds__(kGemvWarps * kWarp)
    w4a16_gemv_kernel(const T* __restrict__ a, const uint8_t* __restrict__ w, const float* __restrict__ w_scale,
                      int64_t group_size, int64_t groups, const float* __restrict__ bias, T* __restrict__ out,
                      int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = (int64_t)blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
  const int64_t m0 = (int64_t)blockIdx.y * MR;
  if (n >= N) return;
  const int mr = (int)min((int64_t)MR, M - m0);
  const int64_t kb = (K + 1) / 2;
  const uint8_t* wr = w + n * kb;
  const float* sr = w_scale + n * groups;
  const bool channel = group_size <= 0;
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;

  if (VEC) {
    for (int64_t b = lane * 16; b < kb; b += kWarp * 16) {
      const uint4 pv = __ldg(reinterpret_cast<const uint4*>(wr + b));
      const uint32_t pw[4] = {pv.x, pv.y, pv.z, pv.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = 2 * b + 8 * q;
        const float s = __ldg(sr + (channel ? 0 : k / group_size));
        float wf[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) wf[t] = (float)sext4((pw[q] >> (4 * t)) & 15u) * s;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m < mr) {
            float x[8];
            load8<T>(a + (m0 + m) * K + k, x);
#pragma unroll
            for (int t = 0; t < 8; ++t) acc[m] = fmaf(wf[t], x[t], acc[m]);
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += kWarp) {
      const uint8_t byte = wr[k >> 1];
      const float wf = (float)sext4((k & 1) ? (byte >> 4) : (byte & 15u)) * sr[channel ? 0 : k / group_size];
#pragma unroll
      for (int m = 0; m < MR; ++m)
        if (m < mr) acc[m] = fmaf(wf, to_float<T>(a[(m0 + m) * K + k]), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    if (m < mr) {
      const float v = warp_sum(acc[m]);
      if (lane == 0) out[(m0 + m) * N + n] = from_float<T>(v + (bias ? bias[n] : 0.f));
    }
  }
}

constexpr int TM = 64, TN = 64, TK = 32, kTileThreads = 256, kPad = 4;

template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    w4a16_tile_kernel(const T* __restrict__ a, const uint8_t* __restrict__ w, const float* __restrict__ w_scale,
                      int64_t group_size, int64_t groups, const float* __restrict__ bias, T* __restrict__ out,
                      int64_t M, int64_t N, int64_t K) {
  __shared__ __align__(16) float As[TK][TM + kPad];  // [k][row]
  __shared__ __align__(16) float Ws[TK][TN + kPad];  // [k][col], dequantized (nibble * scale)
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = (int64_t)blockIdx.y * TM, n0 = (int64_t)blockIdx.x * TN;
  const int64_t kb = (K + 1) / 2;
  const bool channel = group_size <= 0;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += TK) {
#pragma unroll
    for (int t = 0; t < TM * TK / kTileThreads; ++t) {  // 64 rows x 32 k, coalesced along k
      const int e = tid + t * kTileThreads, r = e / TK, kk = e % TK;
      const int64_t m = m0 + r, k = k0 + kk;
      As[kk][r] = (m < M && k < K) ? to_float<T>(a[m * K + k]) : 0.f;
    }
#pragma unroll
    for (int t = 0; t < TN * (TK / 2) / kTileThreads; ++t) {  // 64 rows x 16 packed bytes
      const int e = tid + t * kTileThreads, r = e / (TK / 2), bb = e % (TK / 2);
      const int64_t n = n0 + r, b = k0 / 2 + bb, k = 2 * b;
      float lo = 0.f, hi = 0.f;
      if (n < N && b < kb) {
        const uint8_t byte = w[n * kb + b];
        const float* sr = w_scale + n * groups;
        lo = (float)sext4(byte & 15u) * sr[channel ? 0 : k / group_size];
        if (k + 1 < K) hi = (float)sext4(byte >> 4) * sr[channel ? 0 : (k + 1) / group_size];
      }
      Ws[2 * bb][r] = lo;
      Ws[2 * bb + 1][r] = hi;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < TK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 wv = *reinterpret_cast<const float4*>(&Ws[kk][tx * 4]);
      const float ar[4] = {av.x, av.y, av.z, av.w}, wc[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], wc[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n < N) out[m * N + n] = from_float<T>(acc[i][j] + (bias ? bias[n] : 0.f));
    }
  }
}

template <typename T>
cudaError_t launch(const T* a, const uint8_t* w, const float* w_scale, int64_t gs, int64_t groups, const float* bias,
                   T* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M <= kGemvRows) {
    const bool vec = K % 32 == 0 && (gs <= 0 || gs % 8 == 0) && aligned16(a) && aligned16(w);
    const dim3 block(kGemvWarps * kWarp);
    const unsigned gx = (unsigned)ceil_div(N, kGemvWarps);
    if (M == 1) {
      if (vec) w4a16_gemv_kernel<T, 1, true><<<dim3(gx, 1), block, 0, stream>>>(a, w, w_scale, gs, groups, bias, out, M, N, K);
      else w4a16_gemv_kernel<T, 1, false><<<dim3(gx, 1), block, 0, stream>>>(a, w, w_scale, gs, groups, bias, out, M, N, K);
    } else {
      if (vec) w4a16_gemv_kernel<T, kGemvRows, true><<<dim3(gx, 1), block, 0, stream>>>(a, w, w_scale, gs, groups, bias, out, M, N, K);
      else w4a16_gemv_kernel<T, kGemvRows, false><<<dim3(gx, 1), block, 0, stream>>>(a, w, w_scale, gs, groups, bias, out, M, N, K);
    }
  } else {
    const dim3 grid((unsigned)ceil_div(N, TN), (unsigned)ceil_div(M, TM));
    w4a16_tile_kernel<T><<<grid, kTileThreads, 0, stream>>>(a, w, w_scale, gs, groups, bias, out, M, N, K);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t w4a16_mm(const void* a, DType dtype, const uint8_t* w_packed, const float* w_scale, int64_t group_size,
                     const float* bias, void* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const bool channel = group_size <= 0 || group_size >= K;
  const int64_t gs = channel ? 0 : group_size;
  const int64_t groups = channel ? 1 : ceil_div(K, gs);
  switch (dtype) {
    case DType::kFloat32:
      return launch(static_cast<const float*>(a), w_packed, w_scale, gs, groups, bias, static_cast<float*>(out), M, N, K, stream);
    case DType::kFloat16:
      return launch(static_cast<const __half*>(a), w_packed, w_scale, gs, groups, bias, static_cast<__half*>(out), M, N, K, stream);
    case DType::kBFloat16:
      return launch(static_cast<const __nv_bfloat16*>(a), w_packed, w_scale, gs, groups, bias,
                    static_cast<__nv_bfloat16*>(out), M, N, K, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace qframe
