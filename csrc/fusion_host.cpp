// The host C++ path: serves `backend="cuda"` for CPU tensors.
//
// float32 and float64 layers of C <= 128 run the SIMD kernels (simd_fusion.h) where the CPU has them
// (AVX2 + FMA or AVX-512) and the call fits them (takes_simd_forward, takes_simd_backward); the rest
// runs the chain below.
//
// float32 and float64 at narrow layers (C < 256, see tiled()) run the chain of fusion_chain.h
// (GEMMs and row stages) on tiles of a few hundred pixels (about 1 MiB of intermediates), a
// contiguous run of tiles per intra-op thread, so that a GEMM's output is read by the next row
// stage while it is still in cache: with the untiled chain the GEMMs at C=64 are bound by memory,
// not arithmetic, and each row stage is another pass over DRAM. The tile GEMMs are at::mm_out /
// addmm_ on views of the thread's own buffers; the row stages are those of fusion_math.h, compiled
// twice, for the x86-64 baseline and for AVX2+FMA, and picked at run time by torch's own CPU
// capability (so ATEN_CPU_CAPABILITY=default selects the baseline code). The backward sums the
// weight gradients of its tiles per thread, then over threads in thread order: deterministic for a
// given thread count.
//
// Wide layers run the same chain as one range (whole-tensor GEMMs, row stages spread over the
// threads), and so do float16 and bfloat16, whose GEMMs then round each product once rather than
// once per tile.
//
// When asked, the forward also returns its GEMM outputs (csrc/fusion_api.h, "activations"), and the
// backward then reads them instead of recomputing them; both executors store them in the same layout.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "fusion_chain.h"

namespace gk {
namespace {

// ---- row stages -------------------------------------------------------------------------------

// One row; the mix stages with the head width as a compile-time constant (see fusion_math.h).
template <class StageT, class T, int kHeadWidth>
inline void run_row(const FusionBuffers& b, int64_t row) {
  if constexpr (walks_heads<StageT>()) {
    StageT::template run<SerialTeam, T, kHeadWidth>(SerialTeam{}, b, row);
  } else {
    StageT::template run<SerialTeam, T>(SerialTeam{}, b, row);
  }
}

template <class StageT, class T, int kHeadWidth>
void rows_baseline(const FusionBuffers& b, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) run_row<StageT, T, kHeadWidth>(b, row);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define GK_HAVE_AVX2_ROWS 1
// The same loop for CPUs with AVX2 and FMA: GCC inlines the stage (compiled for the baseline ISA,
// a subset of this one) and vectorizes its channel loops eight floats wide. `flatten`, because GCC's
// size limits otherwise leave the larger stages (the mix stages) out of line, compiled for the
// baseline ISA only.
template <class StageT, class T, int kHeadWidth>
__attribute__((target("avx2,fma"), flatten)) void rows_avx2(const FusionBuffers& b, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) run_row<StageT, T, kHeadWidth>(b, row);
}
#endif

bool use_avx2() {
#if defined(GK_HAVE_AVX2_ROWS)
  const std::string capability = at::get_cpu_capability();
  return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <class StageT, class T, int kHeadWidth>
void run_rows_of_width(const FusionBuffers& b, int64_t begin, int64_t end) {
#if defined(GK_HAVE_AVX2_ROWS)
  static const bool avx2 = use_avx2();
  if (avx2) return rows_avx2<StageT, T, kHeadWidth>(b, begin, end);
#endif
  rows_baseline<StageT, T, kHeadWidth>(b, begin, end);
}

template <class StageT, class T>
void run_rows(const FusionBuffers& b, int64_t begin, int64_t end) {
  if constexpr (walks_heads<StageT>()) {
    // The head widths of the usual configurations (C = 64 to 512, 1 to 8 heads, or width 32/64).
    switch (b.channels / b.heads) {
      case 8: return run_rows_of_width<StageT, T, 8>(b, begin, end);
      case 16: return run_rows_of_width<StageT, T, 16>(b, begin, end);
      case 32: return run_rows_of_width<StageT, T, 32>(b, begin, end);
      case 40: return run_rows_of_width<StageT, T, 40>(b, begin, end);
      case 64: return run_rows_of_width<StageT, T, 64>(b, begin, end);
      default: break;
    }
  }
  run_rows_of_width<StageT, T, 0>(b, begin, end);
}

// Rows [begin, end) of a stage.
template <class T>
void run_stage_rows(Stage stage, const FusionBuffers& b, int64_t begin, int64_t end) {
  for_stage(stage, [&](auto s) { run_rows<decltype(s), T>(b, begin, end); });
}

// The untiled chain's stages (see tiled()): rows spread over the intra-op threads.
void host_stage(Stage stage, at::ScalarType dtype, const FusionBuffers& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gemini_kernels_host_stage", [&] {
    // About 16K channel-elements per task: enough to amortise the task, small enough to balance.
    const int64_t grain = std::max<int64_t>(1, 16384 / b.channels);
    at::parallel_for(0, 2 * b.pixels, grain,
                     [&](int64_t begin, int64_t end) { run_stage_rows<scalar_t>(stage, b, begin, end); });
  });
}

