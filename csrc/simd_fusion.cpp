// The host path's SIMD forward and backward (simd_fusion.h): which instruction set runs them, and the
// torch-facing calls, their tiles spread over the intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "fusion_api.h"
#include "simd_fusion.h"

namespace gk {
namespace {

const char* isa_name(SimdIsa isa) { return isa == SimdIsa::Avx512 ? "avx512" : "avx2"; }

// What this CPU runs, as torch's own CPU capability allows (ATEN_CPU_CAPABILITY=avx2 or default
// narrows it, as it narrows torch's kernels), best first.
std::vector<SimdIsa> supported_isas() {
  std::vector<SimdIsa> isas;
#if defined(GK_SIMD_FUSION)
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
    isas.push_back(SimdIsa::Avx512);
  if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    isas.push_back(SimdIsa::Avx2);
#endif
  return isas;
}

const std::vector<SimdIsa>& isas() {
  static const std::vector<SimdIsa> supported = supported_isas();
  return supported;
}

SimdIsa parse_isa(const std::string& name, const char* op) {
  std::string have;
  for (SimdIsa isa : isas()) {
    if (name == isa_name(isa)) return isa;
    have += std::string(have.empty() ? "" : ", ") + isa_name(isa);
  }
  TORCH_CHECK(false, "gemini_kernels.", op, ": isa=\"", name, "\" is not one this CPU runs; expected one of [", have,
              "]");
}

// The entry points of an instruction set's file.
template <class T>
struct Entry {
  int64_t (*tile)();
  int64_t (*lanes)();
  int64_t (*forward_scratch)(int, int);
  int64_t (*backward_scratch)(int, int);
  void (*forward)(const SimdForwardArgs<T>&, int64_t, int64_t, T*);
  void (*backward)(const SimdBackwardArgs<T>&, int64_t, int64_t, T*, const SimdParamSet<T*>&);
};
template <class T>
Entry<T> entry(SimdIsa isa) {
#if defined(GK_SIMD_FUSION)
  if (isa == SimdIsa::Avx512)
    return {avx512::tile<T>, avx512::lanes<T>, avx512::forward_scratch_elements<T>,
            avx512::backward_scratch_elements<T>, avx512::forward_tiles<T>, avx512::backward_tiles<T>};
  return {avx2::tile<T>, avx2::lanes<T>, avx2::forward_scratch_elements<T>, avx2::backward_scratch_elements<T>,
          avx2::forward_tiles<T>, avx2::backward_tiles<T>};
#else
  TORCH_CHECK(false, "gemini_kernels: the SIMD kernels are not compiled on this platform (", isa_name(isa), ")");
#endif
}

bool is_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

int64_t lanes_of(SimdIsa isa, at::ScalarType dtype) {
  return dtype == at::kFloat ? entry<float>(isa).lanes() : entry<double>(isa).lanes();
}

// Pointers in FusionParams order (fusion_params.h) as a parameter set.
template <class P>
SimdParamSet<P> param_set(const std::array<P, kNumParams>& in) {
  SimdParamSet<P> out{};
  out.fc1_weight = in[0];
  out.fc1_bias = in[1];
  out.fc2_weight = in[2];
  out.fc2_bias = in[3];
  out.k_noise = in[4];
  out.v_noise = in[5];
  for (int d = 0; d < 2; ++d) {
    out.in_proj_weight[d] = in[6 + 4 * d];
    out.in_proj_bias[d] = in[7 + 4 * d];
    out.out_proj_weight[d] = in[8 + 4 * d];
    out.out_proj_bias[d] = in[9 + 4 * d];
  }
  return out;
}

template <class T>
SimdLayer<T> layer_of(const at::Tensor& x0, const std::vector<at::Tensor>& params, int64_t num_heads) {
  SimdLayer<T> layer{};
  std::array<const T*, kNumParams> pointers{};
  for (int i = 0; i < kNumParams; ++i) pointers[i] = params[i].data_ptr<T>();
  layer.p = param_set(pointers);
  layer.channels = static_cast<int>(x0.size(-1));
  layer.pixels = x0.numel() / layer.channels;
  layer.heads = static_cast<int>(num_heads);
  layer.scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(layer.channels / num_heads)));
  return layer;
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
std::unique_ptr<void, AlignedFree> aligned_scratch(int64_t elements, size_t element_size) {
  const size_t bytes = (static_cast<size_t>(elements) * element_size + 63) / 64 * 64;
  std::unique_ptr<void, AlignedFree> scratch(std::aligned_alloc(64, bytes));
  TORCH_CHECK(scratch != nullptr, "gemini_kernels: could not allocate ", bytes, " bytes of scratch");
  return scratch;
}

static_assert(kSimdActivations == 2 * kSimdSavedPlanes, "an activation per direction and saved plane");
// The activations' pointers as the kernels take them (null where there are none): direction d's plane k
// is activations[d * kSimdSavedPlanes + k].
template <class P>
void saved_planes(at::TensorList activations, SimdSaved<P>& saved) {
  for (int d = 0; d < 2; ++d)
    for (int k = 0; k < kSimdSavedPlanes; ++k)
      saved[d][k] = activations.empty() ? nullptr : static_cast<P>(activations[d * kSimdSavedPlanes + k].data_ptr());
}

template <class T>
void run_forward(SimdIsa isa, const at::Tensor& x0, const at::Tensor& x1, const std::vector<at::Tensor>& params,
                 int64_t num_heads, const std::array<at::Tensor, 2>& y, const at::Tensor& gate,
                 at::TensorList activations) {
  const Entry<T> run = entry<T>(isa);
  SimdForwardArgs<T> args{};
  saved_planes(activations, args.saved);
  args.layer = layer_of<T>(x0, params, num_heads);
  args.x[0] = x0.data_ptr<T>();
  args.x[1] = x1.data_ptr<T>();
  args.y[0] = y[0].data_ptr<T>();
  args.y[1] = y[1].data_ptr<T>();
  args.gate = gate.data_ptr<T>();
  const int64_t tiles = (args.layer.pixels + run.tile() - 1) / run.tile();
  // Rows past the last tile (where the rounding to the multiple is longer than a tile) are zeros, so
  // that the activations are a function of the inputs, as a traced call's are compared.
  for (const at::Tensor& a : activations) a.narrow(0, tiles * run.tile(), a.size(0) - tiles * run.tile()).zero_();
  const int64_t scratch_elements = run.forward_scratch(args.layer.channels, args.layer.heads);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const auto scratch = aligned_scratch(scratch_elements, sizeof(T));
    run.forward(args, begin, end, static_cast<T*>(scratch.get()));
  });
}

