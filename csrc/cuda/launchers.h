// Launchers of the CUDA low-bit GEMM kernels: raw device pointers and a stream, no torch.
//
// Layouts (shared with the CPU backend and the Triton kernels):
//   a        int8 [M, K] (int8 ops) or T [M, K] (w4a16), row-major, contiguous
//   w        int8 [N, K] (nn.Linear layout) or packed int4 uint8 [N, ceil(K/2)]: byte j of a row
//            holds w[2j] in the low nibble and w[2j+1] in the high nibble (two's complement)
//   w_scale  float [N] (group_size <= 0) or float [N, groups], groups = ceil(K / group_size)
//   a_scale  float [M]; bias float [N] or nullptr
// Every launcher returns the launch error (cudaSuccess when the kernel was queued).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace qframe {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out_i32 = a @ w.T (int32), or, when out_f32 is given instead, the scaled float32 result
// out_f32 = (a @ w.T) * a_scale[:, None] * w_scale[None, :] + bias.
cudaError_t int8_mm(const int8_t* a, const int8_t* w, int32_t* out_i32, float* out_f32, const float* a_scale,
                    const float* w_scale, const float* bias, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

// out = sum_g a_scale[m] * w_scale[n, g] * (int32 dot of group g) + bias, float32 [M, N].
cudaError_t w4a8_mm(const int8_t* a, const float* a_scale, const uint8_t* w_packed, const float* w_scale,
                    int64_t group_size, const float* bias, float* out, int64_t M, int64_t N, int64_t K,
                    cudaStream_t stream);

// out = a @ (unpack(w_packed) * scale).T + bias, fp32 accumulation, out in a's dtype.
cudaError_t w4a16_mm(const void* a, DType dtype, const uint8_t* w_packed, const float* w_scale, int64_t group_size,
                     const float* bias, void* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace cuda
}  // namespace qframe
