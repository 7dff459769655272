// The host path's fused forward and backward for narrow layers: both directions of a tile of pixels in
// one pass, every intermediate in the core's caches, on explicit SIMD registers.
//
// The tile is held transposed, channels x pixels, so that each SIMD register holds one channel of
// consecutive pixels. Then every per-pixel step is lane-wise: the softmax over the channels, the per
// head sums and the gates need no horizontal reduction, and the head width does not matter. A product
// out = W x (W as the parameters store it, N x K row-major; x and out K x T and N x T) is a
// register-blocked loop: kRows rows of W, each weight broadcast, times kVectors registers of pixels;
// the backward's input gradients read W's columns the same way (W^T x), and its weight gradients are
// blocks of rows of a channel-major gradient times registers of a pixel-major operand, summed over the
// tile's pixels. The forward does the 7 C^2 multiply-adds per pixel and direction of SPEC §1's
// identities, the value identity included: per head j, out_j = Wv_j (o + a_j (v_noise + s - o)) + bv_j,
// one product on a per-head input formed as the product reads it (see docs/spec.md); the backward
// recomputes all but the output product from the forward's gates (6 C^2) and does 14 C^2 of gradients.
//
// The kernels (simd_fusion_kernel.h) are compiled once per instruction set, each in its own file under
// `#pragma GCC target` (simd_fusion_avx512.cpp, simd_fusion_avx2.cpp); simd_fusion.cpp picks one at run
// time and spreads the tiles over the intra-op threads.
#pragma once

#include <cstdint>

// x86-64 with GCC (the `#pragma GCC target` files and `__builtin_shuffle`); elsewhere no instruction set
// is compiled, and the chain runs every call.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GK_SIMD_FUSION 1
#endif

namespace gk {

// The 14 parameters (fusion_params.h) as stored, contiguous: P is const T* for the parameters, T* for
// their gradients.
template <class P>
struct SimdParamSet {
  P fc1_weight;  // (C, 2C)
  P fc1_bias;
  P fc2_weight;  // (C, C)
  P fc2_bias;
  P k_noise;  // (2, C)
  P v_noise;  // (2, C)
  P in_proj_weight[2];  // (3C, C): Wq, Wk, Wv
  P in_proj_bias[2];    // (3C,)
  P out_proj_weight[2];  // (C, C)
  P out_proj_bias[2];
};

// The layer, shared by both directions of the call.
template <class T>
struct SimdLayer {
  SimdParamSet<const T*> p;
  int64_t pixels;
  int channels, heads;
  T scale;  // 1 / sqrt(C / heads)
};

// The forward's products a training forward keeps for the backward, which then recomputes none of its
// 6 C^2 multiply-adds per pixel and direction: per direction fc1's output u, the relation r, q
// (without its bias), dk and the mixed values. One (pixels rounded up to kSimdSavedPixelMultiple, C)
// tensor each (so 10, each the size of an input: the allocator reuses blocks of that size, where
// one large tensor would take fresh pages from the system on every forward), tile t's C x tile block
// at t * tile * C, channel-major as the kernel holds it (no transposes either way). Every instruction
// set's tile divides the multiple, so the shapes do not depend on which one runs.
constexpr int kSimdSavedPlanes = 5;
constexpr int64_t kSimdSavedPixelMultiple = 48;
inline int64_t simd_saved_pixels(int64_t pixels) {
  return (pixels + kSimdSavedPixelMultiple - 1) / kSimdSavedPixelMultiple * kSimdSavedPixelMultiple;
}
// [direction][plane]: all null where nothing is saved.
template <class P>
using SimdSaved = P[2][kSimdSavedPlanes];

// A forward: x, y (M, C) row-major; gate (2, M, heads) written; saved written unless null. T is float
// or double (the gates' type too).
template <class T>
struct SimdForwardArgs {
  SimdLayer<T> layer;
  const T* x[2];
  T* y[2];
  T* gate;
  SimdSaved<T*> saved;
};

// A backward: from grad_y (M, C), the forward's gates and, unless null, its saved products, grad_x
// (M, C) written and the parameters' gradients added to `grads` (a thread's own sums, one set per
// thread).
template <class T>
struct SimdBackwardArgs {
  SimdLayer<T> layer;
  const T* x[2];
  const T* grad_y[2];
  const T* gate;
  SimdSaved<const T*> saved;
  T* grad_x[2];
};

// The instruction sets the kernel is compiled for.
enum class SimdIsa { Avx512, Avx2 };

// Per instruction set, in each file's namespace (simd_fusion_avx512.cpp, simd_fusion_avx2.cpp): pixels
// a tile (tiles [begin, end) cover pixels [begin * tile, min(end * tile, M))) and elements a register;
// the scratch a thread's run of tiles takes, in elements of T (64-byte aligned); the runs of tiles, the
// backward adding its parameters' gradients to `grads`.
#define GK_SIMD_ENTRY_POINTS                                                                                 \
  template <class T>                                                                                        \
  int64_t tile();                                                                                           \
  template <class T>                                                                                        \
  int64_t lanes();                                                                                          \
  template <class T>                                                                                        \
  int64_t forward_scratch_elements(int channels, int heads);                                                \
  template <class T>                                                                                        \
  int64_t backward_scratch_elements(int channels, int heads);                                               \
  template <class T>                                                                                        \
  void forward_tiles(const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch);              \
  template <class T>                                                                                        \
  void backward_tiles(const SimdBackwardArgs<T>& args, int64_t begin, int64_t end, T* scratch,              \
                      const SimdParamSet<T*>& grads);
namespace avx512 {
GK_SIMD_ENTRY_POINTS
}  // namespace avx512
namespace avx2 {
GK_SIMD_ENTRY_POINTS
}  // namespace avx2
#undef GK_SIMD_ENTRY_POINTS

}  // namespace gk
