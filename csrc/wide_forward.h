// The fused forward of wide layers (MiT stages 3-4, C = 320 and 512): five launches of block products
// whose prologues form their inputs and whose epilogues run the row stages, so that of the pixels only
// x0, x1 (read), y0, y1 (written) and four intermediates per direction go through DRAM: fc1's
// pre-activation u, z with its softmax statistics, the gates, and the value mix. (The narrow layers' tile of
// fused_forward.h keeps a whole row of every intermediate in shared memory; at C = 512 five of those
// rows of 64 pixels take 325 KiB.)
//
// A block owns kWideRows pixels of one direction and the n columns of a few whole heads (n a multiple of
// 16, at most kWideMaxColumns: wide_block_heads; with 8 heads, 80 columns at C = 320 and 128 at
// C = 512), and sums its products over the inputs' k in chunks of kWideChunk columns. The five
// passes, per direction d (s = x_d, o = x_{1-d}):
//
//   pre     u = [s, o] fc1^T + b1                                      K = 2C: both halves in one sum
//   logits  z = GELU(u) W2^T + b2, and per row the max and sum of exp over the block's columns
//   gates   e = k_noise + s - s r (r = softmax(z), from the statistics) formed as the key product's input;
//           q = s Wq^T + bq, dk = e Wk^T;  per head a = sigmoid(scale q . dk)   (the key bias cancels)
//   values  v_self = (v_noise + s) Wv^T + bv, v_cross = o Wv^T + bv;  mixed = v_cross + a (v_self - v_cross)
//   output  y = s + mixed Wo^T + bo
//
// That is 8 C^2 multiply-adds per pixel and direction, as the narrow kernel's and the chain's (the
// value identity of SPEC §1 would need each head's own input to the value product, and heads of 40
// channels are not whole MMA tiles); u and the mix share one buffer (u is dead once z is computed).
// The wide backward (wide_backward.h) runs the first two passes again, as they are.
//
// The block logic is written once, here, against an *engine*:
//
//   T* operand(int i)           input chunk i: kWideRows rows of kWideChunkStride elements
//   A* sums(int i)              product sums i: kWideRows rows of n, row stride wide_sums_ld(n), accumulation type
//   A* row_values()             kWideRows * shape.values_per_row values of the accumulation type
//   void sync()                 every earlier write of the block is seen by every later read
//   void rows(const F& f)       f(team, r) for every row r < kWideRows
//   void product(int i, int operand, const T* w, int ldw, int n, int k, bool accumulate, bool transposed)
//                               sums(i)[r][c] = (accumulate ? sums(i)[r][c] : 0)
//                                               + sum_{j < k} operand(operand)[r][j] w[c ldw + j]
//                               (w[j ldw + c] when transposed; w may be another input chunk)
//
// with as many inputs, sums and row values as the pass's WideShape asks for (wide_backward.h's passes
// use the same engines).
//
// The host engine (fused_host_engine.h) runs every line below with one thread per block, summing in the
// accumulation type where the CUDA engine (fusion_kernels.cu) issues WMMA MMAs, over the same split of
// the 16 x 16 output tiles over warps (MmaSplit).
//
// Rounding as the narrow fused forward's: each product (bias included) rounded to T once, as a Linear's
// output; the row stages in the accumulation type from T values.
#pragma once

#include "fused_forward.h"

