// Launchers of the CUDA row stages. Plain C++ and CUDA runtime types only, so that the torch-facing
// fusion_cuda.cpp and the toolkit-only fusion_kernels.cu share it.
#pragma once

#include <cuda_runtime_api.h>

#include "fused_backward.h"
#include "fused_forward.h"
#include "fusion_math.h"
#include "gradient_assembly.h"
#include "wide_backward.h"
#include "wide_forward.h"

namespace gk {

enum class ScalarKind { Float, Double, Half, BFloat16 };

// Queues `stage` over all 2 * buffers.pixels rows on `stream`; returns the launch error, if any.
cudaError_t launch_stage(Stage stage, ScalarKind kind, const FusionBuffers& buffers, cudaStream_t stream);

// Queues the fused forward (fused_forward.h) over all args.pixels pixels, a block of kFusedWarps warps
// per tile of kFusedTileRows pixels; Half and BFloat16 only (cudaErrorInvalidValue otherwise).
cudaError_t launch_fused_forward(ScalarKind kind, const FusedForwardArgs& args, cudaStream_t stream);

// Queues the wide forward's five passes (wide_forward.h), wide_blocks(...) blocks of kFusedWarps warps
// each; Half and BFloat16 only.
cudaError_t launch_wide_forward(ScalarKind kind, const WideForwardArgs& args, cudaStream_t stream);

// Queues the wide backward's eight passes (wide_backward.h); Half and BFloat16 only.
cudaError_t launch_wide_backward(ScalarKind kind, const WideBackwardArgs& args, cudaStream_t stream);

// Queues the fused backward (fused_backward.h): args.programs blocks of kFusedWarps warps, then the
// reduction of their partial sums into the parameters' gradients; Half and BFloat16 only.
cudaError_t launch_fused_backward(ScalarKind kind, const FusedBackwardArgs& args, cudaStream_t stream);

// The programs a backward asks for on the current device (see fused_backward_programs_within).
cudaError_t fused_backward_programs(ScalarKind kind, int channels, int heads, int* programs);

// Queues the chain backward's gradient assembly (gradient_assembly.h): every element of the 14
// parameters' gradients, a thread each.
cudaError_t launch_assemble_gradients(ScalarKind kind, const GradientParts& parts, const FusionParamGradPointers& grads,
                                      cudaStream_t stream);

// Whether this build's fused kernels of `kind` can run their MMAs on the current device's code (false
// for bfloat16 kernels generated for an architecture before sm_80, which would trap).
cudaError_t fused_kernels_have_mma(ScalarKind kind, bool* have);

}  // namespace gk
