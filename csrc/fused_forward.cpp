// Around the fused forward's tile logic (fused_forward.h): which calls take it, its arguments from the
// tensors, the host engine that runs every line of it on CPU, and the op `fused_forward`
// (CPU here; CUDA in fusion_cuda.cpp), through which the tests compare it with the oracle.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "fused_forward.h"
#include "fused_host_engine.h"
#include "fusion_api.h"

namespace gk {

namespace {

template <class T>
void run_tiles_on_host(const FusedForwardArgs& args) {
  using A = typename Acc<T>::type;
  const int64_t tiles = (args.pixels + kFusedTileRows - 1) / kFusedTileRows;
  const int64_t matrix_elements = static_cast<int64_t>(kFusedTileMatrices) * kFusedTileRows * fused_row_stride(args.channels);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile(matrix_elements);
    std::vector<A> tile_gates(static_cast<size_t>(kFusedTileRows) * args.heads);
    HostTileEngine<T> engine{tile.data(), tile_gates.data(), fused_row_stride(args.channels)};
    for (int64_t t = begin; t < end; ++t) fused_forward_tile<T>(engine, args, t * kFusedTileRows);
  });
}

void launch_on_host(const FusedForwardCall& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.dtype, "gemini_kernels::fused_forward",
                                  [&] { run_tiles_on_host<scalar_t>(call.args); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x0, const at::Tensor& x1,
                                                                 at::TensorList params, int64_t num_heads) {
  const ForwardResult r = fused_forward(x0, x1, params, num_heads, launch_on_host);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

}  // namespace

bool tensor_core_weights(at::TensorList params) {
  // The MMA loads read the weights straight from global memory, 32-byte aligned.
  const FusionParamTensors p = named_params(params);
  for (const at::Tensor* w : {&p.fc1_weight, &p.fc2_weight, &p.in_proj_weight_0, &p.in_proj_weight_1,
                              &p.out_proj_weight_0, &p.out_proj_weight_1})
    if (!w->is_contiguous() || reinterpret_cast<uintptr_t>(w->const_data_ptr()) % 32 != 0) return false;
  return true;
}

bool takes_fused_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                         bool tensor_cores, int64_t shared_memory_bytes, int compute_capability) {
  check_arguments(x0, x1, params, num_heads);
  const int64_t C = x0.size(-1);
  if (!fused_forward_fits(C, num_heads)) return false;
  if (!tensor_cores) return true;
  const at::ScalarType t = x0.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16) return false;  // float32 would run on TF32 tensor cores: 1e-3, not 1e-5
  if (compute_capability < (t == at::kBFloat16 ? 80 : 70)) return false;  // the WMMA shapes of that dtype
  if (fused_launch_bytes(static_cast<int>(C), static_cast<int>(num_heads)) > shared_memory_bytes) return false;
  return tensor_core_weights(params);
}

ForwardResult fused_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                            FusedLauncher launch) {
  check_arguments(x0, x1, params, num_heads);
  const int64_t C = x0.size(-1);
  TORCH_CHECK(fused_forward_fits(C, num_heads), "gemini_kernels: the fused forward takes C <= ", kFusedMaxChannels,
              " channels, a multiple of ", kMmaEdge, "; got x0 of shape ", x0.sizes(), " (C=", C, ")");
  const int64_t M = x0.numel() / C;
  TORCH_CHECK((M + kFusedTileRows - 1) / kFusedTileRows <= INT32_MAX, "gemini_kernels: x0 has ", M,
              " pixels; the fused forward takes at most ", int64_t{INT32_MAX} * kFusedTileRows);
  const at::Tensor x[2] = {x0.contiguous(), x1.contiguous()};
  const std::array<at::Tensor, 2> y = empty_like_inputs(x0, x1);
  const at::Tensor gate =
      at::empty(gate_shape(x0.sizes(), num_heads), x0.options().dtype(accumulation_type(x0.scalar_type())));
  const ContiguousParams weights = contiguous_params(params);
  const FusionParamTensors& w = weights.named;

  FusedForwardCall call;
  call.dtype = x0.scalar_type();
  FusedForwardArgs& a = call.args;
  a.pixels = M;
  a.channels = static_cast<int>(C);
  a.heads = static_cast<int>(num_heads);
  a.scale = 1.0 / std::sqrt(static_cast<double>(C / num_heads));
  for (int d = 0; d < 2; ++d) {
    a.x[d] = x[d].const_data_ptr();
    a.y[d] = y[d].data_ptr();
  }
  a.gate = gate.data_ptr();
#define GK_PARAM_POINTER(field, name, rank, a0, b0, a1, b1) a.params.field = w.field.const_data_ptr();
  GK_FUSION_PARAMS(GK_PARAM_POINTER)
#undef GK_PARAM_POINTER
  call.reads = {x[0], x[1]};
  call.reads.insert(call.reads.end(), weights.list.begin(), weights.list.end());
  call.writes = {y[0], y[1], gate};
  call.flops = 2 * 2 * 8 * M * C * C;  // 8 C^2 multiply-adds per pixel and direction
  if (M > 0) launch(call);
  return {y[0], y[1], gate, {}};
}

// The launch announced as a chain_stage call (fusion_chain.cpp), for the launch ledger's count.
void announce_fused_forward(const FusedForwardCall& call) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("gemini_kernels::chain_stage", "");
  torch::jit::Stack stack{c10::IValue(std::string("fused_forward")), c10::IValue(call.reads), c10::IValue(call.writes),
                          c10::IValue(call.flops)};
  op.callBoxed(&stack);
}

}  // namespace gk

TORCH_LIBRARY_FRAGMENT(gemini_kernels, m) {
  // The fused forward of narrow layers (csrc/fused_forward.h) on its own: y0, y1 and the gates. The CUDA
  // forward takes it where takes_fused_forward says so; on CPU it runs the tile logic with the host
  // engine, for the tests (the host path's own forward is the tiled chain, which MKL makes faster).
  m.def("fused_forward(Tensor x0, Tensor x1, Tensor[] params, int num_heads) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) { m.impl("fused_forward", &gk::fused_forward_cpu); }
