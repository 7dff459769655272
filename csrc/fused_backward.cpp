// Around the fused backward's tile logic (fused_backward.h): which calls take it, its arguments from the
// tensors, its two passes on the host engine, and the op `fused_backward` (CPU here; CUDA in
// fusion_cuda.cpp), through which the tests compare it with the oracle.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "fused_backward.h"
#include "fused_host_engine.h"
#include "fusion_api.h"

namespace gk {

namespace {

template <class T>
void run_programs_on_host(const FusedBackwardArgs& args) {
  using A = typename Acc<T>::type;
  const int64_t matrix_elements =
      static_cast<int64_t>(kFusedBackwardMatrices) * kFusedTileRows * fused_row_stride(args.channels);
  at::parallel_for(0, args.programs, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile(matrix_elements);
    std::vector<A> tile_gates(static_cast<size_t>(kFusedTileRows) * args.heads);
    HostTileEngine<T> engine{tile.data(), tile_gates.data(), fused_row_stride(args.channels)};
    for (int64_t program = begin; program < end; ++program)
      fused_backward_program<T>(engine, args, static_cast<int>(program));
  });
  for_each_gradient_element(ReduceGradients<T>{args}, args.channels);
}

void launch_on_host(const FusedBackwardCall& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.dtype, "gemini_kernels::fused_backward",
                                  [&] { run_programs_on_host<scalar_t>(call.args); });
}

std::vector<at::Tensor> fused_backward_cpu(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                           const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                           int64_t num_heads, int64_t programs) {
  return fused_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads, programs, launch_on_host);
}

}  // namespace

bool takes_fused_backward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                          bool tensor_cores, int64_t shared_memory_bytes, int compute_capability) {
  // The forward's conditions (the same products, the same MMA shapes and weight loads), with the
  // backward's larger tile.
  if (!takes_fused_forward(x0, x1, params, num_heads, tensor_cores, shared_memory_bytes, compute_capability))
    return false;
  return !tensor_cores ||
         fused_backward_launch_bytes(static_cast<int>(x0.size(-1)), static_cast<int>(num_heads)) <= shared_memory_bytes;
}

std::vector<at::Tensor> fused_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                       const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                       int64_t num_heads, int64_t programs, FusedBackwardLauncher launch) {
  check_arguments(x0, x1, params, num_heads);
  check_backward_arguments(grad_y0, grad_y1, x0, gate, num_heads);
  const int64_t C = x0.size(-1);
  TORCH_CHECK(fused_forward_fits(C, num_heads), "gemini_kernels: the fused backward takes C <= ", kFusedMaxChannels,
              " channels, a multiple of ", kMmaEdge, "; got x0 of shape ", x0.sizes(), " (C=", C, ")");
  TORCH_CHECK(programs >= 1 && programs <= INT32_MAX, "gemini_kernels: programs must be in [1, 2^31); got ", programs);
  const int64_t M = x0.numel() / C;
  const int64_t tiles = fused_tile_count(M);
  TORCH_CHECK(tiles <= INT32_MAX, "gemini_kernels: x0 has ", M, " pixels; the fused backward takes at most ",
              int64_t{INT32_MAX} * kFusedTileRows);
  const at::Tensor x[2] = {x0.contiguous(), x1.contiguous()};
  const at::Tensor grad_y[2] = {grad_y0.contiguous(), grad_y1.contiguous()};
  const std::array<at::Tensor, 2> grad_x = empty_like_inputs(x0, x1);
  const ContiguousParams weights = contiguous_params(params);
  const FusionParamTensors& w = weights.named;
  std::vector<at::Tensor> grads = empty_gradients(x0.options(), C);
  // No more programs than tiles: a program without a tile would only add zeros.
  const int64_t used = std::max<int64_t>(1, std::min(programs, tiles));
  const at::Tensor partials =
      at::empty({used, FusionParamOffsets::of(C).total}, x0.options().dtype(accumulation_type(x0.scalar_type())));

  FusedBackwardCall call;
  call.dtype = x0.scalar_type();
  FusedBackwardArgs& a = call.args;
  a.pixels = M;
  a.channels = static_cast<int>(C);
  a.heads = static_cast<int>(num_heads);
  a.scale = 1.0 / std::sqrt(static_cast<double>(C / num_heads));
  a.programs = static_cast<int>(used);
  for (int d = 0; d < 2; ++d) {
    a.x[d] = x[d].const_data_ptr();
    a.grad_y[d] = grad_y[d].const_data_ptr();
    a.grad_x[d] = grad_x[d].data_ptr();
  }
  a.gate = gate.const_data_ptr();
  a.partials = partials.data_ptr();
#define GK_PARAM_POINTER(field, name, rank, a0, b0, a1, b1) a.params.field = w.field.const_data_ptr();
  GK_FUSION_PARAMS(GK_PARAM_POINTER)
#undef GK_PARAM_POINTER
  a.grads = gradient_pointers(grads);
  call.tile_reads = {x[0], x[1], grad_y[0], grad_y[1], gate};
  call.tile_reads.insert(call.tile_reads.end(), weights.list.begin(), weights.list.end());
  call.tile_writes = {grad_x[0], grad_x[1], partials};
  call.reduce_reads = {partials};
  call.reduce_writes = grads;
  call.tile_flops = 2 * 2 * 23 * M * C * C;  // 23 C^2 multiply-adds per pixel and direction
  launch(call);  // M > 0: check_arguments refuses empty inputs (the Python entry points return early)
  std::vector<at::Tensor> result = {grad_x[0], grad_x[1]};
  result.insert(result.end(), grads.begin(), grads.end());
  return result;
}

// The two launches announced as chain_stage calls (fusion_chain.cpp), for the launch ledger's count.
void announce_fused_backward(const FusedBackwardCall& call) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("gemini_kernels::chain_stage", "");
  torch::jit::Stack stack{c10::IValue(std::string("fused_backward")), c10::IValue(call.tile_reads),
                          c10::IValue(call.tile_writes), c10::IValue(call.tile_flops)};
  op.callBoxed(&stack);
  stack = {c10::IValue(std::string("fused_backward_reduce")), c10::IValue(call.reduce_reads),
           c10::IValue(call.reduce_writes), c10::IValue(int64_t{0})};
  op.callBoxed(&stack);
}

}  // namespace gk

TORCH_LIBRARY_FRAGMENT(gemini_kernels, m) {
  // The fused backward of narrow layers (csrc/fused_backward.h) on its own: the gradients of x0, x1 and
  // the 14 parameters from the forward's gates, the weight gradients summed over `programs` partial
  // sums. On CPU it runs the tile logic with the host engine, for the tests.
  m.def("fused_backward(Tensor grad_y0, Tensor grad_y1, Tensor x0, Tensor x1, Tensor[] params, Tensor gate, "
        "int num_heads, int programs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) { m.impl("fused_backward", &gk::fused_backward_cpu); }
