// The fused backward of wide layers (MiT stages 3-4), the wide forward's counterpart: eight launches of
// block products (wide_forward.h's blocks, engine and sources; the first two are the forward's own
// passes, run again over the backward's buffers: forward_passes_of) that recompute what the gradients need
// from x0, x1 and the saved gates, run every input-gradient product with the backward's row stages in
// their prologues and epilogues, and sum the weight gradients over the pixels in blocks of their own, a
// 64 x 64 tile of a gradient each, in pixel order: no atomics, no partial sums, the same bits on every
// run.
//
// Per direction d (s = x_d, o = x_{1-d}, dy = dy_d; a block: 64 pixels and the columns of a few whole
// heads, as the forward's):
//
//   pre      the forward's: u = [s, o] fc1^T + b1                                       -> u
//   logits   the forward's: z = GELU(u) W2^T + b2, per row the block's max and sum of exp -> z, statistics
//   heads    q = s Wq^T + bq, dk = e Wk^T (e formed from z and kept by the first column block),
//            v_self = (v_noise + s) Wv^T + bv, v_cross = o Wv^T + bv, gm = dy Wo;
//            per head the gates' backward (MixBackward's)                   -> mixed, d/dq, d/ddk, gm
//   keys     de = d/ddk Wk, and per row the block's part of sum_c r_c d/dr_c -> de, the partial sums
//   judger   d/dz = r (d/dr - sum r d/dr) formed (kept by the first column block); d/du = (d/dz W2) GELU'(u)
//                                                                           -> d/dz, d/du
//   inputs   dx_d = dy + de (1 - r) + d/dq Wq + (a gm) Wv + d/du W1a
//                   + ((1 - a') gm') Wv' + d/du' W1b        (' the other direction's)   -> dx_d
//   weights  every weight gradient g^T x over all pixels (and both directions where the weight is
//            shared), the bias gradients as column sums of g beside them; d/dv_self = a gm and
//            d/dv_cross = (1 - a) gm formed from gm and the gates where they are read
//   noise    d/dk_noise = (sum_p d/ddk) Wk, d/dv_noise = (sum_p d/dv_self) Wv: the column sums of the
//            weights launch times the weights, since de and d(v_noise + s) are products of them
//
// Rounding follows the CUDA chain's backward (fusion_math.h's MixBackward, RelationBackward,
// HiddenBackward): every stored gradient rounded to T as the chain stores it, products and sums in the
// accumulation type, dx_d = round(elementwise part + the sum of its five products) as the chain's one
// GEMM adds into it.
#pragma once

#include "fused_backward.h"
#include "wide_forward.h"

