// Portable kernels: plain C++ that compilers auto-vectorise (x86 without AVX-512, Arm, ...).
//
// Each weight row is unpacked once into a small buffer and then meets every activation row of
// the tile, so the inner loops are simple int8 or fp32 dot products over contiguous memory.
#include "kernels.h"

// The float epilogue rounds the product before adding the bias on every path (no fused
// multiply-add, which GCC would otherwise form on Arm), so all int8 kernels' float outputs agree
// bit for bit.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <vector>

namespace qframe {
namespace cpu {
namespace {

// Signed value of nibble q (two's complement): (q ^ 8) - 8.
inline int8_t nibble(uint8_t q) { return (int8_t)((q ^ 8) - 8); }

void unpack_row(const uint8_t* w, int64_t K, int8_t* out) {
  const int64_t pairs = K / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    out[2 * j] = nibble(w[j] & 0x0F);
    out[2 * j + 1] = nibble(w[j] >> 4);
  }
  if (K & 1) out[K - 1] = nibble(w[pairs] & 0x0F);
}

inline int32_t dot_i8(const int8_t* x, const int8_t* y, int64_t n) {
  int32_t s = 0;
  for (int64_t k = 0; k < n; ++k) s += (int32_t)x[k] * (int32_t)y[k];
  return s;
}

// fp32 dot with eight partial sums (vectorisable without reassociating a single sum).
inline float dot_f32(const float* x, const float* y, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int u = 0; u < 8; ++u) s[u] += x[k + u] * y[k + u];
  float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; k < n; ++k) r += x[k] * y[k];
  return r;
}

}  // namespace

void w4a8_tile_portable(const W4A8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = p.K, groups = p.s.groups;
  const int64_t gs = groups == 1 ? K : p.s.group_size;
  std::vector<int8_t> wq(K);
  for (int64_t n = n0; n < n1; ++n) {
    unpack_row(p.w + n * p.kb, K, wq.data());
    const float* srow = p.s.w_scale + n * groups;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* am = p.a + m * K;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
        acc += (float)dot_i8(wq.data() + k0, am + k0, k1 - k0) * srow[g];
      }
      float r = acc * p.a_scale[m];
      if (p.bias) r += p.bias[n];
      p.out[m * p.N + n] = r;
    }
  }
}

void w4a16_tile_portable(const W4A16Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = p.K, groups = p.s.groups;
  const int64_t gs = groups == 1 ? K : p.s.group_size;
  std::vector<int8_t> wq(K);
  std::vector<float> wf(K);
  for (int64_t n = n0; n < n1; ++n) {
    unpack_row(p.w + n * p.kb, K, wq.data());
    const float* srow = p.s.w_scale + n * groups;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
      for (int64_t k = k0; k < k1; ++k) wf[k] = (float)wq[k] * srow[g];
    }
    for (int64_t m = m0; m < m1; ++m) {
      float r = dot_f32(wf.data(), p.a + m * K, K);
      if (p.bias) r += p.bias[n];
      p.out[m * p.N + n] = r;
    }
  }
}

void int8_tile_portable(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = p.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = p.w + n * K;
    for (int64_t m = m0; m < m1; ++m) {
      const int32_t r = dot_i8(p.a + m * K, wn, K);
      if (p.a_scale == nullptr) {
        static_cast<int32_t*>(p.out)[m * p.N + n] = r;
      } else {
        float f = (float)r * p.a_scale[m] * p.w_scale[n];
        if (p.bias) f += p.bias[n];
        static_cast<float*>(p.out)[m * p.N + n] = f;
      }
    }
  }
}

}  // namespace cpu
}  // namespace qframe
