// Torch binding of the CPU low-bit GEMM kernels: operators torch.ops.qframe_cpu.*, registered
// when the library loads (module qframe._C, see module.cpp).
//
// Checks every tensor (device, dtype, shape, contiguity) with one-line messages, prepares the
// activations once per call (even/odd int8 split, bf16 hi/lo split, group sums), then spreads
// output tiles over torch's intra-op threads. The kernels themselves live in kernels_*.cpp.
// Only the ATen pieces in use are included: torch/extension.h would triple the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.h"
#include "parallel.h"

namespace qc = qframe::cpu;

namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << dtype_name(t.scalar_type()) << " " << t.sizes();
  return s.str();
}

void check_common(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined; pass a tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides(),
                    " for ", describe(t), "; call .contiguous()");
}

void check(const char* op, const at::Tensor& t, const char* name, at::ScalarType dt, int64_t dim, const char* shape) {
  check_common(op, t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == dt && t.dim() == dim, op, ": ", name, " must be ", dtype_name(dt), " ", shape,
                    ", got ", describe(t));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Packed int4 weights: uint8 [N, ceil(K / 2)]; returns N.
int64_t check_packed(const char* op, const at::Tensor& w_packed, int64_t K) {
  check(op, w_packed, "w_packed", at::kByte, 2, "[N, ceil(K / 2)]");
  const int64_t kb = ceil_div(K, 2);
  TORCH_CHECK_VALUE(w_packed.size(1) == kb, op, ": w_packed must be uint8 [N, ceil(K / 2)] = [N, ", kb,
                    "] for K = ", K, ", got ", describe(w_packed));
  return w_packed.size(0);
}

qc::Scales check_scales(const char* op, const at::Tensor& w_scale, int64_t N, int64_t K, int64_t group_size) {
  check_common(op, w_scale, "w_scale");
  TORCH_CHECK_VALUE(w_scale.scalar_type() == at::kFloat, op, ": w_scale must be float32, got ", describe(w_scale));
  qc::Scales s{w_scale.data_ptr<float>(), group_size, 1};
  if (group_size <= 0) {
    TORCH_CHECK_VALUE((w_scale.dim() == 1 && w_scale.size(0) == N) ||
                          (w_scale.dim() == 2 && w_scale.size(0) == N && w_scale.size(1) == 1),
                      op, ": per-channel w_scale (group_size <= 0) must be float32 [N] = [", N, "], got ",
                      describe(w_scale));
    s.group_size = 0;
    return s;
  }
  s.groups = ceil_div(K, group_size);
  TORCH_CHECK_VALUE(w_scale.dim() == 2 && w_scale.size(0) == N && w_scale.size(1) == s.groups, op,
                    ": w_scale for group_size ", group_size, " must be float32 [N, ceil(K / group_size)] = [", N,
                    ", ", s.groups, "], got ", describe(w_scale));
  return s;
}

// Bias as a contiguous float32 [N] (any floating dtype accepted), or undefined.
at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  const at::Tensor& b = *bias;
  TORCH_CHECK_VALUE(b.device().is_cpu(), op, ": bias must be a CPU tensor, got device ", b.device());
  TORCH_CHECK_VALUE(at::isFloatingType(b.scalar_type()) && b.dim() == 1 && b.size(0) == N, op,
                    ": bias must be a floating tensor [N] = [", N, "], got ", describe(b));
  return b.to(at::kFloat).contiguous();
}

// Threads for a call: torch's intra-op setting, one inside an enclosing parallel region.
int threads_for_call() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

// Runs tile(m0, m1, n0, n1) over the output in parallel. Items are (n tile, m tile) pairs in
// n-major order, claimed one at a time (parallel.h), so each weight tile stays hot in cache while
// its activation tiles pass over it.
template <class F>
void run_tiles(int64_t M, int64_t N, int64_t K, F&& tile) {
  const int64_t threads = threads_for_call();
  const int64_t mt = M <= 96 ? M : 64;
  const int64_t m_tiles = ceil_div(M, mt);
  const int64_t want_n_tiles = std::max<int64_t>(1, ceil_div(8 * threads, m_tiles));
  int64_t nt = ceil_div(ceil_div(N, want_n_tiles), 4) * 4;
  nt = std::min<int64_t>(std::max<int64_t>(nt, 4), M > 96 ? 128 : 64);
  const int64_t n_tiles = ceil_div(N, nt);
  const int64_t items = n_tiles * m_tiles;
  // Below ~1M multiply-adds spreading the work costs more than it saves.
  const int use = M * N * K < (1 << 20) ? 1 : (int)threads;
  qc::parallel_chunks(items, 1, use, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t ni = it / m_tiles, mi = it % m_tiles;
      tile(mi * mt, std::min(M, (mi + 1) * mt), ni * nt, std::min(N, (ni + 1) * nt));
    }
  });
}