namespace gk {

constexpr int kWideGradientTile = 64;  // weight-gradient blocks: 64 x 64 tiles

// The backward's own passes, after the forward's Pre and Logits.
enum class WideBackwardPass : int { Heads = 0, Keys, Judger, Inputs, Weights, Noise };
constexpr int kWideBackwardPasses = 6;
constexpr int kWideBackwardLaunches = 2 + kWideBackwardPasses;

struct WideBackwardArgs : WideLayer {
  const void* x[2];       // (M, C)
  const void* grad_y[2];  // (M, C)
  const void* gate;       // (2, M, h), accumulation type: the forward's gates
  void* grad_x[2];        // (M, C)
  // (2, M, C) in T unless said otherwise:
  void* pre;         // u, fc1's pre-activation
  void* z;           // fc2's output, bias included
  void* stats;       // (2, M, h / block_heads, 2), accumulation type: per block of z's columns, max and sum of exp
  void* key_input;   // e = k_noise + s - s r
  void* mixed;       // v_cross + a (v_self - v_cross)
  void* grad_query;  // d/dq
  void* grad_key;    // d/ddk
  void* grad_mixed;  // gm = dy Wo
  void* grad_e;      // de = d/ddk Wk
  void* dots;        // (2, M, h / block_heads), accumulation type: per block of columns, sum r d/dr
  void* grad_z;      // d/dz
  void* grad_pre;    // d/du
  void* column_sums;  // (4, C), accumulation type: sum_p d/ddk of each direction, then sum_p d/dv_self
  FusionParamPointers params;
  FusionParamGradPointers grads;
};

// Whether the wide backward takes a layer (any dtype; the CUDA engine also needs 16-bit inputs): the
// forward's blocks, and weight gradients of whole 64 x 64 tiles.
GK_HD constexpr bool wide_backward_fits(int64_t C, int64_t h) {
  return wide_forward_fits(C, h) && C % kWideGradientTile == 0;
}

// The weights launch's blocks: the 64 x 64 tiles of Wo, Wq, Wk, Wv of each direction, W2 and W1 (C x 2C).
GK_HD constexpr int64_t wide_gradient_blocks(int C) {
  const int64_t t = C / kWideGradientTile;
  return 11 * t * t;
}
// The noise launch's blocks: 64 columns of k_noise's or v_noise's row d each.
GK_HD constexpr int64_t wide_noise_blocks(int C) { return 4LL * (C / kWideGradientTile); }

GK_HD constexpr int64_t wide_backward_blocks(WideBackwardPass pass, int64_t pixels, int C, int heads,
                                             int block_heads) {
  return pass == WideBackwardPass::Weights ? wide_gradient_blocks(C)
         : pass == WideBackwardPass::Noise ? wide_noise_blocks(C)
                                           : wide_blocks(pixels, heads, block_heads);
}

// A pass's block: its inputs, sums and row values, and the columns of its sums.
GK_HD constexpr WideShape wide_backward_shape(WideBackwardPass pass) {
  switch (pass) {
    case WideBackwardPass::Heads: return {5, 5, 2};
    case WideBackwardPass::Keys: return {1, 1, 2};
    case WideBackwardPass::Judger: return {1, 1, 3};
    case WideBackwardPass::Inputs: return {5, 1, 2};
    case WideBackwardPass::Weights: return {2, 1, 2};
    default: return {0, 0, 1};  // Noise
  }
}
GK_HD constexpr int wide_backward_columns(WideBackwardPass pass, int C, int heads, int block_heads) {
  return pass == WideBackwardPass::Weights || pass == WideBackwardPass::Noise ? kWideGradientTile
                                                                              : C / heads * block_heads;
}

namespace wide {

// ---- more sources ----------------------------------------------------------------------------------

// d/dv_self = a gm (own) or d/dv_cross = (1 - a) gm, a the gate of column k's head.
template <class T>
struct GatedGrad {
  const T* grad_mixed;
  const A_t<T>* gates;  // the same pixel's (h) row
  int heads;
  int width;
  bool cross;
  int rows;
  int channels;
  GK_HD T at(int r, int k) const {
    if (r >= rows) return round_to<T>(A_t<T>(0));
    const A_t<T> a = gates[static_cast<int64_t>(r) * heads + k / width];
    return round_to<T>((cross ? A_t<T>(1) - a : a) * widen(grad_mixed[static_cast<int64_t>(r) * channels + k]));
  }
};

// d/dz = r (d/dr - sum r d/dr), d/dr = -de s: RelationBackward's, with r and the row's sum from row_values
// (max, 1 / total, sum r d/dr).
template <class T>
struct RelationGrad {
  const T* z;
  const T* grad_e;
  const T* self;
  const A_t<T>* row_values;
  int rows;
  int channels;
  GK_HD T at(int r, int k) const {
    using A = A_t<T>;
    if (r >= rows) return round_to<T>(A(0));
    const int64_t at = static_cast<int64_t>(r) * channels + k;
    const A rel = relation_of(z[at], row_values + 3 * r);
    const A grad_rel = -mul_rn(widen(grad_e[at]), widen(self[at]));
    return round_to<T>(rel * (grad_rel - row_values[3 * r + 2]));
  }
};

// ---- row stages and epilogues --------------------------------------------------------------------

// The gates' backward, per head of the block (MixBackward's): from q, dk, v_self, v_cross and gm (the
// five sums), the recomputed mix (for d/dWo), d/dq, d/ddk and gm, rounded.
template <class T>
struct HeadsGradOut {
  const A_t<T>* q_sums;
  const A_t<T>* k_sums;
  const A_t<T>* self_sums;
  const A_t<T>* cross_sums;
  const A_t<T>* gm_sums;
  const A_t<T>* gates;  // the block's first row of (M, h), direction d
  const T* bq;
  const T* bv;
  T* mixed;  // the block's first row of (M, C), direction d, as the three below
  T* grad_query;
  T* grad_key;
  T* grad_mixed;
  Block b;
  int heads;
  int channels;
  double scale;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    if (r >= b.rows) return;
    const A s = static_cast<A>(scale);
    for (int j = 0; j < b.heads; ++j) {
      const int lo = j * b.width, hi = lo + b.width;
      const A a = gates[static_cast<int64_t>(r) * heads + b.head0 + j];
      A grad_a = 0;
      for (int c = lo + team.first(); c < hi; c += team.stride()) {
        const int i = r * b.ld + c;
        const A vs = linear_value(self_sums[i], bv[b.n0 + c]);
        const A vc = linear_value(cross_sums[i], bv[b.n0 + c]);
        grad_a += widen(round_to<T>(gm_sums[i])) * widen(round_to<T>(vs - vc));
      }
      const A grad_logit = team.sum(grad_a) * two_way_softmax_grad(a);
      for (int c = lo + team.first(); c < hi; c += team.stride()) {
        const int i = r * b.ld + c;
        const int64_t at = static_cast<int64_t>(r) * channels + b.n0 + c;
        const A vs = linear_value(self_sums[i], bv[b.n0 + c]);
        const A vc = linear_value(cross_sums[i], bv[b.n0 + c]);
        const A q = linear_value(q_sums[i], bq[b.n0 + c]) * s;
        const A k = widen(round_to<T>(k_sums[i]));
        mixed[at] = round_to<T>(value_mix(vc, vs - vc, a));
        grad_query[at] = round_to<T>(grad_logit * k * s);
        grad_key[at] = round_to<T>(grad_logit * q);
        grad_mixed[at] = round_to<T>(gm_sums[i]);
      }
    }
  }
};

// de = round(sum), and the row's sum over the block's columns of r d/dr, d/dr = -de s.
template <class T>
struct KeysGradOut {
  const A_t<T>* sums;
  T* grad_e;        // the block's first row of (M, C), direction d
  const T* z;       // the same row of z
  const T* self;    // the block's first row of s
  const A_t<T>* row_values;  // (max, 1 / total)
  A_t<T>* dots;     // the block's first row of (M, column blocks), direction d
  Block b;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    if (r >= b.rows) return;
    A dot = 0;
    for (int c = team.first(); c < b.n; c += team.stride()) {
      const int64_t at = static_cast<int64_t>(r) * channels + b.n0 + c;
      const T ge = round_to<T>(sums[r * b.ld + c]);
      grad_e[at] = ge;
      const A rel = relation_of(z[at], row_values + 2 * r);
      dot += mul_rn(rel, -mul_rn(widen(ge), widen(self[at])));
    }
    dot = team.sum(dot);
    if (team.leader()) dots[static_cast<int64_t>(r) * b.column_blocks + b.column_block] = dot;
  }
};

