// The fused backward of narrow layers (C <= 128, C a multiple of 16), the fused forward's counterpart:
// one pass over a tile of 64 pixels recomputes the forward's products from x0, x1 and the saved gates
// and runs every gradient product of both directions, so x0, x1, dy0 and dy1 are read once and dx0, dx1
// written once. The weight gradients are summed over the tiles of a *program* (a CUDA block that walks
// tiles p, p + P, p + 2P, ...) into the program's own partial sums, in the accumulation type, with no
// atomics; a second pass (ReduceGradients) adds the P partials in program order and writes the 14
// parameter gradients. So a rerun gives the same bits, on a device with the same P.
//
// The tile logic is written once, against the engine of fused_forward.h, which for the backward also
// does (A the accumulation type, `out` a program's partial sums):
//
//   void weight_gradient(A* out, int ldo, int n, int k, WeightTerm<T> first, WeightTerm<T> second)
//                               out[c * ldo + j] += sum_r first.g[r][c] first.x[r][j] (+ second's)
//                               for c < n, j < k, over the tile's rows r < kFusedTileRows
//   void column_sums(A* out, int n, const T* g, const T* g2)
//                               out[c] += sum_r g[r][c] (+ g2[r][c]), c < n (row stride engine.ld())
//   void clear(A* out, int64_t n)   out[0:n] = 0
//
// Rows past the last pixel hold x = 0 and dy = 0, so every gradient of theirs is exactly 0 and adds
// nothing to the sums.
//
// Rounding follows the CUDA chain's backward (fusion_math.h's MixBackward, RelationBackward,
// HiddenBackward): every gradient a product reads or a sum adds is rounded to T, as the chain stores
// it; products and sums accumulate in A; dx_d is summed in T, each contribution rounded once, as the
// chain's GEMMs add into it.
#pragma once

#include "fused_forward.h"

namespace gk {

constexpr int kFusedBackwardMatrices = 12;

// Where each parameter's gradient sits in a program's partial sums: the parameters' own layout, one
// after another in FusionParams order (fusion_params.h), so that the reduction writes each element of
// the partials to the same element of a gradient. The v_noise slot holds sum_r d/d(v_noise + s), which
// is v_noise's gradient; the key third of in_proj_bias's slots stays 0 (the key bias cancels).
// The parameters by index, in FusionParams order: kParam_fc1_weight, ...
enum ParamIndex : int {
#define GK_PARAM_INDEX(field, name, rank, a0, b0, a1, b1) kParam_##field,
  GK_FUSION_PARAMS(GK_PARAM_INDEX)
#undef GK_PARAM_INDEX
  kParamCount
};

struct FusionParamOffsets {
#define GK_PARAM_OFFSET(field, name, rank, a0, b0, a1, b1) int64_t field;
  GK_FUSION_PARAMS(GK_PARAM_OFFSET)
#undef GK_PARAM_OFFSET
  int64_t total;

