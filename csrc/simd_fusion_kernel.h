// The kernels of simd_fusion.h, included once by each instruction set's file after its
// `#pragma GCC target`, with GK_SIMD_ISA naming the namespace of its entry points (simd_fusion.h).
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

// One operand of a product: rows of W (ld elements apart) times the k x kTile block x; with
// `transposed`, rows of W^T (W's columns: element (i, k) at w[k * ld + i]), as the backward's input
// gradients need; with a gate, times base + gate * x (the gate one value a pixel: a head's value input,
// formed as it is read).
template <class T>
struct Operand {
  const T* w;
  int64_t ld;
  const T* x;
  int k;
  const T* base = nullptr;
  const T* gate = nullptr;
  bool transposed = false;
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
template <bool kGated, bool kTransposed, int R, class T>
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
      const Vec<T> w = set1(kTransposed ? op.w[k * op.ld + i] : op.w[i * op.ld + k]);
      for (int v = 0; v < kVectors; ++v) acc[i][v] = fma(w, x[v], acc[i][v]);
    }
  }
}

// out (R x kTile) = bias, or 0, or with `add` out itself, + a.w a.x + b.w b.x: one register block.
template <int R, class T>
inline void product_block(const Operand<T>& a, const Operand<T>& b, const T* bias, bool add, T* out) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[R][kVectors];
  for (int i = 0; i < R; ++i) {
    const Vec<T> init = set1(bias != nullptr ? bias[i] : T(0));
    for (int v = 0; v < kVectors; ++v) acc[i][v] = add ? load(out + i * kTile<T> + v * L) : init;
  }
  if (a.gate != nullptr) {
    accumulate<true, false>(a, acc);
  } else if (a.transposed) {
    accumulate<false, true>(a, acc);
  } else {
    accumulate<false, false>(a, acc);
  }
  if (b.transposed) {
    accumulate<false, true>(b, acc);
  } else {
    accumulate<false, false>(b, acc);
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < kVectors; ++v) store(out + i * kTile<T> + v * L, acc[i][v]);
}

// f(std::integral_constant<int, R>, i) for blocks of R rows starting at row i that cover n rows:
// kRows at a time, then 4, 2, 1.
template <class F>
inline void for_row_blocks(int n, const F& f) {
  int i = 0;
  for (; i + kRows <= n; i += kRows) f(std::integral_constant<int, kRows>(), i);
  if (n - i >= 4) { f(std::integral_constant<int, 4>(), i); i += 4; }
  if (n - i >= 2) { f(std::integral_constant<int, 2>(), i); i += 2; }
  if (n - i >= 1) f(std::integral_constant<int, 1>(), i);
}

// Operand a from its row i on.
template <class T>
Operand<T> from_row(Operand<T> a, int i) {
  a.w += a.transposed ? i : i * a.ld;
  return a;
}

// out (n x kTile) = bias (or 0, or out with `add`) + a.w a.x + b.w b.x over n rows of W.
template <class T>
void product(int n, const Operand<T>& a, const Operand<T>& b, const T* bias, bool add, T* out) {
  for_row_blocks(n, [&](auto rows, int i) {
    product_block<decltype(rows)::value>(from_row(a, i), from_row(b, i), bias != nullptr ? bias + i : nullptr, add,
                                         out + i * kTile<T>);
  });
}
template <class T>
void product(int n, const Operand<T>& a, const T* bias, T* out) {
  product(n, a, Operand<T>{a.w, 0, a.x, 0}, bias, false, out);
}
// out = W^T x, or with `add` out += W^T x, over the n columns of W (rows ld apart), k rows of it.
template <class T>
void transposed_product(int n, const T* w, int64_t ld, const T* x, int k, bool add, T* out) {
  product(n, Operand<T>{w, ld, x, k, nullptr, nullptr, true}, Operand<T>{w, 0, x, 0}, static_cast<const T*>(nullptr),
          add, out);
}

// One weight gradient's pixel-major operand: rows x[p] (ld apart), or with a gate base[p] + gate[p] x[p]
// (a head's value input U_j = o + a_j w, formed as it is read).
template <class T>
struct Rows {
  const T* x;
  int64_t ld;
  const T* base = nullptr;
  const T* gate = nullptr;
};