// ---- the CUDA stage kernels' lanes and packs, run on the host -----------------------------------

// A barrier for a fixed number of threads (std::barrier is C++20).
class LaneBarrier {
 public:
  explicit LaneBarrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    released_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const int count_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
};

// A CUDA lane group (fusion_kernels.cu's LaneGroupTeam) emulated with kLanes threads that walk the rows
// together, kPack channels a step: the lane offsets, idle lanes and per-lane packs of the stages run
// as on the GPU, the reductions through shared slots between barriers where the GPU shuffles (summing
// in lane order, not the shuffles' tree). For the tests only (packed_chain_forward / _backward).
template <int kLanes, int kP>
struct LaneThreadsTeam {
  static constexpr int kPack = kP;
  struct Shared {
    LaneBarrier barrier{kLanes};
    double slots[kLanes];
  };
  int lane;
  Shared* shared;
  int first() const { return lane; }
  int stride() const { return kLanes; }
  bool leader() const { return lane == 0; }
  void sync() const { shared->barrier.arrive_and_wait(); }
  template <class A>
  A sum(A v) const {
    return reduce(v, [](A a, A b) { return a + b; });
  }
  template <class A>
  A max(A v) const {
    return reduce(v, [](A a, A b) { return max_(a, b); });
  }
  template <class A, class F>
  A reduce(A v, F f) const {
    shared->slots[lane] = static_cast<double>(v);
    sync();
    A total = static_cast<A>(shared->slots[0]);
    for (int i = 1; i < kLanes; ++i) total = f(total, static_cast<A>(shared->slots[i]));
    sync();  // before any lane writes its slot for the next reduction
    return total;
  }
};

template <class T, int kPack, int kLanes>
void lane_threads_rows(Stage stage, const FusionBuffers& b) {
  using Team = LaneThreadsTeam<kLanes, kPack>;
  typename Team::Shared shared;
  for_stage(stage, [&](auto s) {
    using StageT = decltype(s);
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < kLanes; ++lane)
      lanes.emplace_back([&, lane] {
        const Team team{lane, &shared};
        for (int64_t row = 0; row < 2 * b.pixels; ++row) StageT::template run<Team, T>(team, b, row);
      });
    for (std::thread& lane : lanes) lane.join();
  });
}

// The untiled chain's stages as a CUDA lane group of kLanes lanes runs them with packs; refused where
// the CUDA kernels would not pack (stage_pack), so that a test cannot pass unpacked.
template <int kLanes>
void packed_lanes_stage(Stage stage, at::ScalarType dtype, const FusionBuffers& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gemini_kernels_packed_stage", [&] {
    constexpr int kPack = kPackBytes / sizeof(scalar_t);
    const int pack = stage_pack(b, sizeof(scalar_t));
    TORCH_CHECK(pack > 1, "gemini_kernels: packed_chain: the CUDA stage kernels would not pack these buffers (",
                dtype, ", C = ", b.channels, ", ", b.heads, " heads, or a pointer not 16-byte aligned)");
    if constexpr (kPack > 1) lane_threads_rows<scalar_t, kPack, kLanes>(stage, b);
  });
}

