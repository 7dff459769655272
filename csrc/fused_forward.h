// The fused forward of narrow layers (C <= 128, C a multiple of 16): one pass over a tile of 64 pixels
// does every product and every row stage of both directions, so x0 and x1 are read once, y0 and y1
// written once, and nothing else of the pixels goes through DRAM but the gates the backward needs
// (SPEC §1, docs/spec.md; the math is that of fusion_math.h's row stages, with the same identities).
//
// The tile logic (which product when, into which tile buffer, the row stages between them) is
// written once, here, against an *engine* that carries it out:
//
//   T* matrix(int i)            tile buffer i (kFusedTileRows rows of engine.ld() elements, i < 5)
//   A* gates()                  the tile's gates, kFusedTileRows x heads, in the accumulation type
//   void sync()                 every earlier write of the tile is seen by every later read
//   void rows(const F& f)       f(team, r) for every row r of the tile, r < kFusedTileRows
//   void gemm(const E& epilogue, int n, MmaTerm<T> first, MmaTerm<T> second)
//                               for every row r < kFusedTileRows and column c < n:
//                                 epilogue(r, c, sum_k first.a[r][k] first.w[c][k] (+ the same of second))
//                               (w[k][c] for a transposed term)
//
// The fused backward (fused_backward.h) asks three more of an engine: weight_gradient, column_sums
// and clear (see there).
//
// The host engine (fused_forward.cpp) walks rows and columns with one thread and sums in the
// accumulation type, so CPU tests run every line below against the float64 oracle; the CUDA engine
// (fusion_kernels.cu) gives a row to a warp (the Team of fusion_math.h) and a 16 x 16 output tile to a
// warp's tensor-core MMAs (WMMA, float accumulators), which is the only code a CPU test cannot run.
//
// Rounding follows the oracle's in the 16-bit dtypes: each product (bias included) is rounded to T
// once, as a Linear's output is, and the GELU, the softmaxes and the mix are computed in the
// accumulation type from T values. Toolkit-free, as fusion_math.h.
#pragma once

#include "fusion_math.h"
#include "fusion_params.h"

namespace gk {

constexpr int kFusedTileRows = 64;     // pixels per tile: four 16-row MMA tiles
constexpr int kFusedMaxChannels = 128;  // MiT stages 1-2; the weights of wider layers outgrow a tile's reach
constexpr int kMmaEdge = 16;           // m, n and k of one tensor-core MMA
// Tile buffers have rows of C + kFusedRowPad elements: the padding shifts consecutive rows over the
// shared-memory banks (a row of 128 or 256 bytes would start every row on the same bank), and keeps
// each row 32-byte aligned as the MMA loads need.
constexpr int kFusedRowPad = 8;
constexpr int kFusedTileMatrices = 5;

// The parameters by name (fusion_params.h's table, shapes and all), as raw pointers. What the tile
// reads of them: fc1_weight's columns 0:C act on self (W1a) and C:2C on other (W1b); row d of
// k_noise and v_noise serves direction d; in_proj_weight_d stacks Wq, Wk, Wv of direction d.
struct FusionParamPointers {
#define GK_PARAM_POINTER(field, name, rank, a0, b0, a1, b1) const void* field;
  GK_FUSION_PARAMS(GK_PARAM_POINTER)
#undef GK_PARAM_POINTER
};

// The layer and the call as raw pointers, so that the struct crosses into the toolkit-only CUDA file.
// Everything is contiguous and row-major.
struct FusedForwardArgs {
  int64_t pixels;  // M per direction
  int channels;    // C
  int heads;       // h
  double scale;    // 1 / sqrt(C / h)