template <class F>
void parallel_rows(int64_t M, int64_t K, F&& row) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1));
  qc::parallel_chunks(M, grain, threads_for_call(), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) row(m);
  });
}

// A 64-byte aligned scratch buffer of at least `bytes`, one per thread, kept between calls.
uint8_t* thread_scratch(int64_t bytes) {
  thread_local std::vector<uint8_t> buf;
  if ((int64_t)buf.size() < bytes + 64) buf.resize(bytes + 64);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<uint8_t*>((p + 63) & ~(uintptr_t)63);
}

// The packed-panel int8 GEMM over the whole output: work items are (weight panel, row tile) pairs
// in panel-major order; a thread repacks a panel only when its next item is on another one. Rows
// are split only when there are too few panels to keep every thread busy. `pack` / `tile` are the
// VNNI (int8_gemm_avx512.cpp) or AVX2 (int8_avx2.cpp) pair, `width` their panel width.
using PackFn = void (*)(const qc::Int8Args&, int64_t, int64_t, uint8_t*);
using PanelFn = void (*)(const qc::Int8Args&, int64_t, const uint8_t*, int64_t, int64_t, int64_t);

void run_int8_panels(const qc::Int8Args& p, int64_t width, PackFn pack, PanelFn tile) {
  const int64_t panels = ceil_div(p.N, width);
  const int64_t threads = threads_for_call();
  int64_t m_tiles = 1;
  if (panels < 2 * threads) m_tiles = std::max<int64_t>(1, std::min(ceil_div(2 * threads, panels), p.M / 48));
  const int64_t mt = ceil_div(p.M, m_tiles);
  const int64_t items = panels * m_tiles;
  const int64_t bytes = qc::int8_panel_bytes(p.K, width);
  const int use = p.M * p.N * p.K < (1 << 20) ? 1 : (int)threads;
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = calls.fetch_add(1, std::memory_order_relaxed) + 1;
  qc::parallel_chunks(items, 1, use, [&](int64_t begin, int64_t end) {
    uint8_t* packed = thread_scratch(bytes);
    thread_local uint64_t have_call = 0;  // which call and panel this thread's scratch holds
    thread_local int64_t have_panel = -1;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t ni = it / m_tiles, mi = it % m_tiles;
      if (have_call != call || have_panel != ni) {
        pack(p, width, ni * width, packed);
        have_call = call, have_panel = ni;
      }
      tile(p, width, packed, mi * mt, std::min(p.M, (mi + 1) * mt), ni * width);
    }
  });
}

// lane_group[c, l]: group of int32 lane l in chunk c (chunk of `chunk_k` k values, lanes of
// chunk_k / 16), relative to the chunk's first group.
at::Tensor lane_groups(int64_t nchunk, int64_t chunk_k, int64_t group_size) {
  auto t = at::zeros({nchunk, 16}, at::kInt);
  if (group_size <= 0) return t;
  int32_t* p = t.data_ptr<int32_t>();
  const int64_t lane_k = chunk_k / 16;
  for (int64_t c = 0; c < nchunk; ++c)
    for (int64_t l = 0; l < 16; ++l)
      p[c * 16 + l] = (int32_t)((c * chunk_k + l * lane_k) / group_size - (c * chunk_k) / group_size);
  return t;
}