// The shape of each of the SIMD forward's activations for x0 (which the fake kernel of fusion_forward
// also returns, from simd_saved_pixel_multiple).
std::vector<int64_t> activation_shape(const at::Tensor& x0) {
  const int64_t C = x0.size(-1);
  return {simd_saved_pixels(C == 0 ? 0 : x0.numel() / C), C};
}

ForwardResult forward_with(SimdIsa isa, const at::Tensor& x0_in, const at::Tensor& x1_in, at::TensorList params,
                           int64_t num_heads, bool save_activations) {
  RECORD_FUNCTION("gemini_kernels::simd_forward", std::vector<c10::IValue>());
  const at::Tensor x0 = x0_in.contiguous(), x1 = x1_in.contiguous();
  const ContiguousParams p = contiguous_params(params);
  const std::array<at::Tensor, 2> y = empty_like_inputs(x0_in, x1_in);
  const at::Tensor gate = at::empty(gate_shape(x0.sizes(), num_heads), x0.options());
  std::vector<at::Tensor> activations;
  if (save_activations)
    for (int i = 0; i < kSimdActivations; ++i) activations.push_back(at::empty(activation_shape(x0), x0.options()));
  if (x0.scalar_type() == at::kFloat) {
    run_forward<float>(isa, x0, x1, p.list, num_heads, y, gate, activations);
  } else {
    run_forward<double>(isa, x0, x1, p.list, num_heads, y, gate, activations);
  }
  return {y[0], y[1], gate, activations};
}

