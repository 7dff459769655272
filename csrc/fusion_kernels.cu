// The CUDA row stages: one warp per row (direction, pixel), its lanes striding over the channels
// and reducing with shuffles; the math is the stages of fusion_math.h, shared with the host path.
// Includes only toolkit headers (no torch), see fusion_kernels.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fusion_kernels.h"

namespace gk {

// torch builds CUDA code with the implicit half / bfloat16 conversions switched off.
template <>
struct Convert<__half> {
  template <class A>
  __device__ __forceinline__ static A load(__half x) { return static_cast<A>(__half2float(x)); }
  template <class A>
  __device__ __forceinline__ static __half store(A v) { return __float2half_rn(static_cast<float>(v)); }
};
template <>
struct Convert<__nv_bfloat16> {
  template <class A>
  __device__ __forceinline__ static A load(__nv_bfloat16 x) { return static_cast<A>(__bfloat162float(x)); }
  template <class A>
  __device__ __forceinline__ static __nv_bfloat16 store(A v) { return __float2bfloat16_rn(static_cast<float>(v)); }
};

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// A warp owns a row: lane l handles channels l, l + 32, ...
struct WarpTeam {
  int lane;
  __device__ __forceinline__ int first() const { return lane; }
  __device__ __forceinline__ int stride() const { return kWarpSize; }
  __device__ __forceinline__ bool leader() const { return lane == 0; }
  // Orders the lanes' memory accesses: what one lane wrote before it, the others read after it.
  __device__ __forceinline__ void sync() const { __syncwarp(kFullMask); }
  template <class A>
  __device__ __forceinline__ A sum(A v) const {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
  }
  template <class A>
  __device__ __forceinline__ A max(A v) const {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = max_(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
  }
};

template <class StageT, class T>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize) stage_kernel(const FusionBuffers buffers) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= 2 * buffers.pixels) return;  // whole warps leave together, so the shuffles stay full
  StageT::template run<WarpTeam, T>(WarpTeam{static_cast<int>(threadIdx.x % kWarpSize)}, buffers, row);
}

template <class StageT, class T>
cudaError_t launch(const FusionBuffers& buffers, cudaStream_t stream) {
  const int64_t rows = 2 * buffers.pixels;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  stage_kernel<StageT, T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(buffers);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_typed(Stage stage, const FusionBuffers& buffers, cudaStream_t stream) {
  switch (stage) {
    case Stage::HiddenForward: return launch<HiddenForward, T>(buffers, stream);
    case Stage::RelationForward: return launch<RelationForward, T>(buffers, stream);
    case Stage::MixForward: return launch<MixForward, T>(buffers, stream);
    case Stage::MixBackward: return launch<MixBackward, T>(buffers, stream);
    case Stage::RelationBackward: return launch<RelationBackward, T>(buffers, stream);
    case Stage::HiddenBackward: return launch<HiddenBackward, T>(buffers, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_stage(Stage stage, ScalarKind kind, const FusionBuffers& buffers, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Float: return launch_typed<float>(stage, buffers, stream);
    case ScalarKind::Double: return launch_typed<double>(stage, buffers, stream);
    case ScalarKind::Half: return launch_typed<__half>(stage, buffers, stream);
    case ScalarKind::BFloat16: return launch_typed<__nv_bfloat16>(stage, buffers, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gk