inline uint16_t bf16_bits(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline float bf16_float(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------------------------------------

at::Tensor w4a8_mm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w_packed,
                   const at::Tensor& w_scale, int64_t group_size, const std::optional<at::Tensor>& bias,
                   bool portable) {
  const char* op = "w4a8_mm";
  check(op, a, "a", at::kChar, 2, "[M, K]");
  const int64_t M = a.size(0), K = a.size(1);
  TORCH_CHECK_VALUE(K >= 1, op, ": a must have K >= 1 columns, got ", describe(a));
  check(op, a_scale, "a_scale", at::kFloat, 1, "[M]");
  TORCH_CHECK_VALUE(a_scale.size(0) == M, op, ": a_scale must be float32 [M] = [", M, "], got ", describe(a_scale));
  const int64_t N = check_packed(op, w_packed, K), kb = ceil_div(K, 2);
  const qc::Scales s = check_scales(op, w_scale, N, K, group_size);
  const at::Tensor b = check_bias(op, bias, N);

  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;

  const bool vec = !portable && qc::has_avx512_vnni() && qc::w4a8_group_size_vectorised(s.group_size);
  qc::W4A8Args p{};
  p.M = M, p.N = N, p.K = K;
  p.w = w_packed.data_ptr<uint8_t>(), p.kb = kb;
  p.a = a.data_ptr<int8_t>();
  p.a_scale = a_scale.data_ptr<float>();
  p.s = s;
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();

  at::Tensor a_even, a_odd, corr, corr_i, lanes;
  if (vec) {
    const int64_t nchunk = ceil_div(kb, 64), lda = nchunk * 64, groups = s.groups;
    const int64_t gs = groups == 1 ? K : s.group_size;
    a_even = at::empty({M, lda}, at::kChar);
    a_odd = at::empty({M, lda}, at::kChar);
    corr = at::empty({M, groups}, at::kFloat);
    corr_i = at::empty({M}, at::kInt);
    lanes = lane_groups(nchunk, 128, groups == 1 ? 0 : s.group_size);
    int8_t* pe = a_even.data_ptr<int8_t>();
    int8_t* po = a_odd.data_ptr<int8_t>();
    float* pc = corr.data_ptr<float>();
    int32_t* pci = corr_i.data_ptr<int32_t>();
    const int8_t* pa = p.a;
    parallel_rows(M, K, [&](int64_t m) {
      const int8_t* x = pa + m * K;
      int8_t* e = pe + m * lda;
      int8_t* o = po + m * lda;
      const int64_t pairs = K / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        e[j] = x[2 * j];
        o[j] = x[2 * j + 1];
      }
      int64_t j = pairs;
      if (K & 1) e[j] = x[K - 1], o[j] = 0, ++j;
      std::memset(e + j, 0, lda - j);
      std::memset(o + j, 0, lda - j);
      int32_t total = 0;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * gs, k1 = std::min(K, (g + 1) * gs); k < k1; ++k) sum += x[k];
        pc[m * groups + g] = 8.f * (float)sum;
        total += sum;
      }
      pci[m] = 8 * total;
    });
    p.a_even = pe, p.a_odd = po, p.lda = lda;
    p.corr = pc, p.corr_i = pci;
    p.lane_group = lanes.data_ptr<int32_t>();
  }
  run_tiles(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (vec)
      qc::w4a8_tile_avx512(p, m0, m1, n0, n1);
    else
      qc::w4a8_tile_portable(p, m0, m1, n0, n1);
  });
  return out;
}

