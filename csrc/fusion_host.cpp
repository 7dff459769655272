// The host C++ path: serves `backend="cuda"` for CPU tensors.
//
// float32 and float64 at narrow layers (C < 256, see tiled()) run the whole chain of fusion_api.cpp
// (GEMMs and row stages) on tiles of a few hundred pixels (about 1 MiB of intermediates), a
// contiguous run of tiles per intra-op thread, so that a GEMM's output is read by the next row
// stage while it is still in cache: with the untiled
// chain the GEMMs at C=64 are bound by memory, not arithmetic, and each row stage is another pass
// over DRAM. The tile GEMMs are at::mm_out / addmm_ on views of the thread's own buffers; the row
// stages are those of fusion_math.h, compiled twice, for the x86-64 baseline and for AVX2+FMA, and
// picked at run time by torch's own CPU capability (so ATEN_CPU_CAPABILITY=default selects the
// baseline code). The backward sums the weight gradients of its tiles per thread, then over threads
// in thread order: deterministic for a given thread count.
//
// Wide layers take the untiled chain of fusion_api.cpp (whole-tensor GEMMs, row stages spread over
// the threads), and so do float16 and bfloat16, whose GEMMs then round each product once rather than
// once per tile.
//
// When asked, the forward also returns its GEMM outputs (csrc/fusion_api.h, "activations"), and the
// backward then reads them instead of recomputing them; both chains store them in the same layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "fusion_api.h"

