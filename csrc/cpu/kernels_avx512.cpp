// AVX-512 kernels: packed int4 x int8 with VNNI (vpdpbusd), packed int4 x bf16 with AVX512-BF16
// (vdpbf16ps), and int8 x int8 with VNNI.
//
// Every function that uses intrinsics carries a target attribute, so the file builds without
// -march flags and the binding picks these kernels only when the CPU reports the features.
// Lambdas do not inherit target attributes, hence plain templates throughout.
#include "kernels.h"

#include <algorithm>

#include "x86.h"

namespace qframe {
namespace cpu {

#if QF_X86

bool has_avx512_vnni() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
}

bool has_avx512_bf16() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}

#define QF_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define QF_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

// How weight scales meet the accumulators.
//   kChannel: one scale per row; integer accumulation over the whole row, scaled once.
//   kBcast:   groups span whole chunks; flush every `group_size / chunk` chunks with one scale.
//   kPerm:    groups smaller than a chunk (or not aligned to it); flush every chunk with a scale
//             vector gathered per int32 lane through `lane_group`.
enum Mode { kChannel = 0, kBcast = 1, kPerm = 2 };

// Software prefetch distance for the streamed weight rows (bytes), where several activation rows
// share each weight load.
constexpr int64_t kPrefetch = 1024;

// One activation row (GEMV) is bound by DRAM bandwidth. The NB weight rows of a register block are
// adjacent in memory, and so are consecutive blocks: one linear stream, prefetched (into L2) this
// far ahead of the block's start, NB lines per 64 bytes of row consumed. Per-row prefetches a
// short way ahead keep too few lines in flight: about half the bandwidth on Zen 4 (M = 1,
// 4096 x 4096, cold cache; benchmarks/gemm.py).
constexpr int64_t kGemvPrefetch = 16384;

template <int MB, int NB>
inline void prefetch_weights(const uint8_t* block, const uint8_t* const* wr, int64_t line, int j, int64_t offset) {
  if (MB == 1)
    _mm_prefetch((const char*)(block + kGemvPrefetch + 64 * (line * NB + j)), _MM_HINT_T1);
  else
    _mm_prefetch((const char*)(wr[j] + offset + kPrefetch), _MM_HINT_T0);
}

inline __mmask64 tail_mask64(int64_t n) {  // n in [1, 64]
  return n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
}

// Weight scales of one flush for row `srow`: chunk c, its first group g0.
template <int MODE>
QF_VNNI inline __m512 flush_scales(const float* srow, int64_t groups, int64_t g0, const int32_t* lane_group) {
  if (MODE == kBcast) return _mm512_set1_ps(srow[g0]);
  const int64_t cnt = std::min<int64_t>(16, groups - g0);
  const __m512 raw = _mm512_maskz_loadu_ps((__mmask16)((1u << cnt) - 1), srow + g0);
  return _mm512_permutexvar_ps(_mm512_loadu_si512(lane_group), raw);
}

// sum_g srow[g] * crow[g], the correction for the +8 nibble offset in the grouped paths.
QF_VNNI inline float dot_groups(const float* srow, const float* crow, int64_t groups) {
  __m512 v = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const int64_t cnt = std::min<int64_t>(16, groups - g);
    const __mmask16 k = (__mmask16)((1u << cnt) - 1);
    v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, srow + g), _mm512_maskz_loadu_ps(k, crow + g), v);
  }
  return _mm512_reduce_add_ps(v);
}

// ---------------------------------------------------------------------------------------------
// W4A8: one chunk is 64 packed bytes = 128 k. Byte j of a row holds k = 2j (low nibble) and
// k = 2j + 1 (high nibble); (nibble ^ 8) is w + 8 as an unsigned byte, so vpdpbusd(w + 8, a)
// against the even-k and odd-k activation bytes needs no interleaving; 8 * sum(a) is removed
// afterwards. Int32 lane l of a chunk covers k in [128c + 8l, 128c + 8l + 8).

