// The fusion as GEMMs plus fused row stages, device-agnostic: the same code drives the host
// stages on CPU tensors and the CUDA kernels on GPU tensors. Also defines the torch ops and the
// Python module that loads them.
//
// Forward, for both directions d at once (shapes per direction, M pixels, C channels):
//   g[d]    = x_d @ [W1a; W1b; Wq_d; Wv_d; Wv_{1-d}]^T         GEMM (M, C) x (C, 5C) per direction
//   hidden  = GELU(g[d][:, :C] + g[1-d][:, C:2C] + b1)            stage HiddenForward
//   z       = hidden @ W2^T                                       one GEMM over 2M rows
//   e       = k_noise[d] + s - s * softmax(z + b2)                stage RelationForward
//   dk      = e @ Wk_d^T                                          batched GEMM
//   mixed   = v_cross + a * v_delta, a = sigmoid(q . dk) per head stage MixForward (y = s + bo)
//   y_d    += mixed[d] @ Wo_d^T                                   GEMM, in place
// That is 8 C^2 multiply-adds per pixel and direction (SPEC §4), and the per-pixel work between
// the GEMMs is one pass per stage. The backward recomputes up to dk from the inputs and the saved
// gates (or, when the forward saved its activations, only the row stages: 7 C^2 fewer multiply-adds
// per pixel and direction), then runs the transposed chain; every weight gradient is a GEMM or a
// plain sum, so the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
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
              kNumActivations, " tensors fusion_forward returns with save_activations=True; got ", activations.size());
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

namespace {

const char* stage_name(Stage stage) {
  switch (stage) {
    case Stage::HiddenForward: return "gemini_kernels::hidden_forward";
    case Stage::RelationForward: return "gemini_kernels::relation_forward";
    case Stage::MixForward: return "gemini_kernels::mix_forward";
    case Stage::MixBackward: return "gemini_kernels::mix_backward";
    case Stage::RelationBackward: return "gemini_kernels::relation_backward";
    case Stage::HiddenBackward: return "gemini_kernels::hidden_backward";
  }
  return "gemini_kernels::stage";
}

// Runs a stage under its own name in the torch profiler.
void run_stage(StageRunner run, Stage stage, at::ScalarType dtype, const FusionBuffers& b) {
  RECORD_FUNCTION(stage_name(stage), std::vector<c10::IValue>());
  run(stage, dtype, b);
}

// The forward chain up to the key projection, shared by the forward and the backward's recompute.
struct KeyChain {
  at::Tensor x[2];  // (M, C) contiguous
  at::Tensor g[2];  // (M, 5C) each
  at::Tensor hidden, z, e, dk, lse;
  FusionBuffers buffers{};
};

// What run_to_keys keeps: the forward lets e and dk reuse the buffers of hidden and z; a forward that
// saves its activations keeps z and dk in buffers of their own; the backward needs hidden (for
// d/dW2), z, e and the lse after the keys.
enum class KeyChainUse { Forward, SavingForward, Backward };

// saved: the forward's activations (check_activations), for the backward, whose GEMM outputs are
// taken instead of recomputed; z is copied, since the backward overwrites it with d/dz.
KeyChain run_to_keys(const at::Tensor& x0, const at::Tensor& x1, const PackedWeights& w, int64_t num_heads,
                     KeyChainUse use, at::TensorList saved, StageRunner run) {
  const int64_t C = x0.size(-1);
  const int64_t M = x0.numel() / C;
  const auto dtype = x0.scalar_type();
  const auto options = x0.options();
  const bool resume = !saved.empty();
  const bool for_backward = use == KeyChainUse::Backward;
  KeyChain k;
  k.x[0] = x0.contiguous().view({M, C});
  k.x[1] = x1.contiguous().view({M, C});
  for (int d = 0; d < 2; ++d) k.g[d] = resume ? saved[d] : at::mm(k.x[d], w.wx[d].t());
  k.hidden = at::empty({2, M, C}, options);
  k.z = resume ? saved[2].clone() : at::empty({2, M, C}, options);
  k.e = for_backward ? at::empty({2, M, C}, options) : k.hidden;  // hidden is dead once z is computed
  if (for_backward) k.lse = at::empty({2, M}, options.dtype(accumulation_type(dtype)));

  FusionBuffers& b = k.buffers;
  b = parameter_buffers(w, C, num_heads);
  b.pixels = M;
  b.x[0] = k.x[0].const_data_ptr();
  b.x[1] = k.x[1].const_data_ptr();
  b.g[0] = k.g[0].const_data_ptr();
  b.g[1] = k.g[1].const_data_ptr();
  b.hidden = k.hidden.data_ptr();
  b.z = k.z.data_ptr();
  b.e = k.e.data_ptr();
  b.lse = for_backward ? k.lse.data_ptr() : nullptr;

  run_stage(run, Stage::HiddenForward, dtype, b);
  if (!resume) {
    at::Tensor z_rows = k.z.view({2 * M, C});
    at::mm_out(z_rows, k.hidden.view({2 * M, C}), w.w2.t());
  }
  run_stage(run, Stage::RelationForward, dtype, b);
  if (resume) {
    k.dk = saved[3];
  } else if (use != KeyChainUse::Forward) {
    k.dk = at::bmm(k.e, w.wk.transpose(1, 2));
  } else {
    k.dk = k.z;  // z is dead once e is computed
    at::bmm_out(k.dk, k.e, w.wk.transpose(1, 2));
  }
  b.dk = k.dk.const_data_ptr();
  return k;
}

}  // namespace