namespace gk {
namespace {

// ---- row stages -------------------------------------------------------------------------------

template <class StageT>
constexpr bool loops_over_heads() {
  return std::is_same_v<StageT, MixForward> || std::is_same_v<StageT, MixBackward>;
}

// One row; the mix stages with the head width as a compile-time constant (see fusion_math.h).
template <class StageT, class T, int kHeadWidth>
inline void run_row(const FusionBuffers& b, int64_t row) {
  if constexpr (loops_over_heads<StageT>()) {
    StageT::template run<SerialTeam, T, kHeadWidth>(SerialTeam{}, b, row);
  } else {
    StageT::template run<SerialTeam, T>(SerialTeam{}, b, row);
  }
}

template <class StageT, class T, int kHeadWidth>
void rows_baseline(const FusionBuffers& b, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) run_row<StageT, T, kHeadWidth>(b, row);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define GK_HAVE_AVX2_ROWS 1
// The same loop for CPUs with AVX2 and FMA: GCC inlines the stage (compiled for the baseline ISA,
// a subset of this one) and vectorizes its channel loops eight floats wide.
template <class StageT, class T, int kHeadWidth>
__attribute__((target("avx2,fma"))) void rows_avx2(const FusionBuffers& b, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) run_row<StageT, T, kHeadWidth>(b, row);
}
#endif

bool use_avx2() {
#if defined(GK_HAVE_AVX2_ROWS)
  const std::string capability = at::get_cpu_capability();
  return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <class StageT, class T, int kHeadWidth>
void run_rows_of_width(const FusionBuffers& b, int64_t begin, int64_t end) {
#if defined(GK_HAVE_AVX2_ROWS)
  static const bool avx2 = use_avx2();
  if (avx2) return rows_avx2<StageT, T, kHeadWidth>(b, begin, end);
#endif
  rows_baseline<StageT, T, kHeadWidth>(b, begin, end);
}

template <class StageT, class T>
void run_rows(const FusionBuffers& b, int64_t begin, int64_t end) {
  if constexpr (loops_over_heads<StageT>()) {
    // The head widths of the usual configurations (C = 64 to 512, 1 to 8 heads, or width 32/64).
    switch (b.channels / b.heads) {
      case 8: return run_rows_of_width<StageT, T, 8>(b, begin, end);
      case 16: return run_rows_of_width<StageT, T, 16>(b, begin, end);
      case 32: return run_rows_of_width<StageT, T, 32>(b, begin, end);
      case 40: return run_rows_of_width<StageT, T, 40>(b, begin, end);
      case 64: return run_rows_of_width<StageT, T, 64>(b, begin, end);
      default: break;
    }
  }
  run_rows_of_width<StageT, T, 0>(b, begin, end);
}

// The untiled chain's runner: rows spread over the intra-op threads.
template <class StageT, class T>
void run_rows_parallel(const FusionBuffers& b) {
  // About 16K channel-elements per task: enough to amortise the task, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 16384 / b.channels);
  at::parallel_for(0, 2 * b.pixels, grain, [&](int64_t begin, int64_t end) { run_rows<StageT, T>(b, begin, end); });
}

template <class T>
void run_stage(Stage stage, const FusionBuffers& b) {
  switch (stage) {
    case Stage::HiddenForward: return run_rows_parallel<HiddenForward, T>(b);
    case Stage::RelationForward: return run_rows_parallel<RelationForward, T>(b);
    case Stage::MixForward: return run_rows_parallel<MixForward, T>(b);
    case Stage::MixBackward: return run_rows_parallel<MixBackward, T>(b);
    case Stage::RelationBackward: return run_rows_parallel<RelationBackward, T>(b);
    case Stage::HiddenBackward: return run_rows_parallel<HiddenBackward, T>(b);
  }
}

// The untiled chain's stages (see tiled()).
void host_stage(Stage stage, at::ScalarType dtype, const FusionBuffers& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gemini_kernels_host_stage",
                                  [&] { run_stage<scalar_t>(stage, b); });
}

// ---- tile GEMMs: at::mm_out / addmm_ on views of the tile buffers (so MKL's sgemm, single-threaded
// inside the parallel region), under InferenceMode to keep the dispatch short ----

template <class T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out (rows, n) = beta * out + a (rows, k) @ w^T, w (n, k); beta is 0 or 1
template <class T>
void gemm_abt(int64_t rows, int64_t n, int64_t k, const T* a, int64_t lda, const T* w, int64_t ldw, T beta, T* out,
              int64_t ldo) {
  at::Tensor o = matrix(out, rows, n, ldo);
  if (beta == T(0)) {
    at::mm_out(o, matrix(a, rows, k, lda), matrix(w, n, k, ldw).t());
  } else {
    o.addmm_(matrix(a, rows, k, lda), matrix(w, n, k, ldw).t());
  }
}

// out (rows, n) = beta * out + a (rows, k) @ w, w (k, n); beta is 0 or 1
template <class T>
void gemm_ab(int64_t rows, int64_t n, int64_t k, const T* a, int64_t lda, const T* w, int64_t ldw, T beta, T* out,
             int64_t ldo) {
  at::Tensor o = matrix(out, rows, n, ldo);
  if (beta == T(0)) {
    at::mm_out(o, matrix(a, rows, k, lda), matrix(w, k, n, ldw));
  } else {
    o.addmm_(matrix(a, rows, k, lda), matrix(w, k, n, ldw));
  }
}

// out (p, q) += a^T @ b, a (rows, p), b (rows, q)
template <class T>
void gemm_atb_accumulate(int64_t rows, int64_t p, int64_t q, const T* a, int64_t lda, const T* b, int64_t ldb, T* out) {
  matrix(out, p, q, q).addmm_(matrix(a, rows, p, lda).t(), matrix(b, rows, q, ldb));
}

// sums (n,) += column sums of a (rows, n)
template <class T>
void add_column_sums(int64_t rows, int64_t n, const T* a, int64_t lda, T* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = a + r * lda;
    for (int64_t c = 0; c < n; ++c) sums[c] += row[c];
  }
}

// Pixels per tile, for tiles of about 1 MiB of intermediates (per_pixel_elements C-wide rows each).
// Measured on a 2-core EPYC (512 KiB L2 per core, 32 MiB L3): 384 KiB tiles, which fit L2, run 10-15%
// slower than 1 MiB ones, whose longer GEMMs amortise MKL's packing of the weights; 2 MiB and more
// are slower again. At least kMinTilePixels, though: each tile GEMM repacks its C x C weights, work
// that only a long enough tile amortises (when wide layers were tiled too, 16-pixel tiles at C=512
// made the backward 2.3x slower than the oracle's untiled GEMMs). Then shortened so that every
// thread gets about as many tiles as the others (three 256-pixel tiles on two threads left one idle
// a third of the time), but not below kMinEvenedPixels: with many threads and few pixels, an idle
// thread costs less than tiles too short to amortise the packing.
int64_t tile_pixels(int64_t M, int64_t C, int64_t per_pixel_elements, size_t element_size) {
  constexpr int64_t kTileBytes = 1024 * 1024;
  constexpr int64_t kMinTilePixels = 256;
  constexpr int64_t kMinEvenedPixels = 64;
  const int64_t cache_pixels = kTileBytes / (per_pixel_elements * C * static_cast<int64_t>(element_size));
  const int64_t most = std::max<int64_t>(kMinTilePixels, cache_pixels / 16 * 16);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tiles = ((M + most - 1) / most + threads - 1) / threads * threads;
  return std::max<int64_t>(kMinEvenedPixels, ((M + tiles - 1) / tiles + 15) / 16 * 16);
}