template <int MB, int NB, int MODE>
QF_VNNI void w4a8_micro(const W4A8Args& p, int64_t m0, int64_t n0) {
  const int64_t nchunk = p.lda / 64;
  const int64_t full = p.kb / 64;
  const __mmask64 tail = tail_mask64(p.kb - full * 64);
  const int64_t groups = p.s.groups;
  const int64_t period = MODE == kBcast ? p.s.group_size / 128 : 1;
  const __m512i x88 = _mm512_set1_epi8((char)0x88);
  const __m512i low4 = _mm512_set1_epi8(0x0F);

  const uint8_t* wr[NB];
  const float* srow[NB];
  for (int j = 0; j < NB; ++j) {
    wr[j] = p.w + (n0 + j) * p.kb;
    srow[j] = p.s.w_scale + (n0 + j) * groups;
  }
  const int8_t* ae[MB];
  const int8_t* ao[MB];
  for (int i = 0; i < MB; ++i) {
    ae[i] = p.a_even + (m0 + i) * p.lda;
    ao[i] = p.a_odd + (m0 + i) * p.lda;
  }
  __m512i acc[MB][NB];
  __m512 accf[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      acc[i][j] = _mm512_setzero_si512();
      accf[i][j] = _mm512_setzero_ps();
    }

  int64_t left = period;
  for (int64_t c = 0; c < nchunk; ++c) {
    const __mmask64 km = c < full ? ~(__mmask64)0 : tail;
    __m512i lo[NB], hi[NB];
    for (int j = 0; j < NB; ++j) {
      prefetch_weights<MB, NB>(wr[0], wr, c, j, 64 * c);
      const __m512i t = _mm512_xor_si512(_mm512_maskz_loadu_epi8(km, wr[j] + 64 * c), x88);
      lo[j] = _mm512_and_si512(t, low4);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(t, 4), low4);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512i a0 = _mm512_loadu_si512(ae[i] + 64 * c);
      const __m512i a1 = _mm512_loadu_si512(ao[i] + 64 * c);
      for (int j = 0; j < NB; ++j) {
        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], lo[j], a0);
        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], hi[j], a1);
      }
    }
    if (MODE != kChannel && (--left == 0 || c + 1 == nchunk)) {
      left = period;
      const int64_t g0 = MODE == kBcast ? c / period : (128 * c) / p.s.group_size;
      for (int j = 0; j < NB; ++j) {
        const __m512 sv = flush_scales<MODE>(srow[j], groups, g0, p.lane_group + 16 * c);
        for (int i = 0; i < MB; ++i) {
          accf[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), sv, accf[i][j]);
          acc[i][j] = _mm512_setzero_si512();
        }
      }
    }
  }

  for (int i = 0; i < MB; ++i) {
    const int64_t m = m0 + i;
    for (int j = 0; j < NB; ++j) {
      const int64_t n = n0 + j;
      float r;
      if (MODE == kChannel) {
        r = (float)(_mm512_reduce_add_epi32(acc[i][j]) - p.corr_i[m]) * srow[j][0];
      } else {
        r = _mm512_reduce_add_ps(accf[i][j]) - dot_groups(srow[j], p.corr + m * groups, groups);
      }
      r *= p.a_scale[m];
      if (p.bias) r += p.bias[n];
      p.out[m * p.N + n] = r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// W4A16: one chunk is 16 packed bytes = 32 k. Each byte, zero-extended to a dword, becomes the
// word pair (low nibble, high nibble) and a vpermw table lookup turns it into two bf16 weights:
// the pair layout vdpbf16ps expects, matching the activations' natural order. Int32 lane l of
// a chunk covers k = 32c + 2l and 32c + 2l + 1.

template <int MB, int NB, int MODE, int PARTS>
QF_BF16 void w4a16_micro(const W4A16Args& p, int64_t m0, int64_t n0) {
  const int64_t nchunk = p.lda / 32;
  const int64_t full = p.kb / 16;
  const int64_t rest = p.kb - full * 16;
  const __mmask16 tail = (__mmask16)((1u << rest) - 1);
  const int64_t groups = p.s.groups;
  const int64_t period = MODE == kBcast ? p.s.group_size / 32 : 1;
  // bf16 bit patterns of the signed nibble values 0..7, -8..-1
  const __m512i table = _mm512_set_epi16(
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
      (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080, (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100,
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  const __m512i nib = _mm512_set1_epi32(0x000F000F);

  const uint8_t* wr[NB];
  const float* srow[NB];
  for (int j = 0; j < NB; ++j) {
    wr[j] = p.w + (n0 + j) * p.kb;
    srow[j] = p.s.w_scale + (n0 + j) * groups;
  }
  const uint16_t* ap[PARTS][MB];
  for (int t = 0; t < PARTS; ++t)
    for (int i = 0; i < MB; ++i) ap[t][i] = p.a_part[t] + (m0 + i) * p.lda;
  __m512 acc[MB][NB];
  __m512 accf[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      acc[i][j] = _mm512_setzero_ps();
      accf[i][j] = _mm512_setzero_ps();
    }

  int64_t left = period;
  for (int64_t c = 0; c < nchunk; ++c) {
    const __mmask16 km = c < full ? (__mmask16)0xFFFF : tail;
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) {
      if ((c & 3) == 0) prefetch_weights<MB, NB>(wr[0], wr, c >> 2, j, 16 * c);
      const __m512i x = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(km, wr[j] + 16 * c));
      const __m512i idx = _mm512_ternarylogic_epi32(x, _mm512_slli_epi32(x, 12), nib, 0xA8);  // (x | x << 12) & nib
      wv[j] = _mm512_permutexvar_epi16(idx, table);
    }
    for (int i = 0; i < MB; ++i)
      for (int t = 0; t < PARTS; ++t) {
        const __m512i av = _mm512_loadu_si512(ap[t][i] + 32 * c);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv[j], (__m512bh)av);
      }
    if (MODE != kChannel && (--left == 0 || c + 1 == nchunk)) {
      left = period;
      const int64_t g0 = MODE == kBcast ? c / period : (32 * c) / p.s.group_size;
      for (int j = 0; j < NB; ++j) {
        __m512 sv;
        if (MODE == kBcast) {
          sv = _mm512_set1_ps(srow[j][g0]);
        } else {
          const int64_t cnt = std::min<int64_t>(16, groups - g0);
          const __m512 raw = _mm512_maskz_loadu_ps((__mmask16)((1u << cnt) - 1), srow[j] + g0);
          sv = _mm512_permutexvar_ps(_mm512_loadu_si512(p.lane_group + 16 * c), raw);
        }
        for (int i = 0; i < MB; ++i) {
          accf[i][j] = _mm512_fmadd_ps(acc[i][j], sv, accf[i][j]);
          acc[i][j] = _mm512_setzero_ps();
        }
      }
    }
  }

  for (int i = 0; i < MB; ++i) {
    const int64_t m = m0 + i;
    for (int j = 0; j < NB; ++j) {
      const int64_t n = n0 + j;
      float r = MODE == kChannel ? _mm512_reduce_add_ps(acc[i][j]) * srow[j][0] : _mm512_reduce_add_ps(accf[i][j]);
      if (p.bias) r += p.bias[n];
      p.out[m * p.N + n] = r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// INT8: one chunk is 64 k; (w ^ 0x80) is w + 128 as an unsigned byte, so
// sum(w * a) = vpdpbusd(w + 128, a) - 128 * sum(a).

template <int MB, int NB>
QF_VNNI void int8_micro(const Int8Args& p, int64_t m0, int64_t n0) {
  const int64_t K = p.K;
  const int64_t nchunk = (K + 63) / 64;
  const int64_t full = K / 64;
  const __mmask64 tail = tail_mask64(K - full * 64);
  const __m512i x80 = _mm512_set1_epi8((char)0x80);
  const int8_t* wr[NB];
  const int8_t* ar[MB];
  for (int j = 0; j < NB; ++j) wr[j] = p.w + (n0 + j) * K;
  for (int i = 0; i < MB; ++i) ar[i] = p.a + (m0 + i) * K;
  __m512i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();

  for (int64_t c = 0; c < nchunk; ++c) {
    const __mmask64 km = c < full ? ~(__mmask64)0 : tail;
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) {
      prefetch_weights<MB, NB>(reinterpret_cast<const uint8_t*>(wr[0]), reinterpret_cast<const uint8_t* const*>(wr), c,
                               j, 64 * c);
      wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(km, wr[j] + 64 * c), x80);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512i av = _mm512_maskz_loadu_epi8(km, ar[i] + 64 * c);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], av);
    }
  }

  for (int i = 0; i < MB; ++i) {
    const int64_t m = m0 + i;
    for (int j = 0; j < NB; ++j) {
      const int64_t n = n0 + j;
      const int32_t r = _mm512_reduce_add_epi32(acc[i][j]) - p.a_sum[m];
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

// ---------------------------------------------------------------------------------------------
// Tile walkers: register blocks of MB activation rows x NB weight rows. The weight rows of a
// block stay in L1 while the activation blocks of the tile pass over them. A single row (GEMV)
// takes wider weight blocks: more rows stream side by side and nothing is reused anyway.

template <typename Args, template <int, int> class Micro>
struct Walk {
  static void gemv(const Args& p, int64_t m, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) Micro<1, 4>::run(p, m, n);
    switch (n1 - n) {
      case 3: Micro<1, 3>::run(p, m, n); break;
      case 2: Micro<1, 2>::run(p, m, n); break;
      case 1: Micro<1, 1>::run(p, m, n); break;
      default: break;
    }
  }
  template <int NB>
  static void rows(const Args& p, int64_t m0, int64_t m1, int64_t n) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) Micro<4, NB>::run(p, m, n);
    switch (m1 - m) {
      case 3: Micro<3, NB>::run(p, m, n); break;
      case 2: Micro<2, NB>::run(p, m, n); break;
      case 1: Micro<1, NB>::run(p, m, n); break;
      default: break;
    }
  }
  static void tile(const Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (m1 - m0 == 1) return gemv(p, m0, n0, n1);
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) rows<2>(p, m0, m1, n);
    if (n < n1) rows<1>(p, m0, m1, n);
  }
};