  GK_HD static constexpr FusionParamOffsets of(int64_t C) {
    FusionParamOffsets o{};
    int64_t at = 0;
#define GK_PARAM_OFFSET(field, name, rank, a0, b0, a1, b1) \
  o.field = at;                                           \
  at += ((a0) * C + (b0)) * ((rank) == 2 ? (a1) * C + (b1) : 1);
    GK_FUSION_PARAMS(GK_PARAM_OFFSET)
#undef GK_PARAM_OFFSET
    o.total = at;
    return o;
  }
};

// A parameter's rows and the columns of each: its two dimensions, or one row for a vector. (Switches,
// not arrays: an array indexed at run time goes to a CUDA thread's stack.)
GK_HD constexpr int64_t param_rows(int param, int64_t C) {
  switch (param) {
#define GK_PARAM_ROWS(field, name, rank, a0, b0, a1, b1) \
  case kParam_##field: return (rank) == 2 ? (a0) * C + (b0) : 1;
    GK_FUSION_PARAMS(GK_PARAM_ROWS)
#undef GK_PARAM_ROWS
  }
  return 0;
}
GK_HD constexpr int64_t param_columns(int param, int64_t C) {
  switch (param) {
#define GK_PARAM_COLUMNS(field, name, rank, a0, b0, a1, b1) \
  case kParam_##field: return (rank) == 2 ? (a1) * C + (b1) : (a0) * C + (b0);
    GK_FUSION_PARAMS(GK_PARAM_COLUMNS)
#undef GK_PARAM_COLUMNS
  }
  return 0;
}

// The parameters' gradients, as raw pointers (contiguous, the parameters' dtype and shapes).
struct FusionParamGradPointers {
#define GK_PARAM_POINTER(field, name, rank, a0, b0, a1, b1) void* field;
  GK_FUSION_PARAMS(GK_PARAM_POINTER)
#undef GK_PARAM_POINTER
};

// Parameter `param`'s gradient.
template <class T>
GK_HD T* gradient_of(const FusionParamGradPointers& grads, int param) {
  switch (param) {
#define GK_PARAM_CASE(field, name, rank, a0, b0, a1, b1) \
  case kParam_##field: return mptr<T>(grads.field);
    GK_FUSION_PARAMS(GK_PARAM_CASE)
#undef GK_PARAM_CASE
  }
  return nullptr;
}

// Where parameter `param`'s gradient starts in the layout.
GK_HD constexpr int64_t param_offset(int param, int64_t C) {
  switch (param) {
#define GK_PARAM_OFFSET_CASE(field, name, rank, a0, b0, a1, b1) \
  case kParam_##field: return FusionParamOffsets::of(C).field;
    GK_FUSION_PARAMS(GK_PARAM_OFFSET_CASE)
#undef GK_PARAM_OFFSET_CASE
  }
  return 0;
}

struct FusedBackwardArgs {
  int64_t pixels;  // M per direction
  int channels;    // C
  int heads;       // h
  double scale;    // 1 / sqrt(C / h)
  int programs;    // P: the number of partial sums

  const void* x[2];       // (M, C)
  const void* grad_y[2];  // (M, C)
  const void* gate;       // (2, M, h), accumulation type: the forward's gates
  void* grad_x[2];        // (M, C)
  void* partials;         // (P, FusionParamOffsets::total), accumulation type
  FusionParamPointers params;
  FusionParamGradPointers grads;
};

GK_HD constexpr int64_t fused_tile_count(int64_t pixels) { return (pixels + kFusedTileRows - 1) / kFusedTileRows; }

// The CUDA block of the backward: its tile's buffers (16-bit, float gates), then the warps' staging.
GK_HD constexpr int64_t fused_backward_launch_bytes(int C, int h) {
  return fused_tile_bytes(C, h, 2, 4, kFusedBackwardMatrices) + kFusedStagingBytes;
}

// How many programs a backward runs with `concurrent` blocks at once on a GPU of `l2_bytes` of L2: every
// tile reads and writes its program's partial sums (11 C^2 + 14 C floats), so all programs' sums
// must stay within 4/5 of the L2 (the rest for the weights the tiles reread), or that traffic goes to
// DRAM on every tile. H100 (50 MiB): 132 programs at C = 64, 57 at C = 128.
GK_HD constexpr int64_t fused_backward_programs_within(int C, int64_t concurrent, int64_t l2_bytes) {
  const int64_t fit = l2_bytes / 5 * 4 / (FusionParamOffsets::of(C).total * 4);
  const int64_t programs = concurrent < fit ? concurrent : fit;
  return programs > 1 ? programs : 1;
}

// One term of a weight gradient: g^T x over the tile's rows, g (kFusedTileRows x n), x (kFusedTileRows x k).
template <class T>
struct WeightTerm {
  const T* g = nullptr;
  int ldg = 0;
  const T* x = nullptr;
  int ldx = 0;
};

namespace fused {

// ---- epilogues ----------------------------------------------------------------------------------

// acc += round(sum), in T (a gradient that several products add to).
template <class T>
struct AddTo {
  T* acc;
  int ld;
  GK_HD void operator()(int r, int c, A_t<T> sum) const {
    acc[r * ld + c] = round_to<T>(widen(acc[r * ld + c]) + widen(round_to<T>(sum)));
  }
};

// AddTo, and round(sum) kept apart (for a column sum of the product).
template <class T>
struct AddToAndKeep {
  T* acc;
  T* kept;
  int ld;
  GK_HD void operator()(int r, int c, A_t<T> sum) const {
    const T p = round_to<T>(sum);
    kept[r * ld + c] = p;
    acc[r * ld + c] = round_to<T>(widen(acc[r * ld + c]) + widen(p));
  }
};

// u = round(fc1 pre-activation) and GELU(u), the first for the backward's GELU', the second for fc2.
template <class T>
struct StorePreActivationAndGelu {
  T* pre;
  T* hidden;
  int ld;
  const T* bias;
  GK_HD void operator()(int r, int c, A_t<T> sum) const {
    const T u = round_to<T>(sum + widen(bias[c]));
    pre[r * ld + c] = u;
    hidden[r * ld + c] = round_to<T>(gelu(widen(u)));
  }
};

// d/du = round(d/dhidden) GELU'(u).
template <class T>
struct StoreGeluGrad {
  T* out;
  const T* pre;
  int ld;
  GK_HD void operator()(int r, int c, A_t<T> sum) const {
    out[r * ld + c] = round_to<T>(widen(round_to<T>(sum)) * gelu_grad(widen(pre[r * ld + c])));
  }
};

// ---- row stages ---------------------------------------------------------------------------------

template <class T>
struct ZeroRows {
  T* tile;
  int ld;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int c = team.first(); c < channels; c += team.stride()) tile[r * ld + c] = round_to<T>(A_t<T>(0));
  }
};