// dw (R x V registers, rows ldw apart) += sum over pixels p < count of d[i][p] x[p][:]: d channel-major
// (rows kTile apart). A weight gradient's register block.
template <bool kGated, int R, int V, class T>
inline void outer_block(const T* d, const Rows<T>& x, int count, T* dw, int64_t ldw) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = load(dw + i * ldw + v * L);
  for (int p = 0; p < count; ++p) {
    Vec<T> xv[V];
    for (int v = 0; v < V; ++v) {
      xv[v] = load(x.x + p * x.ld + v * L);
      if constexpr (kGated) xv[v] = fma(set1(x.gate[p]), xv[v], load(x.base + p * x.ld + v * L));
    }
    for (int i = 0; i < R; ++i) {
      const Vec<T> w = set1(d[i * kTile<T> + p]);
      for (int v = 0; v < V; ++v) acc[i][v] = fma(w, xv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) store(dw + i * ldw + v * L, acc[i][v]);
}

// R rows of dw over k columns, in blocks of up to kVectors registers (2 + 2 rather than 3 + 1 for four).
template <bool kGated, int R, class T>
inline void outer_rows(int k, const T* d, Rows<T> x, int count, T* dw, int64_t ldw) {
  constexpr int L = kLanes<T>;
  const auto shift = [&](int columns) {
    x.x += columns;
    if constexpr (kGated) x.base += columns;
    dw += columns;
    k -= columns;
  };
  while (k >= 3 * L && k != 4 * L) {
    outer_block<kGated, R, 3>(d, x, count, dw, ldw);
    shift(3 * L);
  }
  while (k >= 2 * L) {
    outer_block<kGated, R, 2>(d, x, count, dw, ldw);
    shift(2 * L);
  }
  if (k >= L) outer_block<kGated, R, 1>(d, x, count, dw, ldw);
}

// dw (n x k, rows ldw apart) += d x over the pixels p < count (k a multiple of kLanes).
template <bool kGated, class T>
void add_outer_rows(int n, int k, const T* d, const Rows<T>& x, int count, T* dw, int64_t ldw) {
  int i = 0;
  for (; i + kRows <= n; i += kRows) outer_rows<kGated, kRows>(k, d + i * kTile<T>, x, count, dw + i * ldw, ldw);
  for (; i + 4 <= n; i += 4) outer_rows<kGated, 4>(k, d + i * kTile<T>, x, count, dw + i * ldw, ldw);
  for (; i < n; ++i) outer_rows<kGated, 1>(k, d + i * kTile<T>, x, count, dw + i * ldw, ldw);
}
template <class T>
void add_outer(int n, int k, const T* d, const T* x, int64_t ldx, int count, T* dw, int64_t ldw) {
  add_outer_rows<false>(n, k, d, Rows<T>{x, ldx}, count, dw, ldw);
}

// A bias gradient: sums[c] += sum over the pixels of d[c][p], for c < n. Summed lane-wise, one register
// a channel (lane l holding pixels l, l + kLanes, ...), across the thread's tiles; finish() adds the
// registers' lanes to sums once, in lane order. A sum per channel and tile (in pixel order a chain of
// dependent adds, in registers a horizontal sum) cost as much as a tile's products at C = 64.
template <class T>
class RowSums {
 public:
  RowSums() = default;
  // lanes: n registers of scratch, zeroed here.
  RowSums(T* lanes, T* sums, int n) : lanes_(lanes), sums_(sums), n_(n) {
    std::fill(lanes, lanes + int64_t{n} * kLanes<T>, T(0));
  }
  // The first count pixels of the channel-major tile d (rows kTile apart).
  void add(const T* d, int count) {
    constexpr int L = kLanes<T>;
    if (count == kTile<T>) {
      for (int c = 0; c < n_; ++c) {
        Vec<T> total = load(d + c * kTile<T>);
        for (int v = 1; v < kVectors; ++v) total = total + load(d + c * kTile<T> + v * L);
        store(lanes_ + c * L, load(lanes_ + c * L) + total);
      }
      return;
    }
    for (int c = 0; c < n_; ++c)
      for (int p = 0; p < count; ++p) lanes_[c * L + p % L] += d[c * kTile<T> + p];
  }
  void finish() const {
    for (int c = 0; c < n_; ++c) {
      T total = 0;
      for (int l = 0; l < kLanes<T>; ++l) total += lanes_[c * kLanes<T> + l];
      sums_[c] += total;
    }
  }

 private:
  T* lanes_ = nullptr;
  T* sums_ = nullptr;
  int n_ = 0;
};

// Pixel-major rows (count of them, ld apart) into a channel-major tile (C x kTile), zero past count:
// in register transposes of kLanes x kLanes where the tile is full and C a multiple of the register,
// element by element otherwise.
template <class T>
void to_channels(const T* rows, int64_t ld, int count, int C, T* tile) {
  constexpr int kT = kTile<T>, L = kLanes<T>;
  if (count == kT && C % L == 0) {
    for (int p = 0; p < kT; p += L)
      for (int c = 0; c < C; c += L) {
        Vec<T> r[L];
        load_transposed(rows + p * ld + c, ld, r);
        for (int i = 0; i < L; ++i) store(tile + (c + i) * kT + p, r[i]);
      }
    return;
  }
  for (int p = 0; p < count; ++p)
    for (int c = 0; c < C; ++c) tile[c * kT + p] = rows[p * ld + c];
  for (int c = 0; c < C; ++c)
    for (int p = count; p < kT; ++p) tile[c * kT + p] = T(0);
}

// A channel-major tile into count pixel-major rows (ld apart), plus `add`'s rows (ld apart) if given.
template <class T>
void to_pixels(const T* tile, int count, int C, T* rows, int64_t ld, const T* add = nullptr) {
  constexpr int kT = kTile<T>, L = kLanes<T>;
  if (count == kT && C % L == 0) {
    for (int c = 0; c < C; c += L)
      for (int p = 0; p < kT; p += L) {
        Vec<T> r[L];
        load_transposed(tile + c * kT + p, kT, r);
        for (int i = 0; i < L; ++i) {
          const Vec<T> v = add != nullptr ? r[i] + load(add + (p + i) * ld + c) : r[i];
          store(rows + (p + i) * ld + c, v);
        }
      }
    return;
  }
  for (int p = 0; p < count; ++p)
    for (int c = 0; c < C; ++c) rows[p * ld + c] = tile[c * kT + p] + (add != nullptr ? add[p * ld + c] : T(0));
}

// The value mix's input gradients, all heads at once: per head j, d/dU_j = Wv_j^T d/dmixed_j (U_j =
// o + a_j w, Wv_j the head's rows of Wv, ld C), summed over the heads as is (sum_gu) and weighted by
// a_j (sum_agu), and d/da_j = sum over the channels of d/dU_j w (grad_a, heads x kTile). Blocks of R
// channels keep each head's product and both sums in registers: a product per head (k = the head width,
// short) with its sums read and written in memory ran at half the other products' rate. R = 2 fits
// AVX-512's 32 registers (22 taken), 1 AVX2's 16.
template <class T>
void value_input_gradients(int C, int heads, const T* wv, const T* grad_mixed, const T* gates, const T* w,
                           T* sum_gu, T* sum_agu, T* grad_a) {
  constexpr int L = kLanes<T>, kT = kTile<T>, R = kRows >= 8 ? 2 : 1;
  const int width = C / heads;
  for (int c0 = 0; c0 < C; c0 += R) {  // C is a multiple of the register (run_simd_backward's caller checks)
    Vec<T> sg[R][kVectors], sag[R][kVectors];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVectors; ++v) sg[r][v] = sag[r][v] = set1(T(0));
    for (int j = 0; j < heads; ++j) {
      Vec<T> t[R][kVectors];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kVectors; ++v) t[r][v] = set1(T(0));
      for (int k = j * width; k < (j + 1) * width; ++k) {
        Vec<T> x[kVectors];
        for (int v = 0; v < kVectors; ++v) x[v] = load(grad_mixed + k * kT + v * L);
        for (int r = 0; r < R; ++r) {
          const Vec<T> weight = set1(wv[int64_t{k} * C + c0 + r]);
          for (int v = 0; v < kVectors; ++v) t[r][v] = fma(weight, x[v], t[r][v]);
        }
      }
      T* ga = grad_a + j * kT;
      for (int v = 0; v < kVectors; ++v) {
        const Vec<T> a = load(gates + j * kT + v * L);
        Vec<T> g = c0 == 0 ? set1(T(0)) : load(ga + v * L);
        for (int r = 0; r < R; ++r) {
          sg[r][v] = sg[r][v] + t[r][v];
          sag[r][v] = sag[r][v] + a * t[r][v];
          g = g + t[r][v] * load(w + (c0 + r) * kT + v * L);
        }
        store(ga + v * L, g);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVectors; ++v) {
        store(sum_gu + (c0 + r) * kT + v * L, sg[r][v]);
        store(sum_agu + (c0 + r) * kT + v * L, sag[r][v]);
      }
  }
}