template <int MODE>
struct W4A8 {
  template <int MB, int NB>
  struct K {
    static void run(const W4A8Args& p, int64_t m, int64_t n) { w4a8_micro<MB, NB, MODE>(p, m, n); }
  };
};

template <int MODE, int PARTS>
struct W4A16 {
  template <int MB, int NB>
  struct K {
    static void run(const W4A16Args& p, int64_t m, int64_t n) { w4a16_micro<MB, NB, MODE, PARTS>(p, m, n); }
  };
};

template <int MODE>
void w4a16_tile_mode(const W4A16Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (p.parts) {
    case 1: return Walk<W4A16Args, W4A16<MODE, 1>::template K>::tile(p, m0, m1, n0, n1);
    case 2: return Walk<W4A16Args, W4A16<MODE, 2>::template K>::tile(p, m0, m1, n0, n1);
    default: return Walk<W4A16Args, W4A16<MODE, 3>::template K>::tile(p, m0, m1, n0, n1);
  }
}

template <int MB, int NB>
struct Int8K {
  static void run(const Int8Args& p, int64_t m, int64_t n) { int8_micro<MB, NB>(p, m, n); }
};

template <class Args>
int mode_of(const Args& p, int64_t chunk_k) {
  if (p.s.groups == 1) return kChannel;
  return p.s.group_size % chunk_k == 0 ? kBcast : kPerm;
}

}  // namespace

