// The host path's SIMD forward (simd_forward.h): which instruction set runs it, and the torch-facing
// call, its tiles spread over the intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fusion_api.h"
#include "simd_forward.h"

namespace gk {

template <class T>
int64_t simd_forward_tile(SimdIsa isa) {
  return isa == SimdIsa::Avx512 ? avx512::tile<T>() : avx2::tile<T>();
}

template <class T>
int64_t simd_forward_scratch(SimdIsa isa, int channels, int heads) {
  return (8 * int64_t{channels} + heads + 2) * simd_forward_tile<T>(isa);
}

template <class T>
void simd_forward_tiles(SimdIsa isa, const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch) {
  if (isa == SimdIsa::Avx512) return avx512::tiles(args, begin, end, scratch);
  avx2::tiles(args, begin, end, scratch);
}

namespace {

const char* isa_name(SimdIsa isa) { return isa == SimdIsa::Avx512 ? "avx512" : "avx2"; }

// What this CPU runs, as torch's own CPU capability allows (ATEN_CPU_CAPABILITY=avx2 or default
// narrows it, as it narrows torch's kernels), best first.
std::vector<SimdIsa> supported_isas() {
  std::vector<SimdIsa> isas;
#if defined(__x86_64__) && defined(__GNUC__)
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
    isas.push_back(SimdIsa::Avx512);
  if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    isas.push_back(SimdIsa::Avx2);
#endif
  return isas;
}

SimdIsa parse_isa(const std::string& name) {
  for (SimdIsa isa : supported_isas())
    if (name == isa_name(isa)) return isa;
  std::string have;
  for (SimdIsa isa : supported_isas()) have += std::string(have.empty() ? "" : ", ") + isa_name(isa);
  TORCH_CHECK(false, "gemini_kernels.simd_forward: isa=\"", name, "\" is not one this CPU runs; expected one of [",
              have, "]");
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <class T>
void run(SimdIsa isa, const at::Tensor& x0, const at::Tensor& x1, const FusionParamTensors& p, int64_t num_heads,
         const at::Tensor& y0, const at::Tensor& y1, const at::Tensor& gate) {
  const int64_t C = x0.size(-1), M = x0.numel() / C;
  SimdForwardArgs<T> args{};
  args.x[0] = x0.data_ptr<T>();
  args.x[1] = x1.data_ptr<T>();
  args.y[0] = y0.data_ptr<T>();
  args.y[1] = y1.data_ptr<T>();
  args.gate = gate.data_ptr<T>();
  args.fc1_weight = p.fc1_weight.data_ptr<T>();
  args.fc1_bias = p.fc1_bias.data_ptr<T>();
  args.fc2_weight = p.fc2_weight.data_ptr<T>();
  args.fc2_bias = p.fc2_bias.data_ptr<T>();
  args.k_noise = p.k_noise.data_ptr<T>();
  args.v_noise = p.v_noise.data_ptr<T>();
  args.in_proj_weight[0] = p.in_proj_weight_0.data_ptr<T>();
  args.in_proj_weight[1] = p.in_proj_weight_1.data_ptr<T>();
  args.in_proj_bias[0] = p.in_proj_bias_0.data_ptr<T>();
  args.in_proj_bias[1] = p.in_proj_bias_1.data_ptr<T>();
  args.out_proj_weight[0] = p.out_proj_weight_0.data_ptr<T>();
  args.out_proj_weight[1] = p.out_proj_weight_1.data_ptr<T>();
  args.out_proj_bias[0] = p.out_proj_bias_0.data_ptr<T>();
  args.out_proj_bias[1] = p.out_proj_bias_1.data_ptr<T>();
  args.pixels = M;
  args.channels = static_cast<int>(C);
  args.heads = static_cast<int>(num_heads);
  args.scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(C / num_heads)));
  const int64_t tile = simd_forward_tile<T>(isa);
  const int64_t tiles = (M + tile - 1) / tile;
  const size_t bytes = (simd_forward_scratch<T>(isa, args.channels, args.heads) * sizeof(T) + 63) / 64 * 64;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<void, AlignedFree> scratch(std::aligned_alloc(64, bytes));
    TORCH_CHECK(scratch != nullptr, "gemini_kernels.simd_forward: could not allocate ", bytes, " bytes of scratch");
    simd_forward_tiles<T>(isa, args, begin, end, static_cast<T*>(scratch.get()));
  });
}

