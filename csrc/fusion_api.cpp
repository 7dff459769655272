// The device-agnostic parts of the fusion around its chain (fusion_chain.h): the parameter table by
// name, the weight packing and its cache, the argument checks and the gradients' assembly. Also
// defines the torch ops and the Python module that loads them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <list>
#include <mutex>
#include <string>

#include "fusion_api.h"

namespace gk {

FusionParamTensors named_params(at::TensorList params) {
  TORCH_CHECK(params.size() == kNumParams, "gemini_kernels: expected ", kNumParams,
              " parameters in FusionParams order, got ", params.size());
  FusionParamTensors named;
  int i = 0;
#define GK_PARAM_ASSIGN(field, name, rank, a0, b0, a1, b1) named.field = params[i++];
  GK_FUSION_PARAMS(GK_PARAM_ASSIGN)
#undef GK_PARAM_ASSIGN
  return named;
}

ContiguousParams contiguous_params(at::TensorList params) {
  ContiguousParams out;
  for (const at::Tensor& t : params) out.list.push_back(t.contiguous());
  out.named = named_params(out.list);
  return out;
}

std::array<at::Tensor, 2> empty_like_inputs(const at::Tensor& x0, const at::Tensor& x1) {
  return {at::empty(x0.sizes(), x0.options()), at::empty(x1.sizes(), x1.options())};
}

std::vector<ParamSpec> param_specs(int64_t C) {
  std::vector<ParamSpec> specs;
#define GK_PARAM_SPEC(field, name, rank, a0, b0, a1, b1)                              \
  specs.push_back(ParamSpec{name, rank == 1 ? std::vector<int64_t>{a0 * C + b0}        \
                                            : std::vector<int64_t>{a0 * C + b0, a1 * C + b1}});
  GK_FUSION_PARAMS(GK_PARAM_SPEC)
#undef GK_PARAM_SPEC
  return specs;
}

PackedWeights pack_weights(at::TensorList params, int64_t C) {
  const FusionParamTensors p = named_params(params);
  const at::Tensor in_weight[2] = {p.in_proj_weight_0, p.in_proj_weight_1};
  const at::Tensor in_bias[2] = {p.in_proj_bias_0, p.in_proj_bias_1};
  const at::Tensor w1a = p.fc1_weight.narrow(1, 0, C), w1b = p.fc1_weight.narrow(1, C, C);
  // in_proj rows are [Wq; Wk; Wv], C each
  enum InProjBlock { kQuery = 0, kKey = 1, kValue = 2 };
  auto rows = [C](const at::Tensor& t, InProjBlock block) { return t.narrow(0, block * C, C); };
  PackedWeights w;
  w.wx = at::stack({at::cat({w1a, w1b, rows(in_weight[0], kQuery), rows(in_weight[0], kValue), rows(in_weight[1], kValue)}),
                    at::cat({w1a, w1b, rows(in_weight[1], kQuery), rows(in_weight[1], kValue), rows(in_weight[0], kValue)})});
  w.w2 = p.fc2_weight;
  w.wk = at::stack({rows(in_weight[0], kKey), rows(in_weight[1], kKey)});
  w.wv = at::stack({rows(in_weight[0], kValue), rows(in_weight[1], kValue)});
  w.wo = at::stack({p.out_proj_weight_0, p.out_proj_weight_1});
  w.b1 = p.fc1_bias.contiguous();
  w.b2 = p.fc2_bias.contiguous();
  w.k_noise = p.k_noise.contiguous();
  w.v_noise = p.v_noise.contiguous();
  w.bq = at::stack({rows(in_bias[0], kQuery), rows(in_bias[1], kQuery)});
  w.bv = at::stack({rows(in_bias[0], kValue), rows(in_bias[1], kValue)});
  w.bo = at::stack({p.out_proj_bias_0, p.out_proj_bias_1});
  // v_self - v_cross = Wv v_noise + Wv s - Wv o: the first term is the same for every pixel.
  w.vn_proj = at::bmm(w.wv, w.v_noise.unsqueeze(2)).squeeze(2).contiguous();
  return w;
}

namespace {

// One parameter's identity for the weight cache (see cached_pack_weights).
struct ParamIdentity {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  at::Device device;
  uint32_t version;

