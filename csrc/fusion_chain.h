// The GEMM-and-stage chain of the fusion, written once for every device and tiling.
//
// A chain is a plan: its steps as data (the GEMMs, the row stages of fusion_math.h between them, and
// the pixel sums that make the weight gradients), over a range of n pixels, and a buffer plan that
// names every intermediate, gives its shape per range and says where it lives: in the caller's
// tensors over all M pixels (inputs, outputs, saved activations), in the chain's own scratch, or in
// the memory of an earlier buffer that is dead by then. An executor runs a plan over all M pixels:
// as one range (CUDA, and the host's wide and reduced-precision layers: whole_range below) or as many
// cache-sized ones (the host's narrow float layers: fusion_host.cpp). Both interpret the same steps
// with run_steps; they differ only in how a product, a sum or a stage is carried out.
//
// Each row stage declares what it reads and writes (kReads / kWrites in fusion_math.h) and each GEMM
// names its operands, so check_plan replays a plan before its first use and refuses one that reads
// a buffer whose memory another has overwritten; the same declarations let the launch ledger count
// the plan's traffic on CPU (chain_plan_table below).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <functional>
#include <string>
#include <vector>

#include "fusion_api.h"

namespace gk {

constexpr int index_of(Buffer b) { return static_cast<int>(b); }
const char* buffer_name(Buffer b);

// f(StageT{}) for the stage struct that `stage` names (fusion_math.h): the chain's accesses, the host's
// row runners. (The CUDA launcher keeps a switch of its own, which reports an unknown stage as a CUDA
// error.)
template <class F>
auto for_stage(Stage stage, F&& f) {
  switch (stage) {
    case Stage::HiddenForward: return f(HiddenForward{});
    case Stage::RelationForward: return f(RelationForward{});
    case Stage::MixForward: return f(MixForward{});
    case Stage::MixBackward: return f(MixBackward{});
    case Stage::RelationBackward: return f(RelationBackward{});
    case Stage::HiddenBackward: return f(HiddenBackward{});
  }
  return f(HiddenForward{});
}

// ---- buffer plan ------------------------------------------------------------------------------

// The row width of a buffer, in terms of the layer's C and h.
enum class Columns : uint8_t { Channels, GLayout /* 5C, see FusionBuffers */, Heads, One };

struct BufferShape {
  int directions;    // 2: (2, n, columns), both directions stacked; 1: (n, columns), one direction
  Columns columns;
  bool accumulator;  // in the accumulation type (Acc), not the compute dtype
};
BufferShape buffer_shape(Buffer b);
int64_t buffer_columns(Buffer b, int64_t C, int64_t H);

enum class Placement : uint8_t {
  Unused,   // not in this chain: a null pointer in FusionBuffers
  Input,    // the caller's tensor over all M pixels; a step that writes it works on a copy (copied)
  Output,   // the caller's tensor over all M pixels
  Scratch,  // the chain's own, per range
  Alias,    // the memory of buffer `storage`, whose values are dead when this one is written
};

struct BufferPlan {
  std::array<Placement, kNumBuffers> placement{};  // Unused unless set
  std::array<Buffer, kNumBuffers> storage{};       // whose memory each buffer uses: itself, unless an Alias
  std::array<bool, kNumBuffers> copied{};          // Inputs that a step writes (found by check_plan)