// The row's softmax (RowSoftmax's max and 1 / total) and its sum of r d/dr over the blocks, three values a row.
template <class T>
struct JudgerRows {
  const A_t<T>* stats;  // the block's first row of (M, column blocks, 2), direction d
  const A_t<T>* dots;   // the block's first row of (M, column blocks)
  A_t<T>* row_values;
  int rows;
  int column_blocks;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    RowSoftmax<T>{stats, row_values, rows, column_blocks, 3}(team, r);
    A dot = 0;
    if (r < rows)
      for (int j = team.first(); j < column_blocks; j += team.stride()) dot += dots[static_cast<int64_t>(r) * column_blocks + j];
    dot = team.sum(dot);
    if (team.leader()) row_values[3 * r + 2] = dot;
  }
};

// d/du = round(round(d/dhidden) GELU'(u)).
template <class T>
struct GeluGradOut {
  const A_t<T>* sums;
  T* grad_pre;  // the block's first row of (M, C), direction d
  const T* pre;  // the same row of u
  Block b;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    if (r >= b.rows) return;
    for (int c = team.first(); c < b.n; c += team.stride()) {
      const int64_t at = static_cast<int64_t>(r) * channels + b.n0 + c;
      grad_pre[at] = round_to<T>(widen(round_to<T>(sums[r * b.ld + c])) * gelu_grad(widen(pre[at])));
    }
  }
};

