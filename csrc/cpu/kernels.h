// Low-bit GEMM kernels for the CPU: argument blocks and tile entry points.
//
// The kernels take raw pointers and compute one output tile [m0, m1) x [n0, n1); the binding
// (bindings.cpp) checks tensors, prepares activations once per call and spreads tiles over
// threads. Kernel files include no torch header, which keeps them quick to compile.
#pragma once

#include <cstdint>

namespace qframe {
namespace cpu {

// Weight scale layout shared by the packed-int4 kernels: per-channel when group_size <= 0
// (groups == 1), else `groups` = ceil(K / group_size) scales per output row.
struct Scales {
  const float* w_scale;  // [N] or [N, groups]
  int64_t group_size;    // <= 0: per-channel
  int64_t groups;
};

// out[m, n] = a_scale[m] * sum_g w_scale[n, g] * sum_{k in g} w[n, k] * a[m, k] + bias[n]
struct W4A8Args {
  int64_t M, N, K;
  const uint8_t* w;        // [N, kb] packed int4, kb = ceil(K / 2)
  int64_t kb;
  const int8_t* a;         // [M, K] (portable path)
  // AVX-512 path: activations split into even-k and odd-k bytes, zero padded to `lda` bytes
  // (a multiple of 64), so byte j of a packed row meets a_even[j] (low nibble) and a_odd[j].
  const int8_t* a_even;
  const int8_t* a_odd;
  int64_t lda;
  const float* a_scale;    // [M]
  Scales s;
  // 8 * sum of a over each group, [M, groups] (per-channel: [M]); undoes the +8 offset that
  // makes nibbles unsigned for vpdpbusd.
  const float* corr;
  const int32_t* corr_i;   // [M] 8 * sum_k a[m, k], exact, for the per-channel path
  const int32_t* lane_group;  // [lda / 64, 16]: group of each int32 lane of a 64-byte chunk, minus the chunk's first group
  const float* bias;       // [N] or nullptr
  float* out;              // [M, N]
};

// out[m, n] = sum_g w_scale[n, g] * sum_{k in g} w[n, k] * a[m, k] + bias[n], fp32 accumulation.
struct W4A16Args {
  int64_t M, N, K;
  const uint8_t* w;        // [N, kb]
  int64_t kb;
  const float* a;          // [M, K] fp32 (portable path)
  // AVX-512 BF16 path: activations as `parts` bf16 terms whose sum is the activation (bit
  // patterns, zero padded to `lda` elements, a multiple of 32): bf16 needs one term, fp16 two,
  // fp32 three (8 + 8 + 8 significand bits), so the products are those of the input precision.
  const uint16_t* a_part[3];
  int parts;
  int64_t lda;
  Scales s;
  const int32_t* lane_group;  // [lda / 32, 16]
  const float* bias;
  float* out;              // [M, N] fp32
};

// out = a @ w.T over int8 with int32 accumulation; with a_scale != nullptr also the float epilogue.
struct Int8Args {
  int64_t M, N, K;
  const int8_t* a;         // [M, K]
  const int8_t* w;         // [N, K]
  const int32_t* a_sum;    // [M] 128 * sum_k a[m, k]
  const float* a_scale;    // [M] or nullptr (int32 output)
  const float* w_scale;    // [N]
  const float* bias;       // [N] or nullptr
  void* out;               // int32 [M, N] when a_scale is nullptr, else float [M, N]
  int64_t lda;             // row stride of a in bytes (panel kernel: K rounded up to a multiple of 4)
  // AVX2 kernel only (int8_avx2.cpp): a holds codes clamped to [-127, 127]; row m had -128 at the
  // positions fix_k[fix_off[m] .. fix_off[m + 1]). nullptr when no row had any.
  const int64_t* fix_off = nullptr;  // [M + 1]
  const int64_t* fix_k = nullptr;
};

// CPU features the fast paths need, checked at run time (false where the architecture differs).
bool has_avx512_vnni();
bool has_avx512_bf16();
bool has_avx2();
bool has_arm_dotprod();

// Tile kernels. *_avx512 require the features above; *_portable run anywhere.
void w4a8_tile_avx512(const W4A8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void w4a8_tile_portable(const W4A8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void w4a16_tile_avx512(const W4A16Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void w4a16_tile_portable(const W4A16Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void int8_tile_avx512(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void int8_tile_portable(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// int8 GEMM over packed weight panels (int8_gemm_avx512.cpp), for M >= kInt8PanelMinM rows:
// int8_pack_panel_avx512 repacks output channels [n0, n0 + width) into `dst`
// (int8_panel_bytes(K, width) bytes), int8_panel_tile_avx512 multiplies rows [m0, m1) by it.
constexpr int64_t kInt8PanelMinM = 8;
int64_t int8_panel_width(int64_t N);
int64_t int8_panel_bytes(int64_t K, int64_t width);
void int8_pack_panel_avx512(const Int8Args& p, int64_t width, int64_t n0, uint8_t* dst);
void int8_panel_tile_avx512(const Int8Args& p, int64_t width, const uint8_t* packed, int64_t m0, int64_t m1,
                            int64_t n0);

// int8 GEMM for AVX2 without VNNI (int8_avx2.cpp): u8 x s8 pairs (vpmaddubsw) on |w| and
// a * sign(w); same panel scheme as above with 8 or 16 channels per panel.
// From this many rows the AVX2 panels beat the dot-product tile (repacking costs as much as
// ~30 rows of products on 2-core Zen 4 at K = 576..2304; benchmarks/cpu_int8_table.py).
constexpr int64_t kInt8Avx2PanelMinM = 64;
int64_t int8_avx2_panel_width(int64_t N);
void int8_pack_panel_avx2(const Int8Args& p, int64_t width, int64_t n0, uint8_t* dst);
void int8_tile_avx2(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);  // few rows
void int8_panel_tile_avx2(const Int8Args& p, int64_t width, const uint8_t* packed, int64_t m0, int64_t m1,
                          int64_t n0);

// int8 tile kernel for Arm with the dot-product extension (int8_arm.cpp; reads a with row stride lda).
void int8_tile_dotprod(const Int8Args& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// Whether the AVX-512 kernels handle this group size (others take the portable path).
inline bool w4a8_group_size_vectorised(int64_t group_size) {
  return group_size <= 0 || group_size % 8 == 0;
}
inline bool w4a16_group_size_vectorised(int64_t group_size) {
  return group_size <= 0 || group_size % 2 == 0;
}

}  // namespace cpu
}  // namespace qframe