// The saved gates of direction d into the tile's gates (0 past the last pixel).
template <class T>
struct LoadGates {
  A_t<T>* tile_gates;
  const A_t<T>* gates;  // the tile's first pixel, direction d: (M, h) rows
  int rows;
  int heads;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int j = team.first(); j < heads; j += team.stride())
      tile_gates[r * heads + j] = r < rows ? gates[static_cast<int64_t>(r) * heads + j] : A_t<T>(0);
  }
};

// The gates' backward (MixBackward's), per head: d/da = sum gm (v_self - v_cross), d/dlogit = d/da a (1 - a);
// then, over their inputs, d/dv_self = a gm (over v_delta), d/dv_cross = (1 - a) gm (over the mix),
// d/dq = d/dlogit dk scale (over dk) and d/ddk = d/dlogit q scale (over q); and dx_s += dy, the residual.
template <class T>
struct GateGradRow {
  const T* grad_mixed;
  T* v_delta;  // out: d/dv_self
  T* mixed;    // out: d/dv_cross
  T* query;    // in: q (bias included); out: d/ddk
  T* dk;       // out: d/dq
  const T* grad_y;
  T* grad_self;
  int ld;
  const A_t<T>* tile_gates;
  int heads;
  int width;
  double scale;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    const A s = static_cast<A>(scale);
    for (int j = 0; j < heads; ++j) {
      const int lo = j * width, hi = lo + width;
      const A a = tile_gates[r * heads + j];
      A grad_a = 0;
      for (int c = lo + team.first(); c < hi; c += team.stride())
        grad_a += widen(grad_mixed[r * ld + c]) * widen(v_delta[r * ld + c]);
      const A grad_logit = team.sum(grad_a) * two_way_softmax_grad(a);
      team.sync();  // every lane has read the head's v_delta before any overwrites it
      for (int c = lo + team.first(); c < hi; c += team.stride()) {
        const int i = r * ld + c;
        const A gm = widen(grad_mixed[i]), q = widen(query[i]) * s, k = widen(dk[i]);
        v_delta[i] = round_to<T>(a * gm);
        mixed[i] = round_to<T>((A(1) - a) * gm);
        query[i] = round_to<T>(grad_logit * q);
        dk[i] = round_to<T>(grad_logit * k * s);
      }
    }
    for (int c = team.first(); c < heads * width; c += team.stride())
      grad_self[r * ld + c] = round_to<T>(widen(grad_self[r * ld + c]) + widen(grad_y[r * ld + c]));
  }
};