std::vector<int64_t> gate_shape(at::IntArrayRef x_shape, int64_t num_heads) {
  std::vector<int64_t> out{2};
  out.insert(out.end(), x_shape.begin(), x_shape.end());
  out.back() = num_heads;
  return out;
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

ForwardResult fusion_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                             bool save_activations, StageRunner run) {
  check_arguments(x0, x1, params, num_heads);
  const int64_t C = x0.size(-1);
  const PackedWeights w = cached_pack_weights(params, C);
  KeyChain k = run_to_keys(x0, x1, w, num_heads,
                           save_activations ? KeyChainUse::SavingForward : KeyChainUse::Forward, {}, run);
  const int64_t M = k.x[0].size(0);

  // Allocated in the inputs' shape and written through (M, C) views, so that the outputs are not views
  // themselves: autograd refuses in-place changes (y0 += x0, relu_) to a view a custom op returns.
  const at::Tensor out[2] = {at::empty(x0.sizes(), x0.options()), at::empty(x1.sizes(), x1.options())};
  at::Tensor y[2] = {out[0].view({M, C}), out[1].view({M, C})};
  at::Tensor gate = at::empty(gate_shape(x0.sizes(), num_heads), x0.options().dtype(accumulation_type(x0.scalar_type())));
  const at::Tensor mixed = k.hidden;  // hidden and e, which shares its buffer, are dead once dk is computed
  FusionBuffers& b = k.buffers;
  b.mixed = mixed.data_ptr();
  b.y[0] = y[0].data_ptr();
  b.y[1] = y[1].data_ptr();
  b.gate = gate.data_ptr();
  run_stage(run, Stage::MixForward, x0.scalar_type(), b);
  for (int d = 0; d < 2; ++d) y[d].addmm_(mixed[d], w.wo[d].t());
  std::vector<at::Tensor> activations;
  if (save_activations) activations = {k.g[0], k.g[1], k.z, k.dk};
  return {out[0], out[1], gate, activations};
}

std::vector<at::Tensor> fusion_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                        const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                        at::TensorList activations, int64_t num_heads, StageRunner run) {
  check_arguments(x0, x1, params, num_heads);
  const int64_t C = x0.size(-1);
  const int64_t M = x0.numel() / C;
  check_backward_arguments(grad_y0, grad_y1, x0, gate, num_heads);
  check_activations(activations, x0);
  const auto dtype = x0.scalar_type();
  const auto options = x0.options();
  const PackedWeights w = cached_pack_weights(params, C);
  KeyChain k = run_to_keys(x0, x1, w, num_heads, KeyChainUse::Backward, activations, run);
  const bool resumed = !activations.empty();

  const at::Tensor gy[2] = {grad_y0.contiguous().view({M, C}), grad_y1.contiguous().view({M, C})};
  const at::Tensor gate_rows = gate.contiguous();
  at::Tensor grad_mixed = at::empty({2, M, C}, options);
  for (int d = 0; d < 2; ++d) {
    at::Tensor grad_mixed_d = grad_mixed[d];
    at::mm_out(grad_mixed_d, gy[d], w.wo[d]);
  }
  // In place (see FusionBuffers): mixed over grad_mixed, and, unless they are the forward's saved
  // activations, grad_dk over dk and grad_g over g.
  const at::Tensor& mixed = grad_mixed;
  const at::Tensor grad_dk = resumed ? at::empty_like(k.dk) : k.dk;
  const at::Tensor grad_g[2] = {resumed ? at::empty_like(k.g[0]) : k.g[0], resumed ? at::empty_like(k.g[1]) : k.g[1]};
  FusionBuffers& b = k.buffers;
  b.gate = const_cast<void*>(gate_rows.const_data_ptr());  // only read by the backward stages
  b.grad_y[0] = gy[0].const_data_ptr();
  b.grad_y[1] = gy[1].const_data_ptr();
  b.grad_mixed = grad_mixed.const_data_ptr();
  b.mixed = mixed.data_ptr();
  b.grad_dk = grad_dk.data_ptr();
  b.grad_g[0] = grad_g[0].data_ptr();
  b.grad_g[1] = grad_g[1].data_ptr();
  run_stage(run, Stage::MixBackward, dtype, b);

  at::Tensor grad_wo[2], grad_x[2];
  for (int d = 0; d < 2; ++d) grad_wo[d] = at::mm(gy[d].t(), mixed[d]);
  const at::Tensor grad_wk = at::bmm(grad_dk.transpose(1, 2), k.e);
  at::Tensor grad_x_out[2];  // in the inputs' shape, for the reason of fusion_forward's outputs
  for (int d = 0; d < 2; ++d) {
    grad_x_out[d] = at::empty((d == 0 ? x0 : x1).sizes(), options);
    grad_x[d] = grad_x_out[d].view({M, C});
    at::mm_out(grad_x[d], grad_dk[d], w.wk[d]);  // d/de, overwritten in place with the elementwise d/dx_d
    b.grad_e[d] = grad_x[d].const_data_ptr();
    b.grad_x[d] = grad_x[d].data_ptr();
  }
  const at::Tensor grad_k_noise = at::stack({grad_x[0].sum(0), grad_x[1].sum(0)});
  run_stage(run, Stage::RelationBackward, dtype, b);  // k.z now holds d/dz

  const at::Tensor grad_z = k.z.view({2 * M, C});
  const at::Tensor hidden = k.hidden.view({2 * M, C});
  const at::Tensor grad_w2 = at::mm(grad_z.t(), hidden);
  at::Tensor grad_hidden = hidden;  // hidden is dead once d/dW2 is computed
  at::mm_out(grad_hidden, grad_z, w.w2);
  b.grad_hidden = grad_hidden.const_data_ptr();
  run_stage(run, Stage::HiddenBackward, dtype, b);

  at::Tensor grad_wx[2];
  for (int d = 0; d < 2; ++d) {
    grad_x[d].addmm_(grad_g[d], w.wx[d]);
    grad_wx[d] = at::mm(grad_g[d].t(), k.x[d]);
  }
  WeightGradients r;
  for (int d = 0; d < 2; ++d) {
    r.grad_x[d] = grad_x_out[d];
    r.grad_wx[d] = grad_wx[d];
    r.grad_g_sum[d] = grad_g[d].sum(0);
    r.grad_wo[d] = grad_wo[d];
    r.grad_bo[d] = gy[d].sum(0);
  }
  r.grad_w2 = grad_w2;
  r.grad_b2 = grad_z.sum(0);
  r.grad_k_noise = grad_k_noise;
  r.grad_wk = grad_wk;
  return assemble_gradients(r, w, x0, x1);
}