  explicit ParamIdentity(const at::Tensor& t)
      : storage(t.storage().getWeakStorageImpl()),
        data(t.const_data_ptr()),
        sizes(t.sizes().vec()),
        strides(t.strides().vec()),
        dtype(t.scalar_type()),
        device(t.device()),
        version(t._version()) {}

  bool matches(const at::Tensor& t) const {
    // expired(): the storage was freed; its StorageImpl's memory stays allocated while this weak
    // reference lives, so no other storage can sit at that address and compare equal.
    return !storage.expired() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
           data == t.const_data_ptr() && t.sizes() == at::IntArrayRef(sizes) &&
           t.strides() == at::IntArrayRef(strides) && dtype == t.scalar_type() && device == t.device() &&
           version == t._version();
  }
};

struct WeightCacheEntry {
  std::vector<ParamIdentity> params;
  int64_t C;
  c10::Stream stream;
  PackedWeights weights;
};

struct WeightCache {
  std::atomic<bool> enabled{true};
  std::mutex mutex;
  std::list<WeightCacheEntry> entries;  // most recently used first
  int64_t hits = 0, misses = 0, uncached = 0;
};

WeightCache& weight_cache() {
  static WeightCache* cache = new WeightCache();  // never destroyed: tensors must not be freed at exit
  return *cache;
}

c10::Stream current_stream(const at::Device& device) {
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device);
}

}  // namespace

PackedWeights cached_pack_weights(at::TensorList params, int64_t C) {
  WeightCache& cache = weight_cache();
  const bool versioned = cache.enabled.load() &&
                         std::none_of(params.begin(), params.end(), [](const at::Tensor& t) { return t.is_inference(); });
  if (!versioned) {
    std::lock_guard<std::mutex> lock(cache.mutex);
    ++cache.uncached;
  } else {
    const c10::Stream stream = current_stream(params[0].device());
    std::lock_guard<std::mutex> lock(cache.mutex);
    for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
      if (it->C != C || it->stream != stream || it->params.size() != params.size()) continue;
      bool same = true;
      for (size_t i = 0; i < params.size() && same; ++i) same = it->params[i].matches(params[i]);
      if (!same) continue;
      ++cache.hits;
      cache.entries.splice(cache.entries.begin(), cache.entries, it);
      return it->weights;
    }
  }
  PackedWeights w = pack_weights(params, C);
  if (versioned) {
    std::vector<ParamIdentity> identity;
    identity.reserve(params.size());
    for (const at::Tensor& t : params) identity.emplace_back(t);
    const c10::Stream stream = current_stream(params[0].device());
    std::lock_guard<std::mutex> lock(cache.mutex);
    ++cache.misses;
    cache.entries.push_front(WeightCacheEntry{std::move(identity), C, stream, w});
    if (cache.entries.size() > kWeightCacheEntries) cache.entries.pop_back();
  }
  return w;
}

void clear_weight_cache() {
  WeightCache& cache = weight_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.entries.clear();
  cache.hits = cache.misses = cache.uncached = 0;
}

bool set_weight_cache_enabled(bool enabled) {
  WeightCache& cache = weight_cache();
  const bool previous = cache.enabled.exchange(enabled);
  if (!enabled) {
    std::lock_guard<std::mutex> lock(cache.mutex);
    cache.entries.clear();  // what was packed before cannot be trusted once the cache is back on
  }
  return previous;
}

std::vector<int64_t> weight_cache_info() {
  WeightCache& cache = weight_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return {cache.hits, cache.misses, cache.uncached, static_cast<int64_t>(cache.entries.size())};
}

// Kernels trust their pointers, so the op checks what would make them read out of bounds even when
// called directly (torch.ops.gemini_kernels.*) rather than through the validating Python API.
FusionBuffers parameter_buffers(const PackedWeights& w, int64_t C, int64_t num_heads) {
  FusionBuffers b{};
  b.channels = static_cast<int>(C);
  b.heads = static_cast<int>(num_heads);
  b.scale = 1.0 / std::sqrt(static_cast<double>(C / num_heads));
  b.b1 = w.b1.const_data_ptr();
  b.b2 = w.b2.const_data_ptr();
  b.k_noise = w.k_noise.const_data_ptr();
  b.bq = w.bq.const_data_ptr();
  b.bv = w.bv.const_data_ptr();
  b.vn_proj = w.vn_proj.const_data_ptr();
  b.bo = w.bo.const_data_ptr();
  return b;
}

