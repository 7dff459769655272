// The kernel of simd_forward.h, included once by each instruction set's file after its
// `#pragma GCC target`, with GK_SIMD_ISA naming the namespace of its entry points (simd_forward.h).
// That file defines, in gk's anonymous namespace, the SIMD register layer:
// load(p), store(p, v), set1(x), fma(a, b, c) for float and double, kLanes<T> (elements a register),
// kRows (weight rows a register block) and kVectors (registers of pixels a block, so a tile is
// kLanes<T> * kVectors pixels). Everything here has internal linkage, so each file's copy keeps its
// own instruction set; the per-element math comes from fusion_math.h, included before the pragma and
// inlined here, so that the same functions serve the row stages and this kernel.
//
// Rounding follows the host chain's: products of the row steps are never contracted (-ffp-contract=off),
// the gate logit sums its rounded products in channel order, and only the products' sums use fma, as
// a GEMM library's do.

namespace gk {
namespace {

// One operand of a product: rows of W (ld elements apart) times the k x kTile block x, or, with a
// gate, times base + gate * x (the gate one value a pixel: a head's value input, formed as it is read).
template <class T>
struct Operand {
  const T* w;
  int64_t ld;
  const T* x;
  int k;
  const T* base = nullptr;
  const T* gate = nullptr;
};

template <class T>
constexpr int kTile = kLanes<T> * kVectors;

template <class T>
using Vec = decltype(set1(T()));

// r[i] = row i of the kLanes x kLanes block at src (rows ld apart), transposed: lane l of r[i] is
// src[l * ld + i]. log2(kLanes) rounds of two-register shuffles, each swapping the off-diagonal
// blocks of width B of every pair of rows B apart.
template <class T, int B>
inline void transpose_round(Vec<T> (&r)[kLanes<T>]) {
  constexpr int L = kLanes<T>;
  using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Index IndexVec __attribute__((vector_size(sizeof(Vec<T>))));
  IndexVec first, second;
  for (int l = 0; l < L; ++l) {
    first[l] = (l & B) ? L + l - B : l;
    second[l] = (l & B) ? L + l : l + B;
  }
  for (int i = 0; i < L; ++i) {
    if (i & B) continue;
    const Vec<T> a = r[i], b = r[i + B];
    r[i] = __builtin_shuffle(a, b, first);
    r[i + B] = __builtin_shuffle(a, b, second);
  }
  if constexpr (B > 1) transpose_round<T, B / 2>(r);
}
template <class T>
inline void load_transposed(const T* src, int64_t ld, Vec<T> (&r)[kLanes<T>]) {
  for (int i = 0; i < kLanes<T>; ++i) r[i] = load(src + i * ld);
  transpose_round<T, kLanes<T> / 2>(r);
}

// acc += op.w op.x for R rows of W, each weight broadcast against kVectors registers of pixels.
template <bool kGated, int R, class T>
inline void accumulate(const Operand<T>& op, Vec<T> (&acc)[R][kVectors]) {
  constexpr int L = kLanes<T>;
  Vec<T> gate[kVectors];
  if constexpr (kGated)
    for (int v = 0; v < kVectors; ++v) gate[v] = load(op.gate + v * L);
  for (int k = 0; k < op.k; ++k) {
    Vec<T> x[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      x[v] = load(op.x + k * kTile<T> + v * L);
      if constexpr (kGated) x[v] = fma(gate[v], x[v], load(op.base + k * kTile<T> + v * L));
    }
    for (int i = 0; i < R; ++i) {
      const Vec<T> w = set1(op.w[i * op.ld + k]);
      for (int v = 0; v < kVectors; ++v) acc[i][v] = fma(w, x[v], acc[i][v]);
    }
  }
}

// out (R x kTile) = bias (or 0) + a.w a.x + b.w b.x: one register block.
template <int R, class T>
inline void product_block(const Operand<T>& a, const Operand<T>& b, const T* bias, T* out) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[R][kVectors];
  for (int i = 0; i < R; ++i) {
    const Vec<T> init = set1(bias != nullptr ? bias[i] : T(0));
    for (int v = 0; v < kVectors; ++v) acc[i][v] = init;
  }
  if (a.gate != nullptr) {
    accumulate<true>(a, acc);
  } else {
    accumulate<false>(a, acc);
  }
  accumulate<false>(b, acc);
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < kVectors; ++v) store(out + i * kTile<T> + v * L, acc[i][v]);
}

