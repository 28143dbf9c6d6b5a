// int8 x int8 tile kernel for Arm CPUs with the dot-product extension (Armv8.2 SDOT; e.g. the
// Cortex-A78AE of a Jetson Orin): vdotq_s32 adds four int8 x int8 products into each int32 lane,
// exactly, with no saturating step. Four weight rows meet each activation row per pass, so every
// activation load serves four output channels. Runtime detection: HWCAP_ASIMDDP.
//
// Built for aarch64 only; the target attribute lets it compile without -march flags. Elsewhere
// has_arm_dotprod() is false and the tile entry point is never called.
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

#if defined(__aarch64__)
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#endif

namespace qframe {
namespace cpu {

#if defined(__aarch64__)

bool has_arm_dotprod() {
#if defined(__linux__)
  static const bool ok = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
  return ok;
#else
  return false;
#endif
}

#define QF_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))

namespace {

QF_DOTPROD inline void epilogue(const Int8Args& p, int64_t m, int64_t n, int32_t r) {
  if (p.a_scale == nullptr) {
    static_cast<int32_t*>(p.out)[m * p.N + n] = r;
  } else {  // same operation order as the portable epilogue
    float f = (float)r * p.a_scale[m] * p.w_scale[n];
    if (p.bias) f += p.bias[n];
    static_cast<float*>(p.out)[m * p.N + n] = f;
  }
}

}  // namespace

QF_DOTPROD void int8_tile_dotprod(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = p.K, K16 = K / 16 * 16;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* w0 = p.w + n * K;
    const int8_t* w1 = w0 + K;
    const int8_t* w2 = w1 + K;
    const int8_t* w3 = w2 + K;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* a = p.a + m * p.lda;
      int32x4_t c0 = vdupq_n_s32(0), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t k = 0; k < K16; k += 16) {
        const int8x16_t av = vld1q_s8(a + k);
        c0 = vdotq_s32(c0, av, vld1q_s8(w0 + k));
        c1 = vdotq_s32(c1, av, vld1q_s8(w1 + k));
        c2 = vdotq_s32(c2, av, vld1q_s8(w2 + k));
        c3 = vdotq_s32(c3, av, vld1q_s8(w3 + k));
      }
      int32_t r0 = vaddvq_s32(c0), r1 = vaddvq_s32(c1), r2 = vaddvq_s32(c2), r3 = vaddvq_s32(c3);
      for (int64_t k = K16; k < K; ++k) {
        const int32_t x = a[k];
        r0 += x * w0[k], r1 += x * w1[k], r2 += x * w2[k], r3 += x * w3[k];
      }
      epilogue(p, m, n, r0), epilogue(p, m, n + 1, r1), epilogue(p, m, n + 2, r2), epilogue(p, m, n + 3, r3);
    }
  }
  for (; n < n1; ++n) {
    const int8_t* w0 = p.w + n * K;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* a = p.a + m * p.lda;
      int32x4_t c0 = vdupq_n_s32(0);
      for (int64_t k = 0; k < K16; k += 16) c0 = vdotq_s32(c0, vld1q_s8(a + k), vld1q_s8(w0 + k));
      int32_t r0 = vaddvq_s32(c0);
      for (int64_t k = K16; k < K; ++k) r0 += (int32_t)a[k] * w0[k];
      epilogue(p, m, n, r0);
    }
  }
}

#else  // not aarch64: never called (has_arm_dotprod() is false), defined so the library links

bool has_arm_dotprod() { return false; }
void int8_tile_dotprod(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int8_tile_portable(p, m0, m1, n0, n1);
}

#endif

}  // namespace cpu
}  // namespace qframe
