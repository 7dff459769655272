// The plans of fusion_chain.h, their check, the whole-range executor and the forward and backward
// that every executor shares.
//
// Forward, for both directions d at once (shapes per direction, M pixels, C channels):
//   g[d]    = x_d @ [W1a; W1b; Wq_d; Wv_d; Wv_{1-d}]^T          GEMM (M, C) x (C, 5C) per direction
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
#include "fusion_chain.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>

namespace gk {

const char* buffer_name(Buffer b) {
  static const char* const names[kNumBuffers] = {
      "x0",     "x1",     "g0",        "g1",      "hidden",  "z",      "lse",    "e",     "dk",
      "gate",   "mixed",  "y0",        "y1",      "grad_y0", "grad_y1", "grad_mixed", "grad_dk", "grad_e0",
      "grad_e1", "grad_z", "grad_hidden", "grad_g0", "grad_g1", "grad_x0", "grad_x1"};
  return names[index_of(b)];
}

BufferShape buffer_shape(Buffer b) {
  switch (b) {
    case Buffer::X0: case Buffer::X1: case Buffer::Y0: case Buffer::Y1: case Buffer::GradY0: case Buffer::GradY1:
    case Buffer::GradE0: case Buffer::GradE1: case Buffer::GradX0: case Buffer::GradX1:
      return {1, Columns::Channels, false};
    case Buffer::G0: case Buffer::G1: case Buffer::GradG0: case Buffer::GradG1:
      return {1, Columns::GLayout, false};
    case Buffer::Lse: return {2, Columns::One, true};
    case Buffer::Gate: return {2, Columns::Heads, true};
    default: return {2, Columns::Channels, false};
  }
}

int64_t buffer_columns(Buffer b, int64_t C, int64_t H) {
  switch (buffer_shape(b).columns) {
    case Columns::Channels: return C;
    case Columns::GLayout: return kGBlocks * C;
    case Columns::Heads: return H;
    case Columns::One: return 1;
  }
  return 0;
}

void BufferPlan::set(std::initializer_list<Buffer> buffers, Placement p) {
  for (Buffer b : buffers) {
    placement[index_of(b)] = p;
    storage[index_of(b)] = b;
  }
}

void BufferPlan::alias(Buffer b, Buffer over) {
  placement[index_of(b)] = Placement::Alias;
  storage[index_of(b)] = owner(over);
}

std::vector<int64_t> reduction_shape(Reduction r, int64_t C) {
  switch (r) {
    case Reduction::Wx: return {kGBlocks * C, C};
    case Reduction::GSum: return {kGBlocks * C};
    case Reduction::B2: case Reduction::KNoise: return {C};
    default: return {C, C};
  }
}

bool reduction_per_direction(Reduction r) { return r != Reduction::W2 && r != Reduction::B2; }

// ---- steps and their accesses -----------------------------------------------------------------

namespace {

template <class StageT>
std::vector<Access> reads_of() { return {std::begin(StageT::kReads), std::end(StageT::kReads)}; }
template <class StageT>
std::vector<Access> writes_of() { return {std::begin(StageT::kWrites), std::end(StageT::kWrites)}; }


void add_operand(std::vector<Access>& into, const Operand& operand) {
  into.push_back({operand[0]});
  if (operand[1] != operand[0]) into.push_back({operand[1]});
}

}  // namespace

const char* stage_name(Stage stage) {
  switch (stage) {
    case Stage::HiddenForward: return "hidden_forward";
    case Stage::RelationForward: return "relation_forward";
    case Stage::MixForward: return "mix_forward";
    case Stage::MixBackward: return "mix_backward";
    case Stage::RelationBackward: return "relation_backward";
    case Stage::HiddenBackward: return "hidden_backward";
  }
  return "stage";
}

std::vector<Access> stage_reads(Stage stage) {
  return for_stage(stage, [](auto s) { return reads_of<decltype(s)>(); });
}

std::vector<Access> stage_writes(Stage stage) {
  return for_stage(stage, [](auto s) { return writes_of<decltype(s)>(); });
}

std::vector<Access> step_reads(const Step& step) {
  std::vector<Access> reads;
  switch (step.kind) {
    case StepKind::RowStage:
      return stage_reads(step.stage);
    case StepKind::Gemm:
      add_operand(reads, step.a);
      if (step.accumulate) add_operand(reads, step.out);
      break;
    case StepKind::WeightGradient:
      add_operand(reads, step.a);
      add_operand(reads, step.b);
      break;
    case StepKind::ColumnSum:
      add_operand(reads, step.a);
      break;
  }
  return reads;
}

std::vector<Access> step_writes(const Step& step) {
  std::vector<Access> writes;
  if (step.kind == StepKind::RowStage) return stage_writes(step.stage);
  if (step.kind == StepKind::Gemm) add_operand(writes, step.out);
  return writes;
}

namespace {

const char* weight_name(Weight w) {
  static const char* const names[] = {"wx", "w2", "wk", "wo"};
  return names[static_cast<int>(w)];
}

const char* reduction_name(Reduction r) {
  static const char* const names[] = {"grad_wx", "grad_g_sum", "grad_w2", "grad_b2", "grad_k_noise", "grad_wk",
                                      "grad_wo"};
  return names[static_cast<int>(r)];
}

std::string operand_name(const Operand& o) {
  return o[0] == o[1] ? std::string(buffer_name(o[0])) : std::string(buffer_name(o[0])) + "," + buffer_name(o[1]);
}

}  // namespace

std::string step_name(const Step& step) {
  std::ostringstream s;
  switch (step.kind) {
    case StepKind::RowStage: s << stage_name(step.stage); break;
    case StepKind::Gemm:
      s << operand_name(step.out) << (step.accumulate ? " += " : " = ") << operand_name(step.a) << " @ "
        << weight_name(step.weight) << (step.transposed ? "^T" : "");
      break;
    case StepKind::WeightGradient:
      s << reduction_name(step.into) << " += " << operand_name(step.a) << "^T @ " << operand_name(step.b);
      break;
    case StepKind::ColumnSum:
      s << reduction_name(step.into) << " += colsum " << operand_name(step.a);
      break;
  }
  return s.str();
}

// ---- the plans --------------------------------------------------------------------------------

namespace {

constexpr bool kTransposed = true, kAccumulate = true;

Step row_stage(Stage stage) {
  Step s{StepKind::RowStage};
  s.stage = stage;
  return s;
}

Step gemm(Span span, Operand out, Operand a, Weight weight, bool transposed, bool accumulate = false) {
  Step s{StepKind::Gemm};
  s.span = span;
  s.out = out;
  s.a = a;
  s.weight = weight;
  s.transposed = transposed;
  s.accumulate = accumulate;
  return s;
}

Step weight_gradient(Span span, Reduction into, Operand a, Operand b) {
  Step s{StepKind::WeightGradient};
  s.span = span;
  s.into = into;
  s.a = a;
  s.b = b;
  return s;
}

Step column_sum(Span span, Reduction into, Operand a) {
  Step s{StepKind::ColumnSum};
  s.span = span;
  s.into = into;
  s.a = a;
  return s;
}

using B = Buffer;
constexpr Span kRows = Span::Rows, kDirections = Span::Directions;

// The forward up to the keys: the forward's first half and the backward's recompute, whose GEMMs a
// backward that resumes from the forward's saved outputs leaves out.
void add_steps_to_keys(std::vector<Step>& steps, bool resume) {
  if (!resume) steps.push_back(gemm(kDirections, {B::G0, B::G1}, {B::X0, B::X1}, Weight::Wx, kTransposed));
  steps.push_back(row_stage(Stage::HiddenForward));
  if (!resume) steps.push_back(gemm(kRows, both(B::Z), both(B::Hidden), Weight::W2, kTransposed));
  steps.push_back(row_stage(Stage::RelationForward));
  if (!resume) steps.push_back(gemm(kDirections, both(B::Dk), both(B::E), Weight::Wk, kTransposed));
}

// Replays the plan's declared accesses: every read must find the values it names in their memory
// (no alias has overwritten them), an alias has its owner's shape, RelationBackward's d/dz shares z's
// memory (FusionBuffers has one pointer for both), and every output ends holding its own values.
// Records the inputs that a step writes, which every range then copies.
void check_plan(ChainPlan& plan) {
  BufferPlan& p = plan.buffers;
  auto fail = [&plan](const std::string& what) { TORCH_CHECK(false, "gemini_kernels: chain plan '", plan.name, "': ", what); };
  for (int i = 0; i < kNumBuffers; ++i) {
    const Buffer b = static_cast<Buffer>(i);
    if (p[b] != Placement::Alias) continue;
    const BufferShape mine = buffer_shape(b), theirs = buffer_shape(p.owner(b));
    if (p[p.owner(b)] == Placement::Unused || p[p.owner(b)] == Placement::Alias || mine.directions != theirs.directions ||
        mine.columns != theirs.columns || mine.accumulator != theirs.accumulator)
      fail(std::string(buffer_name(b)) + " cannot live in " + buffer_name(p.owner(b)));
  }
  if (p.used(B::GradZ) && p.owner(B::GradZ) != p.owner(B::Z)) fail("grad_z must be written over z");

  // holder[memory][column block]: the buffer whose values are there now
  constexpr int kNone = -1;
  std::array<std::array<int, kGBlocks>, kNumBuffers> holder;
  for (auto& blocks : holder) blocks.fill(kNone);
  for (int i = 0; i < kNumBuffers; ++i)
    if (p.placement[i] == Placement::Input) holder[i].fill(i);
  auto blocks = [](uint8_t columns, auto&& f) {
    for (int k = 0; k < kGBlocks; ++k)
      if (columns & (1u << k)) f(k);
  };
  for (const Step& step : plan.steps) {
    for (const Access& r : step_reads(step)) {
      if (!p.used(r.buffer)) fail(step_name(step) + " reads " + buffer_name(r.buffer) + ", which the plan lacks");
      blocks(r.columns, [&](int k) {
        if (holder[index_of(p.owner(r.buffer))][k] != index_of(r.buffer))
          fail(step_name(step) + " reads " + buffer_name(r.buffer) + " where its values are not (yet, or any more)");
      });
    }
    for (const Access& w : step_writes(step)) {
      if (!p.used(w.buffer)) continue;  // an optional output (RelationForward's lse)
      const Buffer memory = p.owner(w.buffer);
      if (p[memory] == Placement::Input) p.copied[index_of(memory)] = true;
      blocks(w.columns, [&](int k) { holder[index_of(memory)][k] = index_of(w.buffer); });
    }
  }
  for (int i = 0; i < kNumBuffers; ++i) {
    if (p.placement[i] != Placement::Output) continue;
    for (int k = 0; k < kGBlocks; ++k)
      if (holder[i][k] != i) fail(std::string("output ") + buffer_name(static_cast<Buffer>(i)) + " is not left whole");
  }
}

ChainPlan make_forward_plan(bool save) {
  ChainPlan plan{save ? "forward, saving its GEMM outputs" : "forward", false, {}, {}};
  BufferPlan& p = plan.buffers;
  p.set({B::X0, B::X1}, Placement::Input);
  p.set({B::Y0, B::Y1, B::Gate}, Placement::Output);
  p.set({B::G0, B::G1, B::Z, B::Dk}, save ? Placement::Output : Placement::Scratch);
  p.set({B::Hidden}, Placement::Scratch);
  p.alias(B::E, B::Hidden);  // hidden is dead once z is computed
  if (!save) p.alias(B::Dk, B::Z);  // z is dead once e is computed
  p.alias(B::Mixed, B::Hidden);  // e is dead once dk is computed
  add_steps_to_keys(plan.steps, false);
  plan.steps.push_back(row_stage(Stage::MixForward));
  plan.steps.push_back(gemm(kDirections, {B::Y0, B::Y1}, both(B::Mixed), Weight::Wo, kTransposed, kAccumulate));
  check_plan(plan);
  return plan;
}

// resume: the forward's g, z and dk are inputs. They stay unwritten (a retained graph runs its
// backward again), so their gradients get memory of their own, except d/dz, which is written over a
// copy of z.
ChainPlan make_backward_plan(bool resume) {
  ChainPlan plan{resume ? "backward from the saved GEMM outputs" : "backward", true, {}, {}};
  BufferPlan& p = plan.buffers;
  p.set({B::X0, B::X1, B::GradY0, B::GradY1, B::Gate}, Placement::Input);
  p.set({B::GradX0, B::GradX1}, Placement::Output);
  p.set({B::G0, B::G1, B::Z, B::Dk}, resume ? Placement::Input : Placement::Scratch);
  p.set({B::Hidden, B::Lse, B::E, B::GradMixed}, Placement::Scratch);
  if (resume) {
    p.set({B::GradG0, B::GradG1, B::GradDk}, Placement::Scratch);
  } else {
    p.alias(B::GradG0, B::G0);  // block by block: the mix stage's, then the hidden stage's
    p.alias(B::GradG1, B::G1);
    p.alias(B::GradDk, B::Dk);
  }
  p.alias(B::Mixed, B::GradMixed);
  p.alias(B::GradE0, B::GradX0);  // RelationBackward turns d/de into the elementwise d/dx in place
  p.alias(B::GradE1, B::GradX1);
  p.alias(B::GradZ, B::Z);
  p.alias(B::GradHidden, B::Hidden);  // hidden is dead once d/dW2 is computed

  std::vector<Step>& s = plan.steps;
  add_steps_to_keys(s, resume);
  s.push_back(gemm(kDirections, both(B::GradMixed), {B::GradY0, B::GradY1}, Weight::Wo, !kTransposed));
  s.push_back(row_stage(Stage::MixBackward));
  s.push_back(weight_gradient(kDirections, Reduction::Wo, {B::GradY0, B::GradY1}, both(B::Mixed)));
  s.push_back(weight_gradient(kDirections, Reduction::Wk, both(B::GradDk), both(B::E)));
  s.push_back(gemm(kDirections, {B::GradE0, B::GradE1}, both(B::GradDk), Weight::Wk, !kTransposed));
  s.push_back(column_sum(kDirections, Reduction::KNoise, {B::GradE0, B::GradE1}));
  s.push_back(row_stage(Stage::RelationBackward));
  s.push_back(weight_gradient(kRows, Reduction::W2, both(B::GradZ), both(B::Hidden)));
  s.push_back(column_sum(kRows, Reduction::B2, both(B::GradZ)));
  s.push_back(gemm(kRows, both(B::GradHidden), both(B::GradZ), Weight::W2, !kTransposed));
  s.push_back(row_stage(Stage::HiddenBackward));
  s.push_back(gemm(kDirections, {B::GradX0, B::GradX1}, {B::GradG0, B::GradG1}, Weight::Wx, !kTransposed, kAccumulate));
  s.push_back(weight_gradient(kDirections, Reduction::Wx, {B::GradG0, B::GradG1}, {B::X0, B::X1}));
  s.push_back(column_sum(kDirections, Reduction::GSum, {B::GradG0, B::GradG1}));
  check_plan(plan);
  return plan;
}

}  // namespace

const ChainPlan& forward_plan(bool save_activations) {
  static const ChainPlan plans[2] = {make_forward_plan(false), make_forward_plan(true)};
  return plans[save_activations];
}

const ChainPlan& backward_plan(bool resume_from_saved) {
  static const ChainPlan plans[2] = {make_backward_plan(false), make_backward_plan(true)};
  return plans[resume_from_saved];
}

int scratch_rows_per_pixel(const ChainPlan& plan) {
  int rows = 0;
  for (int i = 0; i < kNumBuffers; ++i) {
    const Buffer b = static_cast<Buffer>(i);
    const BufferShape shape = buffer_shape(b);
    if (plan.buffers[b] != Placement::Scratch || shape.accumulator) continue;
    rows += shape.directions * (shape.columns == Columns::GLayout ? kGBlocks : 1);
  }
  return rows;
}

std::vector<std::string> chain_plan_table(bool backward, bool saved) {
  const ChainPlan& plan = backward ? backward_plan(saved) : forward_plan(saved);
  static const char* const placements[] = {"unused", "input", "output", "scratch", "alias"};
  static const char* const columns[] = {"C", "5C", "H", "1"};
  static const char* const kinds[] = {"stage", "gemm", "weight_gradient", "column_sum"};
  std::vector<std::string> table;
  for (int i = 0; i < kNumBuffers; ++i) {
    const Buffer b = static_cast<Buffer>(i);
    if (!plan.buffers.used(b)) continue;
    const BufferShape shape = buffer_shape(b);
    std::ostringstream row;
    row << "buffer|" << buffer_name(b) << "|"
        << (plan.buffers.copied[i] ? "copied_input" : placements[static_cast<int>(plan.buffers[b])]) << "|"
        << buffer_name(plan.buffers.owner(b)) << "|" << shape.directions << "|"
        << columns[static_cast<int>(shape.columns)] << "|" << (shape.accumulator ? 1 : 0);
    table.push_back(row.str());
  }
  auto accesses = [](const std::vector<Access>& list) {
    std::string out;
    for (const Access& a : list)
      out += (out.empty() ? "" : ",") + std::string(buffer_name(a.buffer)) + ":" + std::to_string(a.columns);
    return out;
  };
  for (const Step& step : plan.steps) {
    const bool stage = step.kind == StepKind::RowStage, product = step.kind == StepKind::Gemm;
    std::ostringstream row;
    row << kinds[static_cast<int>(step.kind)] << "|"
        << (stage ? stage_name(step.stage) : product ? weight_name(step.weight) : reduction_name(step.into)) << "|"
        << (step.span == Span::Rows ? "rows" : "directions") << "|" << (product ? operand_name(step.out) : "") << "|"
        << (stage ? "" : operand_name(step.a)) << "|"
        << (step.kind == StepKind::WeightGradient ? operand_name(step.b) : "") << "|" << step.transposed << "|"
        << step.accumulate << "|" << accesses(step_reads(step)) << "|" << accesses(step_writes(step));
    table.push_back(row.str());
  }
  return table;
}

// ---- ranges -----------------------------------------------------------------------------------

at::Tensor RangeTensors::matrix(const Operand& operand, int d) const {
  const at::Tensor& t = (*this)[operand[d < 0 ? 0 : d]];
  if (t.dim() == 3) return d < 0 ? t.view({-1, t.size(2)}) : t[d];
  return t;
}

FusionBuffers RangeTensors::stage_buffers(FusionBuffers b) const {
  auto in = [this](Buffer k) -> const void* {
    const at::Tensor& t = (*this)[k];
    return t.defined() ? t.const_data_ptr() : nullptr;
  };
  // An input the plan never writes is not asked for a mutable pointer (it may be shared).
  auto out = [this, &in](Buffer k) -> void* {
    const at::Tensor& t = (*this)[k];
    if (!t.defined()) return nullptr;
    const Buffer memory = plan->owner(k);
    if ((*plan)[memory] == Placement::Input && !plan->copied[index_of(memory)]) return const_cast<void*>(in(k));
    return t.data_ptr();
  };
  b.pixels = pixels;
  b.x[0] = in(Buffer::X0);
  b.x[1] = in(Buffer::X1);
  b.g[0] = in(Buffer::G0);
  b.g[1] = in(Buffer::G1);
  b.hidden = out(Buffer::Hidden);
  b.z = out(Buffer::Z);
  b.lse = out(Buffer::Lse);
  b.e = out(Buffer::E);
  b.dk = in(Buffer::Dk);
  b.gate = out(Buffer::Gate);
  b.mixed = out(Buffer::Mixed);
  b.y[0] = out(Buffer::Y0);
  b.y[1] = out(Buffer::Y1);
  b.grad_y[0] = in(Buffer::GradY0);
  b.grad_y[1] = in(Buffer::GradY1);
  b.grad_mixed = in(Buffer::GradMixed);
  b.grad_dk = out(Buffer::GradDk);
  b.grad_e[0] = in(Buffer::GradE0);
  b.grad_e[1] = in(Buffer::GradE1);
  b.grad_hidden = in(Buffer::GradHidden);
  b.grad_g[0] = out(Buffer::GradG0);
  b.grad_g[1] = out(Buffer::GradG1);
  b.grad_x[0] = out(Buffer::GradX0);
  b.grad_x[1] = out(Buffer::GradX1);
  return b;
}

at::Tensor weight_matrix(const PackedWeights& w, Weight which, int d, bool transposed) {
  at::Tensor m;
  switch (which) {
    case Weight::Wx: m = w.wx[d]; break;
    case Weight::W2: m = w.w2; break;
    case Weight::Wk: m = w.wk[d]; break;
    case Weight::Wo: m = w.wo[d]; break;
  }
  return transposed ? m.t() : m;
}

at::Tensor weight_batch(const PackedWeights& w, Weight which, bool transposed) {
  const at::Tensor& m = which == Weight::Wx ? w.wx : which == Weight::Wk ? w.wk : w.wo;
  TORCH_INTERNAL_ASSERT(which != Weight::W2, "W2 is shared by the directions");
  return transposed ? m.transpose(1, 2) : m;
}

// ---- the whole-range executor -----------------------------------------------------------------

namespace {

// A stage as a call of gemini_kernels::chain_stage (a no-op) with the tensors it reads and writes, the
// g-layout ones narrowed to the column blocks it touches: what a dispatch mode records as its launch.
void announce_stage(Stage stage, const RangeTensors& range) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("gemini_kernels::chain_stage", "");
  const int64_t C = range[Buffer::X0].size(-1);
  auto tensors = [&](const std::vector<Access>& accesses) {
    std::vector<at::Tensor> list;
    for (const Access& a : accesses) {
      const at::Tensor& t = range[a.buffer];
      if (!t.defined()) continue;
      if (buffer_shape(a.buffer).columns != Columns::GLayout || a.columns == kAllColumns) {
        list.push_back(t);
      } else {
        const int first = __builtin_ctz(a.columns), count = __builtin_popcount(a.columns);  // masks are runs of blocks
        list.push_back(t.narrow(-1, first * C, count * C));
      }
    }
    return list;
  };
  torch::jit::Stack stack{c10::IValue(std::string(stage_name(stage))), c10::IValue(tensors(stage_reads(stage))),
                          c10::IValue(tensors(stage_writes(stage))), c10::IValue(int64_t{0})};
  op.callBoxed(&stack);
}

// Whole-tensor GEMMs (cuBLAS, or MKL threaded by itself), each sum written once, as the only range.
struct WholeRangeOps {
  static constexpr bool kBatchesDirections = true;  // one launch for both directions
  StageRunner run;
  at::ScalarType dtype;
  FusionBuffers parameters;
  WeightGradients* sums;
  const RangeTensors* counted = nullptr;  // set: the stages are announced (count_range), not run