void check_arguments(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads) {
  TORCH_CHECK(x0.dim() >= 1 && x0.numel() > 0, "gemini_kernels: x0 must be a non-empty (..., C) tensor; got shape ",
              x0.sizes());
  TORCH_CHECK(at::isFloatingType(x0.scalar_type()), "gemini_kernels: x0 must be a floating-point tensor; got ",
              x0.scalar_type());
  TORCH_CHECK(x1.sizes() == x0.sizes(), "gemini_kernels: x1 has shape ", x1.sizes(), " but x0 has ", x0.sizes(),
              "; expected the same shape");
  TORCH_CHECK(x1.scalar_type() == x0.scalar_type(), "gemini_kernels: x1 has dtype ", x1.scalar_type(),
              " but x0 has ", x0.scalar_type(), "; expected the same dtype");
  TORCH_CHECK(x1.device() == x0.device(), "gemini_kernels: x1 is on ", x1.device(), " but x0 is on ", x0.device(),
              "; expected the same device");
  const int64_t C = x0.size(-1);
  TORCH_CHECK(num_heads >= 1 && C % num_heads == 0, "gemini_kernels: num_heads=", num_heads,
              " must be positive and divide the channel count C=", C);
  TORCH_CHECK(params.size() == kNumParams, "gemini_kernels: expected ", kNumParams,
              " parameters in FusionParams order, got ", params.size());
  const std::vector<ParamSpec> specs = param_specs(C);
  for (int i = 0; i < kNumParams; ++i) {
    const ParamSpec& spec = specs[i];
    TORCH_CHECK(params[i].sizes() == at::IntArrayRef(spec.shape), "gemini_kernels: params['", spec.name,
                "'] has shape ", params[i].sizes(), "; expected ", at::IntArrayRef(spec.shape), " for C=", C);
    TORCH_CHECK(params[i].scalar_type() == x0.scalar_type() && params[i].device() == x0.device(),
                "gemini_kernels: params['", spec.name, "'] is ", params[i].scalar_type(), " on ", params[i].device(),
                "; expected x0's ", x0.scalar_type(), " on ", x0.device());
  }
}

void check_backward_arguments(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                              const at::Tensor& gate, int64_t num_heads) {
  const int64_t M = x0.numel() / x0.size(-1);
  const char* const names[2] = {"grad_y0", "grad_y1"};
  const at::Tensor* grads[2] = {&grad_y0, &grad_y1};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& grad = *grads[i];
    TORCH_CHECK(grad.sizes() == x0.sizes() && grad.scalar_type() == x0.scalar_type() && grad.device() == x0.device(),
                "gemini_kernels: ", names[i], " is ", grad.scalar_type(), grad.sizes(), " on ", grad.device(),
                "; expected x0's ", x0.scalar_type(), x0.sizes(), " on ", x0.device());
  }
  const auto gate_type = accumulation_type(x0.scalar_type());
  TORCH_CHECK(gate.numel() == 2 * M * num_heads && gate.scalar_type() == gate_type && gate.device() == x0.device() &&
                  gate.is_contiguous(),
              "gemini_kernels: gate must be the third output of fusion_forward: a contiguous ", gate_type,
              " tensor of ", 2 * M * num_heads, " elements on ", x0.device(), "; got ", gate.scalar_type(), " ",
              gate.sizes(), " on ", gate.device());
}