// dx_d = round(round(dy + de (1 - r)) + sum): the residual and the key input's elementwise part, then the
// products, as the chain's RelationBackward and its GEMM into dx.
template <class T>
struct InputsOut {
  const A_t<T>* sums;
  T* grad_x;        // the block's first row of (M, C), direction d
  const T* grad_y;  // the same row of dy
  const T* grad_e;  // the block's first row of (2, M, C), direction d, as z
  const T* z;
  const A_t<T>* row_values;  // (max, 1 / total)
  Block b;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    if (r >= b.rows) return;
    for (int c = team.first(); c < b.n; c += team.stride()) {
      const int64_t at = static_cast<int64_t>(r) * channels + b.n0 + c;
      const A rel = relation_of(z[at], row_values + 2 * r);
      const T elementwise = round_to<T>(widen(grad_y[at]) + widen(grad_e[at]) * key_delta_ds(rel));
      grad_x[at] = round_to<T>(widen(elementwise) + sums[r * b.ld + c]);
    }
  }
};

// ---- the weight gradients ---------------------------------------------------------------------------

// Columns c0 .. c0 + 64 of `count` pixels' rows of a source, transposed into an input chunk (row c,
// column p; zeros past `count`): a team per pixel, reading its row along the channels.
template <class T, class Source>
struct StageTransposed {
  Source source;
  T* chunk;
  int c0;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int p) const {
    for (int c = team.first(); c < kWideGradientTile; c += team.stride()) chunk[c * kWideChunkStride + p] = source.at(p, c0 + c);
  }
};

// sums[r] += sum over the chunk's `count` columns of row r (a channel of g), and into `also` where set.
template <class T>
struct ChunkColumnSums {
  const T* chunk;
  int count;
  A_t<T>* sums;
  A_t<T>* also;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    A_t<T> total = 0;
    for (int p = team.first(); p < count; p += team.stride()) total += widen(chunk[r * kWideChunkStride + p]);
    total = team.sum(total);
    if (team.leader()) {
      sums[r] += total;
      if (also != nullptr) also[r] += total;
    }
  }
};

template <class T>
struct ClearRowValues {
  A_t<T>* values;
  int per_row;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int j = team.first(); j < per_row; j += team.stride()) values[j * kWideRows + r] = A_t<T>(0);
  }
};

// The tile: round(sums) into gradient rows r0.., columns c0.. (row stride ld).
template <class T>
struct GradientTileOut {
  const A_t<T>* sums;
  T* grad;
  int64_t ld;
  int r0, c0;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int c = team.first(); c < kWideGradientTile; c += team.stride())
      grad[static_cast<int64_t>(r0 + r) * ld + c0 + c] = round_to<T>(sums[r * wide_sums_ld(kWideGradientTile) + c]);
  }
};

// The column sums of a tile's g rows: round(sum) into a bias gradient, and the float sums kept where set.
template <class T>
struct ColumnSumsOut {
  const A_t<T>* sums;  // the column sums of g
  T* bias;             // at the tile's first row, or zeros when `zero`
  bool zero;
  A_t<T>* kept;        // at the tile's first row (null: none)
  const A_t<T>* kept_sums;  // what `kept` receives
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    if (!team.leader()) return;
    bias[r] = round_to<T>(zero ? A_t<T>(0) : sums[r]);
    if (kept != nullptr) kept[r] = kept_sums[r];
  }
};

}  // namespace wide

