// The CUDA kernels: the row stages, a team of lanes per row (direction, pixel), its lanes striding over
// the channels and reducing with shuffles; and the fused forward and backward of narrow layers, a block
// per tile of pixels (or per program of tiles) whose products run on the tensor cores. The math is
// fusion_math.h's and the tile logic fused_forward.h's and fused_backward.h's, all shared with the host. Includes only toolkit headers (no torch), see
// fusion_kernels.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <type_traits>

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

// A group of kLanes consecutive lanes owns a row, 32 / kLanes rows a warp: lane l of the group handles
// the kPack channels at kPack * l, then kPack * (l + kLanes), ... (a Pack, one access each; see
// fusion_math.h), and the group reduces with shuffles among its own lanes. `mask` holds the warp's
// lanes that have a row (whole groups: past the last row a group leaves).
template <int kLanes, int kP = 1>
struct LaneGroupTeam {
  static_assert(kLanes >= 1 && kLanes <= kWarpSize && (kLanes & (kLanes - 1)) == 0, "a power of two within a warp");
  static constexpr int kPack = kP;
  int lane;  // within the group
  unsigned mask;
  __device__ __forceinline__ int first() const { return lane; }
  __device__ __forceinline__ int stride() const { return kLanes; }
  __device__ __forceinline__ bool leader() const { return lane == 0; }
  // Orders the lanes' memory accesses: what one lane wrote before it, the others read after it.
  __device__ __forceinline__ void sync() const { __syncwarp(mask); }
  template <class A>
  __device__ __forceinline__ A sum(A v) const {
    for (int offset = kLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
    return v;
  }
  template <class A>
  __device__ __forceinline__ A max(A v) const {
    for (int offset = kLanes / 2; offset > 0; offset /= 2) v = max_(v, __shfl_xor_sync(mask, v, offset));
    return v;
  }
};
// A warp owns a row: lane l handles channels l, l + 32, ...
using WarpTeam = LaneGroupTeam<kWarpSize>;

// Launch bounds of the row stages and the wide forward. On sm_80, ptxas left to itself (a block size
// only) holds these kernels to 64-80 registers and spills 4 to 76 bytes; two blocks an SM allow 128
// registers, which they fit, and the wide forward's shared memory allows no more than two there
// anyway. On sm_90 its own choice spills nothing and stays.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define GK_BLOCK_BOUNDS(threads) __launch_bounds__(threads, 2)
#else
#define GK_BLOCK_BOUNDS(threads) __launch_bounds__(threads)
#endif

template <class StageT, class T, int kLanes, int kPack>
__global__ void GK_BLOCK_BOUNDS(kWarpsPerBlock * kWarpSize) stage_kernel(const FusionBuffers buffers) {
  using Team = LaneGroupTeam<kLanes, kPack>;
  constexpr int kRowsPerWarp = kWarpSize / kLanes;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row =
      (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize) * kRowsPerWarp + lane / kLanes;
  const bool has_row = row < 2 * buffers.pixels;
  const unsigned mask = __ballot_sync(kFullMask, has_row);
  if (!has_row) return;  // whole groups leave together, so each group's shuffles stay within `mask`
  StageT::template run<Team, T>(Team{lane % kLanes, mask}, buffers, row);
}

template <class StageT, class T, int kLanes, int kPack>
cudaError_t launch(const FusionBuffers& buffers, cudaStream_t stream) {
  const int64_t rows = 2 * buffers.pixels;
  constexpr int kRowsPerBlock = kWarpsPerBlock * (kWarpSize / kLanes);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  stage_kernel<StageT, T, kLanes, kPack>
      <<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(buffers);
  return cudaGetLastError();
}

// A lane group per row as wide as the row's packs fill, so that few lanes idle: the mix stages walk
// one head at a time, its packs over the group (at C = 64 with 8 heads: 8 lanes of single floats, or
// 2 lanes of 4-float packs, where a warp a row would leave most lanes idle); the other stages stride
// over all C channels, a warp a row unpacked, 8 to 32 lanes packed. Several rows a warp where the group
// is narrower than one.
// The widest group of kNarrowest to kLanes lanes that the row's packs fill (a power of two).
template <class StageT, class T, int kPack, int kLanes, int kNarrowest>
cudaError_t launch_group(int packs, const FusionBuffers& buffers, cudaStream_t stream) {
  if constexpr (kLanes > kNarrowest) {
    if (packs < kLanes) return launch_group<StageT, T, kPack, kLanes / 2, kNarrowest>(packs, buffers, stream);
  }
  return launch<StageT, T, kLanes, kPack>(buffers, stream);
}

template <class StageT, class T, int kPack>
cudaError_t launch_packed(const FusionBuffers& buffers, cudaStream_t stream) {
  constexpr int kNarrowest = walks_heads<StageT>() ? (kPack == 1 ? 4 : 2) : (kPack == 1 ? kWarpSize : 8);
  const int packs = (walks_heads<StageT>() ? buffers.channels / buffers.heads : buffers.channels) / kPack;
  return launch_group<StageT, T, kPack, kWarpSize, kNarrowest>(packs, buffers, stream);
}

// 16-byte packs where stage_pack finds the buffers aligned for them, else single elements.
template <class StageT, class T>
cudaError_t launch_stage_of(const FusionBuffers& buffers, cudaStream_t stream) {
  constexpr int kPack = kPackBytes / sizeof(T);
  if constexpr (kPack > 1 && sizeof(T) <= 4) {
    if (stage_pack(buffers, sizeof(T)) == kPack) return launch_packed<StageT, T, kPack>(buffers, stream);
  }
  return launch_packed<StageT, T, 1>(buffers, stream);
}

template <class T>
cudaError_t launch_typed(Stage stage, const FusionBuffers& buffers, cudaStream_t stream) {
  switch (stage) {
    case Stage::HiddenForward: return launch_stage_of<HiddenForward, T>(buffers, stream);
    case Stage::RelationForward: return launch_stage_of<RelationForward, T>(buffers, stream);
    case Stage::MixForward: return launch_stage_of<MixForward, T>(buffers, stream);
    case Stage::MixBackward: return launch_stage_of<MixBackward, T>(buffers, stream);
    case Stage::RelationBackward: return launch_stage_of<RelationBackward, T>(buffers, stream);
    case Stage::HiddenBackward: return launch_stage_of<HiddenBackward, T>(buffers, stream);
  }
  return cudaErrorInvalidValue;
}

// op(param, r, c) for every element of the 14 parameters' gradients (ReduceGradients,
// AssembleGradients): blockIdx.y the parameter, its elements a thread each.
template <class Op>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize) gradient_elements_kernel(const Op op, int channels) {
  const int param = static_cast<int>(blockIdx.y);
  const int64_t columns = param_columns(param, channels);
  const int64_t size = param_rows(param, channels) * columns;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < size;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x)
    op(param, j / columns, j % columns);
}