// The buffers of one direction's forward steps, channels x pixels (gates heads x pixels). The forward
// lets some share memory (u with hidden, r with e); the backward keeps each.
template <class T>
struct DirectionBuffers {
  T* u;       // fc1 [s, o] + b1
  T* hidden;  // GELU(u)
  T* r;       // softmax over the channels of fc2 hidden + b2
  T* e;       // k_noise + s - s r
  T* q;       // Wq s, without its bias
  T* dk;      // Wk e
  T* w;       // v_noise + s - o
  T* mixed;   // per head Wv_j (o + a_j w) + bv_j
  T* gates;   // computed (forward), or the forward's (backward)
  T* top;     // kTile each: the softmax's running max and sum
  T* total;
};

// Direction d's forward steps up to `mixed`, for the tile's channel-major s and o. With `products`
// the products (u, r, q, dk, mixed) are computed into b, otherwise b holds them (the forward's, saved)
// and only the steps between them run; with compute_gates the gates are computed into b.gates,
// otherwise b.gates holds them already.
template <class T>
void forward_direction(const SimdLayer<T>& layer, int d, const T* self, const T* other, bool products,
                       bool compute_gates, const DirectionBuffers<T>& b) {
  constexpr int kT = kTile<T>;
  const int C = layer.channels, heads = layer.heads, width = C / heads;
  const int64_t plane = int64_t{C} * kT;
  const SimdParamSet<const T*>& p = layer.p;
  // hidden = GELU(fc1 [s, o] + b1)
  if (products)
    product(C, Operand<T>{p.fc1_weight, 2 * C, self, C}, Operand<T>{p.fc1_weight + C, 2 * C, other, C}, p.fc1_bias,
            false, b.u);
  GK_SIMD
  for (int64_t i = 0; i < plane; ++i) b.hidden[i] = gelu(b.u[i]);
  // r = softmax over the channels of fc2 hidden + b2; e = k_noise + s - s r
  const T* k_noise = p.k_noise + d * C;
  if (products) {
    product(C, Operand<T>{p.fc2_weight, C, b.hidden, C}, p.fc2_bias, b.r);
    for (int i = 0; i < kT; ++i) {
      b.top[i] = -std::numeric_limits<T>::infinity();
      b.total[i] = T(0);
    }
    for (int c = 0; c < C; ++c) {
      const T* zc = b.r + c * kT;
      GK_SIMD
      for (int i = 0; i < kT; ++i) b.top[i] = max_(b.top[i], zc[i]);
    }
    for (int c = 0; c < C; ++c) {
      T* zc = b.r + c * kT;
      GK_SIMD
      for (int i = 0; i < kT; ++i) {
        zc[i] = exp_(zc[i] - b.top[i]);
        b.total[i] += zc[i];
      }
    }
    GK_SIMD
    for (int i = 0; i < kT; ++i) b.total[i] = T(1) / b.total[i];
  }
  for (int c = 0; c < C; ++c) {
    T* rc = b.r + c * kT;
    T* ec = b.e + c * kT;
    const T* sc = self + c * kT;
    if (products) {  // r normalized as e is formed (the plain forward lets them share memory)
      GK_SIMD
      for (int i = 0; i < kT; ++i) {
        const T r = rc[i] * b.total[i];
        rc[i] = r;
        ec[i] = key_delta(k_noise[c], sc[i], r);
      }
    } else {
      GK_SIMD
      for (int i = 0; i < kT; ++i) ec[i] = key_delta(k_noise[c], sc[i], rc[i]);
    }
  }
  // q (without its bias), and dk = Wk e (the key bias cancels)
  const T* in_w = p.in_proj_weight[d];
  const T* in_b = p.in_proj_bias[d];
  if (products) {
    product(C, Operand<T>{in_w, C, self, C}, static_cast<const T*>(nullptr), b.q);
    product(C, Operand<T>{in_w + int64_t{C} * C, C, b.e, C}, static_cast<const T*>(nullptr), b.dk);
  }
  // per head a = sigmoid((q + bq) scale . dk)
  if (compute_gates) {
    const T scale = layer.scale;
    for (int j = 0; j < heads; ++j) {
      T* a = b.gates + j * kT;
      for (int i = 0; i < kT; ++i) a[i] = T(0);
      for (int c = j * width; c < (j + 1) * width; ++c) {
        const T* qc = b.q + c * kT;
        const T* kc = b.dk + c * kT;
        const T bias = in_b[c];
        GK_SIMD
        for (int i = 0; i < kT; ++i) a[i] += mul_rn((qc[i] + bias) * scale, kc[i]);
      }
      GK_SIMD
      for (int i = 0; i < kT; ++i) a[i] = two_way_softmax(a[i]);
    }
  }
  // per head mixed_j = Wv_j (o + a_j w) + bv_j, w = v_noise + s - o: the product's input formed as it
  // is read
  const T* v_noise = p.v_noise + d * C;
  for (int c = 0; c < C; ++c) {
    const T* sc = self + c * kT;
    const T* oc = other + c * kT;
    T* wc = b.w + c * kT;
    const T noise = v_noise[c];
    GK_SIMD
    for (int i = 0; i < kT; ++i) wc[i] = noise + sc[i] - oc[i];
  }
  if (!products) return;
  const T* wv = in_w + 2 * int64_t{C} * C;
  const T* bv = in_b + 2 * C;
  for (int j = 0; j < heads; ++j)
    product(width, Operand<T>{wv + int64_t{j} * width * C, C, b.w, C, other, b.gates + j * kT}, bv + j * width,
            b.mixed + j * width * kT);
}