namespace wide {

// The sources of the weights launch, made for each chunk of pixels from the chunk's first pixel p0.
template <class T>
struct RowsMaker {  // rows of an (M, C) buffer
  const T* x;
  int channels;
  GK_HD RowsOf<T> make(int64_t p0, int count) const { return {x + p0 * channels, count, channels}; }
};
template <class T>
struct GatedMaker {
  const T* grad_mixed;
  const A_t<T>* gates;  // (M, h)
  int heads, width;
  bool cross;
  int channels;
  GK_HD GatedGrad<T> make(int64_t p0, int count) const {
    return {grad_mixed + p0 * channels, gates + p0 * heads, heads, width, cross, count, channels};
  }
};
template <class T>
struct NoisyMaker {
  const T* self;
  const T* v_noise;
  int channels;
  GK_HD NoisyInput<T> make(int64_t p0, int count) const { return {self + p0 * channels, v_noise, count, channels}; }
};
template <class T>
struct GeluMaker {
  const T* pre;
  int channels;
  GK_HD GeluOf<T> make(int64_t p0, int count) const { return {pre + p0 * channels, count, channels}; }
};
template <class T>
struct ConcatMaker {
  const T* self;
  const T* other;
  int channels;
  GK_HD SelfThenOther<T> make(int64_t p0, int count) const {
    return {self + p0 * channels, other + p0 * channels, count, channels};
  }
};

// One term of a weight-gradient tile: sums(0) += g^T x over every pixel in chunks, g's columns g0.., x's
// x0..; with `column_sums`, the chunks' column sums of g added to row_values (and `also`).
GK_HD_TEMPLATE
template <class T, class Engine, class GMaker, class XMaker>
GK_HD void gradient_term(Engine& engine, int64_t pixels, const GMaker& g, const XMaker& x, int g0, int x0,
                         bool column_sums, A_t<T>* also, bool& first) {
  for (int64_t p0 = 0; p0 < pixels; p0 += kWideRows) {
    const int count = pixels - p0 < kWideRows ? static_cast<int>(pixels - p0) : kWideRows;
    const auto gs = g.make(p0, count);
    const auto xs = x.make(p0, count);
    engine.rows(StageTransposed<T, decltype(gs)>{gs, engine.operand(0), g0});
    engine.rows(StageTransposed<T, decltype(xs)>{xs, engine.operand(1), x0});
    engine.sync();
    if (column_sums) engine.rows(ChunkColumnSums<T>{engine.operand(0), count, engine.row_values(), also});
    const int k = (count + kMmaEdge - 1) / kMmaEdge * kMmaEdge;
    engine.product(0, 0, engine.operand(1), kWideChunkStride, kWideGradientTile, k, !first, false);
    first = false;
    engine.sync();
  }
}

// Column c0 + r of sums^T W (C rows of W, row stride C) into out[r].
template <class T>
struct NoiseColumns {
  const A_t<T>* sums;
  const T* w;
  T* out;
  int channels;
  int c0;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    A_t<T> total = 0;
    for (int k = team.first(); k < channels; k += team.stride())
      total += sums[k] * widen(w[static_cast<int64_t>(k) * channels + c0 + r]);
    total = team.sum(total);
    if (team.leader()) out[r] = round_to<T>(total);
  }
};

}  // namespace wide

