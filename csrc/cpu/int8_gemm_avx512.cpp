// int8 x int8 GEMM for many activation rows: weight panels packed per call, VNNI outer products.
//
// The dot-product kernel in kernels_avx512.cpp reads the weights in nn.Linear's [N, K] layout and
// reduces each output horizontally; that suits a few rows (it streams the weights once) but
// spends loads and reductions per multiply once M grows. Here a panel of 16 * NV weight rows is
// first repacked (in the L2-sized buffer of the calling thread) as [K/4][16 * NV][4] bytes, so one
// 64-byte load holds four k of sixteen output channels, and every activation row of the tile meets
// it through a broadcast 4-byte load: MR x NV accumulators, one vpdpbusd per accumulator and k
// step, no horizontal reduction. Packing costs one 16 x 16 dword transpose per 1 KiB of weights,
// a few per cent of the multiplies from M ~ 8 on (the binding picks this path from there).
//
// (w ^ 0x80) is w + 128 as an unsigned byte, so vpdpbusd(w + 128, a) - 128 * sum(a) = w . a; bytes
// past K are packed as unsigned 0 and contribute nothing whatever the activations hold there.
#include "kernels.h"

#include <algorithm>
#include <cstring>

#include "x86.h"

namespace qframe {
namespace cpu {

int64_t int8_panel_width(int64_t N) { return N > 32 ? 64 : N > 16 ? 32 : 16; }

int64_t int8_panel_bytes(int64_t K, int64_t width) { return (K + 3) / 4 * width * 4; }

#if QF_X86

#define QF_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace {

QF_VNNI inline __mmask64 bytes_mask(int64_t n) {  // n in [1, 64]
  return n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
}

// r[i] holds 16 dwords of row i; afterwards r[j] holds dword j of every row (16 x 16 transpose).
QF_VNNI inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i u[16];  // u[4g + e], 128-bit lane L: rows 4g..4g+3 at dword 4L + e
  for (int g = 0; g < 4; ++g) {
    const int i = 4 * g;
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // 4 x 4 transpose of 128-bit lanes across u[e], u[4+e], u[8+e], u[12+e]
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// Accumulates rows [m, m + MR) against one packed panel and writes them with the epilogue.
template <int MR, int NV>
QF_VNNI void panel_micro(const Int8Args& p, const uint8_t* bp, int64_t m, int64_t n0) {
  constexpr int64_t kCols = 16 * NV;
  const int64_t K4 = (p.K + 3) / 4;
  const int8_t* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = p.a + (m + i) * p.lda;
  __m512i acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_si512();

  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const uint8_t* b = bp + k4 * kCols * 4;
    _mm_prefetch((const char*)(b + 16 * kCols * 4), _MM_HINT_T0);
    __m512i wv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(b + 64 * j);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, ar[i] + 4 * k4, 4);
      const __m512i av = _mm512_set1_epi32(a4);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], av);
    }
  }

  // Spill the accumulators with constant indices only, so they can live in registers above.
  alignas(64) int32_t res[MR][NV][16];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_store_si512(res[i][j], acc[i][j]);

  for (int i = 0; i < MR; ++i) {
    const int64_t row = m + i;
    const __m512i corr = _mm512_set1_epi32(p.a_sum[row]);
    for (int j = 0; j < NV; ++j) {
      const int64_t n = n0 + 16 * j;
      if (n >= p.N) break;
      const __mmask16 k = p.N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (p.N - n)) - 1);
      const __m512i r = _mm512_sub_epi32(_mm512_load_si512(res[i][j]), corr);
      if (p.a_scale == nullptr) {
        _mm512_mask_storeu_epi32(static_cast<int32_t*>(p.out) + row * p.N + n, k, r);
      } else {
        __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(r), _mm512_set1_ps(p.a_scale[row])),
                                 _mm512_maskz_loadu_ps(k, p.w_scale + n));
        if (p.bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(k, p.bias + n));
        _mm512_mask_storeu_ps(static_cast<float*>(p.out) + row * p.N + n, k, f);
      }
    }
  }
}

template <int NV, int MR>
void panel_tail(const Int8Args& p, const uint8_t* bp, int64_t m, int64_t rows, int64_t n0) {
  if constexpr (MR > 0) {
    if (rows == MR) return panel_micro<MR, NV>(p, bp, m, n0);
    panel_tail<NV, MR - 1>(p, bp, m, rows, n0);
  }
}

// Register blocks: MR rows x NV vectors of 16 channels; MR * NV + NV + 1 of the 32 zmm registers.
template <int NV>
constexpr int rows_per_block() {
  return NV == 4 ? 6 : 12;
}

template <int NV>
void panel_rows(const Int8Args& p, const uint8_t* bp, int64_t m0, int64_t m1, int64_t n0) {
  constexpr int MR = rows_per_block<NV>();
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) panel_micro<MR, NV>(p, bp, m, n0);
  if (m < m1) panel_tail<NV, MR - 1>(p, bp, m, m1 - m, n0);
}

QF_VNNI void pack_panel(const Int8Args& p, int64_t width, int64_t n0, uint8_t* dst) {
  const int64_t K = p.K, K4 = (K + 3) / 4;
  const __m512i x80 = _mm512_set1_epi8((char)0x80);
  for (int64_t c0 = 0; c0 < width; c0 += 16) {
    for (int64_t kb = 0; kb < K4; kb += 16) {
      const __mmask64 km = bytes_mask(K - 4 * kb);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = n0 + c0 + i;
        r[i] = n < p.N ? _mm512_maskz_mov_epi8(km, _mm512_xor_si512(_mm512_maskz_loadu_epi8(km, p.w + n * K + 4 * kb), x80))
                       : _mm512_setzero_si512();
      }
      transpose16(r);
      const int64_t steps = std::min<int64_t>(16, K4 - kb);
      for (int64_t t = 0; t < steps; ++t) _mm512_storeu_si512(dst + ((kb + t) * width + c0) * 4, r[t]);
    }
  }
}

}  // namespace

void int8_pack_panel_avx512(const Int8Args& p, int64_t width, int64_t n0, uint8_t* dst) {
  pack_panel(p, width, n0, dst);
}

void int8_panel_tile_avx512(const Int8Args& p, int64_t width, const uint8_t* packed, int64_t m0, int64_t m1,
                            int64_t n0) {
  switch (width) {
    case 64: return panel_rows<4>(p, packed, m0, m1, n0);
    case 32: return panel_rows<2>(p, packed, m0, m1, n0);
    default: return panel_rows<1>(p, packed, m0, m1, n0);
  }
}

#else  // not x86: never called (has_avx512_vnni() is false), defined so the library links

void int8_pack_panel_avx512(const Int8Args&, int64_t, int64_t, uint8_t*) {}
void int8_panel_tile_avx512(const Int8Args&, int64_t, const uint8_t*, int64_t, int64_t, int64_t) {}

#endif

}  // namespace cpu
}  // namespace qframe
