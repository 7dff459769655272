// The torch-facing fusion, shared by the CPU and CUDA registrations: the projections as GEMMs
// (at::mm / at::bmm, so cuBLAS or MKL), and between them the row stages of fusion_math.h, run by a
// device-specific StageRunner (host loops in fusion_host.cpp, CUDA kernels in fusion_cuda.cpp). The
// chain of GEMMs and stages itself is fusion_chain.h's.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <functional>
#include <tuple>
#include <vector>

#include "fused_backward.h"
#include "fused_forward.h"
#include "gradient_assembly.h"
#include "fusion_math.h"
#include "fusion_params.h"
#include "wide_backward.h"
#include "wide_forward.h"

namespace gk {

#define GK_COUNT_PARAM(field, name, rank, a0, b0, a1, b1) +1
constexpr int kNumParams = 0 GK_FUSION_PARAMS(GK_COUNT_PARAM);
#undef GK_COUNT_PARAM

// The parameters by name (fusion_params.h), as Flash_fwd_params names FlashAttention's: the op
// receives them as a list in FusionParams order, and nothing past named_params indexes that list.
struct FusionParamTensors {
#define GK_PARAM_FIELD(field, name, rank, a0, b0, a1, b1) at::Tensor field;
  GK_FUSION_PARAMS(GK_PARAM_FIELD)
#undef GK_PARAM_FIELD
};

// params: kNumParams tensors in FusionParams order (checked by check_arguments).
FusionParamTensors named_params(at::TensorList params);

// The parameters as the fused kernels read them: contiguous, in FusionParams order and by name.
struct ContiguousParams {
  std::vector<at::Tensor> list;
  FusionParamTensors named;
};
ContiguousParams contiguous_params(at::TensorList params);

// Two outputs (y, or dx) in the inputs' shapes, written through (M, C) views: not views themselves, as
// autograd refuses in-place changes (y0 += x0, relu_) to a view an op returns.
std::array<at::Tensor, 2> empty_like_inputs(const at::Tensor& x0, const at::Tensor& x1);

// One row of the table: the published name and the expected shape for width C.
struct ParamSpec {
  const char* name;
  std::vector<int64_t> shape;
};
std::vector<ParamSpec> param_specs(int64_t C);

// The parameters rearranged for the batched GEMMs (a few C x C copies, small next to M x C).
struct PackedWeights {
  at::Tensor wx;       // (2, 5C, C): rows [W1a; W1b; Wq_d; Wv_d; Wv_{1-d}] for direction d
  at::Tensor w2;       // (C, C)
  at::Tensor wk;       // (2, C, C)
  at::Tensor wv;       // (2, C, C)
  at::Tensor wo;       // (2, C, C)
  at::Tensor b1, b2;   // (C,)
  at::Tensor k_noise, v_noise, bq, bv, bo, vn_proj;  // (2, C)
};

PackedWeights pack_weights(at::TensorList params, int64_t C);

// pack_weights, once per parameter version: the last kWeightCacheEntries packings are kept, each
// keyed by every parameter's storage (held by a weak reference, so that a freed storage's address
// cannot come back as a false match while the entry lives), data pointer, sizes, strides, dtype,
// device, version counter and the current stream. An in-place update (an optimizer step,
// load_state_dict's copy_) bumps the version, and the next call packs again. Inference tensors have
// no version counter and are packed on every call. Writes that bypass the version counter
// (`p.data.mul_(2)`, torch.autograd.gradcheck's perturbations, writes through a raw pointer) are
// not seen, as autograd does not see them: clear_weight_cache() forgets every entry, and
// set_weight_cache_enabled(false) turns the cache off.
PackedWeights cached_pack_weights(at::TensorList params, int64_t C);
constexpr size_t kWeightCacheEntries = 32;
void clear_weight_cache();
// Turns the cache on or off (on by default); returns the previous setting. Off, every call packs.
bool set_weight_cache_enabled(bool enabled);
// hits, misses (packings cached), uncached (packings of inference tensors), entries
std::vector<int64_t> weight_cache_info();
// The per-layer fields of FusionBuffers (sizes, scale, bias and noise pointers); the caller adds the
// per-call activation pointers.
FusionBuffers parameter_buffers(const PackedWeights& w, int64_t C, int64_t num_heads);

// Checks what the kernels would otherwise read out of bounds.
void check_arguments(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads);

// Checks the backward's extra arguments against x0 (after check_arguments).
void check_backward_arguments(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                              const at::Tensor& gate, int64_t num_heads);

// float for float/half/bfloat16, double for double: the dtype of the gates and the log-sum-exps.
at::ScalarType accumulation_type(at::ScalarType t);

// (2, *x_shape[:-1], num_heads)
std::vector<int64_t> gate_shape(at::IntArrayRef x_shape, int64_t num_heads);

// The reduced gradients of a backward, before they are rearranged into the parameters' layout.
struct WeightGradients {
  at::Tensor grad_x[2];      // d/dx_d in x_d's shape (not a view of an (M, C) tensor)
  at::Tensor grad_wx[2];     // (5C, C): d/dwx[d]
  at::Tensor grad_g_sum[2];  // (5C,): column sums of d/dg[d]
  at::Tensor grad_w2;        // (C, C)
  at::Tensor grad_b2;        // (C,)
  at::Tensor grad_k_noise[2];  // (C,): column sums of d/de[d]
  at::Tensor grad_wk[2];     // (C, C)
  at::Tensor grad_wo[2];     // (C, C)
  at::Tensor grad_bo[2];     // (C,): column sums of grad_y[d]
};

// The gradients of x0, x1 and the 14 parameters, in that order, from the reduced ones: one launch of
// the op assemble_gradients (gradient_assembly.h).
std::vector<at::Tensor> assemble_gradients(const WeightGradients& reduced, const PackedWeights& w, const at::Tensor& x0,
                                           const at::Tensor& x1);
// The op's parts as raw pointers (kNumGradientParts contiguous tensors of one dtype, checked).
constexpr size_t kNumGradientParts = 16;
GradientParts gradient_parts(at::TensorList parts, int64_t C);
// The 14 parameters' gradients, uninitialised, and their pointers.
std::vector<at::Tensor> empty_gradients(const at::TensorOptions& options, int64_t C);
FusionParamGradPointers gradient_pointers(std::vector<at::Tensor>& grads);
// op(param, r, c) for every element of the 14 parameters' gradients (param_rows x param_columns of
// width C) on the host, rows in parallel: ReduceGradients, AssembleGradients.
template <class Op>
void for_each_gradient_element(const Op& op, int64_t C) {
  for (int param = 0; param < kParamCount; ++param) {
    const int64_t columns = param_columns(param, C);
    at::parallel_for(0, param_rows(param, C), 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c = 0; c < columns; ++c) op(param, r, c);
    });
  }
}