template <class Op>
cudaError_t launch_gradient_elements(const Op& op, int channels, cudaStream_t stream) {
  int64_t largest = 0;
  for (int param = 0; param < kParamCount; ++param)
    largest = std::max(largest, param_rows(param, channels) * param_columns(param, channels));
  constexpr int kThreads = kWarpsPerBlock * kWarpSize;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((largest + kThreads - 1) / kThreads, 1024)), kParamCount);
  gradient_elements_kernel<<<grid, kThreads, 0, stream>>>(op, channels);
  return cudaGetLastError();
}

// ---- the fused forward ------------------------------------------------------------------------

static_assert(kFusedWarps == kWarpsPerBlock, "the fused forward's blocks are the row stages' size");

// The CUDA engine of fused_forward.h: a tile's buffers in shared memory, a row to a warp, and the
// 16 x 16 output tiles of a product to the warps' WMMA MMAs (16-bit operands, float accumulators),
// staged through each warp's own 1 KiB of shared memory on the way to the epilogue.
template <class T>
struct WarpMmaEngine {
  using A = typename Acc<T>::type;
  using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kMmaEdge, kMmaEdge, kMmaEdge, float>;
  T* tile;
  A* tile_gates;
  float* staging;  // this warp's kMmaEdge x kMmaEdge floats
  int stride;
  int warp;
  int lane;