namespace gk {

constexpr int kWideRows = kFusedTileRows;  // pixels per block: four 16-row MMA tiles
constexpr int kWideMaxColumns = 128;        // a head's columns: the sums take kWideRows x n accumulators
constexpr int kWideChunk = 64;              // the k of one staged input chunk
constexpr int kWideChunkStride = kWideChunk + kFusedRowPad;
constexpr int kWidePasses = 5;
// The sums' rows are padded by 4 floats: a row of 64 or 128 floats would start every row of a 16 x 16
// accumulator tile on the same shared-memory bank.
constexpr int kWideSumsPad = 4;
GK_HD constexpr int wide_sums_ld(int n) { return n + kWideSumsPad; }

enum class WidePass : int { Pre = 0, Logits = 1, Gates = 2, Values = 3, Output = 4 };

// The layer as the wide passes see it, forward and backward.
struct WideLayer {
  int64_t pixels;   // M per direction
  int channels;     // C
  int heads;        // h
  int block_heads;  // heads a block's columns cover (wide_block_heads)
  double scale;     // 1 / sqrt(C / h)
};

struct WideForwardArgs : WideLayer {
  const void* x[2];  // (M, C)
  void* y[2];        // (M, C)
  void* gate;        // (2, M, h), accumulation type
  void* pre;         // (2, M, C): u, fc1's pre-activation, then the value mix
  void* z;           // (2, M, C): fc2's output, bias included
  void* stats;       // (2, M, h / block_heads, 2), accumulation type: per block of z's columns, the max and
                     // the sum of exp(z - max)
  FusionParamPointers params;
};

// The heads of one block's columns: the most whose columns are a multiple of 16 (whole MMA tiles) and
// at most kWideMaxColumns, among the divisors of h; 0 if none is.
GK_HD constexpr int64_t wide_block_heads(int64_t C, int64_t h) {
  int64_t best = 0;
  if (C <= 0 || h <= 0 || C % h != 0) return 0;
  for (int64_t k = 1; k <= h; ++k)
    if (h % k == 0 && (k * (C / h)) % kMmaEdge == 0 && k * (C / h) <= kWideMaxColumns) best = k;
  return best;
}

// Whether the wide forward takes a layer of C channels and h heads (any dtype; the CUDA engine also
// needs 16-bit inputs, see wide_forward.cpp).
GK_HD constexpr bool wide_forward_fits(int64_t C, int64_t h) { return wide_block_heads(C, h) > 0; }

GK_HD constexpr int64_t wide_row_tiles(int64_t pixels) { return (pixels + kWideRows - 1) / kWideRows; }
// Blocks of one pass: both directions, every row tile, every block of columns.
GK_HD constexpr int64_t wide_blocks(int64_t pixels, int heads, int block_heads) {
  return 2 * wide_row_tiles(pixels) * (heads / block_heads);
}
// What a pass's blocks keep: input chunks, product sums (kWideRows x n each) and row values.
struct WideShape {
  int operands;
  int sums;
  int values_per_row;
  // Bytes of one CUDA block's shared memory (16-bit inputs, float sums).
  GK_HD constexpr int64_t bytes(int n) const {
    return static_cast<int64_t>(operands) * kWideRows * kWideChunkStride * 2 + static_cast<int64_t>(sums) * kWideRows * wide_sums_ld(n) * 4 +
           static_cast<int64_t>(values_per_row) * kWideRows * 4;
  }
};
// The forward's passes: two inputs and two sums; two row values (the softmax's max and 1 / total) or a
// gate per head of the block.
GK_HD constexpr WideShape wide_forward_shape(int block_heads) { return {2, 2, block_heads > 2 ? block_heads : 2}; }
// The most a CUDA block asks for (the cap of the kernels' shared-memory opt-in).
constexpr int64_t kWideMaxLaunchBytes = 227 * 1024;

namespace wide {

template <class T>
using A_t = typename Acc<T>::type;
using fused::round_to;
using fused::widen;

// Which block: the block of columns fastest, so that the blocks that read one row tile's inputs run
// together and share them through L2; then the row tile; then the direction.
struct Block {
  int d;
  int64_t first;  // its first pixel
  int rows;       // its pixels (the rest of its kWideRows rows are zeros)
  int column_block, column_blocks;
  int head0, heads;  // its heads
  int width;         // a head's columns
  int n0, n;         // its columns
  int ld;            // the row stride of its sums (wide_sums_ld(n))

