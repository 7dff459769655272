// simd_fusion_kernel.h for AVX2 with FMA: 8 floats or 4 doubles a register, blocks of 4 weight rows x
// 3 registers of pixels (12 accumulators, 3 pixel registers and a weight of the 16 registers; a
// 24-pixel float tile).
#include "simd_fusion.h"
#if defined(GK_SIMD_FUSION)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fusion_math.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace gk {
namespace {
inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256d load(const double* p) { return _mm256_loadu_pd(p); }
inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store(double* p, __m256d v) { _mm256_storeu_pd(p, v); }
inline __m256 set1(float x) { return _mm256_set1_ps(x); }
inline __m256d set1(double x) { return _mm256_set1_pd(x); }
inline __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256d fma(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
template <class T>
constexpr int kLanes = 32 / sizeof(T);
constexpr int kRows = 4, kVectors = 3;
}  // namespace
}  // namespace gk

#define GK_SIMD_ISA avx2
#include "simd_fusion_kernel.h"

#pragma GCC pop_options
#endif  // GK_SIMD_FUSION