  __device__ __forceinline__ int ld() const { return stride; }
  __device__ __forceinline__ T* matrix(int i) const { return tile + i * kFusedTileRows * stride; }
  __device__ __forceinline__ A* gates() const { return tile_gates; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  template <class F>
  __device__ __forceinline__ void rows(const F& f) const {
    const WarpTeam team{lane, kFullMask};  // every lane of the block runs the whole tile
    for (int r = warp; r < kFusedTileRows; r += kFusedWarps) f(team, r);
  }
  template <class E>
  __device__ __forceinline__ void gemm(const E& epilogue, int n, const MmaTerm<T>& first, const MmaTerm<T>& second) const {
    const MmaSplit split = MmaSplit::of(n);
    switch (split.rows) {
      case 4: return items<4>(epilogue, split, first, second);
      case 2: return items<2>(epilogue, split, first, second);
      default: return items<1>(epilogue, split, first, second);
    }
  }

  template <int kRows, class E>
  __device__ __forceinline__ void items(const E& epilogue, const MmaSplit& split, const MmaTerm<T>& first,
                                        const MmaTerm<T>& second) const {
    static_assert(MmaSplit::kRowTiles == 4, "the cases of gemm");
    for (int item = warp; item < split.items(); item += kFusedWarps) {
      const int j = split.column_tile(item), i0 = split.first_row_tile(item);
      Accumulator sum[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) nvcuda::wmma::fill_fragment(sum[r], 0.f);
      accumulate<kRows>(sum, first, i0, j);
      if (second.a != nullptr) accumulate<kRows>(sum, second, i0, j);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        nvcuda::wmma::store_matrix_sync(staging, sum[r], kMmaEdge, nvcuda::wmma::mem_row_major);
        __syncwarp(kFullMask);
        for (int e = lane; e < kMmaEdge * kMmaEdge; e += kWarpSize)
          epilogue((i0 + r) * kMmaEdge + e / kMmaEdge, j * kMmaEdge + e % kMmaEdge, staging[e]);
        __syncwarp(kFullMask);  // the staging is read before the next tile's results overwrite it
      }
    }
  }

  template <int kRows>
  __device__ __forceinline__ static void accumulate(Accumulator (&sum)[kRows], const MmaTerm<T>& term, int i0, int j) {
    if (term.transposed) {
      accumulate_as<kRows, nvcuda::wmma::row_major>(sum, term, i0, j);
    } else {
      accumulate_as<kRows, nvcuda::wmma::col_major>(sum, term, i0, j);
    }
  }
  // sum[r] += rows i0 + r of a times columns j of w^T: w (n x k, row-major) is w^T (k x n) column-major;
  // transposed, w (k x n, row-major) itself.
  template <int kRows, class Layout>
  __device__ __forceinline__ static void accumulate_as(Accumulator (&sum)[kRows], const MmaTerm<T>& term, int i0,
                                                       int j) {
    constexpr bool kTransposed = std::is_same_v<Layout, nvcuda::wmma::row_major>;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, kMmaEdge, kMmaEdge, kMmaEdge, T, nvcuda::wmma::row_major> a;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, kMmaEdge, kMmaEdge, kMmaEdge, T, Layout> b;
    const T* a_rows = term.a + i0 * kMmaEdge * term.lda;
    for (int k = 0; k < term.k; k += kMmaEdge) {
      const T* w = kTransposed ? term.w + static_cast<int64_t>(k) * term.ldw + j * kMmaEdge
                               : term.w + static_cast<int64_t>(j) * kMmaEdge * term.ldw + k;
      nvcuda::wmma::load_matrix_sync(b, w, term.ldw);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        nvcuda::wmma::load_matrix_sync(a, a_rows + r * kMmaEdge * term.lda + k, term.lda);
        nvcuda::wmma::mma_sync(sum[r], a, b, sum[r]);
      }
    }
  }

  // ---- the backward's (fused_backward.h) ----

  // out's 16 x 16 tiles to the warps (tile t to warp t mod kFusedWarps, the same warp on every call, so
  // a tile's sums keep one order); each tile's float accumulators loaded from out, the MMAs of the
  // tile's rows added, stored back.
  __device__ __forceinline__ void weight_gradient(A* out, int ldo, int n, int k, const WeightTerm<T>& first,
                                                  const WeightTerm<T>& second) const {
    static_assert(std::is_same_v<A, float>, "the accumulators are float");
    const int column_tiles = k / kMmaEdge, tiles = (n / kMmaEdge) * column_tiles;
    for (int t = warp; t < tiles; t += kFusedWarps) {
      float* at = out + (t / column_tiles) * kMmaEdge * ldo + (t % column_tiles) * kMmaEdge;
      Accumulator sum;
      nvcuda::wmma::load_matrix_sync(sum, at, ldo, nvcuda::wmma::mem_row_major);
      outer(sum, first, (t / column_tiles) * kMmaEdge, (t % column_tiles) * kMmaEdge);
      if (second.g != nullptr) outer(sum, second, (t / column_tiles) * kMmaEdge, (t % column_tiles) * kMmaEdge);
      nvcuda::wmma::store_matrix_sync(at, sum, ldo, nvcuda::wmma::mem_row_major);
    }
  }
  // sum += g[:, c0:c0+16]^T x[:, j0:j0+16] over the tile's rows: g^T is g read column-major.
  __device__ __forceinline__ static void outer(Accumulator& sum, const WeightTerm<T>& term, int c0, int j0) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, kMmaEdge, kMmaEdge, kMmaEdge, T, nvcuda::wmma::col_major> a;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, kMmaEdge, kMmaEdge, kMmaEdge, T, nvcuda::wmma::row_major> b;