at::Tensor w4a16_mm(const at::Tensor& a, const at::Tensor& w_packed, const at::Tensor& w_scale, int64_t group_size,
                    const std::optional<at::Tensor>& bias, bool portable) {
  const char* op = "w4a16_mm";
  check_common(op, a, "a");
  const at::ScalarType dt = a.scalar_type();
  TORCH_CHECK_VALUE((dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat) && a.dim() == 2, op,
                    ": a must be bfloat16, float16 or float32 [M, K], got ", describe(a));
  const int64_t M = a.size(0), K = a.size(1);
  TORCH_CHECK_VALUE(K >= 1, op, ": a must have K >= 1 columns, got ", describe(a));
  const int64_t N = check_packed(op, w_packed, K), kb = ceil_div(K, 2);
  const qc::Scales s = check_scales(op, w_scale, N, K, group_size);
  const at::Tensor b = check_bias(op, bias, N);

  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out.to(dt);

  const bool vec = !portable && qc::has_avx512_bf16() && qc::w4a16_group_size_vectorised(s.group_size);
  qc::W4A16Args p{};
  p.M = M, p.N = N, p.K = K;
  p.w = w_packed.data_ptr<uint8_t>(), p.kb = kb;
  p.s = s;
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();

  at::Tensor a_f, parts, lanes;
  if (vec) {
    const int64_t nchunk = ceil_div(kb, 16), lda = nchunk * 32;
    lanes = lane_groups(nchunk, 32, s.groups == 1 ? 0 : s.group_size);
    p.lane_group = lanes.data_ptr<int32_t>();
    p.lda = lda;
    p.parts = dt == at::kBFloat16 ? 1 : dt == at::kHalf ? 2 : 3;
    if (dt == at::kBFloat16 && lda == K) {
      p.a_part[0] = reinterpret_cast<const uint16_t*>(a.data_ptr());  // already bf16, no padding needed
    } else {
      parts = at::empty({p.parts, M, lda}, at::kShort);
      uint16_t* base = reinterpret_cast<uint16_t*>(parts.data_ptr());
      for (int t = 0; t < p.parts; ++t) p.a_part[t] = base + t * M * lda;
      const int nparts = p.parts;
      const void* src = a.data_ptr();
      parallel_rows(M, K, [&](int64_t m) {
        uint16_t* row[3];
        for (int t = 0; t < nparts; ++t) row[t] = base + (t * M + m) * lda;
        if (dt == at::kBFloat16) {
          std::memcpy(row[0], static_cast<const uint16_t*>(src) + m * K, K * 2);
        } else {
          for (int64_t k = 0; k < K; ++k) {
            float x = dt == at::kFloat ? static_cast<const float*>(src)[m * K + k]
                                       : static_cast<float>(static_cast<const c10::Half*>(src)[m * K + k]);
            const bool finite = std::isfinite(x);
            for (int t = 0; t < nparts; ++t) {  // peel off bf16 terms: x = sum of the parts
              row[t][k] = bf16_bits(x);
              x = finite ? x - bf16_float(row[t][k]) : 0.f;
            }
          }
        }
        for (int t = 0; t < nparts; ++t) std::memset(row[t] + K, 0, (lda - K) * 2);
      });
    }
  } else {
    a_f = a.to(at::kFloat).contiguous();
    p.a = a_f.data_ptr<float>();
  }
  run_tiles(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (vec)
      qc::w4a16_tile_avx512(p, m0, m1, n0, n1);
    else
      qc::w4a16_tile_portable(p, m0, m1, n0, n1);
  });
  if (dt == at::kFloat) return out;
  // Round to the activations' dtype here rather than with out.to(dt), whose OpenMP team can stall
  // a short call on a busy machine (see parallel.h).
  at::Tensor res = at::empty({M, N}, a.options());
  const float* src = out.data_ptr<float>();
  void* dst = res.data_ptr();
  parallel_rows(M, N, [&](int64_t m) {
    if (dt == at::kBFloat16) {
      c10::BFloat16* d = static_cast<c10::BFloat16*>(dst) + m * N;
      for (int64_t n = 0; n < N; ++n) d[n] = c10::BFloat16(src[m * N + n]);
    } else {
      c10::Half* d = static_cast<c10::Half*>(dst) + m * N;
      for (int64_t n = 0; n < N; ++n) d[n] = c10::Half(src[m * N + n]);
    }
  });
  return res;
}

// Instruction sets of the int8 kernels (the `isa` argument; -1 picks the best this CPU has).
enum Isa : int64_t { kIsaAuto = -1, kIsaPortable = 0, kIsaAvx2 = 1, kIsaAvx512Vnni = 2, kIsaArmDotprod = 3 };

bool isa_supported(int64_t isa) {
  switch (isa) {
    case kIsaPortable: return true;
    case kIsaAvx2: return qc::has_avx2();
    case kIsaAvx512Vnni: return qc::has_avx512_vnni();
    case kIsaArmDotprod: return qc::has_arm_dotprod();
    default: return false;
  }
}

int64_t pick_isa(const char* op, int64_t isa, bool portable) {
  if (portable) return kIsaPortable;
  if (isa == kIsaAuto) {
    if (qc::has_avx512_vnni()) return kIsaAvx512Vnni;
    if (qc::has_arm_dotprod()) return kIsaArmDotprod;
    return qc::has_avx2() ? kIsaAvx2 : kIsaPortable;
  }
  TORCH_CHECK_VALUE(isa >= kIsaPortable && isa <= kIsaArmDotprod, op, ": isa must be -1 (best available), ",
                    "0 (portable), 1 (avx2), 2 (avx512_vnni) or 3 (arm_dotprod), got ", isa);
  TORCH_CHECK_VALUE(isa_supported(isa), op, ": isa ", isa, " is not supported by this CPU (it has: avx2 ",
                    qc::has_avx2(), ", avx512_vnni ", qc::has_avx512_vnni(), ", arm_dotprod ", qc::has_arm_dotprod(),
                    ")");
  return isa;
}

// The AVX2 kernel's activations: rows padded to a multiple of 4 bytes, codes -128 clamped to -127
// and their positions recorded per row (int8_avx2.cpp explains why).
struct Avx2Activations {
  at::Tensor a, off, ks;
};

