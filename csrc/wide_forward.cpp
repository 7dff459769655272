// Around the wide forward's block logic (wide_forward.h): which calls take it, its arguments and
// buffers from the tensors, what each of its launches reads and writes, the host engine's run of every
// line of it on CPU, and the op `wide_forward` (CPU here; CUDA in fusion_cuda.cpp), through which the
// tests compare it with the oracle.
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
#include "wide_forward.h"

namespace gk {

namespace {

}  // namespace

template <class T, WidePass kPass>
void run_wide_pass_on_host(const WideForwardArgs& args) {
  const int n = args.channels / args.heads * args.block_heads;
  at::parallel_for(0, wide_blocks(args.pixels, args.heads, args.block_heads), 1, [&](int64_t begin, int64_t end) {
    HostWideEngine<T> engine(wide_forward_shape(args.block_heads), n);
    for (int64_t block = begin; block < end; ++block) wide_forward_block<T, kPass>(engine, args, block);
  });
}
#define GK_INSTANTIATE_HOST_PASSES(T)                                           \
  template void run_wide_pass_on_host<T, WidePass::Pre>(const WideForwardArgs&); \
  template void run_wide_pass_on_host<T, WidePass::Logits>(const WideForwardArgs&);
GK_INSTANTIATE_HOST_PASSES(float)
GK_INSTANTIATE_HOST_PASSES(double)
GK_INSTANTIATE_HOST_PASSES(at::Half)
GK_INSTANTIATE_HOST_PASSES(at::BFloat16)
#undef GK_INSTANTIATE_HOST_PASSES

namespace {

template <class T>
void run_passes_on_host(const WideForwardArgs& args) {
  run_wide_pass_on_host<T, WidePass::Pre>(args);
  run_wide_pass_on_host<T, WidePass::Logits>(args);
  run_wide_pass_on_host<T, WidePass::Gates>(args);
  run_wide_pass_on_host<T, WidePass::Values>(args);
  run_wide_pass_on_host<T, WidePass::Output>(args);
}

void launch_on_host(const WideForwardCall& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.dtype, "gemini_kernels::wide_forward",
                                  [&] { run_passes_on_host<scalar_t>(call.args); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wide_forward_cpu(const at::Tensor& x0, const at::Tensor& x1,
                                                                at::TensorList params, int64_t num_heads) {
  const ForwardResult r = wide_forward(x0, x1, params, num_heads, launch_on_host);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

}  // namespace

bool takes_wide_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                        bool tensor_cores, int64_t shared_memory_bytes, int compute_capability) {
  check_arguments(x0, x1, params, num_heads);
  const int64_t C = x0.size(-1);
  if (!wide_forward_fits(C, num_heads)) return false;
  if (!tensor_cores) return true;
  const at::ScalarType t = x0.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16) return false;  // float32 would run on TF32 tensor cores
  if (compute_capability < (t == at::kBFloat16 ? 80 : 70)) return false;
  const int64_t block_heads = wide_block_heads(C, num_heads);
  if (wide_forward_shape(static_cast<int>(block_heads)).bytes(static_cast<int>(C / num_heads * block_heads)) >
      shared_memory_bytes)
    return false;
  return tensor_core_weights(params);
}

WideLayer wide_layer(const at::Tensor& x0, int64_t num_heads, const char* kernel) {
  WideLayer layer;
  layer.channels = static_cast<int>(x0.size(-1));
  layer.pixels = x0.numel() / layer.channels;
  layer.heads = static_cast<int>(num_heads);
  layer.block_heads = static_cast<int>(wide_block_heads(layer.channels, num_heads));
  layer.scale = 1.0 / std::sqrt(static_cast<double>(layer.channels / num_heads));
  TORCH_CHECK(wide_blocks(layer.pixels, layer.heads, layer.block_heads) <= INT32_MAX, "gemini_kernels: x0 has ",
              layer.pixels, " pixels; the wide ", kernel, " takes at most ",
              int64_t{INT32_MAX} / (2 * layer.heads / layer.block_heads) * kWideRows);
  return layer;
}

ForwardResult wide_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                           WideLauncher launch) {
  check_arguments(x0, x1, params, num_heads);
  const int64_t C = x0.size(-1);
  TORCH_CHECK(wide_forward_fits(C, num_heads), "gemini_kernels: the wide forward takes layers whose heads group "
              "into blocks of a multiple of ", kMmaEdge, " channels, at most ", kWideMaxColumns, "; got x0 of shape ",
              x0.sizes(), " and num_heads=", num_heads, " (", C / num_heads, " channels a head)");
  const WideLayer layer = wide_layer(x0, num_heads, "forward");
  const int64_t M = layer.pixels;
  const at::Tensor x[2] = {x0.contiguous(), x1.contiguous()};
  const std::array<at::Tensor, 2> y = empty_like_inputs(x0, x1);
  const at::TensorOptions acc = x0.options().dtype(accumulation_type(x0.scalar_type()));
  const at::Tensor gate = at::empty(gate_shape(x0.sizes(), num_heads), acc);
  const at::Tensor pre = at::empty({2, M, C}, x0.options());  // fc1's pre-activation u, then the value mix
  const at::Tensor z = at::empty({2, M, C}, x0.options());
  const at::Tensor stats = at::empty({2, M, num_heads / layer.block_heads, 2}, acc);
  const FusionParamTensors w = contiguous_params(params).named;

  WideForwardCall call;
  call.dtype = x0.scalar_type();
  WideForwardArgs& a = call.args;
  static_cast<WideLayer&>(a) = layer;
  for (int d = 0; d < 2; ++d) {
    a.x[d] = x[d].const_data_ptr();
    a.y[d] = y[d].data_ptr();
  }
  a.gate = gate.data_ptr();
  a.pre = pre.data_ptr();
  a.z = z.data_ptr();
  a.stats = stats.data_ptr();
#define GK_PARAM_POINTER(field, name, rank, a0, b0, a1, b1) a.params.field = w.field.const_data_ptr();
  GK_FUSION_PARAMS(GK_PARAM_POINTER)
#undef GK_PARAM_POINTER

  // What each launch reads and writes, the in-projections by the parts it multiplies by.
  call.launches = [=] {
    const int64_t mac = 2 * 2 * M * C * C;  // FLOPs of one C x C product over both directions
    const at::Tensor wi[2] = {w.in_proj_weight_0, w.in_proj_weight_1}, bi[2] = {w.in_proj_bias_0, w.in_proj_bias_1};
    return std::array<WideLaunch, kWidePasses>{
        WideLaunch{"wide_forward_pre", {x[0], x[1], w.fc1_weight, w.fc1_bias}, {pre}, 2 * mac},
        WideLaunch{"wide_forward_logits", {pre, w.fc2_weight, w.fc2_bias}, {z, stats}, mac},
        WideLaunch{"wide_forward_gates",
                   {x[0], x[1], z, stats, w.k_noise, in_proj_part(wi[0], 0), in_proj_part(wi[0], 1),
                    in_proj_part(wi[1], 0), in_proj_part(wi[1], 1), in_proj_part(bi[0], 0), in_proj_part(bi[1], 0)},
                   {gate},
                   2 * mac},
        WideLaunch{"wide_forward_values",
                   {x[0], x[1], gate, w.v_noise, in_proj_part(wi[0], 2), in_proj_part(wi[1], 2), in_proj_part(bi[0], 2),
                    in_proj_part(bi[1], 2)},
                   {pre},
                   2 * mac},
        WideLaunch{"wide_forward_output",
                   {pre, x[0], x[1], w.out_proj_weight_0, w.out_proj_weight_1, w.out_proj_bias_0, w.out_proj_bias_1},
                   {y[0], y[1]},
                   mac}};
  };
  if (M > 0) launch(call);
  return {y[0], y[1], gate, {}};
}

// The launches announced as chain_stage calls (fusion_chain.cpp), for the launch ledger's count.
void announce_wide_launches(c10::ArrayRef<WideLaunch> launches) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("gemini_kernels::chain_stage", "");
  for (const WideLaunch& launch : launches) {
    torch::jit::Stack stack{c10::IValue(std::string(launch.name)), c10::IValue(launch.reads),
                            c10::IValue(launch.writes), c10::IValue(launch.flops)};
    op.callBoxed(&stack);
  }
}

void announce_wide_forward(const WideForwardCall& call) { announce_wide_launches(call.launches()); }

at::Tensor in_proj_part(const at::Tensor& in_proj, int64_t i) {
  return in_proj.narrow(0, i * in_proj.size(0) / 3, in_proj.size(0) / 3);
}

}  // namespace gk

TORCH_LIBRARY_FRAGMENT(gemini_kernels, m) {
  // The fused forward of wide layers (csrc/wide_forward.h) on its own: y0, y1 and the gates. The CUDA
  // forward takes it where the narrow one does not and takes_wide_forward says so; on CPU it runs the
  // block logic with the host engine, for the tests.
  m.def("wide_forward(Tensor x0, Tensor x1, Tensor[] params, int num_heads) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) { m.impl("wide_forward", &gk::wide_forward_cpu); }
