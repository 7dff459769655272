// The torch-facing fusion, shared by the CPU and CUDA registrations: the projections as GEMMs
// (at::mm / at::bmm, so cuBLAS or MKL), and between them the row stages of fusion_math.h, run by a
// device-specific StageRunner (host loops in fusion_host.cpp, CUDA kernels in fusion_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "fusion_math.h"

namespace gk {

// Runs `stage` over every row of `buffers`, whose tensors have dtype `dtype` and live on the device
// the runner serves; returns when the work is queued (CUDA) or done (host).
using StageRunner = void (*)(Stage stage, at::ScalarType dtype, const FusionBuffers& buffers);

// params: the 14 tensors in FusionParams order. Returns y0, y1 and the gates
// (2, *x0.shape[:-1], num_heads) in the accumulation type, which the backward takes back.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fusion_forward(const at::Tensor& x0, const at::Tensor& x1,
                                                              at::TensorList params, int64_t num_heads,
                                                              StageRunner run);

// Returns the gradients of x0, x1 and the 14 parameters, in that order. Recomputes every
// intermediate from the inputs and the saved gates.
std::vector<at::Tensor> fusion_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                        const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                        int64_t num_heads, StageRunner run);

}  // namespace gk