// Asks for the bytes at p to be brought into L2 ahead of their use (prefetcht1, a line at a time).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

// The saved products' planes (simd_fusion.h), in order.
enum SavedPlane { kSavedU, kSavedR, kSavedQ, kSavedDk, kSavedMixed };
static_assert(kSavedMixed + 1 == kSimdSavedPlanes, "simd_fusion.h counts the saved planes");
static_assert(kSimdSavedPixelMultiple % kTile<float> == 0 && kSimdSavedPixelMultiple % kTile<double> == 0,
              "a tile divides the saved products' pixel multiple");
// Points b's products at their blocks of tile t in direction d's saved planes (the backward's const:
// it only reads them).
template <class P, class T>
void use_saved(const SimdSaved<P>& saved, int C, int d, int64_t tile, DirectionBuffers<T>& b) {
  const auto block = [&](SavedPlane k) { return const_cast<T*>(saved[d][k]) + tile * kTile<T> * C; };
  b.u = block(kSavedU);
  b.r = block(kSavedR);
  b.q = block(kSavedQ);
  b.dk = block(kSavedDk);
  b.mixed = block(kSavedMixed);
}

template <class T>
void run_simd_forward(const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch) {
  constexpr int kT = kTile<T>;
  const SimdLayer<T>& layer = args.layer;
  const int C = layer.channels, heads = layer.heads;
  const int64_t M = layer.pixels, plane = int64_t{C} * kT;
  T* s[2] = {scratch, scratch + plane};
  T* hidden = scratch + 2 * plane;  // then Wo mixed + bo
  T* z = scratch + 3 * plane;
  DirectionBuffers<T> b{};
  b.u = hidden;
  b.hidden = hidden;
  b.r = z;
  b.e = z;
  b.q = scratch + 4 * plane;
  b.dk = scratch + 5 * plane;
  b.w = scratch + 6 * plane;
  b.mixed = scratch + 7 * plane;
  b.gates = scratch + 8 * plane;
  b.top = b.gates + heads * kT;
  b.total = b.top + kT;
  const bool save = args.saved[0][0] != nullptr;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t p0 = tile * kT;
    const int valid = static_cast<int>(std::min<int64_t>(kT, M - p0));
    for (int d = 0; d < 2; ++d) to_channels(args.x[d] + p0 * C, C, valid, C, s[d]);
    for (int d = 0; d < 2; ++d) {
      if (save) use_saved(args.saved, C, d, tile, b);  // u and r then apart from hidden and e
      forward_direction(layer, d, s[d], s[1 - d], true, true, b);
      for (int j = 0; j < heads; ++j) {
        T* gate = args.gate + (d * M + p0) * heads + j;
        for (int i = 0; i < valid; ++i) gate[i * heads] = b.gates[j * kT + i];
      }
      // y = s + (Wo mixed + bo)
      product(C, Operand<T>{layer.p.out_proj_weight[d], C, b.mixed, C}, layer.p.out_proj_bias[d], hidden);
      to_pixels(hidden, valid, C, args.y[d] + p0 * C, C, args.x[d] + p0 * C);
    }
  }
}