// Each thread (at most one run of tiles a thread) sums its tiles' parameter gradients in a set of its
// own; the sets are then added in run order, so the result depends on the thread count only.
template <class T>
std::vector<at::Tensor> run_backward(SimdIsa isa, const at::Tensor& grad_y0, const at::Tensor& grad_y1,
                                     const at::Tensor& x0, const at::Tensor& x1, const std::vector<at::Tensor>& params,
                                     const at::Tensor& gate, at::TensorList activations, int64_t num_heads) {
  const Entry<T> run = entry<T>(isa);
  SimdBackwardArgs<T> args{};
  saved_planes(activations, args.saved);
  args.layer = layer_of<T>(x0, params, num_heads);
  const std::array<at::Tensor, 2> grad_x = empty_like_inputs(x0, x1);
  args.x[0] = x0.data_ptr<T>();
  args.x[1] = x1.data_ptr<T>();
  args.grad_y[0] = grad_y0.data_ptr<T>();
  args.grad_y[1] = grad_y1.data_ptr<T>();
  args.gate = gate.data_ptr<T>();
  args.grad_x[0] = grad_x[0].data_ptr<T>();
  args.grad_x[1] = grad_x[1].data_ptr<T>();
  const int64_t C = args.layer.channels;
  const std::vector<ParamSpec> specs = param_specs(C);
  std::array<int64_t, kNumParams> offsets{};
  int64_t set_elements = 0;
  for (int i = 0; i < kNumParams; ++i) {
    offsets[i] = set_elements;
    int64_t n = 1;
    for (int64_t dim : specs[i].shape) n *= dim;
    set_elements += n;
  }
  const int64_t tiles = (args.layer.pixels + run.tile() - 1) / run.tile();
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  const at::Tensor sets = at::zeros({runs, set_elements}, x0.options());
  const int64_t scratch_elements = run.backward_scratch(args.layer.channels, args.layer.heads);
  T* const sets_data = sets.data_ptr<T>();
  at::parallel_for(0, runs, 1, [&](int64_t first, int64_t last) {
    const auto scratch = aligned_scratch(scratch_elements, sizeof(T));
    for (int64_t r = first; r < last; ++r) {
      std::array<T*, kNumParams> pointers{};
      for (int i = 0; i < kNumParams; ++i) pointers[i] = sets_data + r * set_elements + offsets[i];
      run.backward(args, tiles * r / runs, tiles * (r + 1) / runs, static_cast<T*>(scratch.get()),
                   param_set(pointers));
    }
  });
  at::Tensor total = sets[0];
  for (int64_t r = 1; r < runs; ++r) total = total + sets[r];
  std::vector<at::Tensor> grads = {grad_x[0], grad_x[1]};
  for (int i = 0; i < kNumParams; ++i)
    grads.push_back(total.narrow(0, offsets[i], params[i].numel()).view(specs[i].shape).clone());
  return grads;
}

// The SIMD forward's activations, as it returns them for x0, or none.
void check_simd_activations(at::TensorList activations, const at::Tensor& x0) {
  if (activations.empty()) return;
  TORCH_CHECK(activations.size() == kSimdActivations, "gemini_kernels.simd_backward: activations must be empty or the ",
              kSimdActivations, " tensors simd_forward returns with save_activations=True; got ", activations.size());
  const std::vector<int64_t> shape = activation_shape(x0);
  for (size_t i = 0; i < activations.size(); ++i) {
    const at::Tensor& a = activations[i];
    TORCH_CHECK(a.sizes() == at::IntArrayRef(shape) && a.scalar_type() == x0.scalar_type() && a.device().is_cpu() &&
                    a.is_contiguous(),
                "gemini_kernels.simd_backward: activations[", i, "] is ", a.scalar_type(), a.sizes(), " on ",
                a.device(), (a.is_contiguous() ? "" : ", not contiguous"), "; expected a contiguous ",
                x0.scalar_type(), at::IntArrayRef(shape), " on cpu as simd_forward returns it for x0");
  }
}

std::vector<at::Tensor> backward_with(SimdIsa isa, const at::Tensor& grad_y0, const at::Tensor& grad_y1,
                                      const at::Tensor& x0_in, const at::Tensor& x1_in, at::TensorList params,
                                      const at::Tensor& gate, at::TensorList activations, int64_t num_heads) {
  RECORD_FUNCTION("gemini_kernels::simd_backward", std::vector<c10::IValue>());
  // The weight gradients' register blocks cover whole registers of columns (outer_rows): checked here,
  // where every caller passes, as a narrower C would leave the last columns' gradients unsummed.
  const int64_t lanes = lanes_of(isa, x0_in.scalar_type());
  TORCH_CHECK(x0_in.size(-1) % lanes == 0, "gemini_kernels.simd_backward: on ", isa_name(isa), " in ",
              x0_in.scalar_type(), " the channel count must be a multiple of ", lanes, "; got ", x0_in.size(-1));
  const at::Tensor x0 = x0_in.contiguous(), x1 = x1_in.contiguous();
  check_simd_activations(activations, x0_in);
  const at::Tensor gy0 = grad_y0.contiguous(), gy1 = grad_y1.contiguous(), g = gate.contiguous();
  const ContiguousParams p = contiguous_params(params);
  std::vector<at::Tensor> grads =
      x0.scalar_type() == at::kFloat ? run_backward<float>(isa, gy0, gy1, x0, x1, p.list, g, activations, num_heads)
                                     : run_backward<double>(isa, gy0, gy1, x0, x1, p.list, g, activations, num_heads);
  grads[0] = grads[0].view(x0_in.sizes());
  grads[1] = grads[1].view(x1_in.sizes());
  return grads;
}