// One block of the weights launch: tile (ti, tj) of one weight gradient, g^T x summed over every pixel
// of its terms in order, and for tj = 0 the column sums of g (the bias gradients).
GK_HD_TEMPLATE
template <class T, class Engine>
GK_HD void wide_gradient_block(Engine& engine, const WideBackwardArgs& args, int64_t index) {
  using namespace wide;
  using A = A_t<T>;
  const int C = args.channels, h = args.heads, width = C / h;
  const int t = C / kWideGradientTile;
  const int64_t M = args.pixels;
  const int64_t tt = static_cast<int64_t>(t) * t;
  // kinds: Wo, Wq, Wk, Wv (tt tiles per direction each), W2 (tt tiles), W1 (2 tt tiles)
  const int kind = index < 8 * tt ? static_cast<int>(index / (2 * tt)) : (index < 9 * tt ? 4 : 5);
  const int64_t within = index < 8 * tt ? index % (2 * tt) : (index < 9 * tt ? index - 8 * tt : index - 9 * tt);
  const int d = kind < 4 ? static_cast<int>(within / tt) : 0;
  const int64_t tile = kind < 4 ? within % tt : within;
  const int column_tiles = kind == 5 ? 2 * t : t;
  const int ti = static_cast<int>(tile / column_tiles), tj = static_cast<int>(tile % column_tiles);
  const int g0 = ti * kWideGradientTile, x0 = tj * kWideGradientTile;
  const bool sums = tj == 0;  // this tile also sums g's columns
  const FusionParamPointers& p = args.params;
  const FusionParamGradPointers& g = args.grads;
  A* column_sums = engine.row_values();  // the column sums of g, then (Wv) those of its first term
  engine.rows(ClearRowValues<T>{column_sums, 2});
  engine.sync();

  const int64_t C2 = static_cast<int64_t>(C) * C;
  const T* s = cptr<T>(d == 0 ? args.x[0] : args.x[1]);
  const T* o = cptr<T>(d == 0 ? args.x[1] : args.x[0]);
  T* grad_w_in = mptr<T>(d == 0 ? g.in_proj_weight_0 : g.in_proj_weight_1);
  T* grad_b_in = mptr<T>(d == 0 ? g.in_proj_bias_0 : g.in_proj_bias_1);
  bool first = true;
  T* grad_tile = nullptr;
  int64_t ld = C;
  T* bias = nullptr;
  bool zero_bias = false;
  A* kept = nullptr;
  const A* kept_sums = column_sums;  // the sums of all of g, or (Wv) of its first term
  switch (kind) {
    case 0:  // d/dWo = dy^T mixed, d/dbo = sum dy
      gradient_term<T>(engine, M, RowsMaker<T>{cptr<T>(d == 0 ? args.grad_y[0] : args.grad_y[1]), C},
                       RowsMaker<T>{cptr<T>(args.mixed) + d * M * C, C}, g0, x0, sums, nullptr, first);
      grad_tile = mptr<T>(d == 0 ? g.out_proj_weight_0 : g.out_proj_weight_1);
      bias = mptr<T>(d == 0 ? g.out_proj_bias_0 : g.out_proj_bias_1);
      break;
    case 1:  // d/dWq = d/dq^T s, d/dbq = sum d/dq
      gradient_term<T>(engine, M, RowsMaker<T>{cptr<T>(args.grad_query) + d * M * C, C}, RowsMaker<T>{s, C}, g0, x0, sums, nullptr, first);
      grad_tile = grad_w_in;
      bias = grad_b_in;
      break;
    case 2:  // d/dWk = d/ddk^T e; the key bias cancels (its gradient is 0); sum d/ddk kept for d/dk_noise
      gradient_term<T>(engine, M, RowsMaker<T>{cptr<T>(args.grad_key) + d * M * C, C},
                       RowsMaker<T>{cptr<T>(args.key_input) + d * M * C, C}, g0, x0, sums, nullptr, first);
      grad_tile = grad_w_in + C2;
      bias = grad_b_in + C;
      zero_bias = true;
      kept = mptr<A>(args.column_sums) + d * C;
      break;
    case 3: {  // d/dWv = (a gm)^T (v_noise + s) + ((1 - a) gm)^T o, d/dbv their column sums; sum a gm kept
      const A* gates = cptr<A>(args.gate) + d * M * h;
      const T* gm = cptr<T>(args.grad_mixed) + d * M * C;
      gradient_term<T>(engine, M, GatedMaker<T>{gm, gates, h, width, false, C},
                       NoisyMaker<T>{s, cptr<T>(p.v_noise) + d * C, C}, g0, x0, sums, column_sums + kWideRows, first);
      gradient_term<T>(engine, M, GatedMaker<T>{gm, gates, h, width, true, C}, RowsMaker<T>{o, C}, g0, x0, sums,
                       nullptr, first);
      grad_tile = grad_w_in + 2 * C2;
      bias = grad_b_in + 2 * C;
      kept = mptr<A>(args.column_sums) + (2 + d) * C;
      kept_sums = column_sums + kWideRows;
      break;
    }
    case 4:  // d/dW2 = sum_d d/dz^T GELU(u), d/db2 = sum d/dz
      for (int dd = 0; dd < 2; ++dd)
        gradient_term<T>(engine, M, RowsMaker<T>{cptr<T>(args.grad_z) + dd * M * C, C}, GeluMaker<T>{cptr<T>(args.pre) + dd * M * C, C}, g0, x0,
                         sums, nullptr, first);
      grad_tile = mptr<T>(g.fc2_weight);
      bias = mptr<T>(g.fc2_bias);
      break;
    default:  // d/dW1 = sum_d d/du^T [s, o], d/db1 = sum d/du
      for (int dd = 0; dd < 2; ++dd)
        gradient_term<T>(engine, M, RowsMaker<T>{cptr<T>(args.grad_pre) + dd * M * C, C},
                         ConcatMaker<T>{cptr<T>(dd == 0 ? args.x[0] : args.x[1]), cptr<T>(dd == 0 ? args.x[1] : args.x[0]), C},
                         g0, x0, sums, nullptr, first);
      grad_tile = mptr<T>(g.fc1_weight);
      ld = 2 * C;
      bias = mptr<T>(g.fc1_bias);
      break;
  }
  engine.rows(GradientTileOut<T>{engine.sums(0), grad_tile, ld, g0, x0});
  if (sums)
    engine.rows(ColumnSumsOut<T>{column_sums, bias + g0, zero_bias, kept != nullptr ? kept + g0 : nullptr, kept_sums});
}

