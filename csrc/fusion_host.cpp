// The host C++ path: the row stages of fusion_math.h run by one thread per row, rows spread over
// the intra-op threads with at::parallel_for. Serves `backend="cuda"` for CPU tensors.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "fusion_api.h"

namespace gk {
namespace {

template <class StageT, class T>
void run_rows(const FusionBuffers& b) {
  // About 16K channel-elements per task: enough to amortise the task, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 16384 / b.channels);
  at::parallel_for(0, 2 * b.pixels, grain, [&](int64_t begin, int64_t end) {
    const SerialTeam team;
    for (int64_t row = begin; row < end; ++row) StageT::template run<SerialTeam, T>(team, b, row);
  });
}

template <class T>
void run_stage(Stage stage, const FusionBuffers& b) {
  switch (stage) {
    case Stage::HiddenForward: return run_rows<HiddenForward, T>(b);
    case Stage::RelationForward: return run_rows<RelationForward, T>(b);
    case Stage::MixForward: return run_rows<MixForward, T>(b);
    case Stage::MixBackward: return run_rows<MixBackward, T>(b);
    case Stage::RelationBackward: return run_rows<RelationBackward, T>(b);
    case Stage::HiddenBackward: return run_rows<HiddenBackward, T>(b);
  }
}

void host_stage(Stage stage, at::ScalarType dtype, const FusionBuffers& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gemini_kernels_host_stage",
                                  [&] { run_stage<scalar_t>(stage, b); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params,
                                               int64_t num_heads) {
  return fusion_forward(x0, x1, params, num_heads, host_stage);
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                     const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                     int64_t num_heads) {
  return fusion_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads, host_stage);
}

}  // namespace
}  // namespace gk

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) {
  m.impl("fusion_forward", &gk::forward_cpu);
  m.impl("fusion_backward", &gk::backward_cpu);
}
