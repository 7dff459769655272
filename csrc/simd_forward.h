// The host path's fused forward for narrow layers: both directions of a tile of pixels in one pass,
// every intermediate in the core's caches, on explicit SIMD registers.
//
// The tile is held transposed, channels x pixels, so that each SIMD register holds one channel of
// consecutive pixels. Then every per-pixel step is lane-wise: the softmax over the channels, the per
// head sums and the gates need no horizontal reduction, and the head width does not matter. A product
// out = W x (W as the parameters store it, N x K row-major; x and out K x T and N x T) is a
// register-blocked loop: kRows rows of W, each weight broadcast, times kVectors registers of pixels.
// It does the 7 C^2 multiply-adds per pixel and direction of SPEC §1's identities, the value identity
// included: per head j, out_j = Wv_j (o + a_j (v_noise + s - o)) + bv_j, one product on a per-head input
// the tile forms after its gates (see docs/spec.md).
//
// The kernel (simd_forward_kernel.h) is compiled once per instruction set, each in its own file under
// `#pragma GCC target` (simd_forward_avx512.cpp, simd_forward_avx2.cpp); fusion_host.cpp picks one at
// run time (simd_forward_isa) and spreads the tiles over the intra-op threads.
#pragma once

#include <cstdint>

namespace gk {

// One call: x, y (M, C) row-major; gate (2, M, heads); the parameters as stored (fusion_params.h),
// contiguous. T is float or double (the gates' type too).
template <class T>
struct SimdForwardArgs {
  const T* x[2];
  T* y[2];
  T* gate;
  const T* fc1_weight;  // (C, 2C)
  const T* fc1_bias;
  const T* fc2_weight;  // (C, C)
  const T* fc2_bias;
  const T* k_noise;  // (2, C)
  const T* v_noise;  // (2, C)
  const T* in_proj_weight[2];  // (3C, C): Wq, Wk, Wv
  const T* in_proj_bias[2];    // (3C,)
  const T* out_proj_weight[2];  // (C, C)
  const T* out_proj_bias[2];
  int64_t pixels;
  int channels, heads;
  T scale;  // 1 / sqrt(C / heads)
};

// The instruction sets the kernel is compiled for.
enum class SimdIsa { Avx512, Avx2 };

// Pixels per tile: tiles [begin, end) cover pixels [begin * tile, min(end * tile, M)).
template <class T>
int64_t simd_forward_tile(SimdIsa isa);
// Scratch per thread, in elements of T.
template <class T>
int64_t simd_forward_scratch(SimdIsa isa, int channels, int heads);
// Runs tiles [begin, end) with `scratch` (simd_forward_scratch elements, 64-byte aligned).
template <class T>
void simd_forward_tiles(SimdIsa isa, const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch);

// Per instruction set (simd_forward_avx512.cpp, simd_forward_avx2.cpp).
namespace avx512 {
template <class T>
int64_t tile();
template <class T>
void tiles(const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch);
}  // namespace avx512
namespace avx2 {
template <class T>
int64_t tile();
template <class T>
void tiles(const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch);
}  // namespace avx2

}  // namespace gk