  Placement operator[](Buffer b) const { return placement[index_of(b)]; }
  Buffer owner(Buffer b) const { return storage[index_of(b)]; }
  bool used(Buffer b) const { return (*this)[b] != Placement::Unused; }
  void set(std::initializer_list<Buffer> buffers, Placement p);
  void alias(Buffer b, Buffer over);
};

// ---- steps ------------------------------------------------------------------------------------

enum class Weight : uint8_t { Wx, W2, Wk, Wo };  // the GEMM operands of PackedWeights
// The sums over pixels behind the weight gradients (the fields of WeightGradients).
enum class Reduction : uint8_t { Wx, GSum, W2, B2, KNoise, Wk, Wo };
constexpr int kNumReductions = static_cast<int>(Reduction::Wo) + 1;
// The per-direction shape of a sum, and whether it has one per direction (else both share it).
std::vector<int64_t> reduction_shape(Reduction r, int64_t C);
bool reduction_per_direction(Reduction r);

enum class StepKind : uint8_t {
  RowStage,        // stage over all 2n rows
  Gemm,            // out = a @ W (W^T when transposed; += when accumulate)
  WeightGradient,  // into += a^T @ b
  ColumnSum,       // into += the column sums of a
};

// Rows: one product over all 2n rows of (2, n, ·) buffers, with the weight both directions share;
// Directions: one per direction d, with weight d (on CUDA one batched launch where it can).
enum class Span : uint8_t { Rows, Directions };

// An operand by direction; a (2, n, ·) buffer is named for both.
using Operand = std::array<Buffer, 2>;
constexpr Operand both(Buffer b) { return {b, b}; }

struct Step {
  StepKind kind;
  Stage stage = Stage::HiddenForward;
  Span span = Span::Directions;
  Operand out{}, a{}, b{};
  Weight weight = Weight::Wx;
  bool transposed = false;
  bool accumulate = false;
  Reduction into = Reduction::Wx;
};

// What a stage declares it reads and writes (kReads / kWrites), and its name ("mix_forward").
std::vector<Access> stage_reads(Stage stage);
std::vector<Access> stage_writes(Stage stage);
const char* stage_name(Stage stage);

std::vector<Access> step_reads(const Step& step);
std::vector<Access> step_writes(const Step& step);
std::string step_name(const Step& step);

struct ChainPlan {
  const char* name;
  bool backward;
  BufferPlan buffers;
  std::vector<Step> steps;
};

// The four plans, built and checked once.
const ChainPlan& forward_plan(bool save_activations);
const ChainPlan& backward_plan(bool resume_from_saved);

// C-wide rows of the compute dtype that a range keeps in scratch per pixel (the gates and
// log-sum-exps, a few values per pixel, left out): what the host sizes its tiles by.
int scratch_rows_per_pixel(const ChainPlan& plan);

// ---- running a plan ---------------------------------------------------------------------------

// A plan over all M pixels: the caller's tensors of its Input and Output buffers, contiguous,
// (M, columns) or (2, M, columns) (buffer_shape).
struct ChainRun {
  const ChainPlan* plan;
  std::array<at::Tensor, kNumBuffers> tensors;
  const PackedWeights* weights;
  int64_t pixels, channels, heads;
  at::ScalarType dtype;
  WeightGradients* gradients;  // receives the sums of the Reduction steps; null in a forward
};
using ChainExecutor = std::function<void(const ChainRun&)>;

// The field of WeightGradients that a Reduction fills (d: the direction, ignored for shared sums).
at::Tensor& reduction_slot(WeightGradients& gradients, Reduction into, int d);

// The whole chain as one range; the stages by `run` (CUDA launches, or the host's parallel rows).
ChainExecutor whole_range(StageRunner run);

// whole_range, its stages announced rather than run: for meta tensors, under a dispatch mode that
// counts the launches of the GPU plan (count_forward, count_backward in fusion_chain.cpp).
ChainExecutor count_range();

// fusion_forward / fusion_backward (fusion_api.h) with the executor named.
ForwardResult run_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                          bool save_activations, const ChainExecutor& execute);
std::vector<at::Tensor> run_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                     const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                     at::TensorList activations, int64_t num_heads, const ChainExecutor& execute);

// The tensors of one range of n pixels by buffer, (2, n, columns) or (n, columns); an Alias holds its
// owner's tensor, an Unused buffer none.
struct RangeTensors {
  const BufferPlan* plan;
  int64_t pixels;
  std::array<at::Tensor, kNumBuffers> tensors;