std::vector<at::Tensor> assemble_gradients(const WeightGradients& r, const PackedWeights& w, const at::Tensor& x0,
                                           const at::Tensor& x1) {
  const int64_t C = x0.size(-1);
  const auto options = x0.options();
  const at::Tensor (&grad_wx)[2] = r.grad_wx;
  const at::Tensor (&grad_g_sum)[2] = r.grad_g_sum;

  auto block = [C](const at::Tensor& t, GBlock i) { return t.narrow(0, static_cast<int64_t>(i) * C, C); };
  std::vector<at::Tensor> grads;
  grads.reserve(2 + kNumParams);
  grads.push_back(r.grad_x[0]);
  grads.push_back(r.grad_x[1]);
  // fc1: W1a and W1b are shared by the directions.
  grads.push_back(at::cat({block(grad_wx[0], kFc1Self) + block(grad_wx[1], kFc1Self),
                           block(grad_wx[0], kFc1Other) + block(grad_wx[1], kFc1Other)},
                          1));
  grads.push_back(block(grad_g_sum[0], kFc1Self) + block(grad_g_sum[1], kFc1Self));
  grads.push_back(r.grad_w2);
  grads.push_back(r.grad_b2);
  grads.push_back(r.grad_k_noise);
  at::Tensor grad_v_noise = at::empty({2, C}, options);
  std::vector<at::Tensor> per_direction;
  for (int d = 0; d < 2; ++d) {
    // d/d(Wv_d v_noise[d]) is the sum of the v_self column gradients.
    const at::Tensor grad_vn_proj = block(grad_g_sum[d], kValueSelf);
    grad_v_noise[d].copy_(at::mv(w.wv[d].t(), grad_vn_proj));
    const at::Tensor grad_wv =
        block(grad_wx[d], kValueSelf) + block(grad_wx[1 - d], kValueOther) + at::outer(grad_vn_proj, w.v_noise[d]);
    per_direction.push_back(at::cat({block(grad_wx[d], kQueryRaw), r.grad_wk[d], grad_wv}));
    // The key bias cancels in k_self - k_cross, so its gradient is exactly zero.
    per_direction.push_back(at::cat({block(grad_g_sum[d], kQueryRaw), at::zeros({C}, options),
                                     block(grad_g_sum[d], kValueSelf) + block(grad_g_sum[1 - d], kValueOther)}));
    per_direction.push_back(r.grad_wo[d]);
    per_direction.push_back(r.grad_bo[d]);
  }
  grads.push_back(grad_v_noise);
  grads.insert(grads.end(), per_direction.begin(), per_direction.end());
  return grads;
}

}  // namespace gk

TORCH_LIBRARY(gemini_kernels, m) {
  m.def(
      "fusion_forward(Tensor x0, Tensor x1, Tensor[] params, int num_heads, bool save_activations=False) -> "
      "(Tensor, Tensor, Tensor, Tensor[])");
  m.def(
      "fusion_backward(Tensor grad_y0, Tensor grad_y1, Tensor x0, Tensor x1, Tensor[] params, Tensor gate, "
      "Tensor[] activations, int num_heads) -> Tensor[]");
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