// e = k_noise + s - s r from the rounded relation r (the key difference's input, for d/dWk).
template <class T>
struct KeyInputRow {
  const T* relation;
  const T* self;
  T* e;
  int ld;
  const T* k_noise;  // row d
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int c = team.first(); c < channels; c += team.stride())
      e[r * ld + c] = round_to<T>(key_delta(widen(k_noise[c]), widen(self[r * ld + c]), widen(relation[r * ld + c])));
  }
};

// The relation softmax's backward (RelationBackward's): d/dr = -d/de s, d/dz = r (d/dr - sum r d/dr) over
// r; and dx_s += d/de (1 - r).
template <class T>
struct RelationGradRow {
  T* relation;  // in: r; out: d/dz
  const T* grad_e;
  const T* self;
  T* grad_self;
  int ld;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    A dot = 0;
    for (int c = team.first(); c < channels; c += team.stride()) {
      const int i = r * ld + c;
      dot += mul_rn(widen(relation[i]), -mul_rn(widen(grad_e[i]), widen(self[i])));
    }
    dot = team.sum(dot);
    for (int c = team.first(); c < channels; c += team.stride()) {
      const int i = r * ld + c;
      const A rel = widen(relation[i]), ge = widen(grad_e[i]);
      const A grad_rel = -mul_rn(ge, widen(self[i]));
      relation[i] = round_to<T>(rel * (grad_rel - dot));
      grad_self[i] = round_to<T>(widen(grad_self[i]) + widen(round_to<T>(ge * key_delta_ds(rel))));
    }
  }
};

// hidden = GELU(u), recomputed from the kept pre-activation.
template <class T>
struct GeluRow {
  const T* pre;
  T* hidden;
  int ld;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int c = team.first(); c < channels; c += team.stride())
      hidden[r * ld + c] = round_to<T>(gelu(widen(pre[r * ld + c])));
  }
};

// The tile's rows that are pixels, out to dx.
template <class T>
struct StoreRows {
  const T* tile;
  int ld;
  T* out;  // the tile's first pixel
  int rows;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    if (r >= rows) return;
    for (int c = team.first(); c < channels; c += team.stride())
      out[static_cast<int64_t>(r) * channels + c] = tile[r * ld + c];
  }
};

// The backward's tile buffers. x_0, x_1 and the two dx accumulators stay for the tile; the others hold,
// per direction, what the comment lists in turn.
enum BackwardMatrix : int {
  kX0 = 0,
  kX1 = 1,
  kGradX0 = 2,
  kGradX1 = 3,
  kPre = 4,      // u, the fc1 pre-activation
  kScratch = 5,  // hidden, e, v_noise + s, d/dmixed, v_noise + s, hidden
  kRelation = 6,  // z, r, d/dz
  kQueryGrad = 7,  // q, d/ddk
  kKeyGrad = 8,    // dk, d/dq
  kSelfValue = 9,  // v_self, v_self - v_cross, d/dv_self, d/de
  kCrossValue = 10,  // v_cross, the mix, d/dv_cross, e
  kGradY = 11,     // dy, d/d(v_noise + s), d/du
};

}  // namespace fused