// One block of the noise launch: 64 columns c of row d of d/dk_noise (sum_k colsum(d/ddk)_k Wk[k][c]) or
// of d/dv_noise (the same with d/dv_self and Wv).
GK_HD_TEMPLATE
template <class T, class Engine>
GK_HD void wide_noise_block(Engine& engine, const WideBackwardArgs& args, int64_t index) {
  using A = wide::A_t<T>;
  const int C = args.channels;
  const int column_blocks = C / kWideGradientTile;
  const int c0 = static_cast<int>(index % column_blocks) * kWideGradientTile;
  const int d = static_cast<int>(index / column_blocks) % 2;
  const bool value = index / column_blocks >= 2;
  const T* w = cptr<T>(d == 0 ? args.params.in_proj_weight_0 : args.params.in_proj_weight_1) +
               (value ? 2 : 1) * static_cast<int64_t>(C) * C;
  const A* sums = cptr<A>(args.column_sums) + ((value ? 2 : 0) + d) * C;
  T* out = mptr<T>(value ? args.grads.v_noise : args.grads.k_noise) + d * C + c0;
  engine.rows(wide::NoiseColumns<T>{sums, w, out, C, c0});
}

// The forward's arguments over the backward's buffers: its Pre and Logits passes write u, z and the
// statistics where the backward's passes read them.
GK_HD WideForwardArgs forward_passes_of(const WideBackwardArgs& a) {
  WideForwardArgs f{};
  static_cast<WideLayer&>(f) = a;
  f.x[0] = a.x[0];
  f.x[1] = a.x[1];
  f.pre = a.pre;
  f.z = a.z;
  f.stats = a.stats;
  f.params = a.params;
  return f;
}