  GK_HD static Block of(const WideLayer& a, int64_t index) {
    const int64_t tiles = wide_row_tiles(a.pixels);
    Block b;
    b.column_blocks = a.heads / a.block_heads;
    b.column_block = static_cast<int>(index % b.column_blocks);
    const int64_t rest = index / b.column_blocks;
    b.first = (rest % tiles) * kWideRows;
    b.d = static_cast<int>(rest / tiles);
    const int64_t left = a.pixels - b.first;
    b.rows = left < kWideRows ? static_cast<int>(left) : kWideRows;
    b.heads = a.block_heads;
    b.head0 = b.column_block * b.heads;
    b.width = a.channels / a.heads;
    b.n = b.heads * b.width;
    b.n0 = b.column_block * b.n;
    b.ld = wide_sums_ld(b.n);
    return b;
  }
};

// A Linear's output as the oracle has it: the sum plus the bias, rounded to T once.
template <class T>
GK_HD A_t<T> linear_value(A_t<T> sum, T bias) { return widen(round_to<T>(sum + widen(bias))); }

// r of the relation softmax from z and its row's (max, 1 / total) (RowSoftmax).
template <class T>
GK_HD A_t<T> relation_of(T z, const A_t<T>* softmax) { return exp_(widen(z) - softmax[0]) * softmax[1]; }

// ---- sources: the inputs of a product, element by element (zeros past the last pixel) -------------

// Row r of x (one direction's (M, C) rows from the block's first pixel).
template <class T>
struct RowsOf {
  const T* x;
  int rows;
  int channels;
  GK_HD T at(int r, int k) const {
    return r < rows ? x[static_cast<int64_t>(r) * channels + k] : round_to<T>(A_t<T>(0));
  }
};

// [s, o]: fc1's input, both halves in one row of 2C.
template <class T>
struct SelfThenOther {
  const T* self;
  const T* other;
  int rows;
  int channels;
  GK_HD T at(int r, int k) const {
    if (r >= rows) return round_to<T>(A_t<T>(0));
    const int64_t row = static_cast<int64_t>(r) * channels;
    return k < channels ? self[row + k] : other[row + k - channels];
  }
};

// e = k_noise + s - s r, r = exp(z - max) / total from the row's (max, 1 / total) in row_values.
template <class T>
struct KeyInput {
  const T* z;
  const T* self;
  const T* k_noise;  // row d
  const A_t<T>* row_values;
  int rows;
  int channels;
  GK_HD T at(int r, int k) const {
    if (r >= rows) return round_to<T>(A_t<T>(0));
    const int64_t at = static_cast<int64_t>(r) * channels + k;
    const A_t<T> p = relation_of(z[at], row_values + 2 * r);
    return round_to<T>(key_delta(widen(k_noise[k]), widen(self[at]), p));
  }
};

// v_noise + s, rounded as the oracle's sum: the input of the self value's product.
template <class T>
struct NoisyInput {
  const T* self;
  const T* v_noise;  // row d
  int rows;
  int channels;
  GK_HD T at(int r, int k) const {
    if (r >= rows) return round_to<T>(A_t<T>(0));
    return round_to<T>(widen(v_noise[k]) + widen(self[static_cast<int64_t>(r) * channels + k]));
  }
};

// GELU(u), rounded: the oracle's hidden, from fc1's rounded output.
template <class T>
struct GeluOf {
  const T* pre;
  int rows;
  int channels;
  GK_HD T at(int r, int k) const {
    if (r >= rows) return round_to<T>(A_t<T>(0));
    return round_to<T>(gelu(widen(pre[static_cast<int64_t>(r) * channels + k])));
  }
};

// Columns k0 .. k0 + width of a source into an input chunk, and into `store` (the block's first row of
// a (M, C) buffer, its pixels only) where that is set: a block that forms an input the weight gradients
// need again keeps it.
template <class T, class Source>
struct StageChunk {
  Source source;
  T* chunk;
  int k0, width;
  T* store;
  int rows, channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int j = team.first(); j < width; j += team.stride()) {
      const T v = source.at(r, k0 + j);
      chunk[r * kWideChunkStride + j] = v;
      if (store != nullptr && r < rows) store[static_cast<int64_t>(r) * channels + k0 + j] = v;
    }
  }
};