void w4a8_tile_avx512(const W4A8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (mode_of(p, 128)) {
    case kChannel: return Walk<W4A8Args, W4A8<kChannel>::K>::tile(p, m0, m1, n0, n1);
    case kBcast: return Walk<W4A8Args, W4A8<kBcast>::K>::tile(p, m0, m1, n0, n1);
    default: return Walk<W4A8Args, W4A8<kPerm>::K>::tile(p, m0, m1, n0, n1);
  }
}

void w4a16_tile_avx512(const W4A16Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (mode_of(p, 32)) {
    case kChannel: return w4a16_tile_mode<kChannel>(p, m0, m1, n0, n1);
    case kBcast: return w4a16_tile_mode<kBcast>(p, m0, m1, n0, n1);
    default: return w4a16_tile_mode<kPerm>(p, m0, m1, n0, n1);
  }
}

void int8_tile_avx512(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  Walk<Int8Args, Int8K>::tile(p, m0, m1, n0, n1);
}

#else  // not x86: the portable kernels serve every call

bool has_avx512_vnni() { return false; }
bool has_avx512_bf16() { return false; }
void w4a8_tile_avx512(const W4A8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  w4a8_tile_portable(p, m0, m1, n0, n1);
}
void w4a16_tile_avx512(const W4A16Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  w4a16_tile_portable(p, m0, m1, n0, n1);
}
void int8_tile_avx512(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int8_tile_portable(p, m0, m1, n0, n1);
}

#endif

}  // namespace cpu
}  // namespace qframe