// Both directions of the tile that starts at pixel `first`, adding its weight gradients to `partial`
// (one program's sums, FusionParamOffsets layout). Per pixel and direction: 7 C^2 multiply-adds
// recompute the forward's products (fc1 2, fc2, q, dk, v_self, v_cross), 8 the input gradients and 8
// the weight gradients.
GK_HD_TEMPLATE
template <class T, class Engine>
GK_HD void fused_backward_tile(Engine& engine, const FusedBackwardArgs& args, int64_t first,
                               typename Acc<T>::type* partial) {
  using namespace fused;
  using A = A_t<T>;
  const int C = args.channels, h = args.heads, ld = engine.ld(), width = C / h;
  const int64_t left = args.pixels - first;
  const int rows = left < kFusedTileRows ? static_cast<int>(left) : kFusedTileRows;
  const FusionParamPointers& p = args.params;
  const FusionParamOffsets at = FusionParamOffsets::of(C);
  const T* fc1 = cptr<T>(p.fc1_weight);
  const T* fc2 = cptr<T>(p.fc2_weight);
  T* pre = engine.matrix(kPre);
  T* scratch = engine.matrix(kScratch);
  T* relation = engine.matrix(kRelation);
  T* query = engine.matrix(kQueryGrad);
  T* dk = engine.matrix(kKeyGrad);
  T* v_self = engine.matrix(kSelfValue);
  T* v_cross = engine.matrix(kCrossValue);
  T* grad_y = engine.matrix(kGradY);
  A* tile_gates = engine.gates();

  engine.rows(LoadRows<T>{engine.matrix(kX0), ld, cptr<T>(args.x[0]) + first * C, rows, C});
  engine.rows(LoadRows<T>{engine.matrix(kX1), ld, cptr<T>(args.x[1]) + first * C, rows, C});
  engine.rows(ZeroRows<T>{engine.matrix(kGradX0), ld, C});
  engine.rows(ZeroRows<T>{engine.matrix(kGradX1), ld, C});
  engine.sync();
  for (int d = 0; d < 2; ++d) {
    // Direction-indexed fields by conditionals (see fused_forward_tile).
    const T* s = engine.matrix(d == 0 ? kX0 : kX1);
    const T* o = engine.matrix(d == 0 ? kX1 : kX0);
    T* grad_s = engine.matrix(d == 0 ? kGradX0 : kGradX1);
    T* grad_o = engine.matrix(d == 0 ? kGradX1 : kGradX0);
    const T* w_in = cptr<T>(d == 0 ? p.in_proj_weight_0 : p.in_proj_weight_1);  // Wq, Wk, Wv
    const T* b_in = cptr<T>(d == 0 ? p.in_proj_bias_0 : p.in_proj_bias_1);
    const T* w_out = cptr<T>(d == 0 ? p.out_proj_weight_0 : p.out_proj_weight_1);
    const T* wq = w_in;
    const T* wk = w_in + C * C;
    const T* wv = w_in + 2 * C * C;
    A* grad_w_in = partial + (d == 0 ? at.in_proj_weight_0 : at.in_proj_weight_1);
    A* grad_b_in = partial + (d == 0 ? at.in_proj_bias_0 : at.in_proj_bias_1);
    A* grad_w_out = partial + (d == 0 ? at.out_proj_weight_0 : at.out_proj_weight_1);
    A* grad_b_out = partial + (d == 0 ? at.out_proj_bias_0 : at.out_proj_bias_1);

    // ---- the forward again, up to the mix -------------------------------------------------------
    engine.gemm(StorePreActivationAndGelu<T>{pre, scratch, ld, cptr<T>(p.fc1_bias)}, C,
                MmaTerm<T>{s, ld, fc1, 2 * C, C}, MmaTerm<T>{o, ld, fc1 + C, 2 * C, C});
    engine.rows(LoadGates<T>{tile_gates, cptr<A>(args.gate) + (d * args.pixels + first) * h, rows, h});
    engine.rows(LoadRows<T>{grad_y, ld, cptr<T>(d == 0 ? args.grad_y[0] : args.grad_y[1]) + first * C, rows, C});
    engine.sync();
    engine.gemm(StoreBias<T>{relation, ld, cptr<T>(p.fc2_bias)}, C, MmaTerm<T>{scratch, ld, fc2, C, C}, MmaTerm<T>{});
    engine.gemm(StoreBias<T>{query, ld, b_in}, C, MmaTerm<T>{s, ld, wq, C, C}, MmaTerm<T>{});
    engine.sync();
    // r over z, e over hidden
    engine.rows(RelationRow<T>{relation, s, scratch, ld, cptr<T>(p.k_noise) + d * C, C, relation});
    engine.sync();
    engine.gemm(StoreBias<T>{dk, ld, nullptr}, C, MmaTerm<T>{scratch, ld, wk, C, C}, MmaTerm<T>{});
    engine.sync();
    engine.rows(NoisyRow<T>{s, scratch, ld, cptr<T>(p.v_noise) + d * C, C});
    engine.sync();
    engine.gemm(StoreBias<T>{v_self, ld, b_in + 2 * C}, C, MmaTerm<T>{scratch, ld, wv, C, C}, MmaTerm<T>{});
    engine.gemm(StoreBias<T>{v_cross, ld, b_in + 2 * C}, C, MmaTerm<T>{o, ld, wv, C, C}, MmaTerm<T>{});
    engine.sync();
    // the mix over v_cross, v_self - v_cross over v_self
    engine.rows(MixRow<T>{v_self, v_cross, v_cross, ld, tile_gates, h, width, C, v_self});
    engine.sync();

    // ---- the output projection and the gates --------------------------------------------------
    // d/dmixed = dy Wo; d/dWo += dy^T mixed; d/dbo += sum dy
    engine.gemm(StoreBias<T>{scratch, ld, nullptr}, C, MmaTerm<T>{grad_y, ld, w_out, C, C, true}, MmaTerm<T>{});
    engine.weight_gradient(grad_w_out, C, C, C, WeightTerm<T>{grad_y, ld, v_cross, ld}, WeightTerm<T>{});
    engine.column_sums(grad_b_out, C, grad_y, nullptr);
    engine.sync();
    engine.rows(GateGradRow<T>{scratch, v_self, v_cross, query, dk, grad_y, grad_s, ld, tile_gates, h, width,
                               args.scale});
    engine.sync();

    // ---- values and query: d/dWv, d/dbv, d/dv_noise, d/dWq, d/dbq, and their part of dx ----------
    const T* grad_v_self = v_self;
    const T* grad_v_cross = v_cross;
    const T* grad_q = dk;
    const T* grad_dk = query;
    engine.rows(NoisyRow<T>{s, scratch, ld, cptr<T>(p.v_noise) + d * C, C});
    engine.gemm(AddToAndKeep<T>{grad_s, grad_y, ld}, C, MmaTerm<T>{grad_v_self, ld, wv, C, C, true}, MmaTerm<T>{});
    engine.gemm(AddTo<T>{grad_o, ld}, C, MmaTerm<T>{grad_v_cross, ld, wv, C, C, true}, MmaTerm<T>{});
    engine.column_sums(grad_b_in + 2 * C, C, grad_v_self, grad_v_cross);
    engine.column_sums(grad_b_in, C, grad_q, nullptr);
    engine.weight_gradient(grad_w_in, C, C, C, WeightTerm<T>{grad_q, ld, s, ld}, WeightTerm<T>{});
    engine.sync();
    engine.gemm(AddTo<T>{grad_s, ld}, C, MmaTerm<T>{grad_q, ld, wq, C, C, true}, MmaTerm<T>{});
    engine.column_sums(partial + at.v_noise + d * C, C, grad_y, nullptr);
    engine.weight_gradient(grad_w_in + 2 * C * C, C, C, C, WeightTerm<T>{grad_v_self, ld, scratch, ld},
                           WeightTerm<T>{grad_v_cross, ld, o, ld});
    engine.sync();

    // ---- the key difference and the relation softmax: d/dWk, d/dk_noise, d/dz -------------------
    T* grad_e = v_self;
    T* e = v_cross;
    engine.rows(KeyInputRow<T>{relation, s, e, ld, cptr<T>(p.k_noise) + d * C, C});
    engine.gemm(StoreBias<T>{grad_e, ld, nullptr}, C, MmaTerm<T>{grad_dk, ld, wk, C, C, true}, MmaTerm<T>{});
    engine.sync();
    engine.rows(RelationGradRow<T>{relation, grad_e, s, grad_s, ld, C});
    engine.rows(GeluRow<T>{pre, scratch, ld, C});
    engine.column_sums(partial + at.k_noise + d * C, C, grad_e, nullptr);
    engine.weight_gradient(grad_w_in + C * C, C, C, C, WeightTerm<T>{grad_dk, ld, e, ld}, WeightTerm<T>{});
    engine.sync();

    // ---- the relation judger: d/dW2, d/db2, d/du, d/dW1, d/db1 ----------------------------------
    const T* grad_z = relation;
    T* grad_u = grad_y;
    engine.gemm(StoreGeluGrad<T>{grad_u, pre, ld}, C, MmaTerm<T>{grad_z, ld, fc2, C, C, true}, MmaTerm<T>{});
    engine.column_sums(partial + at.fc2_bias, C, grad_z, nullptr);
    engine.weight_gradient(partial + at.fc2_weight, C, C, C, WeightTerm<T>{grad_z, ld, scratch, ld}, WeightTerm<T>{});
    engine.sync();
    engine.gemm(AddTo<T>{grad_s, ld}, C, MmaTerm<T>{grad_u, ld, fc1, 2 * C, C, true}, MmaTerm<T>{});
    engine.gemm(AddTo<T>{grad_o, ld}, C, MmaTerm<T>{grad_u, ld, fc1 + C, 2 * C, C, true}, MmaTerm<T>{});
    engine.column_sums(partial + at.fc1_bias, C, grad_u, nullptr);
    engine.weight_gradient(partial + at.fc1_weight, 2 * C, C, C, WeightTerm<T>{grad_u, ld, s, ld}, WeightTerm<T>{});
    engine.weight_gradient(partial + at.fc1_weight + C, 2 * C, C, C, WeightTerm<T>{grad_u, ld, o, ld},
                           WeightTerm<T>{});
    engine.sync();  // the next direction overwrites what these read
  }
  engine.rows(StoreRows<T>{engine.matrix(kGradX0), ld, mptr<T>(args.grad_x[0]) + first * C, rows, C});
  engine.rows(StoreRows<T>{engine.matrix(kGradX1), ld, mptr<T>(args.grad_x[1]) + first * C, rows, C});
}