// One product of a block: its input, the weights of its n columns (w^T, or w itself when transposed: the
// input gradient of a Linear), and where the input goes once formed (see StageChunk).
template <class T, class Source>
struct Term {
  Source source;
  const T* w;
  int ldw;
  bool transposed;
  T* store;
  int rows, channels;
};
template <class T, class Source>
GK_HD Term<T, Source> term(const Source& source, const T* w, int ldw, bool transposed = false, T* store = nullptr,
                           int rows = 0, int channels = 0) {
  return {source, w, ldw, transposed, store, rows, channels};
}

// The products of a block over k < K in chunks: term i into sums(i), or with `into_one` every term into
// sums(0), in order.
GK_HD_TEMPLATE
template <class T, class Engine, class... Sources>
GK_HD void block_terms(Engine& engine, int n, int K, bool into_one, const Term<T, Sources>&... terms) {
  for (int k0 = 0; k0 < K; k0 += kWideChunk) {
    const int width = K - k0 < kWideChunk ? K - k0 : kWideChunk;
    int i = 0;
    ((engine.rows(StageChunk<T, Sources>{terms.source, engine.operand(i), k0, width, terms.store, terms.rows,
                                         terms.channels}),
      ++i),
     ...);
    engine.sync();
    i = 0;
    ((engine.product(into_one ? 0 : i, i,
                     terms.transposed ? terms.w + static_cast<int64_t>(k0) * terms.ldw : terms.w + k0, terms.ldw, n,
                     width, into_one ? (k0 > 0 || i > 0) : k0 > 0, terms.transposed),
      ++i),
     ...);
    engine.sync();  // the next chunk overwrites the inputs
  }
}

// ---- epilogues: a team per row over the block's columns ------------------------------------------

// round(sum + bias) into the block's columns (a null bias adds nothing).
template <class T>
struct BiasOut {
  const A_t<T>* sums;
  T* out;  // the block's first row of (M, C)
  const T* bias;
  Block b;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    if (r >= b.rows) return;
    for (int c = team.first(); c < b.n; c += team.stride())
      out[static_cast<int64_t>(r) * channels + b.n0 + c] =
          round_to<T>(bias != nullptr ? sums[r * b.ld + c] + widen(bias[b.n0 + c]) : sums[r * b.ld + c]);
  }
};

// z = round(sum + b2), and the row's max and sum of exp(z - max) over the block's columns.
template <class T>
struct LogitsOut {
  const A_t<T>* sums;
  T* z;
  A_t<T>* stats;  // the block's first row of (M, column blocks, 2), direction d
  const T* b2;
  Block b;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    if (r >= b.rows) return;
    T* row = z + static_cast<int64_t>(r) * channels + b.n0;
    A top = -static_cast<A>(INFINITY);
    for (int c = team.first(); c < b.n; c += team.stride()) {
      const T v = round_to<T>(sums[r * b.ld + c] + widen(b2[b.n0 + c]));
      row[c] = v;
      top = max_(top, widen(v));
    }
    top = team.max(top);
    A total = 0;
    for (int c = team.first(); c < b.n; c += team.stride())
      total += exp_(linear_value(sums[r * b.ld + c], b2[b.n0 + c]) - top);
    total = team.sum(total);
    if (team.leader()) {
      A* at = stats + (static_cast<int64_t>(r) * b.column_blocks + b.column_block) * 2;
      at[0] = top;
      at[1] = total;
    }
  }
};

// The row's softmax over all C columns of z from the blocks' statistics: (max, 1 / total) into row_values.
template <class T>
struct RowSoftmax {
  const A_t<T>* stats;  // the block's first row of (M, column blocks, 2), direction d
  A_t<T>* row_values;  // the row's two at per_row r
  int rows;
  int column_blocks;
  int per_row = 2;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    if (r >= rows) {
      if (team.leader()) row_values[per_row * r] = row_values[per_row * r + 1] = A(0);
      return;
    }
    const A* row = stats + static_cast<int64_t>(r) * column_blocks * 2;
    A top = -static_cast<A>(INFINITY);
    for (int j = team.first(); j < column_blocks; j += team.stride()) top = max_(top, row[2 * j]);
    top = team.max(top);
    A total = 0;
    for (int j = team.first(); j < column_blocks; j += team.stride()) total += row[2 * j + 1] * exp_(row[2 * j] - top);
    total = team.sum(total);
    if (team.leader()) {
      row_values[per_row * r] = top;
      row_values[per_row * r + 1] = A(1) / total;
    }
  }
};