// Runs `stage` over every row of `buffers`, whose tensors have dtype `dtype` and live on the device
// the runner serves; returns when the work is queued (CUDA) or done (host).
using StageRunner = void (*)(Stage stage, at::ScalarType dtype, const FusionBuffers& buffers);

// What a forward may keep for its backward, so that the backward does not recompute them: the GEMM
// outputs g[0], g[1] (M, 5C), z (2, M, C) and dk (2, M, C), in that order (see FusionBuffers). They
// spare the backward 7 of its 23 C^2 multiply-adds per pixel and direction and cost 14 C values of
// memory per pixel; an empty list means "recompute".
constexpr int kNumActivations = 4;

// Checks saved activations against x0 (after check_arguments): empty, or the four tensors above.
void check_activations(at::TensorList activations, const at::Tensor& x0);

// y0, y1, the gates (2, *x0.shape[:-1], num_heads) in the accumulation type, and the saved
// activations (empty unless asked for); the backward takes back the last two.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// ---- the host path's SIMD forward and backward (simd_fusion.h, simd_fusion.cpp) ------------------

// The widest layer they take: at C = 128 the weights (11 C^2 elements, 704 KiB in float32) stay in a
// core's L2 cache, which every tile rereads them from.
constexpr int64_t kSimdMaxWidth = 128;
// Whether a CPU forward takes the SIMD forward: float32 or float64, C <= kSimdMaxWidth, and a CPU (and
// torch CPU capability) with AVX2 and FMA at least; to save activations, also the SIMD backward's
// conditions, as only it reads the SIMD forward's.
bool takes_simd_forward(const at::Tensor& x0, bool save_activations);
// Whether a CPU backward takes the SIMD backward: the forward's conditions, C a multiple of the
// register's elements (16 / 8 floats, 8 / 4 doubles on AVX-512 / AVX2), and no activations or the
// SIMD forward's (kSimdActivations of them).
bool takes_simd_backward(const at::Tensor& x0, at::TensorList activations);
// The activations the SIMD forward saves: its products (simd_fusion.h), per direction and plane.
constexpr int64_t kSimdActivations = 10;
// y0, y1, the gates and, with save_activations, the activations, on the best instruction set this CPU
// runs.
ForwardResult simd_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                           bool save_activations);
// The gradients of x0, x1 and the 14 parameters (as fusion_backward's), from the gates and the SIMD
// forward's activations (recomputed where there are none).
std::vector<at::Tensor> simd_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                      const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                      at::TensorList activations, int64_t num_heads);