// The scratch run_simd_forward takes: 8 channel-major planes, the gates and two rows of pixels.
template <class T>
int64_t forward_scratch(int C, int heads) {
  return (8 * int64_t{C} + heads + 2) * kTile<T>;
}

// The backward of a tile: the forward's steps again (from the saved gates), then each direction's
// gradients in reverse order. grad_x accumulates channel-major (the residual's grad_y first), each
// weight gradient in the thread's sums, over the tile's real pixels only.
template <class T>
void run_simd_backward(const SimdBackwardArgs<T>& args, int64_t begin, int64_t end, T* scratch,
                       const SimdParamSet<T*>& grads) {
  constexpr int kT = kTile<T>;
  const SimdLayer<T>& layer = args.layer;
  const SimdParamSet<const T*>& p = layer.p;
  const int C = layer.channels, heads = layer.heads, width = C / heads;
  const int64_t M = layer.pixels, plane = int64_t{C} * kT;
  T* next = scratch;
  const auto take = [&](int64_t n) {
    T* out = next;
    next += n;
    return out;
  };
  T* s[2] = {take(plane), take(plane)};
  T* gy[2] = {take(plane), take(plane)};
  T* gx[2] = {take(plane), take(plane)};
  T* gates[2] = {take(heads * kT), take(heads * kT)};
  DirectionBuffers<T> b{};
  b.u = take(plane);
  b.hidden = take(plane);
  b.r = take(plane);
  b.e = take(plane);
  b.q = take(plane);
  b.dk = take(plane);
  b.w = take(plane);
  b.mixed = take(plane);
  b.top = take(kT);
  b.total = take(kT);
  T* grad_mixed = take(plane);
  T* t1 = take(plane);  // d/de, then d/dhidden
  T* t2 = take(plane);  // d/dq, then d/dz, then d/du
  T* grad_dk = take(plane);
  T* rows = take(plane);  // pixel-major: an operand of the weight gradients
  T* sum_gu = take(plane);
  T* sum_agu = take(plane);
  T* grad_a = take(heads * kT);
  T* dot = take(kT);
  const auto bias_sums = [&](T* sums) { return RowSums<T>(take(int64_t{C} * kLanes<T>), sums, C); };
  RowSums<T> fc1_bias = bias_sums(grads.fc1_bias), fc2_bias = bias_sums(grads.fc2_bias);
  struct DirectionSums {
    RowSums<T> out_bias, value_bias, query_bias, value_noise, key_noise;
  } sums[2];
  for (int d = 0; d < 2; ++d)
    sums[d] = {bias_sums(grads.out_proj_bias[d]), bias_sums(grads.in_proj_bias[d] + 2 * C),
               bias_sums(grads.in_proj_bias[d]), bias_sums(grads.v_noise + d * C), bias_sums(grads.k_noise + d * C)};
  const bool saved = args.saved[0][0] != nullptr;

  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t p0 = tile * kT;
    const int valid = static_cast<int>(std::min<int64_t>(kT, M - p0));
    if (tile + 1 < end) {  // the next tile's inputs and saved products, which come from DRAM
      const int64_t p1 = p0 + kT, count = std::min<int64_t>(kT, M - p1);
      for (int d = 0; d < 2; ++d) {
        prefetch(args.x[d] + p1 * C, count * C * sizeof(T));
        prefetch(args.grad_y[d] + p1 * C, count * C * sizeof(T));
        prefetch(args.gate + (d * M + p1) * heads, count * heads * sizeof(T));
        if (saved)
          for (int k = 0; k < kSimdSavedPlanes; ++k) prefetch(args.saved[d][k] + (tile + 1) * plane, plane * sizeof(T));
      }
    }
    for (int d = 0; d < 2; ++d) {
      to_channels(args.x[d] + p0 * C, C, valid, C, s[d]);
      to_channels(args.grad_y[d] + p0 * C, C, valid, C, gy[d]);
      std::copy(gy[d], gy[d] + plane, gx[d]);  // the residual's
      to_channels(args.gate + (d * M + p0) * heads, heads, valid, heads, gates[d]);
    }
    for (int d = 0; d < 2; ++d) {
      const T* self = s[d];
      const T* other = s[1 - d];
      const T* self_rows = args.x[d] + p0 * C;
      const T* other_rows = args.x[1 - d] + p0 * C;
      T* gs = gx[d];
      T* go = gx[1 - d];
      b.gates = gates[d];
      if (saved) use_saved(args.saved, C, d, tile, b);
      forward_direction(layer, d, self, other, !saved, false, b);
      const T* in_w = p.in_proj_weight[d];
      const T* in_b = p.in_proj_bias[d];
      const T* wq = in_w;
      const T* wk = in_w + int64_t{C} * C;
      const T* wv = in_w + 2 * int64_t{C} * C;
      T* g_in_w = grads.in_proj_weight[d];

      // y = s + Wo mixed + bo
      sums[d].out_bias.add(gy[d], valid);
      to_pixels(b.mixed, valid, C, rows, C);
      add_outer(C, C, gy[d], rows, C, valid, grads.out_proj_weight[d], C);
      transposed_product(C, p.out_proj_weight[d], C, gy[d], C, false, grad_mixed);
      sums[d].value_bias.add(grad_mixed, valid);

      // mixed_j = Wv_j U_j + bv_j, U_j = o + a_j w = (1 - a_j) o + a_j (v_noise + s): per head
      // d/dU_j = Wv_j^T d/dmixed_j, summed over the heads as is (sum_gu) and weighted by a_j (sum_agu)
      T* w_rows = rows;
      const T* v_noise = p.v_noise + d * C;
      for (int i = 0; i < valid; ++i)
        for (int c = 0; c < C; ++c) w_rows[i * C + c] = v_noise[c] + self_rows[i * C + c] - other_rows[i * C + c];
      value_input_gradients(C, heads, wv, grad_mixed, b.gates, b.w, sum_gu, sum_agu, grad_a);
      for (int j = 0; j < heads; ++j) {
        const T* a = b.gates + j * kT;
        const T* gm = grad_mixed + j * width * kT;
        add_outer_rows<true>(width, C, gm, Rows<T>{w_rows, C, other_rows, a}, valid,
                             g_in_w + (2 * int64_t{C} + j * width) * C, C);
        // a_j = sigmoid(logit_j), logit_j = sum over the head of (q + bq) scale dk
        const T scale = layer.scale;
        for (int c = j * width; c < (j + 1) * width; ++c) {
          const T* qc = b.q + c * kT;
          const T* kc = b.dk + c * kT;
          T* gq = t2 + c * kT;
          T* gk = grad_dk + c * kT;
          const T bias = in_b[c];
          GK_SIMD
          for (int i = 0; i < kT; ++i) {
            const T grad_logit = grad_a[j * kT + i] * two_way_softmax_grad(a[i]);
            gk[i] = grad_logit * ((qc[i] + bias) * scale);
            gq[i] = grad_logit * kc[i] * scale;
          }
        }
      }
      sums[d].value_noise.add(sum_agu, valid);
      GK_SIMD
      for (int64_t i = 0; i < plane; ++i) {
        gs[i] += sum_agu[i];
        go[i] += sum_gu[i] - sum_agu[i];
      }
      // q = Wq s + bq
      sums[d].query_bias.add(t2, valid);
      add_outer(C, C, t2, self_rows, C, valid, g_in_w, C);
      transposed_product(C, wq, C, t2, C, true, gs);
      // dk = Wk e
      to_pixels(b.e, valid, C, rows, C);
      add_outer(C, C, grad_dk, rows, C, valid, g_in_w + int64_t{C} * C, C);
      transposed_product(C, wk, C, grad_dk, C, false, t1);
      // e = k_noise + s - s r, r = softmax(z): d/dz = r (d/dr - sum_c r d/dr), d/dr = -d/de s
      sums[d].key_noise.add(t1, valid);
      for (int i = 0; i < kT; ++i) dot[i] = T(0);
      for (int c = 0; c < C; ++c) {
        const T* ge = t1 + c * kT;
        const T* rc = b.r + c * kT;
        const T* sc = self + c * kT;
        GK_SIMD
        for (int i = 0; i < kT; ++i) dot[i] += mul_rn(rc[i], -mul_rn(ge[i], sc[i]));
      }
      for (int c = 0; c < C; ++c) {
        const T* ge = t1 + c * kT;
        const T* rc = b.r + c * kT;
        const T* sc = self + c * kT;
        T* gz = t2 + c * kT;
        T* gsc = gs + c * kT;
        GK_SIMD
        for (int i = 0; i < kT; ++i) {
          gz[i] = rc[i] * (-mul_rn(ge[i], sc[i]) - dot[i]);
          gsc[i] += ge[i] * key_delta_ds(rc[i]);
        }
      }
      // z = W2 hidden + b2
      fc2_bias.add(t2, valid);
      to_pixels(b.hidden, valid, C, rows, C);
      add_outer(C, C, t2, rows, C, valid, grads.fc2_weight, C);
      transposed_product(C, p.fc2_weight, C, t2, C, false, t1);
      // hidden = GELU(u), u = W1a s + W1b o + b1
      GK_SIMD
      for (int64_t i = 0; i < plane; ++i) t2[i] = t1[i] * gelu_grad(b.u[i]);
      fc1_bias.add(t2, valid);
      add_outer(C, C, t2, self_rows, C, valid, grads.fc1_weight, 2 * C);
      add_outer(C, C, t2, other_rows, C, valid, grads.fc1_weight + C, 2 * C);
      transposed_product(C, p.fc1_weight, 2 * C, t2, C, true, gs);
      transposed_product(C, p.fc1_weight + C, 2 * C, t2, C, true, go);
    }
    for (int d = 0; d < 2; ++d) to_pixels(gx[d], valid, C, args.grad_x[d] + p0 * C, C);
  }
  fc1_bias.finish();
  fc2_bias.finish();
  for (const DirectionSums& direction : sums)
    for (const RowSums<T>& bias : {direction.out_bias, direction.value_bias, direction.query_bias,
                                   direction.value_noise, direction.key_noise})
      bias.finish();
}