// q = round(sum + bq), dk = round(sum) (the key bias cancels); a = sigmoid(scale q . dk) of each head.
template <class T>
struct GateOut {
  const A_t<T>* query_sums;
  const A_t<T>* key_sums;
  A_t<T>* gates;  // the block's first row of (M, h), direction d
  const T* bq;
  Block b;
  int heads;
  double scale;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    if (r >= b.rows) return;
    const A s = static_cast<A>(scale);
    for (int j = 0; j < b.heads; ++j) {
      const int lo = j * b.width, hi = lo + b.width;
      A logit = 0;
      for (int c = lo + team.first(); c < hi; c += team.stride()) {
        const A q = linear_value(query_sums[r * b.ld + c], bq[b.n0 + c]);
        logit += mul_rn(q * s, widen(round_to<T>(key_sums[r * b.ld + c])));
      }
      logit = team.sum(logit);
      if (team.leader()) gates[static_cast<int64_t>(r) * heads + b.head0 + j] = two_way_softmax(logit);
    }
  }
};

// The row's gates of the block's heads into row_values (0 past the last pixel).
template <class T>
struct LoadGates {
  const A_t<T>* gates;  // the block's first row of (M, h), direction d
  A_t<T>* row_values;
  Block b;
  int heads;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int j = team.first(); j < b.heads; j += team.stride())
      row_values[r * b.heads + j] = r < b.rows ? gates[static_cast<int64_t>(r) * heads + b.head0 + j] : A_t<T>(0);
  }
};

// v_self = round(sum + bv), v_cross = round(sum + bv); mixed = v_cross + a (v_self - v_cross), a the gate
// of the column's head.
template <class T>
struct MixOut {
  const A_t<T>* self_sums;
  const A_t<T>* cross_sums;
  const A_t<T>* row_values;  // the gates
  T* mixed;                  // the block's first row of (M, C), direction d
  const T* bv;
  Block b;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    if (r >= b.rows) return;
    for (int c = team.first(); c < b.n; c += team.stride()) {
      const A_t<T> vs = linear_value(self_sums[r * b.ld + c], bv[b.n0 + c]);
      const A_t<T> vc = linear_value(cross_sums[r * b.ld + c], bv[b.n0 + c]);
      mixed[static_cast<int64_t>(r) * channels + b.n0 + c] =
          round_to<T>(value_mix(vc, vs - vc, row_values[r * b.heads + c / b.width]));
    }
  }
};

// y = s + round(sum + bo) into the block's columns.
template <class T>
struct ResidualOut {
  const A_t<T>* sums;
  T* y;        // the block's first row of (M, C), direction d
  const T* self;  // the same row of s
  const T* bias;
  Block b;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    if (r >= b.rows) return;
    for (int c = team.first(); c < b.n; c += team.stride()) {
      const int64_t at = static_cast<int64_t>(r) * channels + b.n0 + c;
      y[at] = round_to<T>(widen(self[at]) + linear_value(sums[r * b.ld + c], bias[b.n0 + c]));
    }
  }
};

}  // namespace wide