// ---- the fused forward of narrow layers (fused_forward.h, fused_forward.cpp) --------------------

// One launch of it: the arguments, and the tensors it reads and writes and its FLOPs (what the launch
// ledger counts).
struct FusedForwardCall {
  FusedForwardArgs args;
  at::ScalarType dtype;
  std::vector<at::Tensor> reads, writes;
  int64_t flops;
};
// Runs the call's tiles: the host engine (CPU), the CUDA kernel, or the ledger's announcement.
using FusedLauncher = void (*)(const FusedForwardCall& call);

// Whether the fused kernels' MMAs can load the weight matrices straight from global memory: contiguous,
// 32-byte aligned.
bool tensor_core_weights(at::TensorList params);
// Whether a forward takes the fused kernel: the layer fits (fused_forward_fits), and with
// tensor_cores (the CUDA engine) also a 16-bit dtype whose MMAs the GPU has (compute_capability:
// 10 * major + minor), a tile within `shared_memory_bytes` and contiguous, 32-byte aligned weight
// matrices.
bool takes_fused_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                         bool tensor_cores, int64_t shared_memory_bytes, int compute_capability);
// y0, y1 and the gates (as fusion_forward's, no activations), the tiles run by `launch`.
ForwardResult fused_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                            FusedLauncher launch);
// The launch as a gemini_kernels::chain_stage call named "fused_forward" (the ledger's count).
void announce_fused_forward(const FusedForwardCall& call);

// ---- the fused forward of wide layers (wide_forward.h, wide_forward.cpp) -------------------------

// One launch of the wide kernels as the launch ledger counts it: what it reads and writes, its FLOPs.
struct WideLaunch {
  const char* name;
  std::vector<at::Tensor> reads, writes;
  int64_t flops;
};
// The launches as gemini_kernels::chain_stage calls (the ledger's count).
void announce_wide_launches(c10::ArrayRef<WideLaunch> launches);
// Part i of an in-projection's stacked rows (0: query, 1: key, 2: value), what a launch multiplies by.
at::Tensor in_proj_part(const at::Tensor& in_proj, int64_t i);

// Its arguments, and its five launches (one per WidePass, in order), made only when the ledger asks.
struct WideForwardCall {
  WideForwardArgs args;
  at::ScalarType dtype;
  std::function<std::array<WideLaunch, kWidePasses>()> launches;
};
using WideLauncher = void (*)(const WideForwardCall& call);