  const void* x[2];  // (M, C)
  void* y[2];        // (M, C)
  void* gate;        // (2, M, h), accumulation type: a of every head, kept for the backward
  FusionParamPointers params;
};

// Whether the fused forward takes a layer of C channels and h heads (any dtype; the CUDA engine also
// needs 16-bit inputs, see fused_forward.cpp).
GK_HD constexpr bool fused_forward_fits(int64_t C, int64_t h) {
  return C > 0 && C <= kFusedMaxChannels && C % kMmaEdge == 0 && h > 0 && C % h == 0;
}

GK_HD constexpr int fused_row_stride(int C) { return C + kFusedRowPad; }

// Bytes of a tile's buffers: `matrices` matrices of `element` bytes, then the gates of `accumulator` bytes.
GK_HD constexpr int64_t fused_tile_bytes(int C, int h, int element, int accumulator,
                                         int matrices = kFusedTileMatrices) {
  return static_cast<int64_t>(matrices) * kFusedTileRows * fused_row_stride(C) * element +
         static_cast<int64_t>(kFusedTileRows) * h * accumulator;
}
// The CUDA engine's warps per tile, and the float 16 x 16 tile each stages its MMA results in.
constexpr int kFusedWarps = 8;
constexpr int kFusedStagingBytes = kFusedWarps * kMmaEdge * kMmaEdge * 4;
// The shared memory of one CUDA block (its engine takes 16-bit inputs, float gates): the tile's
// buffers, then the warps' staging; at most kFusedMaxLaunchBytes (C = 128, a head per channel).
GK_HD constexpr int64_t fused_launch_bytes(int C, int h) { return fused_tile_bytes(C, h, 2, 4) + kFusedStagingBytes; }
constexpr int64_t kFusedMaxLaunchBytes = fused_launch_bytes(kFusedMaxChannels, kFusedMaxChannels);

// One operand pair of a product: a (kFusedTileRows x k, row stride lda) times w^T, w (n x k, row stride
// ldw): a Linear's forward. Transposed, a times w, w (k x n, row stride ldw): a Linear's input gradient.
template <class T>
struct MmaTerm {
  const T* a = nullptr;
  int lda = 0;
  const T* w = nullptr;
  int ldw = 0;
  int k = 0;
  bool transposed = false;
};

// How a product's 16 x 16 output tiles are split over the warps of a tile: a work item is one column
// tile over `rows` consecutive row tiles (the weights' fragment then serves `rows` independent MMAs),
// `rows` as large as leaves every warp an item (C >= 128: 4; C = 64: 2; narrower: 1); warp w takes
// items w, w + kFusedWarps, ... Both engines walk it, so the host tests cover the split.
struct MmaSplit {
  static constexpr int kRowTiles = kFusedTileRows / kMmaEdge;
  int column_tiles;
  int rows;  // row tiles per item: kRowTiles, kRowTiles / 2 or 1

  GK_HD static MmaSplit of(int n) {
    const int column_tiles = n / kMmaEdge;
    int rows = kRowTiles;
    while (rows > 1 && column_tiles * (kRowTiles / rows) < kFusedWarps) rows /= 2;
    return {column_tiles, rows};
  }
  GK_HD int items() const { return column_tiles * (kRowTiles / rows); }
  GK_HD int column_tile(int item) const { return item / (kRowTiles / rows); }
  GK_HD int first_row_tile(int item) const { return (item % (kRowTiles / rows)) * rows; }
};

namespace fused {

// The tile's buffers, by what they hold in turn.
enum Matrix : int {
  kSelf0 = 0,   // x0 of the tile's pixels (zero in rows past the last pixel)
  kSelf1 = 1,   // x1
  kOperand = 2,  // the next product's input: hidden, then e = k_noise + s - s r, then v_noise + s, then the mix
  kQuery = 3,    // q, then Wv (v_noise + s) + bv
  kWork = 4,     // z, then dk, then Wv o + bv
};

template <class T>
using A_t = typename Acc<T>::type;

// ---- epilogues of the products: (row, column, accumulated sum) -> the tile or the output ----------

template <class T>
GK_HD T round_to(A_t<T> v) { return Convert<T>::template store<A_t<T>>(v); }
template <class T>
GK_HD A_t<T> widen(T v) { return Convert<T>::template load<A_t<T>>(v); }

// out = round(sum + bias); a null bias adds nothing.
template <class T>
struct StoreBias {
  T* out;
  int ld;
  const T* bias;
  GK_HD void operator()(int r, int c, A_t<T> sum) const {
    out[r * ld + c] = round_to<T>(bias != nullptr ? sum + widen(bias[c]) : sum);
  }
};

// hidden = GELU(round(fc1 pre-activation)): the Linear's output is rounded before the activation.
template <class T>
struct StoreGelu {
  T* out;
  int ld;
  const T* bias;
  GK_HD void operator()(int r, int c, A_t<T> sum) const {
    out[r * ld + c] = round_to<T>(gelu(widen(round_to<T>(sum + widen(bias[c])))));
  }
};

// y = s + round(out_proj(mixed)), for the tile's rows that are pixels.
template <class T>
struct StoreResidual {
  T* y;  // the output row of the tile's first pixel
  int rows;
  int channels;
  const T* self;
  int ld;
  const T* bias;
  GK_HD void operator()(int r, int c, A_t<T> sum) const {
    if (r >= rows) return;
    y[static_cast<int64_t>(r) * channels + c] =
        round_to<T>(widen(self[r * ld + c]) + widen(round_to<T>(sum + widen(bias[c]))));
  }
};

// ---- row stages of the tile (a Team per row, as fusion_math.h's) ---------------------------------

// x_d of the tile's pixels into the tile, zeros past the last pixel (so the products stay finite).
template <class T>
struct LoadRows {
  T* tile;
  int ld;
  const T* x;  // the tile's first pixel
  int rows;
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int c = team.first(); c < channels; c += team.stride())
      tile[r * ld + c] = r < rows ? x[static_cast<int64_t>(r) * channels + c] : round_to<T>(A_t<T>(0));
  }
};

