// Around the wide backward's block logic (wide_backward.h): which calls take it, its arguments and
// intermediate buffers, what each of its launches reads and writes, the host engine's run of every line
// of it on CPU, and the op `wide_backward` (CPU here; CUDA in fusion_cuda.cpp), through which the tests
// compare it with the oracle.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "fused_host_engine.h"
#include "fusion_api.h"
#include "wide_backward.h"

namespace gk {

namespace {

template <class T, WideBackwardPass kPass>
void run_pass_on_host(const WideBackwardArgs& args) {
  const int n = wide_backward_columns(kPass, args.channels, args.heads, args.block_heads);
  const int64_t blocks = wide_backward_blocks(kPass, args.pixels, args.channels, args.heads, args.block_heads);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    HostWideEngine<T> engine(wide_backward_shape(kPass), n);
    for (int64_t block = begin; block < end; ++block) wide_backward_block<T, kPass>(engine, args, block);
  });
}

template <class T>
void run_passes_on_host(const WideBackwardArgs& args) {
  const WideForwardArgs forward = forward_passes_of(args);
  run_wide_pass_on_host<T, WidePass::Pre>(forward);
  run_wide_pass_on_host<T, WidePass::Logits>(forward);
  run_pass_on_host<T, WideBackwardPass::Heads>(args);
  run_pass_on_host<T, WideBackwardPass::Keys>(args);
  run_pass_on_host<T, WideBackwardPass::Judger>(args);
  run_pass_on_host<T, WideBackwardPass::Inputs>(args);
  run_pass_on_host<T, WideBackwardPass::Weights>(args);
  run_pass_on_host<T, WideBackwardPass::Noise>(args);
}

void launch_on_host(const WideBackwardCall& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.dtype, "gemini_kernels::wide_backward",
                                  [&] { run_passes_on_host<scalar_t>(call.args); });
}

std::vector<at::Tensor> wide_backward_cpu(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                          const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                          int64_t num_heads) {
  return wide_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads, launch_on_host);
}

}  // namespace

bool takes_wide_backward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                         bool tensor_cores, int64_t shared_memory_bytes, int compute_capability) {
  if (!wide_backward_fits(x0.size(-1), num_heads)) return false;
  if (!takes_wide_forward(x0, x1, params, num_heads, tensor_cores, shared_memory_bytes, compute_capability))
    return false;
  if (!tensor_cores) return true;
  const int C = static_cast<int>(x0.size(-1)), h = static_cast<int>(num_heads);
  const int block_heads = static_cast<int>(wide_block_heads(C, h));
  for (int pass = 0; pass < kWideBackwardPasses; ++pass) {  // (the forward's passes: takes_wide_forward)
    const WideBackwardPass kind = static_cast<WideBackwardPass>(pass);
    if (wide_backward_shape(kind).bytes(wide_backward_columns(kind, C, h, block_heads)) > shared_memory_bytes)
      return false;
  }
  return true;
}