  void stage(Stage stage, const FusionBuffers& b) {
    // each stage by name in the profiler (the name is built only when a profiler listens)
    RECORD_FUNCTION(std::string("gemini_kernels::") + stage_name(stage), std::vector<c10::IValue>());
    if (counted != nullptr) return announce_stage(stage, *counted);
    run(stage, dtype, b);
  }
  void product(at::Tensor out, const at::Tensor& a, const at::Tensor& w, bool accumulate) {
    if (accumulate) {
      out.addmm_(a, w);
    } else {
      at::mm_out(out, a, w);
    }
  }
  void batched_product(at::Tensor out, const at::Tensor& a, const at::Tensor& w) { at::bmm_out(out, a, w); }
  void weight_gradient(Reduction into, int d, const at::Tensor& a, const at::Tensor& b) {
    target(into, d) = at::mm(a.t(), b);
  }
  void batched_weight_gradient(Reduction into, const at::Tensor& a, const at::Tensor& b) {
    const at::Tensor both = at::bmm(a.transpose(1, 2), b);
    for (int d = 0; d < 2; ++d) target(into, d) = both[d];
  }
  void column_sum(Reduction into, int d, const at::Tensor& a) { target(into, d) = a.sum(0); }

  at::Tensor& target(Reduction into, int d) {
    TORCH_INTERNAL_ASSERT(sums != nullptr && (d >= 0) == reduction_per_direction(into));
    return reduction_slot(*sums, into, d);
  }
};

// A fresh buffer over the run's M pixels: (2, M, columns) or (M, columns).
at::Tensor empty_buffer(Buffer b, const ChainRun& run, const at::TensorOptions& options) {
  const BufferShape shape = buffer_shape(b);
  const int64_t cols = buffer_columns(b, run.channels, run.heads);
  const auto with_dtype = options.dtype(shape.accumulator ? accumulation_type(run.dtype) : run.dtype);
  return shape.directions == 2 ? at::empty({2, run.pixels, cols}, with_dtype) : at::empty({run.pixels, cols}, with_dtype);
}

RangeTensors whole_range_tensors(const ChainRun& run) {
  RangeTensors range{&run.plan->buffers, run.pixels, {}};
  const BufferPlan& p = run.plan->buffers;
  const auto options = run.tensors[index_of(Buffer::X0)].options();
  for (int i = 0; i < kNumBuffers; ++i) {
    const Buffer b = static_cast<Buffer>(i);
    if (p[b] == Placement::Input || p[b] == Placement::Output) {
      range.tensors[i] = p.copied[i] ? run.tensors[i].clone() : run.tensors[i];
    } else if (p[b] == Placement::Scratch) {
      range.tensors[i] = empty_buffer(b, run, options);
    }
  }
  for (int i = 0; i < kNumBuffers; ++i)
    if (p.placement[i] == Placement::Alias) range.tensors[i] = range.tensors[index_of(p.storage[i])];
  return range;
}

// counting: the stages announced (count_range) rather than run.
void run_whole_range(const ChainRun& chain, StageRunner run, bool counting) {
  const RangeTensors range = whole_range_tensors(chain);
  WholeRangeOps ops{run, chain.dtype, parameter_buffers(*chain.weights, chain.channels, chain.heads), chain.gradients,
                    counting ? &range : nullptr};
  run_steps(*chain.plan, range, *chain.weights, ops);
}

}  // namespace