// The lane counts the tests emulate: one lane, and groups whose lanes split a row's packs.
StageRunner packed_lanes_runner(int64_t lanes) {
  switch (lanes) {
    case 1: return packed_lanes_stage<1>;
    case 2: return packed_lanes_stage<2>;
    case 8: return packed_lanes_stage<8>;
    default: TORCH_CHECK(false, "gemini_kernels: packed_chain: lanes must be 1, 2 or 8; got ", lanes);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_chain_forward(const at::Tensor& x0, const at::Tensor& x1,
                                                                    at::TensorList params, int64_t num_heads,
                                                                    int64_t lanes) {
  const ForwardResult r = fusion_forward(x0, x1, params, num_heads, false, packed_lanes_runner(lanes));
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::vector<at::Tensor> packed_chain_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1,
                                              const at::Tensor& x0, const at::Tensor& x1, at::TensorList params,
                                              const at::Tensor& gate, int64_t num_heads, int64_t lanes) {
  return fusion_backward(grad_y0, grad_y1, x0, x1, params, gate, {}, num_heads, packed_lanes_runner(lanes));
}

// ---- tiles: the chain on ranges of a few hundred pixels ----------------------------------------

// Pixels per tile, for tiles of about 1 MiB of intermediates (per_pixel_elements C-wide rows each).
// Measured on a 2-core EPYC (512 KiB L2 per core, 32 MiB L3): 384 KiB tiles, which fit L2, run 10-15%
// slower than 1 MiB ones, whose longer GEMMs amortise MKL's packing of the weights; 2 MiB and more
// are slower again. At least kMinTilePixels, though: each tile GEMM repacks its C x C weights, work
// that only a long enough tile amortises (when wide layers were tiled too, 16-pixel tiles at C=512
// made the backward 2.3x slower than the oracle's untiled GEMMs). Then shortened so that every
// thread gets about as many tiles as the others (three 256-pixel tiles on two threads left one idle
// a third of the time), but not below kMinEvenedPixels: with many threads and few pixels, an idle
// thread costs less than tiles too short to amortise the packing.
int64_t tile_pixels(int64_t M, int64_t C, int64_t per_pixel_elements, size_t element_size) {
  constexpr int64_t kTileBytes = 1024 * 1024;
  constexpr int64_t kMinTilePixels = 256;
  constexpr int64_t kMinEvenedPixels = 64;
  const int64_t cache_pixels = kTileBytes / (per_pixel_elements * C * static_cast<int64_t>(element_size));
  const int64_t most = std::max<int64_t>(kMinTilePixels, cache_pixels / 16 * 16);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tiles = ((M + most - 1) / most + threads - 1) / threads * threads;
  return std::max<int64_t>(kMinEvenedPixels, ((M + tiles - 1) / tiles + 15) / 16 * 16);
}

// sums (n,) += column sums of a (rows, n)
template <class T>
void add_column_sums(int64_t rows, int64_t n, const T* a, int64_t lda, T* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = a + r * lda;
    for (int64_t c = 0; c < n; ++c) sums[c] += row[c];
  }
}

// One run of tiles' weight-gradient sums: every Reduction of fusion_chain.h (one per direction where
// it has one), in one zeroed block.
template <class T>
class TileSums {
 public:
  explicit TileSums(int64_t C) : C_(C) {
    int64_t size = 0;
    for (int r = 0; r < kNumReductions; ++r) {
      offset_[r] = size;
      size += (reduction_per_direction(static_cast<Reduction>(r)) ? 2 : 1) * elements(static_cast<Reduction>(r));
    }
    values_.assign(size, T(0));
  }
  T* data(Reduction into, int d) { return values_.data() + offset_[static_cast<int>(into)] + std::max(d, 0) * elements(into); }
  at::Tensor view(Reduction into, int d) {
    return at::from_blob(data(into, d), reduction_shape(into, C_),
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  }
  void add(const TileSums& other) {
    for (size_t i = 0; i < values_.size(); ++i) values_[i] += other.values_[i];
  }

 private:
  int64_t elements(Reduction into) const {
    int64_t n = 1;
    for (int64_t extent : reduction_shape(into, C_)) n *= extent;
    return n;
  }
  int64_t C_;
  std::array<int64_t, kNumReductions> offset_{};
  std::vector<T> values_;
};

// A tile's products and sums: MKL calls on views of the tile (single-threaded inside the parallel
// region), one per direction, as the tiles were measured; the sums added into the run's own.
template <class T>
struct TileOps {
  static constexpr bool kBatchesDirections = false;
  FusionBuffers parameters;
  TileSums<T>* sums;

  void stage(Stage stage, const FusionBuffers& b) { run_stage_rows<T>(stage, b, 0, 2 * b.pixels); }
  void product(at::Tensor out, const at::Tensor& a, const at::Tensor& w, bool accumulate) {
    if (accumulate) {
      out.addmm_(a, w);
    } else {
      at::mm_out(out, a, w);
    }
  }
  void weight_gradient(Reduction into, int d, const at::Tensor& a, const at::Tensor& b) {
    sums->view(into, d).addmm_(a.t(), b);
  }
  void column_sum(Reduction into, int d, const at::Tensor& a) {
    add_column_sums<T>(a.size(0), a.size(1), a.const_data_ptr<T>(), a.stride(0), sums->data(into, d));
  }
};

// One thread's tile memory, laid out by the plan: a slot of tile_pixels rows for every scratch
// buffer, for every (2, M, ·) input or output (whose rows of one tile are not contiguous: staged
// through the slot, as the row stages index a range's directions n rows apart), and for every input
// the plan writes (worked on as a copy).
template <class T>
class TileArena {
  using A = typename Acc<T>::type;

 public:
  TileArena(const ChainRun& run, int64_t tile_pixels) : run_(run) {
    const BufferPlan& p = run.plan->buffers;
    int64_t values = 0, accumulators = 0;
    for (int i = 0; i < kNumBuffers; ++i) {
      const Buffer b = static_cast<Buffer>(i);
      const BufferShape shape = buffer_shape(b);
      const bool external = p[b] == Placement::Input || p[b] == Placement::Output;
      slot_[i] = p[b] == Placement::Scratch || (external && (shape.directions == 2 || p.copied[i]));
      if (!slot_[i]) continue;
      int64_t& next = shape.accumulator ? accumulators : values;
      offset_[i] = next;
      next += shape.directions * tile_pixels * buffer_columns(b, run.channels, run.heads);
    }
    values_.resize(values);
    accumulators_.resize(accumulators);
  }

  // The tensors of pixels [p0, p0 + n), the staged inputs copied in.
  RangeTensors enter(int64_t p0, int64_t n) {
    const BufferPlan& p = run_.plan->buffers;
    RangeTensors range{&p, n, {}};
    for (int i = 0; i < kNumBuffers; ++i) {
      const Buffer b = static_cast<Buffer>(i);
      if (slot_[i]) {
        const BufferShape shape = buffer_shape(b);
        const int64_t cols = buffer_columns(b, run_.channels, run_.heads);
        const auto dtype = shape.accumulator ? c10::CppTypeToScalarType<A>::value : c10::CppTypeToScalarType<T>::value;
        range.tensors[i] = shape.directions == 2 ? at::from_blob(slot(i), {2, n, cols}, at::TensorOptions().dtype(dtype))
                                                 : at::from_blob(slot(i), {n, cols}, at::TensorOptions().dtype(dtype));
        if (p[b] == Placement::Input) copy_rows(run_.tensors[i], range.tensors[i], p0, n, true);
      } else if (p[b] == Placement::Input || p[b] == Placement::Output) {
        range.tensors[i] = run_.tensors[i].narrow(0, p0, n);
      }
    }
    for (int i = 0; i < kNumBuffers; ++i)
      if (p.placement[i] == Placement::Alias) range.tensors[i] = range.tensors[index_of(p.storage[i])];
    return range;
  }

  // Copies the staged outputs of the range back.
  void leave(const RangeTensors& range, int64_t p0) {
    for (int i = 0; i < kNumBuffers; ++i)
      if (slot_[i] && run_.plan->buffers.placement[i] == Placement::Output)
        copy_rows(run_.tensors[i], range.tensors[i], p0, range.pixels, false);
  }

 private:
  void* slot(int i) {
    return buffer_shape(static_cast<Buffer>(i)).accumulator ? static_cast<void*>(accumulators_.data() + offset_[i])
                                                             : static_cast<void*>(values_.data() + offset_[i]);
  }

  // Rows [p0, p0 + n) of each direction, between the whole tensor and the tile's.
  static void copy_rows(const at::Tensor& whole, const at::Tensor& tile, int64_t p0, int64_t n, bool into_tile) {
    const int64_t directions = tile.dim() == 3 ? 2 : 1;
    const int64_t row_bytes = tile.size(-1) * tile.element_size();
    const int64_t M = whole.size(-2);
    char* whole_bytes = static_cast<char*>(const_cast<void*>(whole.const_data_ptr()));
    char* tile_bytes = static_cast<char*>(tile.data_ptr());
    for (int64_t d = 0; d < directions; ++d) {
      char* w = whole_bytes + (d * M + p0) * row_bytes;
      char* t = tile_bytes + d * n * row_bytes;
      if (into_tile) {
        std::memcpy(t, w, n * row_bytes);
      } else {
        std::memcpy(w, t, n * row_bytes);
      }
    }
  }

  const ChainRun& run_;
  std::array<bool, kNumBuffers> slot_{};
  std::array<int64_t, kNumBuffers> offset_{};
  std::vector<T> values_;
  std::vector<A> accumulators_;
};

template <class T>
void run_tiles_typed(const ChainRun& run) {
  const ChainPlan& plan = *run.plan;
  const int64_t M = run.pixels, C = run.channels;
  // Tiles as long when the forward saves its GEMM outputs, or the backward reads them, as when they
  // are recomputed: saving then moves no tile boundary, and so changes no rounding.
  const ChainPlan& sizing = plan.backward ? backward_plan(false) : forward_plan(false);
  const int64_t P = tile_pixels(M, C, scratch_rows_per_pixel(sizing), sizeof(T));
  const int64_t tiles = (M + P - 1) / P;
  PackedWeights w = *run.weights;
  w.w2 = w.w2.contiguous();
  const FusionBuffers parameters = parameter_buffers(w, C, run.heads);
  // One contiguous run of tiles per thread, each with its own sums, so that the order of the
  // additions depends on the thread count only.
  const int64_t runs = std::min<int64_t>(at::get_num_threads(), tiles);
  std::vector<TileSums<T>> sums(run.gradients != nullptr ? runs : 0, TileSums<T>(C));
  at::parallel_for(0, runs, 1, [&](int64_t first_run, int64_t end_run) {
    const c10::InferenceMode inference_mode;  // keeps the dispatch of the tile GEMMs short
    for (int64_t r = first_run; r < end_run; ++r) {
      TileArena<T> arena(run, P);
      TileOps<T> ops{parameters, sums.empty() ? nullptr : &sums[r]};
      for (int64_t tile = tiles * r / runs; tile < tiles * (r + 1) / runs; ++tile) {
        const int64_t p0 = tile * P;
        const RangeTensors range = arena.enter(p0, std::min(P, M - p0));
        run_steps(plan, range, w, ops);
        arena.leave(range, p0);
      }
    }
  });
  if (run.gradients == nullptr) return;

  // Over threads, in thread order; each a fresh tensor, as the op's outputs must not alias one another.
  for (int64_t t = 1; t < runs; ++t) sums[0].add(sums[t]);
  for (int i = 0; i < kNumReductions; ++i) {
    const Reduction into = static_cast<Reduction>(i);
    for (int d = 0; d < (reduction_per_direction(into) ? 2 : 1); ++d)
      reduction_slot(*run.gradients, into, d) = sums[0].view(into, d).clone();
  }
}

void run_tiles(const ChainRun& run) {
  AT_DISPATCH_FLOATING_TYPES(run.dtype, "gemini_kernels_tiles", [&] { run_tiles_typed<scalar_t>(run); });
}

// Tiles pay at narrow layers, where the row stages are a large part of the work and would
// otherwise each stream the intermediates through DRAM; at wide ones the GEMMs dominate, and MKL
// runs them faster over all pixels (threaded by itself) than one tile per thread. Measured on a
// 2-core EPYC, float32, batch 2, forward + backward (bench/RESULTS.md): tiled / untiled speed-up
// over the oracle 2.07x / 1.37x at C=64, 1.31x / 1.14x at C=160, 1.19x / 1.20x at C=256, 1.13x /
// 1.21x at C=320, 0.99x / 1.10x at C=512.
constexpr int64_t kUntiledFromWidth = 256;

bool tiled(const at::Tensor& x0) {
  return (x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble) && x0.size(-1) < kUntiledFromWidth;
}

// Both executors check their arguments first: tiled() reads x0's last dimension.
ForwardResult forward_cpu(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                          bool save_activations) {
  check_arguments(x0, x1, params, num_heads);
  if (takes_simd_forward(x0, save_activations)) return simd_forward(x0, x1, params, num_heads, save_activations);
  if (!tiled(x0)) return fusion_forward(x0, x1, params, num_heads, save_activations, host_stage);
  RECORD_FUNCTION("gemini_kernels::tiled_forward", std::vector<c10::IValue>());
  return run_forward(x0, x1, params, num_heads, save_activations, run_tiles);
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                     const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                     at::TensorList activations, int64_t num_heads) {
  check_arguments(x0, x1, params, num_heads);
  if (takes_simd_backward(x0, activations)) {
    check_backward_arguments(grad_y0, grad_y1, x0, gate, num_heads);
    return simd_backward(grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads);
  }
  if (!tiled(x0))
    return fusion_backward(grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads, host_stage);
  RECORD_FUNCTION("gemini_kernels::tiled_backward", std::vector<c10::IValue>());
  return run_backward(grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads, run_tiles);
}

// ---- the stages' declared accesses, checked ---------------------------------------------------

// Runs each stage on the host over buffers of its own (float64, a few pixels) and compares what it
// does with what it declares (kReads / kWrites in fusion_math.h), which the chain's plan check and
// the launch ledger take on trust: every buffer, or column block of a g-layout one, that a stage
// does not declare it reads is poisoned with NaN and must leave what it writes unchanged; every one
// it does not declare it writes must come back untouched. Returns the disagreements, one line each.
// drop_first_read: check each stage as if it did not declare its first read, which must then
// disagree (the check's own test).
std::vector<std::string> stage_access_mismatches(bool drop_first_read) {
  constexpr int64_t M = 5, C = 16, H = 4;
  BufferPlan plan;
  for (int i = 0; i < kNumBuffers; ++i) plan.set({static_cast<Buffer>(i)}, Placement::Scratch);
  plan.alias(Buffer::GradZ, Buffer::Z);  // FusionBuffers has one pointer for z and d/dz
  const auto options = at::TensorOptions().dtype(at::kDouble);
  auto random = [&options](at::IntArrayRef shape, uint64_t seed) {
    return at::rand(shape, at::detail::createCPUGenerator(seed), options) + 0.25;  // away from 0
  };
  auto fresh = [&](uint64_t seed) {
    RangeTensors range{&plan, M, {}};
    for (int i = 0; i < kNumBuffers; ++i) {
      const Buffer b = static_cast<Buffer>(i);
      const int64_t cols = buffer_columns(b, C, H);
      if (plan.owner(b) == b)
        range.tensors[i] = buffer_shape(b).directions == 2 ? random({2, M, cols}, seed + i) : random({M, cols}, seed + i);
    }
    range.tensors[index_of(Buffer::GradZ)] = range[Buffer::Z];
    return range;
  };
  const at::Tensor vectors = random({6, C}, 99), pairs = random({4, 2, C}, 98);
  FusionBuffers parameters{};
  parameters.channels = C;
  parameters.heads = H;
  parameters.scale = 1.0 / std::sqrt(static_cast<double>(C / H));
  parameters.b1 = vectors[0].const_data_ptr();
  parameters.b2 = vectors[1].const_data_ptr();
  parameters.k_noise = pairs[0].const_data_ptr();
  parameters.bq = pairs[1].const_data_ptr();
  parameters.bv = pairs[2].const_data_ptr();
  parameters.bo = pairs[3].const_data_ptr();
  parameters.vn_proj = vectors.narrow(0, 2, 2).const_data_ptr();

  // The column blocks of a buffer: kGBlocks of C columns for g-layout ones, else the whole row.
  auto blocks_of = [](Buffer b) { return buffer_shape(b).columns == Columns::GLayout ? kGBlocks : 1; };
  auto block = [](const at::Tensor& t, Buffer b, int k) {
    return buffer_shape(b).columns == Columns::GLayout ? t.narrow(-1, k * C, C) : t;
  };
  auto declared = [&plan](const std::vector<Access>& list, Buffer memory, int k) {
    return std::any_of(list.begin(), list.end(), [&](const Access& a) {
      return plan.owner(a.buffer) == memory && (a.columns & (1u << k));
    });
  };
  std::vector<std::string> mismatches;
  const Stage stages[] = {Stage::HiddenForward, Stage::RelationForward, Stage::MixForward,
                          Stage::MixBackward,   Stage::RelationBackward, Stage::HiddenBackward};
  for (Stage stage : stages) {
    std::vector<Access> reads = stage_reads(stage);
    if (drop_first_read) reads.erase(reads.begin());
    const std::vector<Access> writes = stage_writes(stage);
    RangeTensors clean = fresh(1), poisoned = fresh(1), before = fresh(1);
    for (int i = 0; i < kNumBuffers; ++i) {
      const Buffer b = static_cast<Buffer>(i);
      if (plan.owner(b) != b) continue;
      for (int k = 0; k < blocks_of(b); ++k)
        if (!declared(reads, b, k)) block(poisoned[b], b, k).fill_(std::numeric_limits<double>::quiet_NaN());
    }
    run_stage_rows<double>(stage, clean.stage_buffers(parameters), 0, 2 * M);
    run_stage_rows<double>(stage, poisoned.stage_buffers(parameters), 0, 2 * M);
    for (int i = 0; i < kNumBuffers; ++i) {
      const Buffer b = static_cast<Buffer>(i);
      if (plan.owner(b) != b) continue;
      for (int k = 0; k < blocks_of(b); ++k) {
        const std::string where = std::string(stage_name(stage)) + ", " + buffer_name(b) +
                                  (blocks_of(b) > 1 ? " block " + std::to_string(k) : std::string());
        if (declared(writes, b, k)) {
          if (!at::equal(block(clean[b], b, k), block(poisoned[b], b, k)))
            mismatches.push_back(where + ": depends on what the stage does not declare it reads");
        } else if (!at::equal(block(clean[b], b, k), block(before[b], b, k))) {
          mismatches.push_back(where + ": written, not declared");
        }
      }
    }
  }
  return mismatches;
}

}  // namespace
}  // namespace gk

TORCH_LIBRARY_FRAGMENT(gemini_kernels, m) {
  // The stages' declared accesses checked against what they do (stage_access_mismatches).
  m.def("stage_access_mismatches(bool drop_first_read=False) -> str[]", &gk::stage_access_mismatches);
  // The untiled chain with its row stages run as the CUDA stage kernels' lane groups run them, in
  // packs, by `lanes` threads a row (packed_lanes_stage): fusion_math.h's pack and lane code, tested on
  // CPU against the oracle.
  m.def("packed_chain_forward(Tensor x0, Tensor x1, Tensor[] params, int num_heads, int lanes=1) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("packed_chain_backward(Tensor grad_y0, Tensor grad_y1, Tensor x0, Tensor x1, Tensor[] params, Tensor gate, "
        "int num_heads, int lanes=1) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(gemini_kernels, CPU, m) {
  m.impl("fusion_forward", &gk::forward_cpu);
  m.impl("fusion_backward", &gk::backward_cpu);
  m.impl("packed_chain_forward", &gk::packed_chain_forward);
  m.impl("packed_chain_backward", &gk::packed_chain_backward);
}