// out (n x kTile) = bias + a.w a.x + b.w b.x over n rows of W, kRows at a time, then 4, 2, 1.
template <class T>
void product(int n, Operand<T> a, Operand<T> b, const T* bias, T* out) {
  int i = 0;
  const auto advance = [&](int rows) {
    a.w += rows * a.ld;
    b.w += rows * b.ld;
    if (bias != nullptr) bias += rows;
    out += rows * kTile<T>;
    i += rows;
  };
  for (; i + kRows <= n; advance(kRows)) product_block<kRows>(a, b, bias, out);
  if (n - i >= 4) { product_block<4>(a, b, bias, out); advance(4); }
  if (n - i >= 2) { product_block<2>(a, b, bias, out); advance(2); }
  if (n - i >= 1) { product_block<1>(a, b, bias, out); advance(1); }
}
template <class T>
void product(int n, Operand<T> a, const T* bias, T* out) {
  product(n, a, Operand<T>{a.w, 0, a.x, 0}, bias, out);
}

template <class T>
void run_simd_forward(const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch) {
  constexpr int kT = kTile<T>, L = kLanes<T>;
  const int C = args.channels, heads = args.heads, width = C / heads;
  const int64_t M = args.pixels, plane = int64_t{C} * kT;
  // The tile's buffers, channels x pixels each (gates: heads x pixels).
  T* s[2] = {scratch, scratch + plane};
  T* hidden = scratch + 2 * plane;  // then y - s
  T* z = scratch + 3 * plane;       // then p, then e
  T* q = scratch + 4 * plane;
  T* dk = scratch + 5 * plane;
  T* u = scratch + 6 * plane;  // v_noise + s - o
  T* mixed = scratch + 7 * plane;
  T* gates = scratch + 8 * plane;
  T* top = gates + heads * kT;
  T* total = top + kT;

  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t p0 = tile * kT;
    const int valid = static_cast<int>(std::min<int64_t>(kT, M - p0));
    // A full tile moves between the pixel-major inputs and outputs and its channel-major buffers in
    // register transposes of kLanes x kLanes; the last, partial one element by element.
    const bool blocks = valid == kT && C % L == 0;
    for (int d = 0; d < 2; ++d) {
      const T* x = args.x[d] + p0 * C;
      if (blocks) {
        for (int p = 0; p < kT; p += L)
          for (int c = 0; c < C; c += L) {
            Vec<T> r[L];
            load_transposed(x + p * C + c, C, r);
            for (int i = 0; i < L; ++i) store(s[d] + (c + i) * kT + p, r[i]);
          }
        continue;
      }
      for (int p = 0; p < valid; ++p)
        for (int c = 0; c < C; ++c) s[d][c * kT + p] = x[p * C + c];
      for (int c = 0; c < C; ++c)
        for (int p = valid; p < kT; ++p) s[d][c * kT + p] = T(0);  // the last tile's padding
    }
    for (int d = 0; d < 2; ++d) {
      const T* self = s[d];
      const T* other = s[1 - d];
      // hidden = GELU(fc1 [s, o] + b1)
      product(C, Operand<T>{args.fc1_weight, 2 * C, self, C}, Operand<T>{args.fc1_weight + C, 2 * C, other, C},
              args.fc1_bias, hidden);
      GK_SIMD
      for (int64_t i = 0; i < plane; ++i) hidden[i] = gelu(hidden[i]);
      // r = softmax over the channels of fc2 hidden + b2; e = k_noise + s - s r
      product(C, Operand<T>{args.fc2_weight, C, hidden, C}, args.fc2_bias, z);
      for (int p = 0; p < kT; ++p) {
        top[p] = -std::numeric_limits<T>::infinity();
        total[p] = T(0);
      }
      for (int c = 0; c < C; ++c) {
        const T* zc = z + c * kT;
        GK_SIMD
        for (int p = 0; p < kT; ++p) top[p] = max_(top[p], zc[p]);
      }
      for (int c = 0; c < C; ++c) {
        T* zc = z + c * kT;
        GK_SIMD
        for (int p = 0; p < kT; ++p) {
          zc[p] = exp_(zc[p] - top[p]);
          total[p] += zc[p];
        }
      }
      GK_SIMD
      for (int p = 0; p < kT; ++p) total[p] = T(1) / total[p];
      const T* k_noise = args.k_noise + d * C;
      for (int c = 0; c < C; ++c) {
        T* zc = z + c * kT;
        const T* sc = self + c * kT;
        GK_SIMD
        for (int p = 0; p < kT; ++p) zc[p] = key_delta(k_noise[c], sc[p], zc[p] * total[p]);
      }
      // q (without its bias), and dk = Wk e (the key bias cancels)
      const T* in_w = args.in_proj_weight[d];
      const T* in_b = args.in_proj_bias[d];
      product(C, Operand<T>{in_w, C, self, C}, static_cast<const T*>(nullptr), q);
      product(C, Operand<T>{in_w + int64_t{C} * C, C, z, C}, static_cast<const T*>(nullptr), dk);
      // per head a = sigmoid((q + bq) scale . dk)
      const T scale = args.scale;
      for (int j = 0; j < heads; ++j) {
        T* a = gates + j * kT;
        for (int p = 0; p < kT; ++p) a[p] = T(0);
        for (int c = j * width; c < (j + 1) * width; ++c) {
          const T* qc = q + c * kT;
          const T* kc = dk + c * kT;
          const T bias = in_b[c];
          GK_SIMD
          for (int p = 0; p < kT; ++p) a[p] += mul_rn((qc[p] + bias) * scale, kc[p]);
        }
        GK_SIMD
        for (int p = 0; p < kT; ++p) a[p] = two_way_softmax(a[p]);
        T* gate = args.gate + (d * M + p0) * heads + j;
        for (int p = 0; p < valid; ++p) gate[p * heads] = a[p];
      }
      // per head mixed_j = Wv_j (o + a_j (v_noise + s - o)) + bv_j, the product's input formed as it
      // is read from o and u = v_noise + s - o
      const T* v_noise = args.v_noise + d * C;
      for (int c = 0; c < C; ++c) {
        const T* sc = self + c * kT;
        const T* oc = other + c * kT;
        T* uc = u + c * kT;
        const T noise = v_noise[c];
        GK_SIMD
        for (int p = 0; p < kT; ++p) uc[p] = noise + sc[p] - oc[p];
      }
      const T* wv = in_w + 2 * int64_t{C} * C;
      const T* bv = in_b + 2 * C;
      for (int j = 0; j < heads; ++j)
        product(width, Operand<T>{wv + int64_t{j} * width * C, C, u, C, other, gates + j * kT}, bv + j * width,
                mixed + j * width * kT);
      // y = s + (Wo mixed + bo)
      product(C, Operand<T>{args.out_proj_weight[d], C, mixed, C}, args.out_proj_bias[d], hidden);
      const T* x = args.x[d] + p0 * C;
      T* y = args.y[d] + p0 * C;
      if (blocks) {
        for (int c = 0; c < C; c += L)
          for (int p = 0; p < kT; p += L) {
            Vec<T> r[L];
            load_transposed(hidden + c * kT + p, kT, r);
            for (int i = 0; i < L; ++i) store(y + (p + i) * C + c, load(x + (p + i) * C + c) + r[i]);
          }
      } else {
        for (int p = 0; p < valid; ++p)
          for (int c = 0; c < C; ++c) y[p * C + c] = x[p * C + c] + hidden[c * kT + p];
      }
    }
  }
}

}  // namespace

namespace GK_SIMD_ISA {
template <class T>
int64_t tile() {
  return kTile<T>;
}
template <class T>
void tiles(const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch) {
  run_simd_forward(args, begin, end, scratch);
}
template int64_t tile<float>();
template int64_t tile<double>();
template void tiles(const SimdForwardArgs<float>&, int64_t, int64_t, float*);
template void tiles(const SimdForwardArgs<double>&, int64_t, int64_t, double*);
}  // namespace GK_SIMD_ISA
}  // namespace gk