// r = softmax_C(z); e = k_noise + s - s r (the input of the key difference's product), over z's row;
// also r itself, rounded, where `relation` is set (it may be z: each element is read before it is written).
template <class T>
struct RelationRow {
  const T* z;  // z + b2, rounded
  const T* self;
  T* e;
  int ld;
  const T* k_noise;  // row d
  int channels;
  T* relation = nullptr;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    using A = A_t<T>;
    const T* zr = z + r * ld;
    A top = -static_cast<A>(INFINITY);
    for (int c = team.first(); c < channels; c += team.stride()) top = max_(top, widen(zr[c]));
    top = team.max(top);
    A total = 0;
    for (int c = team.first(); c < channels; c += team.stride()) total += exp_(widen(zr[c]) - top);
    total = team.sum(total);
    const A inv_total = A(1) / total;
    for (int c = team.first(); c < channels; c += team.stride()) {
      const A p = exp_(widen(zr[c]) - top) * inv_total;
      e[r * ld + c] = round_to<T>(key_delta(widen(k_noise[c]), widen(self[r * ld + c]), p));
      if (relation != nullptr) relation[r * ld + c] = round_to<T>(p);
    }
  }
};

// Per head: a = sigmoid(scale q . dk), into the tile's gates and, for pixels, the saved gates.
template <class T>
struct GateRow {
  const T* query;  // q, bias included
  const T* dk;
  int ld;
  A_t<T>* tile_gates;  // kFusedTileRows x heads
  A_t<T>* gates;       // the saved gates of the tile's first pixel, direction d: (M, h) rows
  int rows;
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
      A logit = 0;
      for (int c = lo + team.first(); c < hi; c += team.stride())
        logit += mul_rn(widen(query[r * ld + c]) * s, widen(dk[r * ld + c]));
      logit = team.sum(logit);
      if (team.leader()) {
        const A a = two_way_softmax(logit);
        tile_gates[r * heads + j] = a;
        if (r < rows) gates[static_cast<int64_t>(r) * heads + j] = a;
      }
    }
  }
};

// v_noise + s, rounded as the oracle's sum: the input of the self value's product.
template <class T>
struct NoisyRow {
  const T* self;
  T* out;
  int ld;
  const T* v_noise;  // row d
  int channels;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int c = team.first(); c < channels; c += team.stride())
      out[r * ld + c] = round_to<T>(widen(v_noise[c]) + widen(self[r * ld + c]));
  }
};

// mixed = v_cross + a (v_self - v_cross), a the gate of the channel's head; also v_self - v_cross,
// rounded, where `delta` is set (for the backward). Either may be written over its inputs: each
// element is read before it is written.
template <class T>
struct MixRow {
  const T* v_self;
  const T* v_cross;
  T* mixed;
  int ld;
  const A_t<T>* tile_gates;
  int heads;
  int width;
  int channels;
  T* delta = nullptr;
  GK_HD_TEMPLATE
  template <class Team>
  GK_HD void operator()(const Team& team, int r) const {
    for (int c = team.first(); c < channels; c += team.stride()) {
      const A_t<T> vs = widen(v_self[r * ld + c]), vc = widen(v_cross[r * ld + c]);
      mixed[r * ld + c] = round_to<T>(value_mix(vc, vs - vc, tile_gates[r * heads + c / width]));
      if (delta != nullptr) delta[r * ld + c] = round_to<T>(vs - vc);
    }
  }
};

}  // namespace fused