template <class T>
const T* rows_of(const at::Tensor& t, int64_t p0, int64_t C) {
  return t.const_data_ptr<T>() + p0 * C;
}

// ---- tiled forward ----------------------------------------------------------------------------

// Copies the rows [p0, p0 + n) of both directions between a (2, n, C) tile and a (2, M, C) tensor.
template <class T>
void copy_tile_rows(T* to, int64_t to_direction_stride, const T* from, int64_t from_direction_stride, int64_t n,
                    int64_t C) {
  for (int d = 0; d < 2; ++d)
    std::memcpy(to + d * to_direction_stride, from + d * from_direction_stride, n * C * sizeof(T));
}

template <class T>
ForwardResult tiled_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                            bool save_activations) {
  using A = typename Acc<T>::type;
  const int64_t C = x0.size(-1);
  const int64_t M = x0.numel() / C;
  const int64_t H = num_heads;
  const PackedWeights w = cached_pack_weights(params, C);
  const at::Tensor x[2] = {x0.contiguous().view({M, C}), x1.contiguous().view({M, C})};
  const at::Tensor w2 = w.w2.contiguous();
  // In the inputs' shape, not views of (M, C) tensors (see fusion_forward in fusion_api.cpp).
  const at::Tensor out[2] = {at::empty(x0.sizes(), x0.options()), at::empty(x1.sizes(), x1.options())};
  at::Tensor y[2] = {out[0].view({M, C}), out[1].view({M, C})};
  at::Tensor gate = at::empty(gate_shape(x0.sizes(), H), x0.options().dtype(accumulation_type(x0.scalar_type())));
  std::vector<at::Tensor> saved;  // g[0], g[1], z, dk (check_activations); the tiles write g there directly
  if (save_activations)
    saved = {at::empty({M, kGBlocks * C}, x0.options()), at::empty({M, kGBlocks * C}, x0.options()),
             at::empty({2, M, C}, x0.options()), at::empty({2, M, C}, x0.options())};
  const FusionBuffers base = parameter_buffers(w, C, H);
  const T* wx = w.wx.const_data_ptr<T>();
  const T* wk = w.wk.const_data_ptr<T>();
  const T* wo = w.wo.const_data_ptr<T>();
  A* gate_out = gate.data_ptr<A>();

  const int64_t P = tile_pixels(M, C, 14, sizeof(T));
  const int64_t tiles = (M + P - 1) / P;
  at::parallel_for(0, tiles, 1, [&](int64_t first_tile, int64_t end_tile) {
    const c10::InferenceMode inference_mode;
    // g[0], g[1] (P, 5C) unless saved; hidden, then e, then mixed (2, P, C); z, then dk (2, P, C);
    // gates (2, P, H)
    const int64_t g_elements = save_activations ? 0 : P * 10 * C;
    std::vector<T> scratch(g_elements + P * 4 * C);
    std::vector<A> gate_tile(2 * P * H);
    T* hidden = scratch.data() + g_elements;
    T* z = hidden + 2 * P * C;
    for (int64_t tile = first_tile; tile < end_tile; ++tile) {
      const int64_t p0 = tile * P;
      const int64_t n = std::min(P, M - p0);
      FusionBuffers b = base;
      b.pixels = n;
      for (int d = 0; d < 2; ++d) {
        T* g = save_activations ? saved[d].data_ptr<T>() + p0 * kGBlocks * C : scratch.data() + d * P * kGBlocks * C;
        b.x[d] = rows_of<T>(x[d], p0, C);
        b.g[d] = g;
        b.y[d] = y[d].data_ptr<T>() + p0 * C;
        gemm_abt<T>(n, kGBlocks * C, C, rows_of<T>(x[d], p0, C), C, wx + d * kGBlocks * C * C, C, T(0), g, kGBlocks * C);
      }
      b.hidden = hidden;
      b.z = z;
      b.e = hidden;  // hidden is dead once z is computed
      b.lse = nullptr;
      run_rows<HiddenForward, T>(b, 0, 2 * n);
      gemm_abt<T>(2 * n, C, C, hidden, C, w2.const_data_ptr<T>(), C, T(0), z, C);
      if (save_activations) copy_tile_rows(saved[2].data_ptr<T>() + p0 * C, M * C, z, n * C, n, C);
      run_rows<RelationForward, T>(b, 0, 2 * n);
      for (int d = 0; d < 2; ++d)  // dk over z, which is dead once e is computed
        gemm_abt<T>(n, C, C, hidden + d * n * C, C, wk + d * C * C, C, T(0), z + d * n * C, C);
      if (save_activations) copy_tile_rows(saved[3].data_ptr<T>() + p0 * C, M * C, z, n * C, n, C);
      b.dk = z;
      b.mixed = hidden;  // e is dead once dk is computed
      b.gate = gate_tile.data();
      run_rows<MixForward, T>(b, 0, 2 * n);
      for (int d = 0; d < 2; ++d) {
        gemm_abt<T>(n, C, C, hidden + d * n * C, C, wo + d * C * C, C, T(1), y[d].data_ptr<T>() + p0 * C, C);
        std::memcpy(gate_out + (d * M + p0) * H, gate_tile.data() + d * n * H, n * H * sizeof(A));
      }
    }
  });
  return {out[0], out[1], gate, saved};
}

