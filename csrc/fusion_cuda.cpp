// The CUDA registration: dtype dispatch, device guard and current stream for the kernels of
// fusion_kernels.cu. Compiled only in CUDA builds (setup.py), since it needs torch's CUDA headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <mutex>
#include <tuple>

#include "fusion_api.h"
#include "fusion_kernels.h"

namespace gk {
namespace {

// A CUDA runtime call's or a launch's error as a Python exception: "gemini_kernels: <what> failed: <error>".
void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "gemini_kernels: ", what, " failed: ", cudaGetErrorString(status));
}

ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ScalarKind::Float;
    case at::kDouble: return ScalarKind::Double;
    case at::kHalf: return ScalarKind::Half;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default: TORCH_CHECK(false, "gemini_kernels: CUDA kernels support float32, float64, float16 and bfloat16; got ", dtype);
  }
}

void cuda_stage(Stage stage, at::ScalarType dtype, const FusionBuffers& buffers) {
  const cudaError_t status = launch_stage(stage, scalar_kind(dtype), buffers, c10::cuda::getCurrentCUDAStream());
  check_cuda(status, "CUDA kernel launch");
}

void cuda_fused_forward(const FusedForwardCall& call) {
  const cudaError_t status =
      launch_fused_forward(scalar_kind(call.dtype), call.args, c10::cuda::getCurrentCUDAStream());
  check_cuda(status, "the fused forward's launch");
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  const cudaError_t status = cudaDeviceGetAttribute(&value, attribute, device);
  check_cuda(status, "cudaDeviceGetAttribute");
  return value;
}

// Whether the build's code for the current GPU runs the fused kernels' MMAs in `kind` (fused_kernels_have_mma).
bool have_mma(ScalarKind kind) {
  bool have = false;
  const cudaError_t status = fused_kernels_have_mma(kind, &have);
  check_cuda(status, "cudaFuncGetAttributes");
  return have;
}

// What the fused kernels' conditions ask of a GPU, asked of the CUDA runtime once per device (five
// runtime calls that every forward and backward would otherwise make again).
struct DeviceLimits {
  int compute_capability;      // 10 * major + minor
  int64_t shared_memory_bytes;  // a block's most (opt-in)
  bool half_mma, bfloat16_mma;  // fused_kernels_have_mma, under x's device guard

  static const DeviceLimits& of(const at::Tensor& x) {
    constexpr int kDevices = 64;
    static std::array<std::once_flag, kDevices> once;
    static std::array<DeviceLimits, kDevices> limits;
    const int device = x.get_device();
    TORCH_CHECK(device >= 0 && device < kDevices, "gemini_kernels: CUDA device index ", device, " is past ", kDevices);
    std::call_once(once[device], [device] {
      limits[device] = {10 * device_attribute(cudaDevAttrComputeCapabilityMajor, device) +
                            device_attribute(cudaDevAttrComputeCapabilityMinor, device),
                        device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                        have_mma(ScalarKind::Half), have_mma(ScalarKind::BFloat16)};
    });
    return limits[device];
  }
};

// The refusal of a fused kernel's op (the backend itself falls back to the chain instead).
void check_fused_takes(bool takes, const char* kernel, const at::Tensor& x0) {
  TORCH_CHECK(takes, "gemini_kernels: the fused ", kernel,
              " on CUDA takes float16 (sm_70 on) or bfloat16 (sm_80 on) inputs of C <= ", kFusedMaxChannels,
              " channels, a multiple of ", kMmaEdge,
              ", a tile within the device's shared memory, and contiguous 32-byte aligned weights; got x0 ",
              x0.scalar_type(), " of shape ", x0.sizes());
}

// Whether the build's code for x0's GPU runs the fused kernels' MMAs in x0's dtype.
bool fused_kernels_run_here(const at::Tensor& x0) {
  const DeviceLimits& here = DeviceLimits::of(x0);
  return x0.scalar_type() == at::kHalf ? here.half_mma : x0.scalar_type() == at::kBFloat16 && here.bfloat16_mma;
}