#pragma unroll
    for (int r0 = 0; r0 < kFusedTileRows; r0 += kMmaEdge) {
      nvcuda::wmma::load_matrix_sync(a, term.g + r0 * term.ldg + c0, term.ldg);
      nvcuda::wmma::load_matrix_sync(b, term.x + r0 * term.ldx + j0, term.ldx);
      nvcuda::wmma::mma_sync(sum, a, b, sum);
    }
  }
  // A thread a column, its rows in order.
  __device__ __forceinline__ void column_sums(A* out, int n, const T* g, const T* g2) const {
    for (int c = warp * kWarpSize + lane; c < n; c += kFusedWarps * kWarpSize) {
      A sum = 0;
      for (int r = 0; r < kFusedTileRows; ++r)
        sum += fused::widen(g[r * stride + c]) + (g2 != nullptr ? fused::widen(g2[r * stride + c]) : A(0));
      out[c] += sum;
    }
  }
  __device__ __forceinline__ void clear(A* out, int64_t n) const {
    for (int64_t i = warp * kWarpSize + lane; i < n; i += kFusedWarps * kWarpSize) out[i] = 0;
  }
};

// The engine of this thread's block over `matrices` tile buffers in shared memory (fused_tile_bytes' layout).
template <class T>
__device__ __forceinline__ WarpMmaEngine<T> block_engine(unsigned char* shared, int channels, int heads, int matrices) {
  using A = typename Acc<T>::type;
  const int stride = fused_row_stride(channels);
  const int warp = threadIdx.x / kWarpSize;
  WarpMmaEngine<T> engine;
  engine.tile = reinterpret_cast<T*>(shared);
  engine.tile_gates = reinterpret_cast<A*>(shared + static_cast<int64_t>(matrices) * kFusedTileRows * stride * sizeof(T));
  engine.staging =
      reinterpret_cast<float*>(shared + fused_tile_bytes(channels, heads, sizeof(T), sizeof(A), matrices)) +
      warp * kMmaEdge * kMmaEdge;
  engine.stride = stride;
  engine.warp = warp;
  engine.lane = threadIdx.x % kWarpSize;
  return engine;
}

// bfloat16 MMAs need sm_80; the launchers' callers never send them to an older GPU (takes_fused_forward),
// and this keeps builds for older GPUs compiling.
template <class T>
__device__ __forceinline__ constexpr bool has_mma() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return !std::is_same_v<T, __nv_bfloat16>;
#else
  return true;
#endif
}

template <class T>
__global__ void __launch_bounds__(kFusedWarps * kWarpSize) fused_forward_kernel(const FusedForwardArgs args) {
  extern __shared__ __align__(128) unsigned char shared[];
  if constexpr (has_mma<T>()) {
    WarpMmaEngine<T> engine = block_engine<T>(shared, args.channels, args.heads, kFusedTileMatrices);
    fused_forward_tile<T>(engine, args, static_cast<int64_t>(blockIdx.x) * kFusedTileRows);
  } else {
    __trap();
  }
}

// A block a program (fused_backward_program): its tiles blockIdx.x + k gridDim.x. One block an SM (its
// 12 tile matrices take 116 to 132 KiB of shared memory at C = 64), so its threads may take up to 255
// registers each, which keeps a second block off the SM at any width.
template <class T>
__global__ void __launch_bounds__(kFusedWarps * kWarpSize, 1) fused_backward_kernel(const FusedBackwardArgs args) {
  extern __shared__ __align__(128) unsigned char shared[];
  if constexpr (has_mma<T>()) {
    WarpMmaEngine<T> engine = block_engine<T>(shared, args.channels, args.heads, kFusedBackwardMatrices);
    fused_backward_program<T>(engine, args, static_cast<int>(blockIdx.x));
  } else {
    __trap();
  }
}


