// x86 detection for the AVX-512 kernels; elsewhere (Arm, older compilers) they compile to nothing.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QF_X86 1
// GCC 12 flags its own AVX-512 header helpers (_mm512_undefined_*, _mm512_reduce_add_*) as reading
// an uninitialised value.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#else
#define QF_X86 0
#endif