  const at::Tensor& operator[](Buffer b) const { return tensors[index_of(b)]; }
  bool stacked(const Operand& operand) const { return (*this)[operand[0]].dim() == 3; }
  // The matrix of the operand for direction d, or over all its rows when d < 0.
  at::Tensor matrix(const Operand& operand, int d) const;
  // The stage arguments: `parameters` (parameter_buffers) and this range's pointers.
  FusionBuffers stage_buffers(FusionBuffers parameters) const;
};

at::Tensor weight_matrix(const PackedWeights& w, Weight which, int d, bool transposed);
at::Tensor weight_batch(const PackedWeights& w, Weight which, bool transposed);

// Runs the steps of `plan` on one range. Ops carries them out:
//   stage(Stage, const FusionBuffers&)
//   product(at::Tensor out, const at::Tensor& a, const at::Tensor& w, bool accumulate)
//   weight_gradient(Reduction, int d, const at::Tensor& a, const at::Tensor& b)   // d < 0: shared
//   column_sum(Reduction, int d, const at::Tensor& a)
// and, when Ops::kBatchesDirections, the products of both directions of (2, n, ·) operands at once:
//   batched_product(at::Tensor out, const at::Tensor& a, const at::Tensor& w)
//   batched_weight_gradient(Reduction, const at::Tensor& a, const at::Tensor& b)
template <class Ops>
void run_steps(const ChainPlan& plan, const RangeTensors& range, const PackedWeights& w, Ops& ops) {
  const FusionBuffers buffers = range.stage_buffers(ops.parameters);
  for (const Step& step : plan.steps) {
    const bool rows = step.span == Span::Rows;
    switch (step.kind) {
      case StepKind::RowStage:
        ops.stage(step.stage, buffers);
        break;
      case StepKind::Gemm:
        if (rows) {
          ops.product(range.matrix(step.out, -1), range.matrix(step.a, -1),
                      weight_matrix(w, step.weight, 0, step.transposed), step.accumulate);
          break;
        }
        if constexpr (Ops::kBatchesDirections) {
          if (!step.accumulate && range.stacked(step.out) && range.stacked(step.a)) {
            ops.batched_product(range[step.out[0]], range[step.a[0]], weight_batch(w, step.weight, step.transposed));
            break;
          }
        }
        for (int d = 0; d < 2; ++d)
          ops.product(range.matrix(step.out, d), range.matrix(step.a, d),
                      weight_matrix(w, step.weight, d, step.transposed), step.accumulate);
        break;
      case StepKind::WeightGradient:
        if (rows) {
          ops.weight_gradient(step.into, -1, range.matrix(step.a, -1), range.matrix(step.b, -1));
          break;
        }
        if constexpr (Ops::kBatchesDirections) {
          if (range.stacked(step.a) && range.stacked(step.b)) {
            ops.batched_weight_gradient(step.into, range[step.a[0]], range[step.b[0]]);
            break;
          }
        }
        for (int d = 0; d < 2; ++d) ops.weight_gradient(step.into, d, range.matrix(step.a, d), range.matrix(step.b, d));
        break;
      case StepKind::ColumnSum:
        if (rows) {
          ops.column_sum(step.into, -1, range.matrix(step.a, -1));
          break;
        }
        for (int d = 0; d < 2; ++d) ops.column_sum(step.into, d, range.matrix(step.a, d));
        break;
    }
  }
}

// Every plan as a table, for the launch ledger to count (python -m gemini_kernels.ledger): one
// string per step, "kind|name|span|out|a|b|weight|transposed|accumulate|reads|writes", operands and
// accesses as buffer names (reads and writes as name:column-mask), after one line per buffer,
// "buffer|name|placement|owner|directions|columns|accumulator".
std::vector<std::string> chain_plan_table(bool backward, bool saved);

}  // namespace gk
