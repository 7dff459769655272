// The host engine of the fused kernels' tile logic (fused_forward.h, fused_backward.h): one thread
// does what the CUDA engine (fusion_kernels.cu) gives to warps and tensor cores, summing in the
// accumulation type, so that CPU tests run every line of the tile logic but the MMA instruction.
#pragma once

#include <cstdint>
#include <vector>

#include "fused_backward.h"
#include "fused_forward.h"
#include "wide_forward.h"

namespace gk {

template <class T>
struct HostTileEngine {
  using A = typename Acc<T>::type;
  T* tile;
  A* tile_gates;
  int stride;

  int ld() const { return stride; }
  T* matrix(int i) const { return tile + static_cast<int64_t>(i) * kFusedTileRows * stride; }
  A* gates() const { return tile_gates; }
  void sync() const {}
  template <class F>
  void rows(const F& f) const {
    for (int r = 0; r < kFusedTileRows; ++r) f(SerialTeam{}, r);
  }
  // The CUDA engine's split of the output tiles over warps and items (MmaSplit), each 16 x 16 tile's
  // MMAs replaced by sums in the accumulation type.
  template <class E>
  void gemm(const E& epilogue, int n, const MmaTerm<T>& first, const MmaTerm<T>& second) const {
    const MmaSplit split = MmaSplit::of(n);
    for (int warp = 0; warp < kFusedWarps; ++warp)
      for (int item = warp; item < split.items(); item += kFusedWarps)
        for (int i = split.first_row_tile(item); i < split.first_row_tile(item) + split.rows; ++i)
          for (int r = i * kMmaEdge; r < (i + 1) * kMmaEdge; ++r)
            for (int c = split.column_tile(item) * kMmaEdge; c < (split.column_tile(item) + 1) * kMmaEdge; ++c)
              epilogue(r, c, dot(first, r, c) + dot(second, r, c));
  }
  static A dot(const MmaTerm<T>& term, int r, int c) {
    A sum = 0;
    for (int k = 0; k < term.k; ++k) {
      const T w = term.transposed ? term.w[static_cast<int64_t>(k) * term.ldw + c]
                                  : term.w[static_cast<int64_t>(c) * term.ldw + k];
      sum += fused::widen(term.a[r * term.lda + k]) * fused::widen(w);
    }
    return sum;
  }

  // The backward's (fused_backward.h): the CUDA engine's 16 x 16 output tiles of out, each a warp's.
  void weight_gradient(A* out, int ldo, int n, int k, const WeightTerm<T>& first, const WeightTerm<T>& second) const {
    for (int c = 0; c < n; ++c)
      for (int j = 0; j < k; ++j) out[static_cast<int64_t>(c) * ldo + j] += outer(first, c, j) + outer(second, c, j);
  }
  static A outer(const WeightTerm<T>& term, int c, int j) {
    A sum = 0;
    if (term.g == nullptr) return sum;
    for (int r = 0; r < kFusedTileRows; ++r)
      sum += fused::widen(term.g[r * term.ldg + c]) * fused::widen(term.x[r * term.ldx + j]);
    return sum;
  }
  void column_sums(A* out, int n, const T* g, const T* g2) const {
    for (int c = 0; c < n; ++c) {
      A sum = 0;
      for (int r = 0; r < kFusedTileRows; ++r)
        sum += fused::widen(g[r * stride + c]) + (g2 != nullptr ? fused::widen(g2[r * stride + c]) : A(0));
      out[c] += sum;
    }
  }
  void clear(A* out, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) out[i] = 0;
  }
};

// The engine of the wide passes (wide_forward.h, wide_backward.h): one thread a block, the CUDA engine's
// split of the 16 x 16 output tiles over warps and items (MmaSplit) walked in order, each tile's MMAs
// replaced by sums in the accumulation type.
template <class T>
struct HostWideEngine {
  using A = typename Acc<T>::type;
  std::vector<T> operands;  // shape.operands x kWideRows x kWideChunkStride
  std::vector<A> sum_buffers;  // shape.sums x kWideRows x wide_sums_ld(n)
  std::vector<A> values;    // kWideRows x shape.values_per_row
  int n;

  HostWideEngine(const WideShape& shape, int columns)
      : operands(static_cast<size_t>(shape.operands) * kWideRows * kWideChunkStride),
        sum_buffers(static_cast<size_t>(shape.sums) * kWideRows * wide_sums_ld(columns)),
        values(static_cast<size_t>(shape.values_per_row) * kWideRows),
        n(columns) {}

  T* operand(int i) { return operands.data() + static_cast<int64_t>(i) * kWideRows * kWideChunkStride; }
  A* sums(int i) { return sum_buffers.data() + static_cast<int64_t>(i) * kWideRows * wide_sums_ld(n); }
  A* row_values() { return values.data(); }
  void sync() const {}
  template <class F>
  void rows(const F& f) const {
    for (int r = 0; r < kWideRows; ++r) f(SerialTeam{}, r);
  }
  void product(int i, int op, const T* w, int ldw, int columns, int k, bool accumulate, bool transposed) {
    const MmaSplit split = MmaSplit::of(columns);
    const T* a = operand(op);
    A* out = sums(i);
    for (int warp = 0; warp < kFusedWarps; ++warp)
      for (int item = warp; item < split.items(); item += kFusedWarps)
        for (int t = split.first_row_tile(item); t < split.first_row_tile(item) + split.rows; ++t)
          for (int r = t * kMmaEdge; r < (t + 1) * kMmaEdge; ++r)
            for (int c = split.column_tile(item) * kMmaEdge; c < (split.column_tile(item) + 1) * kMmaEdge; ++c) {
              A sum = accumulate ? out[r * wide_sums_ld(n) + c] : A(0);
              for (int j = 0; j < k; ++j)
                sum += fused::widen(a[r * kWideChunkStride + j]) *
                       fused::widen(transposed ? w[static_cast<int64_t>(j) * ldw + c] : w[static_cast<int64_t>(c) * ldw + j]);
              out[r * wide_sums_ld(n) + c] = sum;
            }
  }
};

}  // namespace gk
