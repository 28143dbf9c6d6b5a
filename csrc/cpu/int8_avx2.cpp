// int8 x int8 GEMM for x86 CPUs with AVX2 but without VNNI: u8 x s8 multiply-add pairs.
//
// vpmaddubsw multiplies unsigned bytes by signed bytes and adds adjacent pairs into int16 with
// saturation; vpmaddwd by ones then widens the pairs into int32 sums of four. To make an int8 x
// int8 product fit, the unsigned operand is |w| (at most 128) and the signed one is a * sign(w)
// (vpsignb): a pair is at most 2 * 128 * 127 = 32512 < 32767, so nothing saturates, provided
// a != -128 (a * sign(w) must stay in int8). The binding therefore hands this kernel activations
// clamped to [-127, 127] and, for the rare rows that held -128, the positions of those codes
// (`fix_off` / `fix_k`): the epilogue subtracts w[n, k] once for each, which restores
// a . w = clamp(a) . w - sum_{a_k = -128} w[n, k] exactly.
//
// Below kInt8Avx2PanelMinM rows a dot-product tile streams the weights in nn.Linear's layout instead
// (repacking them would cost as much as the product).
//
// Weights are repacked per call into panels of 8 or 16 output channels as [K/4][8 * NV][4] bytes
// (as the VNNI GEMM in int8_gemm_avx512.cpp does with 16-channel lanes): one 32-byte load holds
// four k of eight channels, and each activation row meets it through a broadcast 4-byte load.
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
#include <cstring>

#include "x86.h"

namespace qframe {
namespace cpu {

int64_t int8_avx2_panel_width(int64_t N) { return N > 8 ? 16 : 8; }

#if QF_X86

bool has_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return ok;
}

#define QF_AVX2 __attribute__((target("avx2")))

namespace {

// Accumulates rows [m, m + MR) against one packed panel (8 * NV channels) and writes them.
template <int MR, int NV>
QF_AVX2 void micro(const Int8Args& p, const uint8_t* bp, int64_t m, int64_t n0) {
  constexpr int64_t kCols = 8 * NV;
  const int64_t K4 = (p.K + 3) / 4;
  const int8_t* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = p.a + (m + i) * p.lda;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_setzero_si256();

  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const uint8_t* b = bp + k4 * kCols * 4;
    _mm_prefetch((const char*)(b + 8 * kCols * 4), _MM_HINT_T0);
    __m256i wv[NV], wa[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * j));
      wa[j] = _mm256_abs_epi8(wv[j]);  // |w| as unsigned bytes: 128 for -128 is right
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, ar[i] + 4 * k4, 4);
      const __m256i av = _mm256_set1_epi32(a4);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        const __m256i pairs = _mm256_maddubs_epi16(wa[j], _mm256_sign_epi8(av, wv[j]));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }

  alignas(32) int32_t res[MR][NV][8];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(res[i][j]), acc[i][j]);

  for (int i = 0; i < MR; ++i) {
    const int64_t row = m + i;
    if (p.fix_off != nullptr) {  // codes -128 that were clamped to -127: subtract w[n, k] once each
      for (int64_t f = p.fix_off[row]; f < p.fix_off[row + 1]; ++f) {
        const int64_t k = p.fix_k[f];
        for (int j = 0; j < NV; ++j)
          for (int l = 0; l < 8; ++l) {
            const int64_t n = n0 + 8 * j + l;
            if (n < p.N) res[i][j][l] -= p.w[n * p.K + k];
          }
      }
    }
    for (int j = 0; j < NV; ++j) {
      const int64_t n = n0 + 8 * j;
      if (n >= p.N) break;
      const int64_t cnt = std::min<int64_t>(8, p.N - n);
      if (p.a_scale == nullptr) {
        std::memcpy(static_cast<int32_t*>(p.out) + row * p.N + n, res[i][j], cnt * 4);
      } else {
        float* o = static_cast<float*>(p.out) + row * p.N + n;
        const float s = p.a_scale[row];
        for (int64_t l = 0; l < cnt; ++l) {  // same operation order as the portable epilogue
          float f = (float)res[i][j][l] * s * p.w_scale[n + l];
          if (p.bias) f += p.bias[n + l];
          o[l] = f;
        }
      }
    }
  }
}