void check_activations(at::TensorList activations, const at::Tensor& x0) {
  if (activations.empty()) return;
  const int64_t C = x0.size(-1);
  const int64_t M = x0.numel() / C;
  TORCH_CHECK(activations.size() == kNumActivations, "gemini_kernels: activations must be empty or the ",
              kNumActivations, " tensors fusion_forward returns with save_activations=True for x0 (the SIMD forward's ",
              kSimdActivations, " only where the SIMD backward takes x0); got ", activations.size());
  static const char* const names[kNumActivations] = {"g0", "g1", "z", "dk"};
  const std::vector<int64_t> shapes[kNumActivations] = {{M, kGBlocks * C}, {M, kGBlocks * C}, {2, M, C}, {2, M, C}};
  for (int i = 0; i < kNumActivations; ++i) {
    const at::Tensor& a = activations[i];
    TORCH_CHECK(a.sizes() == at::IntArrayRef(shapes[i]) && a.scalar_type() == x0.scalar_type() &&
                    a.device() == x0.device() && a.is_contiguous(),
                "gemini_kernels: activations[", i, "] (", names[i], ") is ", a.scalar_type(), a.sizes(), " on ",
                a.device(), (a.is_contiguous() ? "" : ", not contiguous"), "; expected a contiguous ",
                x0.scalar_type(), at::IntArrayRef(shapes[i]), " on ", x0.device(),
                " as fusion_forward returns it for x0");
  }
}

std::vector<int64_t> gate_shape(at::IntArrayRef x_shape, int64_t num_heads) {
  std::vector<int64_t> out{2};
  out.insert(out.end(), x_shape.begin(), x_shape.end());
  out.back() = num_heads;
  return out;
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<at::Tensor> empty_gradients(const at::TensorOptions& options, int64_t C) {
  std::vector<at::Tensor> grads;
  for (const ParamSpec& spec : param_specs(C)) grads.push_back(at::empty(spec.shape, options));
  return grads;
}

FusionParamGradPointers gradient_pointers(std::vector<at::Tensor>& grads) {
  const FusionParamTensors g = named_params(grads);
  FusionParamGradPointers pointers;
#define GK_PARAM_POINTER(field, name, rank, a0, b0, a1, b1) pointers.field = g.field.data_ptr();
  GK_FUSION_PARAMS(GK_PARAM_POINTER)
#undef GK_PARAM_POINTER
  return pointers;
}

GradientParts gradient_parts(at::TensorList parts, int64_t C) {
  TORCH_CHECK(parts.size() == kNumGradientParts, "gemini_kernels: assemble_gradients takes ", kNumGradientParts,
              " tensors; got ", parts.size());
  TORCH_CHECK(C >= 1, "gemini_kernels: assemble_gradients takes channels >= 1; got ", C);
  // elements of each part, in order (see assemble_gradients)
  const int64_t numel[kNumGradientParts] = {5 * C * C, 5 * C * C, 5 * C, 5 * C, C * C, C, C, C,
                                            C * C,     C * C,     C * C, C * C, C, C, 2 * C * C, 2 * C};
  for (size_t i = 0; i < kNumGradientParts; ++i) {
    const at::Tensor& t = parts[i];
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == parts[0].scalar_type() && t.device() == parts[0].device() &&
                    t.numel() == numel[i],
                "gemini_kernels: assemble_gradients takes contiguous tensors of one dtype and device; part ", i,
                " must have ", numel[i], " elements for channels=", C, "; got ", t.scalar_type(), t.sizes(), " on ",
                t.device(), (t.is_contiguous() ? "" : ", not contiguous"));
  }
  GradientParts p;
  p.channels = static_cast<int>(C);
  int i = 0;
  for (int d = 0; d < 2; ++d) p.wx[d] = parts[i++].const_data_ptr();
  for (int d = 0; d < 2; ++d) p.g_sum[d] = parts[i++].const_data_ptr();
  p.w2 = parts[i++].const_data_ptr();
  p.b2 = parts[i++].const_data_ptr();
  for (int d = 0; d < 2; ++d) p.k_noise[d] = parts[i++].const_data_ptr();
  for (int d = 0; d < 2; ++d) p.wk[d] = parts[i++].const_data_ptr();
  for (int d = 0; d < 2; ++d) p.wo[d] = parts[i++].const_data_ptr();
  for (int d = 0; d < 2; ++d) p.bo[d] = parts[i++].const_data_ptr();
  p.wv = parts[i++].const_data_ptr();
  p.v_noise = parts[i++].const_data_ptr();
  return p;
}