std::vector<at::Tensor> wide_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                      const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                      int64_t num_heads, WideBackwardLauncher launch) {
  check_arguments(x0, x1, params, num_heads);
  check_backward_arguments(grad_y0, grad_y1, x0, gate, num_heads);
  const int64_t C = x0.size(-1);
  TORCH_CHECK(wide_backward_fits(C, num_heads), "gemini_kernels: the wide backward takes C a multiple of ",
              kWideGradientTile, " and heads that group into blocks of a multiple of ", kMmaEdge, " channels, at most ",
              kWideMaxColumns, "; got x0 of shape ", x0.sizes(), " and num_heads=", num_heads);
  const WideLayer layer = wide_layer(x0, num_heads, "backward");
  const int64_t M = layer.pixels;
  const at::Tensor x[2] = {x0.contiguous(), x1.contiguous()};
  const at::Tensor grad_y[2] = {grad_y0.contiguous(), grad_y1.contiguous()};
  const std::array<at::Tensor, 2> grad_x = empty_like_inputs(x0, x1);
  std::vector<at::Tensor> grads = empty_gradients(x0.options(), C);
  const FusionParamTensors w = contiguous_params(params).named;
  const at::TensorOptions acc = x0.options().dtype(accumulation_type(x0.scalar_type()));
  const int64_t column_blocks = num_heads / layer.block_heads;
  auto rows = [&] { return at::empty({2, M, C}, x0.options()); };
  const at::Tensor pre = rows(), z = rows(), key_input = rows(), mixed = rows(), grad_query = rows(),
                   grad_key = rows(), grad_mixed = rows(), grad_e = rows(), grad_z = rows(), grad_pre = rows();
  const at::Tensor stats = at::empty({2, M, column_blocks, 2}, acc);
  const at::Tensor dots = at::empty({2, M, column_blocks}, acc);
  const at::Tensor column_sums = at::empty({4, C}, acc);

  WideBackwardCall call;
  call.dtype = x0.scalar_type();
  WideBackwardArgs& a = call.args;
  static_cast<WideLayer&>(a) = layer;
  for (int d = 0; d < 2; ++d) {
    a.x[d] = x[d].const_data_ptr();
    a.grad_y[d] = grad_y[d].const_data_ptr();
    a.grad_x[d] = grad_x[d].data_ptr();
  }
  a.gate = gate.const_data_ptr();
  a.pre = pre.data_ptr();
  a.z = z.data_ptr();
  a.stats = stats.data_ptr();
  a.key_input = key_input.data_ptr();
  a.mixed = mixed.data_ptr();
  a.grad_query = grad_query.data_ptr();
  a.grad_key = grad_key.data_ptr();
  a.grad_mixed = grad_mixed.data_ptr();
  a.grad_e = grad_e.data_ptr();
  a.dots = dots.data_ptr();
  a.grad_z = grad_z.data_ptr();
  a.grad_pre = grad_pre.data_ptr();
  a.column_sums = column_sums.data_ptr();
#define GK_PARAM_POINTER(field, name, rank, a0, b0, a1, b1) a.params.field = w.field.const_data_ptr();
  GK_FUSION_PARAMS(GK_PARAM_POINTER)
#undef GK_PARAM_POINTER
  a.grads = gradient_pointers(grads);

  // What each launch reads and writes, the in-projections by the parts it multiplies by.
  call.launches = [=] {
    const int64_t mac = 2 * 2 * M * C * C;  // FLOPs of one C x C product over both directions
    const FusionParamTensors gw = named_params(grads);
    const at::Tensor wi[2] = {w.in_proj_weight_0, w.in_proj_weight_1}, bi[2] = {w.in_proj_bias_0, w.in_proj_bias_1};
    const at::Tensor wq[2] = {in_proj_part(wi[0], 0), in_proj_part(wi[1], 0)};
    const at::Tensor wk[2] = {in_proj_part(wi[0], 1), in_proj_part(wi[1], 1)};
    const at::Tensor wv[2] = {in_proj_part(wi[0], 2), in_proj_part(wi[1], 2)};
    const at::Tensor bq[2] = {in_proj_part(bi[0], 0), in_proj_part(bi[1], 0)};
    const at::Tensor bv[2] = {in_proj_part(bi[0], 2), in_proj_part(bi[1], 2)};
    return std::array<WideLaunch, kWideBackwardLaunches>{
        // the forward's first two passes, again
        WideLaunch{"wide_forward_pre", {x[0], x[1], w.fc1_weight, w.fc1_bias}, {pre}, 2 * mac},
        WideLaunch{"wide_forward_logits", {pre, w.fc2_weight, w.fc2_bias}, {z, stats}, mac},
        WideLaunch{"wide_backward_heads",
                   {x[0], x[1], grad_y[0], grad_y[1], z, stats, gate, w.k_noise, w.v_noise, wq[0], wq[1], wk[0], wk[1],
                    wv[0], wv[1], bq[0], bq[1], bv[0], bv[1], w.out_proj_weight_0, w.out_proj_weight_1},
                   {key_input, mixed, grad_query, grad_key, grad_mixed},
                   5 * mac},
        WideLaunch{"wide_backward_keys", {grad_key, z, stats, x[0], x[1], wk[0], wk[1]}, {grad_e, dots}, mac},
        WideLaunch{"wide_backward_judger", {z, stats, dots, grad_e, x[0], x[1], pre, w.fc2_weight}, {grad_z, grad_pre},
                   mac},
        WideLaunch{"wide_backward_inputs",
                   {grad_query, grad_mixed, grad_pre, gate, grad_e, z, stats, grad_y[0], grad_y[1], wq[0], wq[1], wv[0],
                    wv[1], w.fc1_weight},
                   {grad_x[0], grad_x[1]},
                   5 * mac},
        WideLaunch{"wide_backward_weights",
                   {grad_y[0], grad_y[1], mixed, grad_query, x[0], x[1], grad_key, key_input, grad_mixed, gate,
                    w.v_noise, grad_z, pre, grad_pre},
                   {gw.out_proj_weight_0, gw.out_proj_weight_1, gw.out_proj_bias_0, gw.out_proj_bias_1,
                    gw.in_proj_weight_0, gw.in_proj_weight_1, gw.in_proj_bias_0, gw.in_proj_bias_1, gw.fc2_weight,
                    gw.fc2_bias, gw.fc1_weight, gw.fc1_bias, column_sums},
                   // Wo, Wq, Wk per direction, Wv (two terms) per direction, W2 and W1 (2 C^2) over both
                   2 * M * C * C * 2 * (3 + 2 + 1 + 2)},
        WideLaunch{"wide_backward_noise", {column_sums, wk[0], wk[1], wv[0], wv[1]}, {gw.k_noise, gw.v_noise},
                   2 * 4 * C * C}};
  };
  launch(call);  // M > 0: check_arguments refuses empty inputs (the Python entry points return early)
  std::vector<at::Tensor> result = {grad_x[0], grad_x[1]};
  result.insert(result.end(), grads.begin(), grads.end());
  return result;
}

void announce_wide_backward(const WideBackwardCall& call) { announce_wide_launches(call.launches()); }

}  // namespace gk

TORCH_LIBRARY_FRAGMENT(gemini_kernels, m) {
  // The fused backward of wide layers (csrc/wide_backward.h) on its own: the gradients of x0, x1 and the
  // 14 parameters from the forward's gates. On CPU it runs the block logic with the host engine, for the
  // tests.
  m.def("wide_backward(Tensor grad_y0, Tensor grad_y1, Tensor x0, Tensor x1, Tensor[] params, Tensor gate, "
        "int num_heads) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) { m.impl("wide_backward", &gk::wide_backward_cpu); }
