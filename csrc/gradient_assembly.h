// The 14 parameter gradients of the chain's backward (fusion_chain.h) from its reduced sums: one
// element at a time, in one pass, on the host (fusion_api.cpp) and on CUDA (fusion_kernels.cu). The
// chain's GEMMs reduce the packed products (g[d] = x_d [W1a; W1b; Wq_d; Wv_d; Wv_{1-d}]^T, see
// FusionBuffers); each parameter's gradient gathers its blocks from both directions:
//   d/dW1a, d/dW1b   the fc1 blocks of both directions' d/dwx, summed (the halves of fc1_weight)
//   d/dWq_d          the query block of d/dwx[d]           d/dWk_d: d/dWk[d]
//   d/dWv_d          the v_self block of d/dwx[d] + the v_other block of d/dwx[1-d] + s_d v_noise[d]^T,
//                    s_d the column sums of the v_self block of d/dg[d] (v_noise enters through Wv_d v_noise[d])
//   d/dv_noise[d]    Wv_d^T s_d
//   in_proj_bias_d   [the query block's sums, 0 (the key bias cancels), s_d + the v_other block's sums of d/dg[1-d]]
// Each element is summed in the accumulation type from the sums in T and rounded once.
#pragma once

#include "fused_backward.h"

namespace gk {

// The reduced sums (WeightGradients, fusion_api.h) and the packed weights they need, as raw pointers,
// contiguous, all of the compute dtype T.
struct GradientParts {
  int channels;
  const void* wx[2];       // (5C, C): d/dwx[d], rows in GBlock order
  const void* g_sum[2];    // (5C,): column sums of d/dg[d]
  const void* w2;          // (C, C)
  const void* b2;          // (C,)
  const void* k_noise[2];  // (C,)
  const void* wk[2];       // (C, C)
  const void* wo[2];       // (C, C)
  const void* bo[2];       // (C,)
  const void* wv;          // (2, C, C): Wv of each direction
  const void* v_noise;     // (2, C)
};

// Row r, column c of parameter `param`'s gradient (a vector is one row, r = 0: param_columns), in
// the accumulation type.
GK_HD_TEMPLATE
template <class T>
GK_HD typename Acc<T>::type assembled_gradient(const GradientParts& p, int param, int64_t r, int64_t c) {
  using A = typename Acc<T>::type;
  const int64_t C = p.channels;
  const auto v = [](const void* t, int64_t k) { return fused::widen(cptr<T>(t)[k]); };
  // Direction-indexed fields by conditionals (a kernel argument indexed at run time is copied to the stack).
  const auto of = [](const void* const (&pair)[2], int d) { return d == 0 ? pair[0] : pair[1]; };
  // row r, column c of block b of d/dwx[d]
  const auto wx = [&](int d, GBlock b, int64_t r, int64_t c) { return v(of(p.wx, d), (b * C + r) * C + c); };
  const auto g_sum = [&](int d, GBlock b, int64_t c) { return v(of(p.g_sum, d), b * C + c); };
  // The per-direction parameters: the same four for d = 0 and d = 1.
  const int d = param >= kParam_in_proj_weight_1 ? 1 : 0;
  const int per_direction = param - (d == 0 ? kParam_in_proj_weight_0 : kParam_in_proj_weight_1);
  switch (param) {
    case kParam_fc1_weight: {
      const GBlock b = c < C ? kFc1Self : kFc1Other;
      return wx(0, b, r, c % C) + wx(1, b, r, c % C);
    }
    case kParam_fc1_bias: return g_sum(0, kFc1Self, c) + g_sum(1, kFc1Self, c);
    case kParam_fc2_weight: return v(p.w2, r * C + c);
    case kParam_fc2_bias: return v(p.b2, c);
    case kParam_k_noise: return v(of(p.k_noise, static_cast<int>(r)), c);
    case kParam_v_noise: {  // Wv_r^T s_r
      A value = 0;
      for (int64_t k = 0; k < C; ++k) value += v(p.wv, (r * C + k) * C + c) * g_sum(static_cast<int>(r), kValueSelf, k);
      return value;
    }
    default: break;
  }
  switch (per_direction) {
    case 0:  // in_proj_weight_d: Wq, Wk, Wv
      if (r < C) return wx(d, kQueryRaw, r, c);
      if (r < 2 * C) return v(of(p.wk, d), (r - C) * C + c);
      return wx(d, kValueSelf, r - 2 * C, c) + wx(1 - d, kValueOther, r - 2 * C, c) +
             g_sum(d, kValueSelf, r - 2 * C) * v(p.v_noise, d * C + c);
    case 1:  // in_proj_bias_d: bq, bk (0: it cancels), bv
      if (c < C) return g_sum(d, kQueryRaw, c);
      if (c < 2 * C) return A(0);
      return g_sum(d, kValueSelf, c - 2 * C) + g_sum(1 - d, kValueOther, c - 2 * C);
    case 2: return v(of(p.wo, d), r * C + c);
    default: return v(of(p.bo, d), c);
  }
}

// Writes row r, column c of parameter `param`'s gradient, rounded once (a functor, as ReduceGradients).
template <class T>
struct AssembleGradients {
  GradientParts parts;
  FusionParamGradPointers grads;
  GK_HD_TEMPLATE
  GK_HD void operator()(int param, int64_t r, int64_t c) const {
    gradient_of<T>(grads, param)[r * param_columns(param, parts.channels) + c] =
        fused::round_to<T>(assembled_gradient<T>(parts, param, r, c));
  }
};

}  // namespace gk