at::Tensor& reduction_slot(WeightGradients& g, Reduction into, int d) {
  switch (into) {
    case Reduction::Wx: return g.grad_wx[d];
    case Reduction::GSum: return g.grad_g_sum[d];
    case Reduction::W2: return g.grad_w2;
    case Reduction::B2: return g.grad_b2;
    case Reduction::KNoise: return g.grad_k_noise[d];
    case Reduction::Wk: return g.grad_wk[d];
    case Reduction::Wo: return g.grad_wo[d];
  }
  return g.grad_w2;
}

ChainExecutor whole_range(StageRunner run) {
  return [run](const ChainRun& chain) { run_whole_range(chain, run, false); };
}

ChainExecutor count_range() {
  return [](const ChainRun& chain) { run_whole_range(chain, nullptr, true); };
}

// ---- forward and backward ---------------------------------------------------------------------

namespace {

ChainRun start_run(const ChainPlan& plan, const PackedWeights& w, const at::Tensor& x0, const at::Tensor& x1,
                   int64_t num_heads) {
  const int64_t C = x0.size(-1);
  const int64_t M = x0.numel() / C;
  ChainRun run{&plan, {}, &w, M, C, num_heads, x0.scalar_type(), nullptr};
  run.tensors[index_of(Buffer::X0)] = x0.contiguous().view({M, C});
  run.tensors[index_of(Buffer::X1)] = x1.contiguous().view({M, C});
  return run;
}

// The Output buffers that the caller does not shape itself, in their (M, ·) / (2, M, ·) shape.
void allocate_outputs(ChainRun& run, const at::TensorOptions& options) {
  for (int i = 0; i < kNumBuffers; ++i)
    if (run.plan->buffers.placement[i] == Placement::Output && !run.tensors[i].defined())
      run.tensors[i] = empty_buffer(static_cast<Buffer>(i), run, options);
}

// The order of fusion_forward's activations (check_activations).
constexpr Buffer kActivations[kNumActivations] = {Buffer::G0, Buffer::G1, Buffer::Z, Buffer::Dk};

}  // namespace