Avx2Activations avx2_activations(qc::Int8Args& p) {
  const int64_t M = p.M, K = p.K, lda = ceil_div(K, 4) * 4;
  Avx2Activations r;
  r.a = at::empty({M, lda}, at::kChar);
  int8_t* dst = r.a.data_ptr<int8_t>();
  std::vector<int64_t> count(M + 1, 0);
  const int8_t* src = p.a;
  parallel_rows(M, K, [&](int64_t m) {
    const int8_t* x = src + m * K;
    int8_t* d = dst + m * lda;
    int64_t c = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = x[k];
      c += v == -128;
      d[k] = v == -128 ? (int8_t)-127 : v;
    }
    std::memset(d + K, 0, lda - K);
    count[m + 1] = c;
  });
  for (int64_t m = 0; m < M; ++m) count[m + 1] += count[m];
  if (count[M] > 0) {
    r.off = at::empty({M + 1}, at::kLong);
    r.ks = at::empty({count[M]}, at::kLong);
    int64_t* off = r.off.data_ptr<int64_t>();
    int64_t* ks = r.ks.data_ptr<int64_t>();
    std::memcpy(off, count.data(), (M + 1) * sizeof(int64_t));
    for (int64_t m = 0; m < M; ++m) {
      int64_t f = off[m];
      for (int64_t k = 0; k < K; ++k)
        if (src[m * K + k] == -128) ks[f++] = k;
    }
    p.fix_off = off, p.fix_k = ks;
  }
  p.a = dst, p.lda = lda;
  return r;
}

// int8 x int8 -> int32 (a_scale undefined) or the float epilogue, on the kernel for `isa`.
at::Tensor int8_mm_impl(const char* op, const at::Tensor& a, const at::Tensor* a_scale, const at::Tensor& w,
                        const at::Tensor* w_scale, const std::optional<at::Tensor>& bias, bool portable,
                        int64_t isa_arg) {
  check(op, a, "a", at::kChar, 2, "[M, K]");
  check(op, w, "w", at::kChar, 2, "[N, K]");
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == K, op, ": w must be int8 [N, K] with K = ", K, " (a's columns), got ", describe(w));
  const int64_t isa = pick_isa(op, isa_arg, portable);
  at::Tensor b;
  if (a_scale) {
    check(op, *a_scale, "a_scale", at::kFloat, 1, "[M]");
    TORCH_CHECK_VALUE(a_scale->size(0) == M, op, ": a_scale must be float32 [M] = [", M, "], got ",
                      describe(*a_scale));
    check(op, *w_scale, "w_scale", at::kFloat, 1, "[N]");
    TORCH_CHECK_VALUE(w_scale->size(0) == N, op, ": w_scale must be float32 [N] = [", N, "], got ",
                      describe(*w_scale));
    b = check_bias(op, bias, N);
  }
  at::Tensor out = at::empty({M, N}, a.options().dtype(a_scale ? at::kFloat : at::kInt));
  if (M == 0 || N == 0) return out;
  if (K == 0) return a_scale ? (b.defined() ? out.copy_(b.expand({M, N})) : out.zero_()) : out.zero_();
  const int8_t* pa = a.data_ptr<int8_t>();
  qc::Int8Args p{M, N, K, pa, w.data_ptr<int8_t>(), nullptr,
                 a_scale ? a_scale->data_ptr<float>() : nullptr,
                 w_scale ? w_scale->data_ptr<float>() : nullptr,
                 b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr(), K};
  if (isa == kIsaAvx2) {
    const Avx2Activations keep = avx2_activations(p);
    if (M >= qc::kInt8Avx2PanelMinM)
      run_int8_panels(p, qc::int8_avx2_panel_width(N), &qc::int8_pack_panel_avx2, &qc::int8_panel_tile_avx2);
    else
      run_tiles(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { qc::int8_tile_avx2(p, m0, m1, n0, n1); });
    return out;
  }
  if (isa == kIsaArmDotprod) {
    run_tiles(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { qc::int8_tile_dotprod(p, m0, m1, n0, n1); });
    return out;
  }
  const bool vec = isa == kIsaAvx512Vnni;
  at::Tensor a_sum = at::empty({M}, at::kInt);
  int32_t* ps = a_sum.data_ptr<int32_t>();
  p.a_sum = ps;
  parallel_rows(M, K, [&](int64_t m) {
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += pa[m * K + k];
    ps[m] = 128 * sum;
  });
  if (vec && M >= qc::kInt8PanelMinM) {
    at::Tensor a_pad;
    if (K % 4) {  // the panel kernel reads activations four bytes at a time: pad rows with zeros
      p.lda = ceil_div(K, 4) * 4;
      a_pad = at::zeros({M, p.lda}, at::kChar);
      int8_t* dst = a_pad.data_ptr<int8_t>();
      parallel_rows(M, K, [&](int64_t m) { std::memcpy(dst + m * p.lda, pa + m * K, K); });
      p.a = dst;
    }
    run_int8_panels(p, qc::int8_panel_width(N), &qc::int8_pack_panel_avx512, &qc::int8_panel_tile_avx512);
    return out;
  }
  run_tiles(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (vec)
      qc::int8_tile_avx512(p, m0, m1, n0, n1);
    else
      qc::int8_tile_portable(p, m0, m1, n0, n1);
  });
  return out;
}