// One block of pass kPass (block: its index among wide_backward_blocks(kPass, ...)).
GK_HD_TEMPLATE
template <class T, WideBackwardPass kPass, class Engine>
GK_HD void wide_backward_block(Engine& engine, const WideBackwardArgs& args, int64_t block) {
  using namespace wide;
  using A = A_t<T>;
  if constexpr (kPass == WideBackwardPass::Weights) {
    wide_gradient_block<T>(engine, args, block);
  } else if constexpr (kPass == WideBackwardPass::Noise) {
    wide_noise_block<T>(engine, args, block);
  } else {
    const Block b = Block::of(args, block);
    const int C = args.channels, h = args.heads, d = b.d;
    const int64_t M = args.pixels;
    const int64_t row0 = (d * M + b.first) * C;       // the block's first row of a (2, M, C) buffer
    const int64_t other0 = ((1 - d) * M + b.first) * C;  // ... of the other direction
    const int64_t own = b.first * C;                    // ... of an (M, C) one
    const int64_t stats_row0 = (d * M + b.first) * b.column_blocks;
    const T* s = cptr<T>(d == 0 ? args.x[0] : args.x[1]) + own;
    const T* o = cptr<T>(d == 0 ? args.x[1] : args.x[0]) + own;
    const T* dy = cptr<T>(d == 0 ? args.grad_y[0] : args.grad_y[1]) + own;
    const FusionParamPointers& p = args.params;
    const T* w_in = cptr<T>(d == 0 ? p.in_proj_weight_0 : p.in_proj_weight_1);  // Wq, Wk, Wv
    const T* b_in = cptr<T>(d == 0 ? p.in_proj_bias_0 : p.in_proj_bias_1);
    const T* fc1 = cptr<T>(p.fc1_weight);
    const int64_t C2 = static_cast<int64_t>(C) * C;
    const int n0 = b.n0;
    const bool keeper = b.column_block == 0;  // the block that keeps what it forms of the whole row
    if constexpr (kPass == WideBackwardPass::Heads) {
      engine.rows(RowSoftmax<T>{cptr<A>(args.stats) + stats_row0 * 2, engine.row_values(), b.rows, b.column_blocks});
      engine.sync();
      const T* w_out = cptr<T>(d == 0 ? p.out_proj_weight_0 : p.out_proj_weight_1);
      const T* wv = w_in + 2 * C2 + n0 * static_cast<int64_t>(C);
      block_terms<T>(
          engine, b.n, C, false, term<T>(RowsOf<T>{s, b.rows, C}, w_in + n0 * static_cast<int64_t>(C), C),
          term<T>(KeyInput<T>{cptr<T>(args.z) + row0, s, cptr<T>(p.k_noise) + d * C, engine.row_values(), b.rows, C},
                  w_in + C2 + n0 * static_cast<int64_t>(C), C, false, keeper ? mptr<T>(args.key_input) + row0 : nullptr,
                  b.rows, C),
          term<T>(NoisyInput<T>{s, cptr<T>(p.v_noise) + d * C, b.rows, C}, wv, C),
          term<T>(RowsOf<T>{o, b.rows, C}, wv, C), term<T>(RowsOf<T>{dy, b.rows, C}, w_out + n0, C, true));
      engine.rows(HeadsGradOut<T>{engine.sums(0), engine.sums(1), engine.sums(2), engine.sums(3), engine.sums(4),
                                  cptr<A>(args.gate) + (d * M + b.first) * h, b_in, b_in + 2 * C,
                                  mptr<T>(args.mixed) + row0, mptr<T>(args.grad_query) + row0,
                                  mptr<T>(args.grad_key) + row0, mptr<T>(args.grad_mixed) + row0, b, h, C, args.scale});
    } else if constexpr (kPass == WideBackwardPass::Keys) {
      engine.rows(RowSoftmax<T>{cptr<A>(args.stats) + stats_row0 * 2, engine.row_values(), b.rows, b.column_blocks});
      engine.sync();
      block_terms<T>(engine, b.n, C, false,
                     term<T>(RowsOf<T>{cptr<T>(args.grad_key) + row0, b.rows, C}, w_in + C2 + n0, C, true));
      engine.rows(KeysGradOut<T>{engine.sums(0), mptr<T>(args.grad_e) + row0, cptr<T>(args.z) + row0, s,
                                 engine.row_values(), mptr<A>(args.dots) + stats_row0, b, C});
    } else if constexpr (kPass == WideBackwardPass::Judger) {
      engine.rows(JudgerRows<T>{cptr<A>(args.stats) + stats_row0 * 2, cptr<A>(args.dots) + stats_row0,
                                engine.row_values(), b.rows, b.column_blocks});
      engine.sync();
      block_terms<T>(engine, b.n, C, false,
                     term<T>(RelationGrad<T>{cptr<T>(args.z) + row0, cptr<T>(args.grad_e) + row0, s,
                                             engine.row_values(), b.rows, C},
                             cptr<T>(p.fc2_weight) + n0, C, true, keeper ? mptr<T>(args.grad_z) + row0 : nullptr,
                             b.rows, C));
      engine.rows(GeluGradOut<T>{engine.sums(0), mptr<T>(args.grad_pre) + row0, cptr<T>(args.pre) + row0, b, C});
    } else {  // Inputs
      engine.rows(RowSoftmax<T>{cptr<A>(args.stats) + stats_row0 * 2, engine.row_values(), b.rows, b.column_blocks});
      engine.sync();
      const T* w_other = cptr<T>(d == 0 ? p.in_proj_weight_1 : p.in_proj_weight_0);
      const A* gates = cptr<A>(args.gate) + (d * M + b.first) * h;
      const A* other_gates = cptr<A>(args.gate) + ((1 - d) * M + b.first) * h;
      const int width = C / h;
      block_terms<T>(
          engine, b.n, C, true, term<T>(RowsOf<T>{cptr<T>(args.grad_query) + row0, b.rows, C}, w_in + n0, C, true),
          term<T>(GatedGrad<T>{cptr<T>(args.grad_mixed) + row0, gates, h, width, false, b.rows, C}, w_in + 2 * C2 + n0, C,
                  true),
          term<T>(RowsOf<T>{cptr<T>(args.grad_pre) + row0, b.rows, C}, fc1 + n0, 2 * C, true),
          term<T>(GatedGrad<T>{cptr<T>(args.grad_mixed) + other0, other_gates, h, width, true, b.rows, C},
                  w_other + 2 * C2 + n0, C, true),
          term<T>(RowsOf<T>{cptr<T>(args.grad_pre) + other0, b.rows, C}, fc1 + C + n0, 2 * C, true));
      engine.rows(InputsOut<T>{engine.sums(0), mptr<T>(d == 0 ? args.grad_x[0] : args.grad_x[1]) + own, dy,
                               cptr<T>(args.grad_e) + row0, cptr<T>(args.z) + row0, engine.row_values(), b, C});
    }
  }
}

}  // namespace gk
