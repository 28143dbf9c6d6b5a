// Checks the Arm dot-product int8 tile kernel (csrc/cpu/int8_arm.cpp) against the portable one,
// bit for bit, on random inputs: int32 output and the float epilogue. Built for aarch64 by
// tests/kernels/test_arm_cross.py and run under qemu-user where it is installed.
// Usage: arm_int8_check SEED; prints one line per shape and exits non-zero on any mismatch.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"

using qframe::cpu::Int8Args;

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? (unsigned)std::strtoul(argv[1], nullptr, 10) : 1u;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> code(-128, 127);
  std::uniform_real_distribution<float> unit(0.5f, 1.5f);
  const int64_t shapes[][3] = {{1, 16, 4}, {1, 37, 5}, {3, 64, 9}, {7, 130, 17}, {16, 1152, 64}, {5, 3, 7}};
  int bad = 0;
  std::printf("has_arm_dotprod %d\n", (int)qframe::cpu::has_arm_dotprod());
  for (const auto& s : shapes) {
    const int64_t M = s[0], K = s[1], N = s[2];
    std::vector<int8_t> a(M * K), w(N * K);
    for (auto& x : a) x = (int8_t)code(rng);
    for (auto& x : w) x = (int8_t)code(rng);
    a[0] = -128, w[0] = -128;  // the extreme product
    std::vector<float> as(M), ws(N), bias(N);
    for (auto& x : as) x = unit(rng);
    for (auto& x : ws) x = unit(rng);
    for (auto& x : bias) x = unit(rng) - 1.0f;
    for (int fl = 0; fl < 2; ++fl) {
      std::vector<int32_t> oi(M * N), ri(M * N);
      std::vector<float> of(M * N), rf(M * N);
      Int8Args p{M, N, K, a.data(), w.data(), nullptr, fl ? as.data() : nullptr, fl ? ws.data() : nullptr,
                 fl ? bias.data() : nullptr, fl ? (void*)of.data() : (void*)oi.data(), K};
      Int8Args r = p;
      r.out = fl ? (void*)rf.data() : (void*)ri.data();
      qframe::cpu::int8_tile_dotprod(p, 0, M, 0, N);
      qframe::cpu::int8_tile_portable(r, 0, M, 0, N);
      const bool same = fl ? std::memcmp(of.data(), rf.data(), M * N * 4) == 0
                           : std::memcmp(oi.data(), ri.data(), M * N * 4) == 0;
      // an independent int64 check of the int32 output
      bool exact = true;
      if (!fl)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            int64_t t = 0;
            for (int64_t k = 0; k < K; ++k) t += (int64_t)a[m * K + k] * w[n * K + k];
            exact = exact && t == oi[m * N + n];
          }
      std::printf("M=%lld K=%lld N=%lld %s: %s\n", (long long)M, (long long)K, (long long)N, fl ? "float" : "int32",
                  same && exact ? "ok" : "MISMATCH");
      bad += !(same && exact);
    }
  }
  return bad ? 1 : 0;
}