ForwardResult run_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                          bool save_activations, const ChainExecutor& execute) {
  check_arguments(x0, x1, params, num_heads);
  const int64_t C = x0.size(-1);
  const PackedWeights w = cached_pack_weights(params, C);
  ChainRun run = start_run(forward_plan(save_activations), w, x0, x1, num_heads);
  const int64_t M = run.pixels;
  const std::array<at::Tensor, 2> out = empty_like_inputs(x0, x1);
  const at::Tensor gate =
      at::empty(gate_shape(x0.sizes(), num_heads), x0.options().dtype(accumulation_type(x0.scalar_type())));
  run.tensors[index_of(Buffer::Y0)] = out[0].view({M, C});
  run.tensors[index_of(Buffer::Y1)] = out[1].view({M, C});
  run.tensors[index_of(Buffer::Gate)] = gate.view({2, M, num_heads});
  allocate_outputs(run, x0.options());
  execute(run);
  std::vector<at::Tensor> activations;
  if (save_activations)
    for (Buffer b : kActivations) activations.push_back(run.tensors[index_of(b)]);
  return {out[0], out[1], gate, activations};
}

std::vector<at::Tensor> run_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                     const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                     at::TensorList activations, int64_t num_heads, const ChainExecutor& execute) {
  check_arguments(x0, x1, params, num_heads);
  check_backward_arguments(grad_y0, grad_y1, x0, gate, num_heads);
  check_activations(activations, x0);
  const int64_t C = x0.size(-1);
  const PackedWeights w = cached_pack_weights(params, C);
  ChainRun run = start_run(backward_plan(!activations.empty()), w, x0, x1, num_heads);
  const int64_t M = run.pixels;
  const at::Tensor gy[2] = {grad_y0.contiguous().view({M, C}), grad_y1.contiguous().view({M, C})};
  run.tensors[index_of(Buffer::GradY0)] = gy[0];
  run.tensors[index_of(Buffer::GradY1)] = gy[1];
  run.tensors[index_of(Buffer::Gate)] = gate.contiguous().view({2, M, num_heads});
  for (size_t i = 0; i < activations.size(); ++i) run.tensors[index_of(kActivations[i])] = activations[i];
  const std::array<at::Tensor, 2> grad_x = empty_like_inputs(x0, x1);
  run.tensors[index_of(Buffer::GradX0)] = grad_x[0].view({M, C});
  run.tensors[index_of(Buffer::GradX1)] = grad_x[1].view({M, C});
  WeightGradients r;
  run.gradients = &r;
  execute(run);
  for (int d = 0; d < 2; ++d) {
    r.grad_x[d] = grad_x[d];
    r.grad_bo[d] = gy[d].sum(0);  // needs grad_y alone: one sum over all pixels, whatever the ranges
  }
  return assemble_gradients(r, w, x0, x1);
}