// Program `program` of the backward: its partial sums cleared, then its tiles, `program` + k P.
GK_HD_TEMPLATE
template <class T, class Engine>
GK_HD void fused_backward_program(Engine& engine, const FusedBackwardArgs& args, int program) {
  using A = typename Acc<T>::type;
  const int64_t stride = FusionParamOffsets::of(args.channels).total;
  A* partial = mptr<A>(args.partials) + program * stride;
  engine.clear(partial, stride);
  engine.sync();
  for (int64_t tile = program; tile < fused_tile_count(args.pixels); tile += args.programs) {
    fused_backward_tile<T>(engine, args, tile * kFusedTileRows, partial);
    engine.sync();  // the next tile reloads the buffers the last stores read
  }
}

// Element i of the partials' layout summed over the programs, in program order.
template <class A>
GK_HD A sum_over_programs(const A* partials, int64_t stride, int programs, int64_t i) {
  A total = 0;
  for (int q = 0; q < programs; ++q) total += partials[q * stride + i];
  return total;
}

// Writes row r, column c of parameter `param`'s gradient (param_rows x param_columns) from the
// programs' partial sums. A functor, so that the runners of gradient elements (fusion_api.h on the
// host, fusion_kernels.cu on CUDA) take it as they take AssembleGradients.
template <class T>
struct ReduceGradients {
  FusedBackwardArgs args;
  GK_HD_TEMPLATE
  GK_HD void operator()(int param, int64_t r, int64_t c) const {
    using A = typename Acc<T>::type;
    const int64_t C = args.channels;
    const int64_t j = r * param_columns(param, C) + c;
    gradient_of<T>(args.grads, param)[j] = fused::round_to<T>(
        sum_over_programs(cptr<A>(args.partials), FusionParamOffsets::of(C).total, args.programs, param_offset(param, C) + j));
  }
};

}  // namespace gk