// The scratch run_simd_backward takes (its `take`s): 21 planes, three sets of gates (both directions'
// and d/da), three rows of a tile, and the 12 bias gradients' registers (RowSums).
template <class T>
int64_t backward_scratch(int C, int heads) {
  return (21 * int64_t{C} + 3 * heads + 3) * kTile<T> + 12 * int64_t{C} * kLanes<T>;
}

}  // namespace

namespace GK_SIMD_ISA {
template <class T>
int64_t tile() {
  return kTile<T>;
}
template <class T>
int64_t lanes() {
  return kLanes<T>;
}
template <class T>
int64_t forward_scratch_elements(int C, int heads) {
  return forward_scratch<T>(C, heads);
}
template <class T>
int64_t backward_scratch_elements(int C, int heads) {
  return backward_scratch<T>(C, heads);
}
template <class T>
void forward_tiles(const SimdForwardArgs<T>& args, int64_t begin, int64_t end, T* scratch) {
  run_simd_forward(args, begin, end, scratch);
}
template <class T>
void backward_tiles(const SimdBackwardArgs<T>& args, int64_t begin, int64_t end, T* scratch,
                    const SimdParamSet<T*>& grads) {
  run_simd_backward(args, begin, end, scratch, grads);
}
#define GK_SIMD_INSTANTIATE(T)                                                                          \
  template int64_t tile<T>();                                                                           \
  template int64_t lanes<T>();                                                                          \
  template int64_t forward_scratch_elements<T>(int, int);                                               \
  template int64_t backward_scratch_elements<T>(int, int);                                              \
  template void forward_tiles(const SimdForwardArgs<T>&, int64_t, int64_t, T*);                         \
  template void backward_tiles(const SimdBackwardArgs<T>&, int64_t, int64_t, T*, const SimdParamSet<T*>&);
GK_SIMD_INSTANTIATE(float)
GK_SIMD_INSTANTIATE(double)
#undef GK_SIMD_INSTANTIATE
}  // namespace GK_SIMD_ISA
}  // namespace gk