// ---- tiled backward ---------------------------------------------------------------------------

// One thread's sums over its tiles.
template <class T>
struct GradientSums {
  std::vector<T> wx, wk, wo, w2, g_sum, b2, k_noise;
  explicit GradientSums(int64_t C)
      : wx(2 * kGBlocks * C * C), wk(2 * C * C), wo(2 * C * C), w2(C * C), g_sum(2 * kGBlocks * C), b2(C), k_noise(2 * C) {}
};

template <class T>
std::vector<at::Tensor> tiled_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                       const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                       at::TensorList saved, int64_t num_heads) {
  using A = typename Acc<T>::type;
  const int64_t C = x0.size(-1);
  const int64_t M = x0.numel() / C;
  const int64_t H = num_heads;
  const auto options = x0.options();
  const PackedWeights w = cached_pack_weights(params, C);
  const at::Tensor x[2] = {x0.contiguous().view({M, C}), x1.contiguous().view({M, C})};
  const at::Tensor gy[2] = {grad_y0.contiguous().view({M, C}), grad_y1.contiguous().view({M, C})};
  const at::Tensor gate_rows = gate.contiguous();
  const at::Tensor w2 = w.w2.contiguous();
  const at::Tensor grad_x_out[2] = {at::empty(x0.sizes(), options), at::empty(x1.sizes(), options)};
  at::Tensor grad_x[2] = {grad_x_out[0].view({M, C}), grad_x_out[1].view({M, C})};
  const FusionBuffers base = parameter_buffers(w, C, H);
  const T* wx = w.wx.const_data_ptr<T>();
  const T* wk = w.wk.const_data_ptr<T>();
  const T* wo = w.wo.const_data_ptr<T>();
  const A* gate_in = gate_rows.const_data_ptr<A>();

  // The forward's activations (check_activations), read in place of the GEMMs that recompute them.
  const bool resume = !saved.empty();
  const T* saved_g[2] = {resume ? saved[0].const_data_ptr<T>() : nullptr, resume ? saved[1].const_data_ptr<T>() : nullptr};
  const T* saved_z = resume ? saved[2].const_data_ptr<T>() : nullptr;
  const T* saved_dk = resume ? saved[3].const_data_ptr<T>() : nullptr;

  const int64_t P = tile_pixels(M, C, 20, sizeof(T));
  const int64_t tiles = (M + P - 1) / P;
  // One contiguous run of tiles per thread, each with its own sums, so that the order of the
  // additions depends on the thread count only.
  const int64_t runs = std::min<int64_t>(at::get_num_threads(), tiles);
  std::vector<GradientSums<T>> sums(runs, GradientSums<T>(C));
  at::parallel_for(0, runs, 1, [&](int64_t first_run, int64_t end_run) {
   for (int64_t run = first_run; run < end_run; ++run) {
    const c10::InferenceMode inference_mode;
    GradientSums<T>& sum = sums[run];
    const int64_t first_tile = tiles * run / runs, end_tile = tiles * (run + 1) / runs;
    // g[0], g[1] (P, 5C), then their gradients; hidden, then d/dhidden; z, then d/dz; e; dk, then
    // d/ddk; d/dmixed, then mixed (each 2, P, C); log-sum-exps (2, P); gates (2, P, H)
    std::vector<T> scratch(P * 20 * C);
    std::vector<A> lse(2 * P), gate_tile(2 * P * H);
    T* g[2] = {scratch.data(), scratch.data() + P * kGBlocks * C};
    T* hidden = scratch.data() + P * 10 * C;
    T* z = hidden + 2 * P * C;
    T* e = z + 2 * P * C;
    T* dk = e + 2 * P * C;
    T* grad_mixed = dk + 2 * P * C;
    for (int64_t tile = first_tile; tile < end_tile; ++tile) {
      const int64_t p0 = tile * P;
      const int64_t n = std::min(P, M - p0);
      FusionBuffers b = base;
      b.pixels = n;
      // The forward chain up to the keys, as in the forward, keeping hidden, e and the lse; the GEMMs
      // only when the forward saved nothing. g is then read from the saved rows and the tile's g
      // buffers take its gradient; z and dk are copied, as the stages below overwrite them.
      for (int d = 0; d < 2; ++d) {
        b.x[d] = rows_of<T>(x[d], p0, C);
        b.g[d] = resume ? saved_g[d] + p0 * kGBlocks * C : g[d];
        if (!resume)
          gemm_abt<T>(n, kGBlocks * C, C, rows_of<T>(x[d], p0, C), C, wx + d * kGBlocks * C * C, C, T(0), g[d], kGBlocks * C);
      }
      b.hidden = hidden;
      b.z = z;
      b.e = e;
      b.lse = lse.data();
      run_rows<HiddenForward, T>(b, 0, 2 * n);
      if (resume) {
        copy_tile_rows(z, n * C, saved_z + p0 * C, M * C, n, C);
      } else {
        gemm_abt<T>(2 * n, C, C, hidden, C, w2.const_data_ptr<T>(), C, T(0), z, C);
      }
      run_rows<RelationForward, T>(b, 0, 2 * n);
      if (resume) copy_tile_rows(dk, n * C, saved_dk + p0 * C, M * C, n, C);
      for (int d = 0; d < 2; ++d) {
        if (!resume) gemm_abt<T>(n, C, C, e + d * n * C, C, wk + d * C * C, C, T(0), dk + d * n * C, C);
        gemm_ab<T>(n, C, C, rows_of<T>(gy[d], p0, C), C, wo + d * C * C, C, T(0), grad_mixed + d * n * C, C);
        std::memcpy(gate_tile.data() + d * n * H, gate_in + (d * M + p0) * H, n * H * sizeof(A));
      }
      b.dk = dk;
      b.gate = gate_tile.data();
      b.grad_mixed = grad_mixed;
      b.mixed = grad_mixed;
      b.grad_dk = dk;
      for (int d = 0; d < 2; ++d) {
        b.grad_y[d] = rows_of<T>(gy[d], p0, C);
        b.grad_g[d] = g[d];
      }
      run_rows<MixBackward, T>(b, 0, 2 * n);

      for (int d = 0; d < 2; ++d) {
        T* gx = grad_x[d].data_ptr<T>() + p0 * C;
        gemm_atb_accumulate<T>(n, C, C, rows_of<T>(gy[d], p0, C), C, grad_mixed + d * n * C, C,
                               sum.wo.data() + d * C * C);
        gemm_atb_accumulate<T>(n, C, C, dk + d * n * C, C, e + d * n * C, C, sum.wk.data() + d * C * C);
        gemm_ab<T>(n, C, C, dk + d * n * C, C, wk + d * C * C, C, T(0), gx, C);  // d/de
        add_column_sums<T>(n, C, gx, C, sum.k_noise.data() + d * C);
        b.grad_e[d] = gx;
        b.grad_x[d] = gx;
      }
      run_rows<RelationBackward, T>(b, 0, 2 * n);  // z now holds d/dz

      gemm_atb_accumulate<T>(2 * n, C, C, z, C, hidden, C, sum.w2.data());
      add_column_sums<T>(2 * n, C, z, C, sum.b2.data());
      gemm_ab<T>(2 * n, C, C, z, C, w2.const_data_ptr<T>(), C, T(0), hidden, C);  // hidden is dead now
      b.grad_hidden = hidden;
      run_rows<HiddenBackward, T>(b, 0, 2 * n);

      for (int d = 0; d < 2; ++d) {
        T* gx = grad_x[d].data_ptr<T>() + p0 * C;
        gemm_ab<T>(n, C, kGBlocks * C, g[d], kGBlocks * C, wx + d * kGBlocks * C * C, C, T(1), gx, C);
        gemm_atb_accumulate<T>(n, kGBlocks * C, C, g[d], kGBlocks * C, rows_of<T>(x[d], p0, C), C, sum.wx.data() + d * kGBlocks * C * C);
        add_column_sums<T>(n, kGBlocks * C, g[d], kGBlocks * C, sum.g_sum.data() + d * kGBlocks * C);
      }
    }
   }
  });

  // Over threads, in thread order.
  GradientSums<T>& total = sums[0];
  for (int64_t t = 1; t < runs; ++t) {
    auto add = [](std::vector<T>& into, const std::vector<T>& from) {
      for (size_t i = 0; i < into.size(); ++i) into[i] += from[i];
    };
    add(total.wx, sums[t].wx);
    add(total.wk, sums[t].wk);
    add(total.wo, sums[t].wo);
    add(total.w2, sums[t].w2);
    add(total.g_sum, sums[t].g_sum);
    add(total.b2, sums[t].b2);
    add(total.k_noise, sums[t].k_noise);
  }
  // Each a fresh tensor: the op's outputs must not alias one another.
  auto tensor = [&options](const std::vector<T>& v, int64_t offset, at::IntArrayRef shape) {
    return at::from_blob(const_cast<T*>(v.data() + offset), shape, options).clone();
  };
  WeightGradients r;
  for (int d = 0; d < 2; ++d) {
    r.grad_x[d] = grad_x_out[d];
    r.grad_wx[d] = tensor(total.wx, d * kGBlocks * C * C, {kGBlocks * C, C});
    r.grad_g_sum[d] = tensor(total.g_sum, d * kGBlocks * C, {kGBlocks * C});
    r.grad_wo[d] = tensor(total.wo, d * C * C, {C, C});
    r.grad_bo[d] = gy[d].sum(0);
  }
  r.grad_w2 = tensor(total.w2, 0, {C, C});
  r.grad_b2 = tensor(total.b2, 0, {C});
  r.grad_k_noise = tensor(total.k_noise, 0, {2, C});
  r.grad_wk = tensor(total.wk, 0, {2, C, C});
  return assemble_gradients(r, w, x0, x1);
}