// Both directions of the tile that starts at pixel `first`: 8 C^2 multiply-adds per pixel and
// direction in the products (fc1 2, fc2 1, query 1, key difference 1, values 2, output 1), as the
// chain's, in six products and four row stages per direction, each separated by a sync.
GK_HD_TEMPLATE
template <class T, class Engine>
GK_HD void fused_forward_tile(Engine& engine, const FusedForwardArgs& args, int64_t first) {
  using namespace fused;
  const int C = args.channels, h = args.heads, ld = engine.ld();
  const int64_t left = args.pixels - first;
  const int rows = left < kFusedTileRows ? static_cast<int>(left) : kFusedTileRows;
  T* self_tile0 = engine.matrix(kSelf0);
  T* self_tile1 = engine.matrix(kSelf1);
  T* operand = engine.matrix(kOperand);
  T* query = engine.matrix(kQuery);
  T* work = engine.matrix(kWork);
  A_t<T>* tile_gates = engine.gates();
  const FusionParamPointers& p = args.params;
  const T* fc1 = cptr<T>(p.fc1_weight);

  // Direction-indexed fields are picked with conditionals, not indexed: a kernel argument indexed by a
  // run-time value is copied to the stack.
  engine.rows(LoadRows<T>{self_tile0, ld, cptr<T>(args.x[0]) + first * C, rows, C});
  engine.rows(LoadRows<T>{self_tile1, ld, cptr<T>(args.x[1]) + first * C, rows, C});
  engine.sync();
  for (int d = 0; d < 2; ++d) {
    const T* s = d == 0 ? self_tile0 : self_tile1;
    const T* o = d == 0 ? self_tile1 : self_tile0;
    const T* w_in = cptr<T>(d == 0 ? p.in_proj_weight_0 : p.in_proj_weight_1);  // Wq, Wk, Wv
    const T* b_in = cptr<T>(d == 0 ? p.in_proj_bias_0 : p.in_proj_bias_1);
    const T* w_out = cptr<T>(d == 0 ? p.out_proj_weight_0 : p.out_proj_weight_1);
    const T* b_out = cptr<T>(d == 0 ? p.out_proj_bias_0 : p.out_proj_bias_1);
    T* y = mptr<T>(d == 0 ? args.y[0] : args.y[1]);
    // hidden = GELU(s W1a^T + o W1b^T + b1): one sum over both halves of fc1
    engine.gemm(StoreGelu<T>{operand, ld, cptr<T>(p.fc1_bias)}, C, MmaTerm<T>{s, ld, fc1, 2 * C, C},
                MmaTerm<T>{o, ld, fc1 + C, 2 * C, C});
    engine.sync();
    engine.gemm(StoreBias<T>{work, ld, cptr<T>(p.fc2_bias)}, C, MmaTerm<T>{operand, ld, cptr<T>(p.fc2_weight), C, C},
                MmaTerm<T>{});
    // q + bq beside the relation softmax, which reads z and writes e over hidden
    engine.gemm(StoreBias<T>{query, ld, b_in}, C, MmaTerm<T>{s, ld, w_in, C, C}, MmaTerm<T>{});
    engine.sync();
    engine.rows(RelationRow<T>{work, s, operand, ld, cptr<T>(p.k_noise) + d * C, C});
    engine.sync();
    // dk = e Wk^T (the key bias cancels), over z
    engine.gemm(StoreBias<T>{work, ld, nullptr}, C, MmaTerm<T>{operand, ld, w_in + C * C, C, C}, MmaTerm<T>{});
    engine.sync();
    engine.rows(GateRow<T>{query, work, ld, tile_gates,
                           mptr<A_t<T>>(args.gate) + (d * args.pixels + first) * h, rows, h, C / h, args.scale});
    engine.rows(NoisyRow<T>{s, operand, ld, cptr<T>(p.v_noise) + d * C, C});
    engine.sync();
    // v_self = Wv (v_noise + s) + bv over q, v_cross = Wv o + bv over dk
    const T* wv = w_in + 2 * C * C;
    engine.gemm(StoreBias<T>{query, ld, b_in + 2 * C}, C, MmaTerm<T>{operand, ld, wv, C, C}, MmaTerm<T>{});
    engine.gemm(StoreBias<T>{work, ld, b_in + 2 * C}, C, MmaTerm<T>{o, ld, wv, C, C}, MmaTerm<T>{});
    engine.sync();
    engine.rows(MixRow<T>{query, work, operand, ld, tile_gates, h, C / h, C});
    engine.sync();
    engine.gemm(StoreResidual<T>{y + first * C, rows, C, s, ld, b_out}, C, MmaTerm<T>{operand, ld, w_out, C, C},
                MmaTerm<T>{});
    engine.sync();  // the next direction overwrites the operand the output product reads
  }
}

}  // namespace gk