at::Tensor int8_mm_i32(const at::Tensor& a, const at::Tensor& w, bool portable, int64_t isa) {
  return int8_mm_impl("int8_mm_i32", a, nullptr, w, nullptr, std::nullopt, portable, isa);
}

at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w, const at::Tensor& w_scale,
                   const std::optional<at::Tensor>& bias, bool portable, int64_t isa) {
  return int8_mm_impl("int8_mm", a, &a_scale, w, &w_scale, bias, portable, isa);
}

// acc (int32 [M, N]) * a_scale[:, None] * w_scale[None, :] + bias, written as float32 bits into
// acc's own storage (one pass, no allocation); the caller views it as float32.
void int8_epilogue_(at::Tensor& acc, const at::Tensor& a_scale, const at::Tensor& w_scale,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "int8_epilogue_";
  check(op, acc, "acc", at::kInt, 2, "[M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  check(op, a_scale, "a_scale", at::kFloat, 1, "[M]");
  TORCH_CHECK_VALUE(a_scale.size(0) == M, op, ": a_scale must be float32 [M] = [", M, "], got ", describe(a_scale));
  check(op, w_scale, "w_scale", at::kFloat, 1, "[N]");
  TORCH_CHECK_VALUE(w_scale.size(0) == N, op, ": w_scale must be float32 [N] = [", N, "], got ", describe(w_scale));
  const at::Tensor b = check_bias(op, bias, N);
  char* base = static_cast<char*>(acc.data_ptr());
  const float* as = a_scale.data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  parallel_rows(M, N, [&](int64_t m) {
    char* row = base + m * N * 4;
    const float s = as[m];
    for (int64_t n = 0; n < N; ++n) {
      int32_t v;
      std::memcpy(&v, row + 4 * n, 4);
      float f = (float)v * s * ws[n];
      if (pb) f += pb[n];
      std::memcpy(row + 4 * n, &f, 4);
    }
  });
}

int64_t features() {
  return (qc::has_avx512_vnni() ? 1 : 0) | (qc::has_avx512_bf16() ? 2 : 0) | (qc::has_avx2() ? 4 : 0) |
         (qc::has_arm_dotprod() ? 8 : 0);
}

}  // namespace

TORCH_LIBRARY(qframe_cpu, m) {
  m.def("w4a8_mm(Tensor a, Tensor a_scale, Tensor w_packed, Tensor w_scale, int group_size, Tensor? bias=None, "
        "bool portable=False) -> Tensor");
  m.def("w4a16_mm(Tensor a, Tensor w_packed, Tensor w_scale, int group_size, Tensor? bias=None, "
        "bool portable=False) -> Tensor");
  // isa: -1 the best this CPU has, 0 portable, 1 AVX2, 2 AVX-512 VNNI, 3 Arm dot product
  m.def("int8_mm_i32(Tensor a, Tensor w, bool portable=False, int isa=-1) -> Tensor");
  m.def("int8_mm(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias=None, bool portable=False, "
        "int isa=-1) -> Tensor");
  m.def("int8_epilogue_(Tensor(a!) acc, Tensor a_scale, Tensor w_scale, Tensor? bias=None) -> ()");
  // bit 0: AVX-512 VNNI kernels usable, 1: AVX-512 BF16, 2: AVX2, 3: Arm dot product
  m.def("features() -> int", &features);
}

TORCH_LIBRARY_IMPL(qframe_cpu, CPU, m) {
  m.impl("w4a8_mm", &w4a8_mm);
  m.impl("w4a16_mm", &w4a16_mm);
  m.impl("int8_mm_i32", &int8_mm_i32);
  m.impl("int8_mm", &int8_mm);
  m.impl("int8_epilogue_", &int8_epilogue_);
}