// Tiles pay at narrow layers, where the row stages are a large part of the work and would
// otherwise each stream the intermediates through DRAM; at wide ones the GEMMs dominate, and MKL
// runs them faster over all pixels (threaded by itself) than one tile per thread. Measured on a
// 2-core EPYC, float32, batch 2, forward + backward (bench/RESULTS.md): tiled / untiled speed-up
// over the oracle 2.07x / 1.37x at C=64, 1.31x / 1.14x at C=160, 1.19x / 1.20x at C=256, 1.13x /
// 1.21x at C=320, 0.99x / 1.10x at C=512.
constexpr int64_t kUntiledFromWidth = 256;

bool tiled(const at::Tensor& x0) {
  return (x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble) && x0.size(-1) < kUntiledFromWidth;
}

// Both chains check their arguments first: tiled() reads x0's last dimension.
ForwardResult forward_cpu(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                          bool save_activations) {
  check_arguments(x0, x1, params, num_heads);
  if (!tiled(x0)) return fusion_forward(x0, x1, params, num_heads, save_activations, host_stage);
  RECORD_FUNCTION("gemini_kernels::tiled_forward", std::vector<c10::IValue>());
  return AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "gemini_kernels_tiled_forward", [&] {
    return tiled_forward<scalar_t>(x0, x1, params, num_heads, save_activations);
  });
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                     const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                     at::TensorList activations, int64_t num_heads) {
  check_arguments(x0, x1, params, num_heads);
  if (!tiled(x0))
    return fusion_backward(grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads, host_stage);
  check_backward_arguments(grad_y0, grad_y1, x0, gate, num_heads);
  check_activations(activations, x0);
  RECORD_FUNCTION("gemini_kernels::tiled_backward", std::vector<c10::IValue>());
  return AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "gemini_kernels_tiled_backward", [&] {
    return tiled_backward<scalar_t>(grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads);
  });
}

}  // namespace
}  // namespace gk

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) {
  m.impl("fusion_forward", &gk::forward_cpu);
  m.impl("fusion_backward", &gk::backward_cpu);
}