ForwardResult simd_forward_with(SimdIsa isa, const at::Tensor& x0_in, const at::Tensor& x1_in, at::TensorList params,
                                int64_t num_heads) {
  RECORD_FUNCTION("gemini_kernels::simd_forward", std::vector<c10::IValue>());
  const at::Tensor x0 = x0_in.contiguous(), x1 = x1_in.contiguous();
  const ContiguousParams p = contiguous_params(params);
  const std::array<at::Tensor, 2> y = empty_like_inputs(x0_in, x1_in);
  const at::Tensor gate = at::empty(gate_shape(x0.sizes(), num_heads), x0.options());
  if (x0.numel() > 0) {
    if (x0.scalar_type() == at::kFloat) {
      run<float>(isa, x0, x1, p.named, num_heads, y[0], y[1], gate);
    } else {
      run<double>(isa, x0, x1, p.named, num_heads, y[0], y[1], gate);
    }
  }
  return {y[0], y[1], gate, {}};
}

// torch.ops.gemini_kernels.simd_forward: y0, y1 and the gates on the named instruction set.
std::tuple<at::Tensor, at::Tensor, at::Tensor> simd_forward_op(const at::Tensor& x0, const at::Tensor& x1,
                                                               at::TensorList params, int64_t num_heads,
                                                               const std::string& isa) {
  check_arguments(x0, x1, params, num_heads);
  TORCH_CHECK((x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble) && x0.size(-1) <= kSimdForwardMaxWidth,
              "gemini_kernels.simd_forward: x0 must be float32 or float64 with at most ", kSimdForwardMaxWidth,
              " channels; got ", x0.scalar_type(), " with ", x0.size(-1));
  auto [y0, y1, gate, activations] = simd_forward_with(parse_isa(isa), x0, x1, params, num_heads);
  return {y0, y1, gate};
}

std::vector<std::string> simd_forward_isas() {
  std::vector<std::string> names;
  for (SimdIsa isa : supported_isas()) names.push_back(isa_name(isa));
  return names;
}

}  // namespace

bool takes_simd_forward(const at::Tensor& x0, bool save_activations) {
  static const std::vector<SimdIsa> isas = supported_isas();
  return !save_activations && !isas.empty() && x0.device().is_cpu() &&
         (x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble) && x0.size(-1) <= kSimdForwardMaxWidth;
}

ForwardResult simd_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads) {
  static const std::vector<SimdIsa> isas = supported_isas();
  return simd_forward_with(isas.front(), x0, x1, params, num_heads);
}

}  // namespace gk

TORCH_LIBRARY_FRAGMENT(gemini_kernels, m) {
  // The host path's SIMD forward on a named instruction set (simd_forward.h), and the sets this CPU
  // runs, best first: what the tests compare, one set at a time, with the oracle.
  m.def("simd_forward(Tensor x0, Tensor x1, Tensor[] params, int num_heads, str isa) -> (Tensor, Tensor, Tensor)");
  m.def("simd_forward_isas() -> str[]", &gk::simd_forward_isas);
  // Whether a CPU forward of x0 takes it (fusion_forward's choice, as fusion_host.cpp makes it).
  m.def("takes_simd_forward(Tensor x0, bool save_activations=False) -> bool", &gk::takes_simd_forward);
}

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) { m.impl("simd_forward", &gk::simd_forward_op); }