bool takes_fused_forward_here(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads) {
  const DeviceLimits& here = DeviceLimits::of(x0);
  return takes_fused_forward(x0, x1, params, num_heads, true, here.shared_memory_bytes, here.compute_capability) &&
         fused_kernels_run_here(x0);
}

void cuda_wide_forward(const WideForwardCall& call) {
  const cudaError_t status = launch_wide_forward(scalar_kind(call.dtype), call.args, c10::cuda::getCurrentCUDAStream());
  check_cuda(status, "the wide forward's launch");
}

bool takes_wide_forward_here(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads) {
  const DeviceLimits& here = DeviceLimits::of(x0);
  return takes_wide_forward(x0, x1, params, num_heads, true, here.shared_memory_bytes, here.compute_capability) &&
         fused_kernels_run_here(x0);
}

// The fused forward where it takes the layer (C <= 128, 16-bit; fused_forward.h), else the wide one
// (heads of 16 to 128 channels, 16-bit; wide_forward.h), else the chain. A forward that saves its
// activations for the backward runs the chain, whose products they are.
ForwardResult forward_cuda(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                           bool save_activations) {
  const c10::cuda::CUDAGuard device_guard(x0.device());
  if (!save_activations && takes_fused_forward_here(x0, x1, params, num_heads))
    return fused_forward(x0, x1, params, num_heads, cuda_fused_forward);
  if (!save_activations && takes_wide_forward_here(x0, x1, params, num_heads))
    return wide_forward(x0, x1, params, num_heads, cuda_wide_forward);
  return fusion_forward(x0, x1, params, num_heads, save_activations, cuda_stage);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wide_forward_cuda(const at::Tensor& x0, const at::Tensor& x1,
                                                                 at::TensorList params, int64_t num_heads) {
  const c10::cuda::CUDAGuard device_guard(x0.device());
  TORCH_CHECK(takes_wide_forward_here(x0, x1, params, num_heads),
              "gemini_kernels: the wide forward on CUDA takes float16 (sm_70 on) or bfloat16 (sm_80 on) inputs with "
              "heads of a multiple of ", kMmaEdge, " channels, at most ", kWideMaxColumns,
              ", and contiguous 32-byte aligned weights; got x0 ", x0.scalar_type(), " of shape ", x0.sizes(),
              " and num_heads=", num_heads);
  const ForwardResult r = wide_forward(x0, x1, params, num_heads, cuda_wide_forward);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(const at::Tensor& x0, const at::Tensor& x1,
                                                                  at::TensorList params, int64_t num_heads) {
  const c10::cuda::CUDAGuard device_guard(x0.device());
  check_fused_takes(takes_fused_forward_here(x0, x1, params, num_heads), "forward", x0);
  const ForwardResult r = fused_forward(x0, x1, params, num_heads, cuda_fused_forward);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

void cuda_fused_backward(const FusedBackwardCall& call) {
  const cudaError_t status =
      launch_fused_backward(scalar_kind(call.dtype), call.args, c10::cuda::getCurrentCUDAStream());
  check_cuda(status, "the fused backward's launch");
}

bool takes_fused_backward_here(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads) {
  const DeviceLimits& here = DeviceLimits::of(x0);
  return takes_fused_backward(x0, x1, params, num_heads, true, here.shared_memory_bytes, here.compute_capability) &&
         fused_kernels_run_here(x0);
}

// As many programs as the GPU runs at once, within what keeps their partial sums in L2: each walks
// tiles / programs tiles. Asked of the CUDA runtime once per device, dtype, width and heads.
int64_t device_programs(const at::Tensor& x0, int64_t num_heads) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int64_t, int64_t>, int64_t> known;
  const auto key = std::make_tuple(x0.get_device(), static_cast<int>(x0.scalar_type()), x0.size(-1), num_heads);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = known.find(key);
    if (found != known.end()) return found->second;
  }
  int programs = 0;
  const cudaError_t status = fused_backward_programs(scalar_kind(x0.scalar_type()), static_cast<int>(x0.size(-1)),
                                                     static_cast<int>(num_heads), &programs);
  check_cuda(status, "sizing the fused backward");
  const std::lock_guard<std::mutex> lock(mutex);
  known.emplace(key, programs);
  return programs;
}

void cuda_wide_backward(const WideBackwardCall& call) {
  const cudaError_t status = launch_wide_backward(scalar_kind(call.dtype), call.args, c10::cuda::getCurrentCUDAStream());
  check_cuda(status, "the wide backward's launch");
}

bool takes_wide_backward_here(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads) {
  const DeviceLimits& here = DeviceLimits::of(x0);
  return takes_wide_backward(x0, x1, params, num_heads, true, here.shared_memory_bytes, here.compute_capability) &&
         fused_kernels_run_here(x0);
}

// The fused backward where it takes the layer (as the forward, with its larger tile), else the wide one,
// else the chain; a backward given saved activations runs the chain, which reads them.
std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                      const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                      at::TensorList activations, int64_t num_heads) {
  const c10::cuda::CUDAGuard device_guard(x0.device());
  if (activations.empty() && takes_fused_backward_here(x0, x1, params, num_heads))
    return fused_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads, device_programs(x0, num_heads),
                          cuda_fused_backward);
  if (activations.empty() && takes_wide_backward_here(x0, x1, params, num_heads))
    return wide_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads, cuda_wide_backward);
  return fusion_backward(grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads, cuda_stage);
}