// ---- the wide passes (wide_forward.h, wide_backward.h) -------------------------------------------

// The CUDA engine of the wide passes: the block's input chunks, float sums and row values in shared
// memory (WideShape's layout), a row to a warp, and the 16 x 16 output tiles of a product to the warps'
// WMMA MMAs (inputs from shared memory, weights from global or shared memory), each tile's float sums
// loaded from and stored back to shared memory around the chunk's MMAs.
template <class T>
struct WideMmaEngine {
  using A = typename Acc<T>::type;
  using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kMmaEdge, kMmaEdge, kMmaEdge, float>;
  T* operands;         // shape.operands x kWideRows x kWideChunkStride
  float* sum_buffers;  // shape.sums x kWideRows x wide_sums_ld(n)
  float* values;       // kWideRows x shape.values_per_row
  int n;
  int warp;
  int lane;

  __device__ __forceinline__ static WideMmaEngine<T> of(unsigned char* shared, const WideShape& shape, int n) {
    static_assert(std::is_same_v<A, float>, "the sums are float");
    WideMmaEngine<T> engine;
    engine.operands = reinterpret_cast<T*>(shared);
    engine.sum_buffers =
        reinterpret_cast<float*>(shared + static_cast<int64_t>(shape.operands) * kWideRows * kWideChunkStride * sizeof(T));
    engine.values = engine.sum_buffers + static_cast<int64_t>(shape.sums) * kWideRows * wide_sums_ld(n);
    engine.n = n;
    engine.warp = threadIdx.x / kWarpSize;
    engine.lane = threadIdx.x % kWarpSize;
    return engine;
  }