template <int NV, int MR>
void tail(const Int8Args& p, const uint8_t* bp, int64_t m, int64_t rows, int64_t n0) {
  if constexpr (MR > 0) {
    if (rows == MR) return micro<MR, NV>(p, bp, m, n0);
    tail<NV, MR - 1>(p, bp, m, rows, n0);
  }
}

// MR * NV accumulators + 2 * NV weight registers + the broadcast and ones, within 16 ymm registers.
template <int NV>
constexpr int rows_per_block() {
  return NV == 2 ? 4 : 6;
}

template <int NV>
void rows(const Int8Args& p, const uint8_t* bp, int64_t m0, int64_t m1, int64_t n0) {
  constexpr int MR = rows_per_block<NV>();
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) micro<MR, NV>(p, bp, m, n0);
  if (m < m1) tail<NV, MR - 1>(p, bp, m, m1 - m, n0);
}

// Scalar repack: bytes past K and channels past N are zero and contribute nothing.
void pack(const Int8Args& p, int64_t width, int64_t n0, uint8_t* dst) {
  const int64_t K = p.K, K4 = (K + 3) / 4;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    uint8_t* d = dst + k4 * width * 4;
    for (int64_t c = 0; c < width; ++c) {
      const int64_t n = n0 + c;
      for (int e = 0; e < 4; ++e) {
        const int64_t k = 4 * k4 + e;
        d[4 * c + e] = (n < p.N && k < K) ? (uint8_t)p.w[n * K + k] : 0;
      }
    }
  }
}

inline QF_AVX2 int32_t hsum(__m256i v) {
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
  return _mm_cvtsi128_si32(x);
}

// a[m] . w[n] over K, 32 bytes at a time, with the scalar tail and the -128 fix-ups.
QF_AVX2 inline __m256i dot_step(__m256i acc, __m256i av, __m256i wv, __m256i ones) {
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(av, wv));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
}

QF_AVX2 void dot_tile(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = p.K, K32 = K / 32 * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nb = std::min<int64_t>(4, n1 - n);
    const int8_t* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = p.w + (n + std::min<int64_t>(j, nb - 1)) * K;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* a = p.a + m * p.lda;
      __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t k = 0; k < K32; k += 32) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k));
        c0 = dot_step(c0, av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[0] + k)), ones);
        c1 = dot_step(c1, av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[1] + k)), ones);
        c2 = dot_step(c2, av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[2] + k)), ones);
        c3 = dot_step(c3, av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[3] + k)), ones);
      }
      int32_t r[4] = {hsum(c0), hsum(c1), hsum(c2), hsum(c3)};
      for (int j = 0; j < nb; ++j) {
        for (int64_t k = K32; k < K; ++k) r[j] += (int32_t)a[k] * wr[j][k];
        if (p.fix_off != nullptr)
          for (int64_t f = p.fix_off[m]; f < p.fix_off[m + 1]; ++f) r[j] -= wr[j][p.fix_k[f]];
        if (p.a_scale == nullptr) {
          static_cast<int32_t*>(p.out)[m * p.N + n + j] = r[j];
        } else {
          float f = (float)r[j] * p.a_scale[m] * p.w_scale[n + j];
          if (p.bias) f += p.bias[n + j];
          static_cast<float*>(p.out)[m * p.N + n + j] = f;
        }
      }
    }
  }
}

}  // namespace

void int8_tile_avx2(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  dot_tile(p, m0, m1, n0, n1);
}

void int8_pack_panel_avx2(const Int8Args& p, int64_t width, int64_t n0, uint8_t* dst) { pack(p, width, n0, dst); }

void int8_panel_tile_avx2(const Int8Args& p, int64_t width, const uint8_t* packed, int64_t m0, int64_t m1,
                          int64_t n0) {
  switch (width) {
    case 16: return rows<2>(p, packed, m0, m1, n0);
    default: return rows<1>(p, packed, m0, m1, n0);
  }
}

#else  // not x86: never called (has_avx2() is false), defined so the library links

bool has_avx2() { return false; }
void int8_tile_avx2(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int8_tile_portable(p, m0, m1, n0, n1);
}
void int8_pack_panel_avx2(const Int8Args&, int64_t, int64_t, uint8_t*) {}
void int8_panel_tile_avx2(const Int8Args&, int64_t, const uint8_t*, int64_t, int64_t, int64_t) {}

#endif

}  // namespace cpu
}  // namespace qframe