// What the ops on a named instruction set take beyond check_arguments.
// (The backward's further condition, a channel count the register divides, backward_with checks.)
void check_simd_call(const at::Tensor& x0, const char* op) {
  const int64_t C = x0.size(-1);
  TORCH_CHECK(is_float_or_double(x0) && C <= kSimdMaxWidth, "gemini_kernels.", op,
              ": x0 must be float32 or float64 with at most ", kSimdMaxWidth, " channels; got ", x0.scalar_type(),
              " with ", C);
}

// The saved products' blocks are as long as the tile of the instruction set that wrote them, which the
// shapes do not show: only the best set, the one fusion_forward and fusion_backward run, saves and
// reads them.
void check_saving_isa(SimdIsa isa, const char* op) {
  TORCH_CHECK(isa == isas().front(), "gemini_kernels.", op, ": activations are saved and read on ",
              isa_name(isas().front()), " only (the instruction set fusion_forward runs); got isa=\"", isa_name(isa),
              "\"");
}

// torch.ops.gemini_kernels.simd_forward / simd_backward: on the named instruction set.
ForwardResult simd_forward_op(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                              const std::string& isa_name, bool save_activations) {
  check_arguments(x0, x1, params, num_heads);
  const SimdIsa isa = parse_isa(isa_name, "simd_forward");
  check_simd_call(x0, "simd_forward");
  if (save_activations) check_saving_isa(isa, "simd_forward");
  return forward_with(isa, x0, x1, params, num_heads, save_activations);
}

std::vector<at::Tensor> simd_backward_op(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                         const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                         int64_t num_heads, const std::string& isa_name, at::TensorList activations) {
  check_arguments(x0, x1, params, num_heads);
  check_backward_arguments(grad_y0, grad_y1, x0, gate, num_heads);
  const SimdIsa isa = parse_isa(isa_name, "simd_backward");
  check_simd_call(x0, "simd_backward");
  if (!activations.empty()) check_saving_isa(isa, "simd_backward");
  return backward_with(isa, grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads);
}

std::vector<std::string> simd_isas() {
  std::vector<std::string> names;
  for (SimdIsa isa : isas()) names.push_back(isa_name(isa));
  return names;
}

bool takes_simd_backward_op(const at::Tensor& x0) { return takes_simd_backward(x0, {}); }

bool runs_simd_forward(const at::Tensor& x0) {
  return !isas().empty() && x0.device().is_cpu() && is_float_or_double(x0) && x0.size(-1) <= kSimdMaxWidth;
}
bool runs_simd_backward(const at::Tensor& x0) {
  return runs_simd_forward(x0) && x0.size(-1) % lanes_of(isas().front(), x0.scalar_type()) == 0;
}

}  // namespace

bool takes_simd_forward(const at::Tensor& x0, bool save_activations) {
  return save_activations ? runs_simd_backward(x0) : runs_simd_forward(x0);
}

bool takes_simd_backward(const at::Tensor& x0, at::TensorList activations) {
  return runs_simd_backward(x0) && (activations.empty() || activations.size() == kSimdActivations);
}

ForwardResult simd_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                           bool save_activations) {
  return forward_with(isas().front(), x0, x1, params, num_heads, save_activations);
}

std::vector<at::Tensor> simd_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                      const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                      at::TensorList activations, int64_t num_heads) {
  return backward_with(isas().front(), grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads);
}

}  // namespace gk

TORCH_LIBRARY_FRAGMENT(gemini_kernels, m) {
  // The host path's SIMD forward and backward on a named instruction set (simd_fusion.h), the sets this
  // CPU runs, best first, and whether fusion_forward / fusion_backward take them: what the tests use to
  // compare each set with the oracle.
  m.def("simd_forward(Tensor x0, Tensor x1, Tensor[] params, int num_heads, str isa, bool save_activations=False) "
        "-> (Tensor, Tensor, Tensor, Tensor[])");
  m.def("simd_backward(Tensor grad_y0, Tensor grad_y1, Tensor x0, Tensor x1, Tensor[] params, Tensor gate, "
        "int num_heads, str isa, Tensor[] activations) -> Tensor[]");
  m.def("simd_isas() -> str[]", &gk::simd_isas);
  m.def("takes_simd_forward(Tensor x0, bool save_activations=False) -> bool", &gk::takes_simd_forward);
  m.def("simd_saved_pixel_multiple() -> int", []() { return gk::kSimdSavedPixelMultiple; });
  m.def("takes_simd_backward(Tensor x0) -> bool", &gk::takes_simd_backward_op);
}

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) {
  m.impl("simd_forward", &gk::simd_forward_op);
  m.impl("simd_backward", &gk::simd_backward_op);
}