// One launch, the op assemble_gradients (CPU here, CUDA in fusion_cuda.cpp, shapes only on meta
// tensors, where the launch ledger counts it).
std::vector<at::Tensor> assemble_gradients(const WeightGradients& r, const PackedWeights& w, const at::Tensor& x0,
                                           const at::Tensor& x1) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gemini_kernels::assemble_gradients", "")
                             .typed<std::vector<at::Tensor>(at::TensorList, int64_t)>();
  std::vector<at::Tensor> parts = {r.grad_wx[0],      r.grad_wx[1], r.grad_g_sum[0], r.grad_g_sum[1], r.grad_w2,
                                   r.grad_b2,         r.grad_k_noise[0], r.grad_k_noise[1], r.grad_wk[0],
                                   r.grad_wk[1],      r.grad_wo[0], r.grad_wo[1], r.grad_bo[0], r.grad_bo[1], w.wv,
                                   w.v_noise};
  for (at::Tensor& t : parts) t = t.contiguous();
  std::vector<at::Tensor> grads = op.call(parts, x0.size(-1));
  grads.insert(grads.begin(), {r.grad_x[0], r.grad_x[1]});
  return grads;
}

namespace {

std::vector<at::Tensor> assemble_gradients_cpu(at::TensorList parts, int64_t C) {
  const GradientParts p = gradient_parts(parts, C);
  std::vector<at::Tensor> grads = empty_gradients(parts[0].options(), C);
  const FusionParamGradPointers g = gradient_pointers(grads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, parts[0].scalar_type(), "gemini_kernels::assemble_gradients",
                                  [&] { for_each_gradient_element(AssembleGradients<scalar_t>{p, g}, C); });
  return grads;
}

std::vector<at::Tensor> assemble_gradients_meta(at::TensorList parts, int64_t C) {
  gradient_parts(parts, C);  // the checks
  return empty_gradients(parts[0].options(), C);
}

}  // namespace

}  // namespace gk

TORCH_LIBRARY(gemini_kernels, m) {
  m.def(
      "fusion_forward(Tensor x0, Tensor x1, Tensor[] params, int num_heads, bool save_activations=False) -> "
      "(Tensor, Tensor, Tensor, Tensor[])");
  m.def(
      "fusion_backward(Tensor grad_y0, Tensor grad_y1, Tensor x0, Tensor x1, Tensor[] params, Tensor gate, "
      "Tensor[] activations, int num_heads) -> Tensor[]");
  // The chain backward's last launch: the 14 parameter gradients from its reduced sums
  // (gradient_assembly.h; the parts in assemble_gradients' order, fusion_api.cpp).
  m.def("assemble_gradients(Tensor[] parts, int channels) -> Tensor[]");
  // The packed-weight cache (fusion_api.h, cached_pack_weights): forget it; its counters; on / off.
  m.def("clear_weight_cache() -> ()", &gk::clear_weight_cache);
  m.def("weight_cache_info() -> int[]", &gk::weight_cache_info);
  m.def("set_weight_cache_enabled(bool enabled) -> bool", &gk::set_weight_cache_enabled);
  // The parameter table as the C++ reads it (fusion_params.h): names, and the shapes for width C,
  // flattened as rank, dims..., for tests that compare it with params.py's.
  m.def("param_names() -> str[]", []() {
    std::vector<std::string> names;
    for (const auto& spec : gk::param_specs(1)) names.emplace_back(spec.name);
    return names;
  });
  m.def("param_shapes(int C) -> int[]", [](int64_t C) {
    std::vector<int64_t> flat;
    for (const auto& spec : gk::param_specs(C)) {
      flat.push_back(static_cast<int64_t>(spec.shape.size()));
      flat.insert(flat.end(), spec.shape.begin(), spec.shape.end());
    }
    return flat;
  });
}

// A plain module: importing it runs the static registrations above (and the CPU / CUDA impls).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "GeminiFusion host and CUDA kernels, registered as torch.ops.gemini_kernels", -1,
                               nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) { m.impl("assemble_gradients", &gk::assemble_gradients_cpu); }
TORCH_LIBRARY_IMPL(gemini_kernels, Meta, m) { m.impl("assemble_gradients", &gk::assemble_gradients_meta); }