ForwardResult fusion_forward(const at::Tensor& x0, const at::Tensor& x1, at::TensorList params, int64_t num_heads,
                             bool save_activations, StageRunner run) {
  return run_forward(x0, x1, params, num_heads, save_activations, whole_range(run));
}

std::vector<at::Tensor> fusion_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                        const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                        at::TensorList activations, int64_t num_heads, StageRunner run) {
  return run_backward(grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads, whole_range(run));
}

}  // namespace gk

namespace {

void ignore_stage(const c10::OperatorHandle&, torch::jit::Stack* stack) { torch::jit::drop(*stack, 4); }

// The GPU plan counted where there is no GPU (meta tensors: shapes, no data): whole_range's aten ops,
// and the stages announced as chain_stage calls (count_range).
// An H100's shared memory per block (opt-in) and compute capability: the GPU the counts stand for.
constexpr int64_t kCountedSharedMemoryBytes = 227 * 1024;
constexpr int kCountedComputeCapability = 90;

std::tuple<at::Tensor, at::Tensor, at::Tensor> count_forward(const at::Tensor& x0, const at::Tensor& x1,
                                                             at::TensorList params, int64_t num_heads) {
  // as forward_cuda (fusion_cuda.cpp) chooses
  auto count = [&] {
    if (gk::takes_fused_forward(x0, x1, params, num_heads, true, kCountedSharedMemoryBytes, kCountedComputeCapability))
      return gk::fused_forward(x0, x1, params, num_heads, gk::announce_fused_forward);
    if (gk::takes_wide_forward(x0, x1, params, num_heads, true, kCountedSharedMemoryBytes, kCountedComputeCapability))
      return gk::wide_forward(x0, x1, params, num_heads, gk::announce_wide_forward);
    return gk::run_forward(x0, x1, params, num_heads, false, gk::count_range());
  };
  const gk::ForwardResult result = count();
  return {std::get<0>(result), std::get<1>(result), std::get<2>(result)};
}

// The fused backward's programs on that GPU (backward_programs in fusion_kernels.cu): a block an SM
// (its registers, up to 255 a thread, allow no second), within what keeps the partial sums in L2.
constexpr int64_t kCountedSms = 132;
constexpr int64_t kCountedL2Bytes = 50 * 1024 * 1024;

int64_t counted_programs(int64_t C) {
  return gk::fused_backward_programs_within(static_cast<int>(C), kCountedSms, kCountedL2Bytes);
}

std::vector<at::Tensor> count_backward(const at::Tensor& grad_y0, const at::Tensor& grad_y1, const at::Tensor& x0,
                                       const at::Tensor& x1, at::TensorList params, const at::Tensor& gate,
                                       int64_t num_heads) {
  // as backward_cuda (fusion_cuda.cpp) chooses
  if (gk::takes_fused_backward(x0, x1, params, num_heads, true, kCountedSharedMemoryBytes, kCountedComputeCapability))
    return gk::fused_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads,
                              counted_programs(x0.size(-1)), gk::announce_fused_backward);
  if (gk::takes_wide_backward(x0, x1, params, num_heads, true, kCountedSharedMemoryBytes, kCountedComputeCapability))
    return gk::wide_backward(grad_y0, grad_y1, x0, x1, params, gate, num_heads, gk::announce_wide_backward);
  return gk::run_backward(grad_y0, grad_y1, x0, x1, params, gate, {}, num_heads, gk::count_range());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gemini_kernels, m) {
  // The chain's plans (chain_plan_table): its buffers and steps.
  m.def("chain_plan(bool backward, bool saved) -> str[]", &gk::chain_plan_table);
  // For the launch ledger (python -m gemini_kernels.ledger --backends cuda): the forward and backward
  // of the CUDA build as it runs them, its stages announced by chain_stage, which does nothing.
  m.def("chain_stage(str stage, Tensor[] reads, Tensor[] writes, int flops=0) -> ()");
  m.def("count_forward(Tensor x0, Tensor x1, Tensor[] params, int num_heads) -> (Tensor, Tensor, Tensor)");
  m.def("count_backward(Tensor grad_y0, Tensor grad_y1, Tensor x0, Tensor x1, Tensor[] params, Tensor gate, "
        "int num_heads) -> Tensor[]");
}

// Above the dispatch modes, so that a mode sees the ops they call; chain_stage below them, so that it
// sees each stage.
TORCH_LIBRARY_IMPL(gemini_kernels, CompositeImplicitAutograd, m) {
  m.impl("count_forward", &count_forward);
  m.impl("count_backward", &count_backward);
}

TORCH_LIBRARY_IMPL(gemini_kernels, CompositeExplicitAutograd, m) {
  m.impl("chain_stage", torch::CppFunction::makeFromBoxedFunction<&ignore_stage>());
}
