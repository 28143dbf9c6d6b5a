// int8 x int8 GEMM with int32 accumulation and a fused per-row / per-channel scale + bias
// epilogue.
//
//   M <= 8 (decode, GEMV-like): one warp per output column streams the weight row once with
//            16-byte loads and __dp4a; memory bound, which is the point.
//   M > 8:   WMMA int8 tensor-core tiles (sm_72+): 64x64 block tile, 4 warps of 32x32, K in
//            steps of 32, the int32 tile staged through shared memory for the epilogue.
//   Devices below sm_72 run the GEMV kernel over row blocks of 8.
#include <mma.h>

#include "common.cuh"
#include "launchers.h"

namespace qframe {
namespace cuda {
namespace {

using namespace detail;

constexpr int kGemvRows = 8;  // activation rows per GEMV block
constexpr int kGemvWarps = 4;

__device__ __forceinline__ void store(int32_t* out_i32, float* out_f32, const float* a_scale, const float* w_scale,
                                      const float* bias, int64_t m, int64_t n, int64_t N, int acc) {
  if (out_i32) {
    out_i32[m * N + n] = acc;
  } else {
    out_f32[m * N + n] = (float)acc * a_scale[m] * w_scale[n] + (bias ? bias[n] : 0.f);
  }
}

// VEC: K % 16 == 0 and 16-byte aligned rows, so every lane reads 16 bytes at a time.
template <int MR, bool VEC>
__global__ void __launch_bounds__(kGemvWarps * kWarp)
    int8_gemv_kernel(const int8_t* __restrict__ a, const int8_t* __restrict__ w, int32_t* out_i32, float* out_f32,
                     const float* __restrict__ a_scale, const float* __restrict__ w_scale,
                     const float* __restrict__ bias, int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = (int64_t)blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
  const int64_t m0 = (int64_t)blockIdx.y * MR;
  if (n >= N) return;
  const int mr = (int)min((int64_t)MR, M - m0);
  const int8_t* wr = w + n * K;
  int acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0;

  if (VEC) {
    for (int64_t k = lane * 16; k < K; k += kWarp * 16) {
      const int4 wv = __ldg(reinterpret_cast<const int4*>(wr + k));
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m < mr) {
          const int4 av = __ldg(reinterpret_cast<const int4*>(a + (m0 + m) * K + k));
          acc[m] = __dp4a(av.x, wv.x, acc[m]);
          acc[m] = __dp4a(av.y, wv.y, acc[m]);
          acc[m] = __dp4a(av.z, wv.z, acc[m]);
          acc[m] = __dp4a(av.w, wv.w, acc[m]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += kWarp) {
      const int wv = wr[k];
#pragma unroll
      for (int m = 0; m < MR; ++m)
        if (m < mr) acc[m] += wv * (int)a[(m0 + m) * K + k];
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    if (m < mr) {
      const int s = warp_sum(acc[m]);
      if (lane == 0) store(out_i32, out_f32, a_scale, w_scale, bias, m0 + m, n, N, s);
    }
  }
}

constexpr int BM = 64, BN = 64, BK = 32, kTileThreads = 128, kCPad = 4;

// Copies 16 bytes of row r (k, k + 16) into shared memory, zero outside the matrix.
template <bool VEC>
__device__ __forceinline__ void load16(const int8_t* src, int64_t r, int64_t rows, int64_t K, int64_t k, int8_t* dst) {
  if (VEC) {
    int4 v = make_int4(0, 0, 0, 0);
    if (r < rows && k < K) v = __ldg(reinterpret_cast<const int4*>(src + r * K + k));
    *reinterpret_cast<int4*>(dst) = v;
  } else {
#pragma unroll
    for (int t = 0; t < 16; ++t) dst[t] = (r < rows && k + t < K) ? src[r * K + k + t] : (int8_t)0;
  }
}

template <bool VEC>
__global__ void __launch_bounds__(kTileThreads)
    int8_wmma_kernel(const int8_t* __restrict__ a, const int8_t* __restrict__ w, int32_t* out_i32, float* out_f32,
                     const float* __restrict__ a_scale, const float* __restrict__ w_scale,
                     const float* __restrict__ bias, int64_t M, int64_t N, int64_t K) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 720
  using namespace nvcuda;
  // [k half][row][16 k]: every fragment pointer is 256-bit aligned with ldm = 16
  __shared__ __align__(128) int8_t As[2][BM][16];
  __shared__ __align__(128) int8_t Ws[2][BN][16];
  __shared__ __align__(128) int Cs[BM][BN + kCPad];

  const int tid = threadIdx.x, warp = tid / kWarp;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, int> c[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(c[i][j], 0);

  const int lr = tid / 2, lh = tid % 2;  // this thread's tile row and k half
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    load16<VEC>(a, m0 + lr, M, K, k0 + 16 * lh, &As[lh][lr][0]);
    load16<VEC>(w, n0 + lr, N, K, k0 + 16 * lh, &Ws[lh][lr][0]);
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[h][wm + 16 * i][0], 16);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Ws[h][wn + 16 * j][0], 16);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wm + 16 * i][wn + 16 * j], c[i][j], BN + kCPad, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += kTileThreads) {
    const int r = e / BN, col = e % BN;
    const int64_t m = m0 + r, n = n0 + col;
    if (m < M && n < N) store(out_i32, out_f32, a_scale, w_scale, bias, m, n, N, Cs[r][col]);
  }
#endif
}

int device_sm() {
  int dev = 0, major = 0, minor = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return major * 10 + minor;
}

}  // namespace

cudaError_t int8_mm(const int8_t* a, const int8_t* w, int32_t* out_i32, float* out_f32, const float* a_scale,
                    const float* w_scale, const float* bias, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const bool vec = K % 16 == 0 && aligned16(a) && aligned16(w);
  if (M <= kGemvRows || device_sm() < 72) {
    const dim3 block(kGemvWarps * kWarp);
    const unsigned gx = (unsigned)ceil_div(N, kGemvWarps);
    if (M == 1) {
      if (vec) int8_gemv_kernel<1, true><<<dim3(gx, 1), block, 0, stream>>>(a, w, out_i32, out_f32, a_scale, w_scale, bias, M, N, K);
      else int8_gemv_kernel<1, false><<<dim3(gx, 1), block, 0, stream>>>(a, w, out_i32, out_f32, a_scale, w_scale, bias, M, N, K);
    } else {
      const dim3 grid(gx, (unsigned)ceil_div(M, kGemvRows));
      if (vec) int8_gemv_kernel<kGemvRows, true><<<grid, block, 0, stream>>>(a, w, out_i32, out_f32, a_scale, w_scale, bias, M, N, K);
      else int8_gemv_kernel<kGemvRows, false><<<grid, block, 0, stream>>>(a, w, out_i32, out_f32, a_scale, w_scale, bias, M, N, K);
    }
    return cudaGetLastError();
  }
  const dim3 grid((unsigned)ceil_div(N, BN), (unsigned)ceil_div(M, BM));
  if (vec) int8_wmma_kernel<true><<<grid, kTileThreads, 0, stream>>>(a, w, out_i32, out_f32, a_scale, w_scale, bias, M, N, K);
  else int8_wmma_kernel<false><<<grid, kTileThreads, 0, stream>>>(a, w, out_i32, out_f32, a_scale, w_scale, bias, M, N, K);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace qframe