// One block of pass `pass` (block: its index among wide_blocks(args.pixels, args.heads)).
GK_HD_TEMPLATE
template <class T, WidePass kPass, class Engine>
GK_HD void wide_forward_block(Engine& engine, const WideForwardArgs& args, int64_t block) {
  using namespace wide;
  using A = A_t<T>;
  const Block b = Block::of(args, block);
  const int C = args.channels, h = args.heads, d = b.d;
  const int64_t row0 = (d * args.pixels + b.first) * C;  // the block's first row of a (2, M, C) buffer
  const int64_t own = b.first * C;                        // ... of an (M, C) one
  const T* s = cptr<T>(d == 0 ? args.x[0] : args.x[1]) + own;
  const T* o = cptr<T>(d == 0 ? args.x[1] : args.x[0]) + own;
  const FusionParamPointers& p = args.params;
  const T* w_in = cptr<T>(d == 0 ? p.in_proj_weight_0 : p.in_proj_weight_1);  // Wq, Wk, Wv
  const T* b_in = cptr<T>(d == 0 ? p.in_proj_bias_0 : p.in_proj_bias_1);
  const int64_t C2 = static_cast<int64_t>(C) * C;
  const int64_t stats_row0 = (d * args.pixels + b.first) * b.column_blocks * 2;
  if constexpr (kPass == WidePass::Pre) {
    block_terms<T>(engine, b.n, 2 * C, false,
                   term<T>(SelfThenOther<T>{s, o, b.rows, C}, cptr<T>(p.fc1_weight) + b.n0 * 2LL * C, 2 * C));
    engine.rows(BiasOut<T>{engine.sums(0), mptr<T>(args.pre) + row0, cptr<T>(p.fc1_bias), b, C});
  } else if constexpr (kPass == WidePass::Logits) {
    block_terms<T>(engine, b.n, C, false,
                   term<T>(GeluOf<T>{cptr<T>(args.pre) + row0, b.rows, C},
                           cptr<T>(p.fc2_weight) + static_cast<int64_t>(b.n0) * C, C));
    engine.rows(LogitsOut<T>{engine.sums(0), mptr<T>(args.z) + row0, mptr<A>(args.stats) + stats_row0,
                             cptr<T>(p.fc2_bias), b, C});
  } else if constexpr (kPass == WidePass::Gates) {
    engine.rows(RowSoftmax<T>{cptr<A>(args.stats) + stats_row0, engine.row_values(), b.rows, b.column_blocks});
    engine.sync();
    block_terms<T>(engine, b.n, C, false, term<T>(RowsOf<T>{s, b.rows, C}, w_in + static_cast<int64_t>(b.n0) * C, C),
                   term<T>(KeyInput<T>{cptr<T>(args.z) + row0, s, cptr<T>(p.k_noise) + d * C, engine.row_values(),
                                       b.rows, C},
                           w_in + C2 + static_cast<int64_t>(b.n0) * C, C));
    engine.rows(GateOut<T>{engine.sums(0), engine.sums(1), mptr<A>(args.gate) + (d * args.pixels + b.first) * h,
                           b_in, b, h, args.scale});
  } else if constexpr (kPass == WidePass::Values) {
    const T* wv = w_in + 2 * C2 + static_cast<int64_t>(b.n0) * C;
    block_terms<T>(engine, b.n, C, false, term<T>(NoisyInput<T>{s, cptr<T>(p.v_noise) + d * C, b.rows, C}, wv, C),
                   term<T>(RowsOf<T>{o, b.rows, C}, wv, C));
    engine.rows(LoadGates<T>{cptr<A>(args.gate) + (d * args.pixels + b.first) * h, engine.row_values(), b, h});
    engine.sync();
    engine.rows(MixOut<T>{engine.sums(0), engine.sums(1), engine.row_values(), mptr<T>(args.pre) + row0,
                          b_in + 2 * C, b, C});
  } else {
    const T* w_out = cptr<T>(d == 0 ? p.out_proj_weight_0 : p.out_proj_weight_1);
    const T* b_out = cptr<T>(d == 0 ? p.out_proj_bias_0 : p.out_proj_bias_1);
    block_terms<T>(engine, b.n, C, false,
                   term<T>(RowsOf<T>{cptr<T>(args.pre) + row0, b.rows, C}, w_out + static_cast<int64_t>(b.n0) * C, C));
    engine.rows(ResidualOut<T>{engine.sums(0), mptr<T>(d == 0 ? args.y[0] : args.y[1]) + own, s, b_out, b, C});
  }
}

}  // namespace gk