  __device__ __forceinline__ T* operand(int i) const { return operands + i * kWideRows * kWideChunkStride; }
  __device__ __forceinline__ float* sums(int i) const { return sum_buffers + i * kWideRows * wide_sums_ld(n); }
  __device__ __forceinline__ float* row_values() const { return values; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  template <class F>
  __device__ __forceinline__ void rows(const F& f) const {
    const WarpTeam team{lane, kFullMask};
    for (int r = warp; r < kWideRows; r += kFusedWarps) f(team, r);
  }
  __device__ __forceinline__ void product(int i, int op, const T* w, int ldw, int columns, int k, bool accumulate,
                                          bool transposed) const {
    const MmaSplit split = MmaSplit::of(columns);
    if (transposed) {
      switch (split.rows) {
        case 4: return items<4, nvcuda::wmma::row_major>(sums(i), operand(op), w, ldw, k, accumulate, split);
        case 2: return items<2, nvcuda::wmma::row_major>(sums(i), operand(op), w, ldw, k, accumulate, split);
        default: return items<1, nvcuda::wmma::row_major>(sums(i), operand(op), w, ldw, k, accumulate, split);
      }
    }
    switch (split.rows) {
      case 4: return items<4, nvcuda::wmma::col_major>(sums(i), operand(op), w, ldw, k, accumulate, split);
      case 2: return items<2, nvcuda::wmma::col_major>(sums(i), operand(op), w, ldw, k, accumulate, split);
      default: return items<1, nvcuda::wmma::col_major>(sums(i), operand(op), w, ldw, k, accumulate, split);
    }
  }
  // w (n x k, row-major) read as w^T (k x n), column-major; transposed, w (k x n, row-major) itself.
  template <int kRows, class Layout>
  __device__ __forceinline__ void items(float* out, const T* a, const T* w, int ldw, int k, bool accumulate,
                                        const MmaSplit& split) const {
    static_assert(MmaSplit::kRowTiles == 4, "the cases of product");
    constexpr bool kTransposed = std::is_same_v<Layout, nvcuda::wmma::row_major>;
    const int ld = wide_sums_ld(n);  // the sums' row stride (the block's, whatever the product's columns)
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, kMmaEdge, kMmaEdge, kMmaEdge, T, nvcuda::wmma::row_major> a_frag;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, kMmaEdge, kMmaEdge, kMmaEdge, T, Layout> w_frag;
    // A tile's sums are this warp's on every product into them: ordering the lanes' stores of the last
    // product before these loads does not rest on the fragments' element-to-lane map being the same.
    if (accumulate) __syncwarp(kFullMask);
    for (int item = warp; item < split.items(); item += kFusedWarps) {
      const int j = split.column_tile(item), i0 = split.first_row_tile(item);
      Accumulator sum[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (accumulate) {
          nvcuda::wmma::load_matrix_sync(sum[r], out + (i0 + r) * kMmaEdge * ld + j * kMmaEdge, ld,
                                         nvcuda::wmma::mem_row_major);
        } else {
          nvcuda::wmma::fill_fragment(sum[r], 0.f);
        }
      }
      for (int kk = 0; kk < k; kk += kMmaEdge) {
        nvcuda::wmma::load_matrix_sync(w_frag,
                                       kTransposed ? w + static_cast<int64_t>(kk) * ldw + j * kMmaEdge
                                                   : w + static_cast<int64_t>(j) * kMmaEdge * ldw + kk,
                                       ldw);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          nvcuda::wmma::load_matrix_sync(a_frag, a + (i0 + r) * kMmaEdge * kWideChunkStride + kk, kWideChunkStride);
          nvcuda::wmma::mma_sync(sum[r], a_frag, w_frag, sum[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        nvcuda::wmma::store_matrix_sync(out + (i0 + r) * kMmaEdge * ld + j * kMmaEdge, sum[r], ld,
                                        nvcuda::wmma::mem_row_major);
    }
  }
};

// One block of the forward's pass kPass per blockIdx.x (wide_forward_block).
template <class T, WidePass kPass>
__global__ void GK_BLOCK_BOUNDS(kFusedWarps * kWarpSize) wide_forward_kernel(const WideForwardArgs args) {
  extern __shared__ __align__(128) unsigned char shared[];
  if constexpr (has_mma<T>()) {
    WideMmaEngine<T> engine = WideMmaEngine<T>::of(shared, wide_forward_shape(args.block_heads),
                                                   args.channels / args.heads * args.block_heads);
    wide_forward_block<T, kPass>(engine, args, static_cast<int64_t>(blockIdx.x));
  } else {
    __trap();
  }
}

// Blocks of a backward pass an SM, for the registers: the heads launch's shared memory (five inputs and five
// sums) keeps it to one, so its threads may take up to 255 registers; the others leave room for two.
constexpr int wide_backward_blocks_per_sm(WideBackwardPass pass) { return pass == WideBackwardPass::Heads ? 1 : 2; }

// One block of the backward's pass kPass per blockIdx.x (wide_backward_block).
template <class T, WideBackwardPass kPass>
__global__ void __launch_bounds__(kFusedWarps * kWarpSize, wide_backward_blocks_per_sm(kPass))
    wide_backward_kernel(const WideBackwardArgs args) {
  extern __shared__ __align__(128) unsigned char shared[];
  if constexpr (has_mma<T>()) {
    WideMmaEngine<T> engine = WideMmaEngine<T>::of(
        shared, wide_backward_shape(kPass), wide_backward_columns(kPass, args.channels, args.heads, args.block_heads));
    wide_backward_block<T, kPass>(engine, args, static_cast<int64_t>(blockIdx.x));
  } else {
    __trap();
  }
}

// Lets kKernel's blocks take `bytes` of shared memory (or the device's most), once per device: the
// setting belongs to the function on that device, shared by every host thread, so a call must never
// lower it under another's launch. Keyed by the kernel itself (the float16 and bfloat16 kernels have
// one type), so each has its own flags.
template <auto kKernel>
cudaError_t allow_shared_memory(int64_t bytes) {
  constexpr int kDevices = 64;
  static std::atomic<bool> allowed[kDevices];
  static std::mutex mutex;
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  if (device < kDevices && allowed[device].load(std::memory_order_acquire)) return cudaSuccess;
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < kDevices && allowed[device].load(std::memory_order_relaxed)) return cudaSuccess;
  int most = 0;
  status = cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  status = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(std::min<int64_t>(bytes, most)));
  if (status == cudaSuccess && device < kDevices) allowed[device].store(true, std::memory_order_release);
  return status;
}

template <class T>
cudaError_t launch_fused(const FusedForwardArgs& args, cudaStream_t stream) {
  static_assert(sizeof(T) == 2 && sizeof(typename Acc<T>::type) == 4, "fused_launch_bytes counts 16-bit tiles");
  const size_t bytes = fused_launch_bytes(args.channels, args.heads);
  // Above 48 KiB a block's dynamic shared memory must be asked for (the caller checked that `bytes`
  // is within the device's most).
  const cudaError_t status = allow_shared_memory<fused_forward_kernel<T>>(kFusedMaxLaunchBytes);
  if (status != cudaSuccess) return status;
  const int64_t blocks = (args.pixels + kFusedTileRows - 1) / kFusedTileRows;
  fused_forward_kernel<T><<<static_cast<unsigned>(blocks), kFusedWarps * kWarpSize, bytes, stream>>>(args);
  return cudaGetLastError();
}

template <class T, WidePass kPass>
cudaError_t launch_wide_pass(const WideForwardArgs& args, cudaStream_t stream) {
  // Above 48 KiB (blocks of more than 48 columns) a block's dynamic shared memory must be asked for.
  const cudaError_t status = allow_shared_memory<wide_forward_kernel<T, kPass>>(kWideMaxLaunchBytes);
  if (status != cudaSuccess) return status;
  const int n = args.channels / args.heads * args.block_heads;
  wide_forward_kernel<T, kPass><<<static_cast<unsigned>(wide_blocks(args.pixels, args.heads, args.block_heads)),
                                  kFusedWarps * kWarpSize, wide_forward_shape(args.block_heads).bytes(n), stream>>>(args);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_wide(const WideForwardArgs& args, cudaStream_t stream) {
  static_assert(sizeof(T) == 2, "WideShape::bytes counts 16-bit chunks");
  cudaError_t status = launch_wide_pass<T, WidePass::Pre>(args, stream);
  if (status == cudaSuccess) status = launch_wide_pass<T, WidePass::Logits>(args, stream);
  if (status == cudaSuccess) status = launch_wide_pass<T, WidePass::Gates>(args, stream);
  if (status == cudaSuccess) status = launch_wide_pass<T, WidePass::Values>(args, stream);
  if (status == cudaSuccess) status = launch_wide_pass<T, WidePass::Output>(args, stream);
  return status;
}

template <class T, WideBackwardPass kPass>
cudaError_t launch_wide_backward_pass(const WideBackwardArgs& args, cudaStream_t stream) {
  const cudaError_t status = allow_shared_memory<wide_backward_kernel<T, kPass>>(kWideMaxLaunchBytes);
  if (status != cudaSuccess) return status;
  const int n = wide_backward_columns(kPass, args.channels, args.heads, args.block_heads);
  const int64_t blocks = wide_backward_blocks(kPass, args.pixels, args.channels, args.heads, args.block_heads);
  wide_backward_kernel<T, kPass><<<static_cast<unsigned>(blocks), kFusedWarps * kWarpSize,
                                   wide_backward_shape(kPass).bytes(n), stream>>>(args);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_wide_backward_typed(const WideBackwardArgs& args, cudaStream_t stream) {
  static_assert(sizeof(T) == 2, "WideShape::bytes counts 16-bit chunks");
  const WideForwardArgs forward = forward_passes_of(args);  // u, z and its statistics, as the forward's
  cudaError_t status = launch_wide_pass<T, WidePass::Pre>(forward, stream);
  if (status == cudaSuccess) status = launch_wide_pass<T, WidePass::Logits>(forward, stream);
  if (status == cudaSuccess) status = launch_wide_backward_pass<T, WideBackwardPass::Heads>(args, stream);
  if (status == cudaSuccess) status = launch_wide_backward_pass<T, WideBackwardPass::Keys>(args, stream);
  if (status == cudaSuccess) status = launch_wide_backward_pass<T, WideBackwardPass::Judger>(args, stream);
  if (status == cudaSuccess) status = launch_wide_backward_pass<T, WideBackwardPass::Inputs>(args, stream);
  if (status == cudaSuccess) status = launch_wide_backward_pass<T, WideBackwardPass::Weights>(args, stream);
  if (status == cudaSuccess) status = launch_wide_backward_pass<T, WideBackwardPass::Noise>(args, stream);
  return status;
}

// The most shared memory a backward block asks for (C = 128, a head per channel); the device's most
// caps it, and takes_fused_backward keeps wider tiles off the device.
constexpr int64_t kFusedBackwardMaxLaunchBytes = fused_backward_launch_bytes(kFusedMaxChannels, kFusedMaxChannels);

// As many programs as the device runs at once (its SMs times the blocks that fit one, which the
// registers hold to one), at most as many as keep all programs' partial sums within 4/5 of the L2
// (fused_backward_programs_within).
template <class T>
cudaError_t backward_programs(int channels, int heads, int* programs) {
  cudaError_t status = allow_shared_memory<fused_backward_kernel<T>>(kFusedBackwardMaxLaunchBytes);
  if (status != cudaSuccess) return status;
  int device = 0, sms = 0, per_sm = 0, l2 = 0;
  status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
  if (status == cudaSuccess)
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_backward_kernel<T>, kFusedWarps * kWarpSize,
                                                           fused_backward_launch_bytes(channels, heads));
  if (status == cudaSuccess && per_sm < 1) status = cudaErrorInvalidConfiguration;  // no block fits an SM
  *programs = static_cast<int>(fused_backward_programs_within(channels, static_cast<int64_t>(sms) * per_sm, l2));
  return status;
}


template <class T>
cudaError_t launch_fused_backward_typed(const FusedBackwardArgs& args, cudaStream_t stream) {
  static_assert(sizeof(T) == 2 && sizeof(typename Acc<T>::type) == 4, "the launch bytes count 16-bit tiles");
  cudaError_t status = allow_shared_memory<fused_backward_kernel<T>>(kFusedBackwardMaxLaunchBytes);
  if (status != cudaSuccess) return status;
  fused_backward_kernel<T><<<static_cast<unsigned>(args.programs), kFusedWarps * kWarpSize,
                             fused_backward_launch_bytes(args.channels, args.heads), stream>>>(args);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  return launch_gradient_elements(ReduceGradients<T>{args}, args.channels, stream);
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

cudaError_t launch_assemble_gradients(ScalarKind kind, const GradientParts& parts, const FusionParamGradPointers& grads,
                                      cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Float: return launch_gradient_elements(AssembleGradients<float>{parts, grads}, parts.channels, stream);
    case ScalarKind::Double: return launch_gradient_elements(AssembleGradients<double>{parts, grads}, parts.channels, stream);
    case ScalarKind::Half: return launch_gradient_elements(AssembleGradients<__half>{parts, grads}, parts.channels, stream);
    case ScalarKind::BFloat16: return launch_gradient_elements(AssembleGradients<__nv_bfloat16>{parts, grads}, parts.channels, stream);
  }
  return cudaErrorInvalidValue;
}

// Whether the bfloat16 fused kernels' code was generated for sm_80 or later (has_mma): a build whose
// only code for this GPU is older PTX (e.g. TORCH_CUDA_ARCH_LIST=7.5+PTX) has them trap instead.
cudaError_t fused_kernels_have_mma(ScalarKind kind, bool* have) {
  *have = true;
  if (kind != ScalarKind::BFloat16) return cudaSuccess;
  for (const void* kernel : {reinterpret_cast<const void*>(fused_forward_kernel<__nv_bfloat16>),
                             reinterpret_cast<const void*>(fused_backward_kernel<__nv_bfloat16>),
                             reinterpret_cast<const void*>(wide_forward_kernel<__nv_bfloat16, WidePass::Pre>),
                             reinterpret_cast<const void*>(wide_backward_kernel<__nv_bfloat16, WideBackwardPass::Heads>)}) {
    cudaFuncAttributes attributes{};
    const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel);
    if (status != cudaSuccess) return status;
    *have = *have && attributes.ptxVersion >= 80;
  }
  return cudaSuccess;
}

cudaError_t launch_fused_backward(ScalarKind kind, const FusedBackwardArgs& args, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Half: return launch_fused_backward_typed<__half>(args, stream);
    case ScalarKind::BFloat16: return launch_fused_backward_typed<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t fused_backward_programs(ScalarKind kind, int channels, int heads, int* programs) {
  switch (kind) {
    case ScalarKind::Half: return backward_programs<__half>(channels, heads, programs);
    case ScalarKind::BFloat16: return backward_programs<__nv_bfloat16>(channels, heads, programs);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_fused_forward(ScalarKind kind, const FusedForwardArgs& args, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Half: return launch_fused<__half>(args, stream);
    case ScalarKind::BFloat16: return launch_fused<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_wide_forward(ScalarKind kind, const WideForwardArgs& args, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Half: return launch_wide<__half>(args, stream);
    case ScalarKind::BFloat16: return launch_wide<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_wide_backward(ScalarKind kind, const WideBackwardArgs& args, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Half: return launch_wide_backward_typed<__half>(args, stream);
    case ScalarKind::BFloat16: return launch_wide_backward_typed<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gk