std::vector<at::Tensor> fused_backward_cuda(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                            const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                            int64_t num_heads, int64_t programs) {
  const c10::cuda::CUDAGuard device_guard(x0.device());
  check_fused_takes(takes_fused_backward_here(x0, x1, params, num_heads), "backward", x0);
  return fused_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads, programs, cuda_fused_backward);
}

std::vector<at::Tensor> wide_backward_cuda(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                           const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                           int64_t num_heads) {
  const c10::cuda::CUDAGuard device_guard(x0.device());
  TORCH_CHECK(takes_wide_backward_here(x0, x1, params, num_heads),
              "gemini_kernels: the wide backward on CUDA takes float16 (sm_70 on) or bfloat16 (sm_80 on) inputs of C a "
              "multiple of ", kWideGradientTile, ", heads grouping into blocks of a multiple of ", kMmaEdge,
              " channels, blocks within the device's shared memory, and contiguous 32-byte aligned weights; got x0 ",
              x0.scalar_type(), " of shape ", x0.sizes(), " and num_heads=", num_heads);
  return wide_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads, cuda_wide_backward);
}

std::vector<at::Tensor> assemble_gradients_cuda(at::TensorList parts, int64_t C) {
  const GradientParts p = gradient_parts(parts, C);
  const c10::cuda::CUDAGuard device_guard(parts[0].device());
  std::vector<at::Tensor> grads = empty_gradients(parts[0].options(), C);
  const cudaError_t status = launch_assemble_gradients(scalar_kind(parts[0].scalar_type()), p, gradient_pointers(grads),
                                                       c10::cuda::getCurrentCUDAStream());
  check_cuda(status, "the gradient assembly's launch");
  return grads;
}

}  // namespace
}  // namespace gk

TORCH_LIBRARY_IMPL(gemini_kernels, CUDA, m) {
  m.impl("assemble_gradients", &gk::assemble_gradients_cuda);
  m.impl("fusion_forward", &gk::forward_cuda);
  m.impl("fusion_backward", &gk::backward_cuda);
  m.impl("fused_forward", &gk::fused_forward_cuda);
  m.impl("fused_backward", &gk::fused_backward_cuda);
  m.impl("wide_forward", &gk::wide_forward_cuda);
  m.impl("wide_backward", &gk::wide_backward_cuda);
}
