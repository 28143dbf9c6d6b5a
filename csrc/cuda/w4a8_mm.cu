// Packed int4 weights x int8 activations with per-channel or per-group weight scales.
//
//   M <= 8 (decode): one warp per output column streams the packed row once (16-byte loads, 32 k
//            per lane), unpacks nibbles to signed bytes with two byte permutes and __dp4a's
//            against the activations; scales per 8-k word. Memory bound: half the bytes of int8.
//   M > 8:   64x64 SIMT tiles: weights unpacked once into shared memory as int8 words, every
//            thread __dp4a's a 4x4 register block and flushes int32 partial sums into float with
//            the group's scale (per 32-k step when group_size % 32 == 0, per 8 k otherwise).
//   Group sizes that are not a multiple of 8 take the GEMV kernel's scalar path over row blocks.
#include "common.cuh"
#include "launchers.h"

namespace qframe {
namespace cuda {
namespace {

using namespace detail;

constexpr int kGemvRows = 8;
constexpr int kGemvWarps = 4;

// VEC: K % 32 == 0, 16-byte aligned rows and (group_size <= 0 or group_size % 8 == 0).
template <int MR, bool VEC>
__global__ void __launch_bounds__(kGemvWarps * kWarp)
    w4a8_gemv_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale, const uint8_t* __restrict__ w,
                     const float* __restrict__ w_scale, int64_t group_size, int64_t groups,
                     const float* __restrict__ bias, float* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = (int64_t)blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
  const int64_t m0 = (int64_t)blockIdx.y * MR;
  if (n >= N) return;
  const int mr = (int)min((int64_t)MR, M - m0);
  const int64_t kb = (K + 1) / 2;
  const uint8_t* wr = w + n * kb;
  const float* sr = w_scale + n * groups;
  const bool channel = group_size <= 0;
  int acci[MR];
  float accf[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acci[m] = 0, accf[m] = 0.f;

  if (VEC) {
    for (int64_t b = lane * 16; b < kb; b += kWarp * 16) {
      const uint4 pv = __ldg(reinterpret_cast<const uint4*>(wr + b));
      const uint32_t pw[4] = {pv.x, pv.y, pv.z, pv.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = 2 * b + 8 * q;
        int w0, w1;
        unpack8(pw[q], w0, w1);
        const float s = channel ? 0.f : __ldg(sr + k / group_size);
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m < mr) {
            const int2 av = __ldg(reinterpret_cast<const int2*>(a + (m0 + m) * K + k));
            const int d = __dp4a(av.y, w1, __dp4a(av.x, w0, 0));
            if (channel) acci[m] += d;
            else accf[m] += (float)d * s;
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += kWarp) {
      const uint8_t byte = wr[k >> 1];
      const int wv = sext4((k & 1) ? (byte >> 4) : (byte & 15u));
      const float s = channel ? 0.f : sr[k / group_size];
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m < mr) {
          const int p = wv * (int)a[(m0 + m) * K + k];
          if (channel) acci[m] += p;
          else accf[m] += (float)p * s;
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    if (m < mr) {
      const float v = channel ? (float)warp_sum(acci[m]) * sr[0] : warp_sum(accf[m]);
      if (lane == 0) out[(m0 + m) * N + n] = v * a_scale[m0 + m] + (bias ? bias[n] : 0.f);
    }
  }
}

constexpr int TM = 64, TN = 64, TK = 32, kTileThreads = 256, kPad = 4;
enum Flush { kChannel = 0, kPer32 = 1, kPer8 = 2 };

// Four activation bytes a[r, k..k+3] as one word, zero outside the matrix.
template <bool VEC>
__device__ __forceinline__ int act_word(const int8_t* a, int64_t r, int64_t M, int64_t K, int64_t k) {
  if (r >= M || k >= K) return 0;
  if (VEC) return __ldg(reinterpret_cast<const int*>(a + r * K + k));
  uint32_t v = 0;
#pragma unroll
  for (int t = 0; t < 4; ++t)
    if (k + t < K) v |= (uint32_t)(uint8_t)a[r * K + k + t] << (8 * t);
  return (int)v;
}

// Four packed bytes of row n from byte offset b (eight int4 values), zero outside the matrix.
template <bool VEC>
__device__ __forceinline__ uint32_t packed_word(const uint8_t* w, int64_t n, int64_t N, int64_t kb, int64_t b) {
  if (n >= N || b >= kb) return 0;
  if (VEC) return __ldg(reinterpret_cast<const uint32_t*>(w + n * kb + b));
  uint32_t v = 0;
#pragma unroll
  for (int t = 0; t < 4; ++t)
    if (b + t < kb) v |= (uint32_t)w[n * kb + b + t] << (8 * t);
  return v;
}

// VEC: K % 8 == 0 and 4-byte aligned rows (word loads for activations and packed weights).
template <int FLUSH, bool VEC>
__global__ void __launch_bounds__(kTileThreads)
    w4a8_tile_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale, const uint8_t* __restrict__ w,
                     const float* __restrict__ w_scale, int64_t group_size, int64_t groups,
                     const float* __restrict__ bias, float* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  __shared__ __align__(16) int As[TK / 4][TM + kPad];  // [k word][row]: 4 consecutive k per word
  __shared__ __align__(16) int Ws[TK / 4][TN + kPad];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = (int64_t)blockIdx.y * TM, n0 = (int64_t)blockIdx.x * TN;
  const int64_t kb = (K + 1) / 2;
  int acc[4][4];
  float accf[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0, accf[i][j] = 0.f;

  // the scale rows of this thread's four columns (clamped to a valid row; unused when out of range)
  const float* srow[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) srow[j] = w_scale + min(n0 + tx * 4 + j, N - 1) * groups;

  for (int64_t k0 = 0; k0 < K; k0 += TK) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {  // 64 rows x 8 words of activations
      const int e = tid + t * kTileThreads, r = e / 8, kw = e % 8;
      As[kw][r] = act_word<VEC>(a, m0 + r, M, K, k0 + 4 * kw);
    }
    {  // 64 rows x 4 packed words (8 k each) of weights, unpacked to 8 int8 words
      const int r = tid / 4, q = tid % 4;
      int w0, w1;
      unpack8(packed_word<VEC>(w, n0 + r, N, kb, k0 / 2 + 4 * q), w0, w1);
      Ws[2 * q][r] = w0;
      Ws[2 * q + 1][r] = w1;
    }
    __syncthreads();
#pragma unroll
    for (int kw = 0; kw < TK / 4; ++kw) {
      const int4 av = *reinterpret_cast<const int4*>(&As[kw][ty * 4]);
      const int4 wv = *reinterpret_cast<const int4*>(&Ws[kw][tx * 4]);
      const int ar[4] = {av.x, av.y, av.z, av.w}, wc[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(ar[i], wc[j], acc[i][j]);
      if (FLUSH == kPer8 && (kw & 1)) {
        const int64_t k = k0 + 4 * (kw - 1);  // first k of this 8-k pair, inside one group
        if (k < K) {
          const int64_t g = k / group_size;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float s = __ldg(srow[j] + g);
#pragma unroll
            for (int i = 0; i < 4; ++i) accf[i][j] += (float)acc[i][j] * s, acc[i][j] = 0;
          }
        }
      }
    }
    if (FLUSH == kPer32 && ((k0 + TK) % group_size == 0 || k0 + TK >= K)) {
      const int64_t g = k0 / group_size;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float s = __ldg(srow[j] + g);
#pragma unroll
        for (int i = 0; i < 4; ++i) accf[i][j] += (float)acc[i][j] * s, acc[i][j] = 0;
      }
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
      if (n >= N) continue;
      const float v = FLUSH == kChannel ? (float)acc[i][j] * srow[j][0] : accf[i][j];
      out[m * N + n] = v * a_scale[m] + (bias ? bias[n] : 0.f);
    }
  }
}

template <int FLUSH>
void launch_tile(bool vec, dim3 grid, cudaStream_t stream, const int8_t* a, const float* a_scale, const uint8_t* w,
                 const float* w_scale, int64_t gs, int64_t groups, const float* bias, float* out, int64_t M, int64_t N,
                 int64_t K) {
  if (vec) w4a8_tile_kernel<FLUSH, true><<<grid, kTileThreads, 0, stream>>>(a, a_scale, w, w_scale, gs, groups, bias, out, M, N, K);
  else w4a8_tile_kernel<FLUSH, false><<<grid, kTileThreads, 0, stream>>>(a, a_scale, w, w_scale, gs, groups, bias, out, M, N, K);
}

}  // namespace

cudaError_t w4a8_mm(const int8_t* a, const float* a_scale, const uint8_t* w_packed, const float* w_scale,
                    int64_t group_size, const float* bias, float* out, int64_t M, int64_t N, int64_t K,
                    cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const bool channel = group_size <= 0 || group_size >= K;
  const int64_t gs = channel ? 0 : group_size;
  const int64_t groups = channel ? 1 : ceil_div(K, gs);
  const bool groups_by_8 = channel || gs % 8 == 0;
  if (M <= kGemvRows || !groups_by_8) {
    const bool vec = K % 32 == 0 && groups_by_8 && aligned16(a) && aligned16(w_packed);
    const dim3 block(kGemvWarps * kWarp);
    const unsigned gx = (unsigned)ceil_div(N, kGemvWarps);
    if (M == 1) {
      if (vec) w4a8_gemv_kernel<1, true><<<dim3(gx, 1), block, 0, stream>>>(a, a_scale, w_packed, w_scale, gs, groups, bias, out, M, N, K);
      else w4a8_gemv_kernel<1, false><<<dim3(gx, 1), block, 0, stream>>>(a, a_scale, w_packed, w_scale, gs, groups, bias, out, M, N, K);
    } else {
      const dim3 grid(gx, (unsigned)ceil_div(M, kGemvRows));
      if (vec) w4a8_gemv_kernel<kGemvRows, true><<<grid, block, 0, stream>>>(a, a_scale, w_packed, w_scale, gs, groups, bias, out, M, N, K);
      else w4a8_gemv_kernel<kGemvRows, false><<<grid, block, 0, stream>>>(a, a_scale, w_packed, w_scale, gs, groups, bias, out, M, N, K);
    }
    return cudaGetLastError();
  }
  const bool vec = K % 8 == 0 && (reinterpret_cast<uintptr_t>(a) & 3u) == 0 && (reinterpret_cast<uintptr_t>(w_packed) & 3u) == 0;
  const dim3 grid((unsigned)ceil_div(N, TN), (unsigned)ceil_div(M, TM));
  if (channel) launch_tile<kChannel>(vec, grid, stream, a, a_scale, w_packed, w_scale, gs, groups, bias, out, M, N, K);
  else if (gs % TK == 0) launch_tile<kPer32>(vec, grid, stream, a, a_scale, w_packed, w_scale, gs, groups, bias, out, M, N, K);
  else launch_tile<kPer8>(vec, grid, stream, a, a_scale, w_packed, w_scale, gs, groups, bias, out, M, N, K);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace qframe