// Whether a forward takes the wide kernels: the layer fits (wide_forward_fits), and with tensor_cores
// (the CUDA engine) also a 16-bit dtype whose MMAs the GPU has, a block within `shared_memory_bytes`
// and contiguous, 32-byte aligned weight matrices.
// The layer of x0 (M, C) and num_heads as the wide kernels see it, once `kernel` ("forward", "backward")
// has found that they take it; refuses more blocks than a grid has.
WideLayer wide_layer(const at::Tensor& x0, int64_t num_heads, const char* kernel);
// The wide forward's pass kPass over all its blocks, on the host engine (the wide backward runs its first two).
template <class T, WidePass kPass>
void run_wide_pass_on_host(const WideForwardArgs& args);
bool takes_wide_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                        bool tensor_cores, int64_t shared_memory_bytes, int compute_capability);
// y0, y1 and the gates (as fusion_forward's, no activations), the passes run by `launch`.
ForwardResult wide_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                           WideLauncher launch);
// The launches as gemini_kernels::chain_stage calls named "wide_forward_pre", ... (the ledger's count).
void announce_wide_forward(const WideForwardCall& call);

// ---- the fused backward of wide layers (wide_backward.h, wide_backward.cpp) ---------------------

struct WideBackwardCall {
  WideBackwardArgs args;
  at::ScalarType dtype;
  std::function<std::array<WideLaunch, kWideBackwardLaunches>()> launches;
};
using WideBackwardLauncher = void (*)(const WideBackwardCall& call);

// Whether a backward takes the wide kernels: wide_backward_fits, and with tensor_cores the wide
// forward's conditions, with the backward's blocks within `shared_memory_bytes`.
bool takes_wide_backward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                         bool tensor_cores, int64_t shared_memory_bytes, int compute_capability);
// The gradients of x0, x1 and the 14 parameters (as fusion_backward's), the passes run by `launch`.
std::vector<at::Tensor> wide_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                      const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                      int64_t num_heads, WideBackwardLauncher launch);
// The launches as gemini_kernels::chain_stage calls: the forward's first two, "wide_backward_heads", ...
void announce_wide_backward(const WideBackwardCall& call);

// ---- the fused backward of narrow layers (fused_backward.h, fused_backward.cpp) -------------------

// Its two launches: the tiles (dx and the programs' partial sums) and the reduction (the parameters'
// gradients), with what each reads and writes.
struct FusedBackwardCall {
  FusedBackwardArgs args;
  at::ScalarType dtype;
  std::vector<at::Tensor> tile_reads, tile_writes, reduce_reads, reduce_writes;
  int64_t tile_flops;
};
using FusedBackwardLauncher = void (*)(const FusedBackwardCall& call);

// Whether a backward takes the fused kernels: takes_fused_forward's conditions, with the backward's
// tile within `shared_memory_bytes`.
bool takes_fused_backward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                          bool tensor_cores, int64_t shared_memory_bytes, int compute_capability);
// The gradients of x0, x1 and the 14 parameters (as fusion_backward's), the weight gradients summed over
// `programs` partial sums (at most one per tile), both passes run by `launch`.
std::vector<at::Tensor> fused_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                       const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                       int64_t num_heads, int64_t programs, FusedBackwardLauncher launch);
// The launches as gemini_kernels::chain_stage calls named "fused_backward" and "fused_backward_reduce".
void announce_fused_backward(const FusedBackwardCall& call);

// params: the 14 tensors in FusionParams order. The chain as one range over all pixels, its stages by
// `run` (fusion_chain.h: run_forward, whole_range).
ForwardResult fusion_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                             bool save_activations, StageRunner run);

// Returns the gradients of x0, x1 and the 14 parameters, in that order. Recomputes every
// intermediate the forward did not save from the inputs and the gates; never writes to `activations`
// (a graph kept with retain_graph runs its backward again).
std::vector<at::Tensor> fusion_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                        const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                        at::TensorList activations, int64_t num_heads, StageRunner run);

}  // namespace gk
