// The per-pixel math of GeminiFusion (SPEC §1), written once for the host C++ path and the CUDA kernels.
//
// The projections are GEMMs done by the caller (fusion_api.cpp); what is left between them is
// per pixel, and lives here as six row stages (forward: hidden, relation, mix; backward: mix,
// relation, hidden). A "row" is one (direction, pixel) pair; rows are independent.
//
// Each stage is written against a Team: the threads that share one row. The host team is a
// single thread walking the channels one by one; the CUDA team is a warp, or a group of its lanes,
// striding over the channels in packs of 16 bytes (or one element where the buffers do not allow
// packs) and reducing with shuffles. The team supplies the reductions (max, sum), the stride and the
// pack, the stage supplies the math, so every line of math below runs on CPU in the tests (the packs
// and the lanes through the host's LaneThreadsTeam, fusion_host.cpp).
//
// This header includes only the C++ standard library, so that it compiles in a .cu file that sees
// nothing but the CUDA toolkit and in a .cpp file that sees nothing of CUDA.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define GK_HD __host__ __device__ __forceinline__
// Stages are host-device templates that call a team's device-only shuffles when the team is the
// warp; that instantiation only ever runs on the device.
#define GK_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define GK_HD inline
#define GK_HD_TEMPLATE
#endif

// On the host, let the compiler vectorize a loop that accumulates `var` (a float sum is otherwise
// kept in order, and the loop scalar). GK_SIMD marks the elementwise loops, whose iteration c reads
// and writes index c only (also in place), so that they vectorize without run-time alias checks. Needs -fopenmp or -fopenmp-simd; a no-op elsewhere.
#if defined(_OPENMP) && !defined(__CUDACC__)
#define GK_SIMD _Pragma("omp simd")
#define GK_SIMD_SUM(var) _Pragma(GK_STRINGIFY(omp simd reduction(+ : var)))
#define GK_SIMD_MAX(var) _Pragma(GK_STRINGIFY(omp simd reduction(max : var)))
#define GK_STRINGIFY(x) #x
#else
#define GK_SIMD
#define GK_SIMD_SUM(var)
#define GK_SIMD_MAX(var)
#endif

namespace gk {

// Accumulation type: float for float/half/bfloat16, double for double.
template <class T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Conversion between a storage type and its accumulation type. The CUDA file specialises it for
// __half and __nv_bfloat16, whose implicit conversions torch's build flags switch off.
template <class T>
struct Convert {
  template <class A>
  GK_HD static A load(T x) { return static_cast<A>(x); }
  template <class A>
  GK_HD static T store(A v) { return static_cast<T>(v); }
};

// exp in float: the CUDA math library's expf on the device; on the host Cephes' expf (range
// reduction to [-ln2/2, ln2/2], degree-6 polynomial; max relative error 8e-8 against exp, measured
// on [-87, 87]), branch-free so that the compiler vectorizes it, which it cannot do with a libm call.
GK_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);  // keeps 2^n a normal float
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln2), 12582912 = 1.5 * 2^23
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;           // x - n ln2, ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  memcpy(&two_to_n, &exponent_bits, sizeof two_to_n);
  return (p * r * r + r + 1.f) * two_to_n;
#endif
}
GK_HD double exp_(double x) { return exp(x); }
// erf in float: the CUDA math library's erff on the device; on the host a rational approximation
// (Eigen's and XLA's; max abs error 4e-7 against erf, measured on [-6, 6]), branch-free so that the
// compiler vectorizes it, and several times faster than glibc's erff, which dominated the GELU stages.
GK_HD float erf_(float x) {
#if defined(__CUDA_ARCH__)
  return erff(x);
#else
  x = x < -4.f ? -4.f : (x > 4.f ? 4.f : x);  // erf(+-4) is +-1 in float
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
#endif
}
GK_HD double erf_(double x) { return erf(x); }
GK_HD float log_(float x) { return logf(x); }
GK_HD double log_(double x) { return log(x); }
// A product that is rounded before anything is added to it, as the oracle's separate multiply and sum
// round it: never contracted into an fma. On the device through the _rn intrinsics, which nvcc does
// not fuse (its default --fmad=true fuses a * b + c elsewhere); on the host the build passes
// -ffp-contract=off (setup.py, _jit_build.py), which keeps every a * b + c of the AVX2+FMA stages
// unfused. Where it matters: an fma never rounds its product, so a product that overflows in the
// oracle (+-inf, and inf - inf = NaN) stays finite, and a sum -x + fma(a, b, x) is not the zero it
// is when a * b was rounded on its own (a saturated softmax's gradient).
GK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GK_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
// A comparison rather than fmax, which the host compiler can vectorize (NaNs still reach the softmax
// through exp).
template <class A>
GK_HD A max_(A a, A b) { return a > b ? a : b; }

// ---- elementwise math and its derivatives ----------------------------------------------------

// GELU, exact (erf) form, as torch.nn.functional.gelu's default.
template <class A>
GK_HD A gelu(A u) {
  return A(0.5) * u * (A(1) + erf_(u * A(0.70710678118654752440)));
}
template <class A>
GK_HD A gelu_grad(A u) {
  const A cdf = A(0.5) * (A(1) + erf_(u * A(0.70710678118654752440)));
  const A pdf = exp_(A(-0.5) * u * u) * A(0.39894228040143267794);  // 1/sqrt(2 pi)
  return cdf + u * pdf;
}

// The key difference of the two keys, before the key projection (the key bias cancels):
// k_self - k_cross = Wk (k_noise + s - s * r).
template <class A>
GK_HD A key_delta(A k_noise, A s, A r) { return k_noise + s - s * r; }
// Its derivative with respect to s (d/dr is -s, applied inline below).
template <class A>
GK_HD A key_delta_ds(A r) { return A(1) - r; }

// The two-way softmax over (k_self, k_cross) of one head, as a sigmoid of the logit difference.
template <class A>
GK_HD A two_way_softmax(A logit_difference) { return A(1) / (A(1) + exp_(-logit_difference)); }
template <class A>
GK_HD A two_way_softmax_grad(A a) { return a * (A(1) - a); }

// The value mix: a * v_self + (1 - a) * v_cross = v_cross + a * (v_self - v_cross).
template <class A>
GK_HD A value_mix(A v_cross, A v_delta, A a) { return v_cross + a * v_delta; }

// The six row stages, in the order a forward then a backward runs them.
enum class Stage { HiddenForward, RelationForward, MixForward, MixBackward, RelationBackward, HiddenBackward };

// The activation buffers of FusionBuffers (below) by name, with the per-direction pairs (x[2], g[2],
// ...) split and grad_z, the d/dz that RelationBackward writes over z, named apart from z: so that
// each stage can declare what it reads and writes (kReads, kWrites), and the chain that runs the
// stages between its GEMMs (fusion_chain.h) can check its buffer plan against those declarations.
enum class Buffer : uint8_t {
  X0, X1, G0, G1, Hidden, Z, Lse, E, Dk, Gate, Mixed, Y0, Y1,
  GradY0, GradY1, GradMixed, GradDk, GradE0, GradE1, GradZ, GradHidden, GradG0, GradG1, GradX0, GradX1,
};
constexpr int kNumBuffers = static_cast<int>(Buffer::GradX1) + 1;

// ---- buffers ----------------------------------------------------------------------------------

// Every buffer the six stages read or write, as untyped pointers so that the same struct crosses
// from the torch-facing C++ into the toolkit-only CUDA file. All are contiguous, row-major, in the
// compute dtype T unless marked "acc" (the accumulation type, see Acc).
//
// Direction d has self x_d and other x_{1-d}. The first GEMMs give, for each d, the (pixels, 5C)
// matrix g[d] = x_d @ [W1a; W1b; Wq_d; Wv_d; Wv_{1-d}]^T, so that
//   fc1 pre-activation of d:  g[d][:, 0:C] + g[1-d][:, C:2C] + b1
//   raw query of d:           g[d][:, 2C:3C]          (+ bq_d, then / sqrt(dh))
//   Wv_d applied to self:     g[d][:, 3C:4C]
//   Wv_d applied to other:    g[1-d][:, 4C:5C]
// grad_g has the layout of g and receives the gradients of those columns.
//
// Stages may run in place where marked: each element is read before it is written, by the thread
// that writes it, and no row reads an element that another row writes. Fewer and smaller buffers
// matter on CPU, where a fresh buffer costs a page fault per 4 KiB (glibc returns buffers over its
// mmap threshold, at most 32 MiB, to the kernel when they are freed).
struct FusionBuffers {
  int64_t pixels;  // M: pixels per direction (all leading dims flattened)
  int channels;    // C
  int heads;       // h; head width C / h
  double scale;    // 1 / sqrt(head width)

  const void* x[2];  // x0, x1: (M, C)
  // parameters, each (C,) or (2, C) with row d for direction d
  const void* b1;       // fc1 bias (C,)
  const void* b2;       // fc2 bias (C,)
  const void* k_noise;  // (2, C)
  const void* bq;       // (2, C) query bias
  const void* bv;       // (2, C) value bias
  const void* bo;       // (2, C) output bias
  const void* vn_proj;  // (2, C) Wv_d v_noise[d]

  const void* g[2];  // (M, 5C) each, see above; two buffers, as a single one would be twice as large
  void* hidden;     // (2, M, C) GELU(fc1(...))
  void* z;          // (2, M, C) fc2 output without bias; RelationBackward overwrites it with d/dz
  void* lse;        // (2, M) acc, or null: log-sum-exp of z + b2, so the backward recomputes r exactly
  void* e;          // (2, M, C) k_noise + s - s * r, the input of the key projection
  const void* dk;   // (2, M, C) e @ Wk^T: the per-channel key difference
  void* gate;       // (2, M, h) acc: a, the first two-way softmax weight of each head
  void* mixed;      // (2, M, C) the attention output before the output projection
  void* y[2];       // y0, y1 (M, C): MixForward writes s + bo, the output GEMM accumulates into it

  const void* grad_y[2];    // (M, C) each
  const void* grad_mixed;   // (2, M, C) grad_y @ Wo; MixBackward may write mixed over it
  void* grad_dk;            // (2, M, C) may be dk
  const void* grad_e[2];    // (M, C) each: grad_dk[d] @ Wk_d
  const void* grad_hidden;  // (2, M, C) d/dz @ W2
  void* grad_g[2];          // (M, 5C) each, may be g
  void* grad_x[2];          // (M, C) each, may be grad_e: the elementwise part of d/dx_d (residual, key delta)
};

// The column blocks of a g-layout row (g and grad_g above), C columns each, by name rather than offset:
// of g[d], x_d times W1a, W1b, Wq_d, Wv_d, and Wv_{1-d} (the other direction's value projection,
// which reads x_d as its other modality); pack_weights stacks wx in this order.
enum GBlock : int { kFc1Self = 0, kFc1Other = 1, kQueryRaw = 2, kValueSelf = 3, kValueOther = 4 };
constexpr int kGBlocks = 5;
// Where block `block` of row `pixel` starts in a g-layout buffer.
template <class P>
GK_HD P* g_block(P* base, int64_t pixel, int C, GBlock block) {
  return base + pixel * kGBlocks * C + static_cast<int64_t>(block) * C;
}

// What a stage reads or writes of a buffer: for a g-layout buffer (g, grad_g) a set of its column
// blocks, since the hidden stages and the mix stages touch disjoint blocks (so the backward can
// write grad_g over g block by block); the whole buffer otherwise.
constexpr uint8_t column_blocks(GBlock first, GBlock last) {
  return static_cast<uint8_t>(((1u << (last + 1)) - 1) & ~((1u << first) - 1));
}
constexpr uint8_t kFc1Columns = column_blocks(kFc1Self, kFc1Other);
constexpr uint8_t kAttentionColumns = column_blocks(kQueryRaw, kValueOther);
constexpr uint8_t kAllColumns = column_blocks(kFc1Self, kValueOther);
struct Access {
  Buffer buffer;
  uint8_t columns = kAllColumns;
};

template <class T>
GK_HD const T* cptr(const void* p) { return static_cast<const T*>(p); }
template <class T>
GK_HD T* mptr(void* p) { return static_cast<T*>(p); }

// The column blocks of one row (direction d, pixel) of a g-layout pair (g, or grad_g): which blocks of
// which direction's buffer hold each product of that row. E is T or const T; own is the pair's
// buffer d, other its buffer 1 - d.
template <class E>
struct GRow {
  E* fc1_self;     // x_d W1a^T, of own
  E* fc1_other;    // x_{1-d} W1b^T, of other (its fc1 block for the other modality)
  E* query_raw;    // x_d Wq_d^T, of own
  E* value_self;   // x_d Wv_d^T, of own
  E* value_other;  // x_{1-d} Wv_d^T, of other
  template <class Void>
  GK_HD GRow(Void* own, Void* other, int64_t pixel, int C)
      : fc1_self(g_block(static_cast<E*>(own), pixel, C, kFc1Self)),
        fc1_other(g_block(static_cast<E*>(other), pixel, C, kFc1Other)),
        query_raw(g_block(static_cast<E*>(own), pixel, C, kQueryRaw)),
        value_self(g_block(static_cast<E*>(own), pixel, C, kValueSelf)),
        value_other(g_block(static_cast<E*>(other), pixel, C, kValueOther)) {}
};

// ---- teams and packs --------------------------------------------------------------------------
//
// A team is the threads that share one row: first() is this thread's rank in the team, stride() the
// team's size, and Team::kPack the consecutive channels a thread takes at each step of a channel loop,
// loaded and stored as one access (a Pack). A channel loop of a stage is therefore
//   for (int c = lo + P * team.first(); c < hi; c += P * team.stride())   // P = Team::kPack
// with the pack's P channels at c..c+P-1, and any other loop over a team (the heads of a gate) steps
// by first() and stride() alone. The host team takes one channel a step (the compiler vectorizes
// across the steps); the CUDA teams take 16 bytes (4 floats, 8 float16 or bfloat16) where stage_pack
// allows, so that a lane issues one load per 16 bytes instead of one per element.

// The serial team: one thread owns the row.
struct SerialTeam {
  static constexpr int kPack = 1;
  GK_HD int first() const { return 0; }
  GK_HD int stride() const { return 1; }
  GK_HD bool leader() const { return true; }
  GK_HD void sync() const {}
  template <class A>
  GK_HD A sum(A v) const { return v; }
  template <class A>
  GK_HD A max(A v) const { return v; }
};

#if defined(__CUDACC__)
#define GK_UNROLL _Pragma("unroll")
#else
#define GK_UNROLL
#endif

// kN consecutive elements of a row: one 16-byte (or narrower) access on the device, whose pointers
// stage_pack has checked for alignment; element by element on the host.
template <class T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T at[kN];
};
template <int kN, class T>
GK_HD Pack<T, kN> load_pack(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Pack<T, kN>*>(p);
#else
  Pack<T, kN> pack;
  for (int i = 0; i < kN; ++i) pack.at[i] = p[i];
  return pack;
#endif
}
template <int kN, class T>
GK_HD void store_pack(T* p, const Pack<T, kN>& pack) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack<T, kN>*>(p) = pack;
#else
  for (int i = 0; i < kN; ++i) p[i] = pack.at[i];
#endif
}
// Element i of a pack in the accumulation type A, and stored from it.
template <class A, class T, int kN>
GK_HD A value(const Pack<T, kN>& pack, int i) {
  return Convert<T>::template load<A>(pack.at[i]);
}
template <class A, class T, int kN>
GK_HD void set_value(Pack<T, kN>& pack, int i, A v) {
  pack.at[i] = Convert<T>::template store<A>(v);
}

// The channels a CUDA stage lane packs into one access (see above) for these buffers: 16 bytes' worth
// where C and the head width are multiples of it and every row the stages touch starts on a 16-byte
// boundary (every pointer aligned; rows are C elements apart), else 1. float64 stays a value a lane:
// its loads are 8 bytes already, and its relation backward spilled registers in packs of two. The
// accumulator buffers (gates, log-sum-exps) are read a value at a time and need nothing.
constexpr int kPackBytes = 16;
inline int stage_pack(const FusionBuffers& b, int element_bytes) {
  const int pack = kPackBytes / element_bytes;
  if (element_bytes > 4 || b.heads <= 0 || b.channels % pack != 0 || (b.channels / b.heads) % pack != 0) return 1;
  const void* const pointers[] = {b.x[0],      b.x[1],         b.b1,        b.b2,        b.k_noise,    b.bq,
                                  b.bv,        b.bo,           b.vn_proj,   b.g[0],      b.g[1],       b.hidden,
                                  b.z,         b.e,            b.dk,        b.mixed,     b.y[0],       b.y[1],
                                  b.grad_y[0], b.grad_y[1],    b.grad_mixed, b.grad_dk,  b.grad_e[0],  b.grad_e[1],
                                  b.grad_hidden, b.grad_g[0],  b.grad_g[1], b.grad_x[0], b.grad_x[1]};
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % kPackBytes != 0) return 1;  // null pointers (unused buffers) pass
  return pack;
}

// Row coordinates shared by the stages.
struct RowIndex {
  int64_t d;       // direction
  int64_t pixel;   // pixel within the direction
  int64_t row;     // d * M + pixel: row of the (2, M, ·) buffers
  int64_t other;   // 1 - d
  GK_HD RowIndex(int64_t r, int64_t pixels) : d(r / pixels), pixel(r % pixels), row(r), other(1 - r / pixels) {}
};

// ---- forward stages ---------------------------------------------------------------------------
//
// The mix stages take the head width as an optional compile-time constant (kHeadWidth, 0 for "read
// it from the buffers"): the host instantiates them for common widths, so that the loops over one
// head have a known trip count and the compiler vectorizes them without remainder loops.

// Whether a row's scratch values may be parked in a T buffer without losing precision.
template <class T>
GK_HD constexpr bool stores_accumulator() { return sizeof(T) == sizeof(typename Acc<T>::type); }

// hidden = GELU(fc1 pre-activation)
struct HiddenForward {
  static constexpr Access kReads[] = {{Buffer::G0, kFc1Columns}, {Buffer::G1, kFc1Columns}};
  static constexpr Access kWrites[] = {{Buffer::Hidden}};
  GK_HD_TEMPLATE
  template <class Team, class T>
  GK_HD static void run(const Team& team, const FusionBuffers& b, int64_t r) {
    using A = typename Acc<T>::type;
    constexpr int P = Team::kPack;
    const int C = b.channels;
    const RowIndex ix(r, b.pixels);
    const GRow<const T> g(b.g[ix.d], b.g[ix.other], ix.pixel, C);
    const T* b1 = cptr<T>(b.b1);
    T* out = mptr<T>(b.hidden) + ix.row * C;
    for (int c = P * team.first(); c < C; c += P * team.stride()) {
      const Pack<T, P> self = load_pack<P>(g.fc1_self + c), other = load_pack<P>(g.fc1_other + c),
                       bias = load_pack<P>(b1 + c);
      Pack<T, P> hidden;
      GK_UNROLL
      for (int i = 0; i < P; ++i) set_value(hidden, i, gelu(value<A>(self, i) + value<A>(other, i) + value<A>(bias, i)));
      store_pack(out + c, hidden);
    }
  }
};

// r = softmax_C(z + b2); e = k_noise + s - s * r; also the log-sum-exp when lse is set.
struct RelationForward {
  static constexpr Access kReads[] = {{Buffer::Z}, {Buffer::X0}, {Buffer::X1}};
  static constexpr Access kWrites[] = {{Buffer::E}, {Buffer::Lse}};  // Lse when the chain has one
  GK_HD_TEMPLATE
  template <class Team, class T>
  GK_HD static void run(const Team& team, const FusionBuffers& b, int64_t r) {
    using A = typename Acc<T>::type;
    constexpr int P = Team::kPack;
    const int C = b.channels;
    const RowIndex ix(r, b.pixels);
    const T* z = cptr<T>(b.z) + ix.row * C;
    const T* b2 = cptr<T>(b.b2);
    const T* s = cptr<T>(b.x[ix.d]) + ix.pixel * C;
    const T* kn = cptr<T>(b.k_noise) + ix.d * C;
    T* e = mptr<T>(b.e) + ix.row * C;

    A top = -static_cast<A>(INFINITY);
    GK_SIMD_MAX(top)
    for (int c = P * team.first(); c < C; c += P * team.stride()) {
      const Pack<T, P> zc = load_pack<P>(z + c), bias = load_pack<P>(b2 + c);
      GK_UNROLL
      for (int i = 0; i < P; ++i) top = max_(top, value<A>(zc, i) + value<A>(bias, i));
    }
    top = team.max(top);
    A total = 0;
    GK_SIMD_SUM(total)
    for (int c = P * team.first(); c < C; c += P * team.stride()) {
      const Pack<T, P> zc = load_pack<P>(z + c), bias = load_pack<P>(b2 + c);
      Pack<T, P> parked;
      GK_UNROLL
      for (int i = 0; i < P; ++i) {
        const A p = exp_(value<A>(zc, i) + value<A>(bias, i) - top);
        set_value(parked, i, p);
        total += p;
      }
      if constexpr (stores_accumulator<T>()) store_pack(e + c, parked);  // to spare the second exp below
    }
    total = team.sum(total);
    const A inv_total = A(1) / total;
    GK_SIMD
    for (int c = P * team.first(); c < C; c += P * team.stride()) {
      const Pack<T, P> noise = load_pack<P>(kn + c), self = load_pack<P>(s + c);
      Pack<T, P> parked, zc, bias;
      if constexpr (stores_accumulator<T>()) {
        parked = load_pack<P>(e + c);
      } else {
        zc = load_pack<P>(z + c);
        bias = load_pack<P>(b2 + c);
      }
      Pack<T, P> delta;
      GK_UNROLL
      for (int i = 0; i < P; ++i) {
        const A p = stores_accumulator<T>() ? value<A>(parked, i) : exp_(value<A>(zc, i) + value<A>(bias, i) - top);
        set_value(delta, i, key_delta(value<A>(noise, i), value<A>(self, i), p * inv_total));
      }
      store_pack(e + c, delta);
    }
    if (b.lse != nullptr && team.leader()) mptr<A>(b.lse)[ix.row] = top + log_(total);
  }
};

// Per head: a = sigmoid(q . dk); mixed = v_cross + a * (v_self - v_cross); y = s + bo.
struct MixForward {
  static constexpr Access kReads[] = {{Buffer::G0, kAttentionColumns}, {Buffer::G1, kAttentionColumns}, {Buffer::Dk},
                                     {Buffer::X0}, {Buffer::X1}};
  static constexpr Access kWrites[] = {{Buffer::Gate}, {Buffer::Mixed}, {Buffer::Y0}, {Buffer::Y1}};
  GK_HD_TEMPLATE
  template <class Team, class T, int kHeadWidth = 0>
  GK_HD static void run(const Team& team, const FusionBuffers& b, int64_t r) {
    using A = typename Acc<T>::type;
    constexpr int P = Team::kPack;
    const int C = b.channels;
    const int width = kHeadWidth > 0 ? kHeadWidth : C / b.heads;
    const A scale = static_cast<A>(b.scale);
    const RowIndex ix(r, b.pixels);
    const GRow<const T> g(b.g[ix.d], b.g[ix.other], ix.pixel, C);
    const T* q_raw = g.query_raw;
    const T* v_self = g.value_self;    // Wv_d s
    const T* v_other = g.value_other;  // Wv_d o
    const T* dk = cptr<T>(b.dk) + ix.row * C;
    const T* s = cptr<T>(b.x[ix.d]) + ix.pixel * C;
    const T* bq = cptr<T>(b.bq) + ix.d * C;
    const T* bv = cptr<T>(b.bv) + ix.d * C;
    const T* bo = cptr<T>(b.bo) + ix.d * C;
    const T* vn = cptr<T>(b.vn_proj) + ix.d * C;
    T* mixed = mptr<T>(b.mixed) + ix.row * C;
    T* y = mptr<T>(b.y[ix.d]) + ix.pixel * C;
    A* gate = mptr<A>(b.gate) + ix.row * b.heads;

    // The logits of all heads, then their gates, then the mix: on the host the exp and the division
    // of one head's gate then overlap with the other heads' instead of stalling each head's mix.
    for (int j = 0; j < b.heads; ++j) {
      const int lo = j * width, hi = lo + width;
      A logit = 0;
      GK_SIMD_SUM(logit)
      for (int c = lo + P * team.first(); c < hi; c += P * team.stride()) {
        const Pack<T, P> q = load_pack<P>(q_raw + c), bias = load_pack<P>(bq + c), key = load_pack<P>(dk + c);
        GK_UNROLL
        for (int i = 0; i < P; ++i) logit += mul_rn((value<A>(q, i) + value<A>(bias, i)) * scale, value<A>(key, i));
      }
      logit = team.sum(logit);
      if (team.leader()) gate[j] = logit;
    }
    team.sync();
    GK_SIMD
    for (int j = team.first(); j < b.heads; j += team.stride()) gate[j] = two_way_softmax(gate[j]);
    team.sync();
    for (int j = 0; j < b.heads; ++j) {
      const int lo = j * width, hi = lo + width;
      const A a = gate[j];
      GK_SIMD
      for (int c = lo + P * team.first(); c < hi; c += P * team.stride()) {
        const Pack<T, P> other = load_pack<P>(v_other + c), self = load_pack<P>(v_self + c),
                         value_bias = load_pack<P>(bv + c), noise = load_pack<P>(vn + c), x = load_pack<P>(s + c),
                         out_bias = load_pack<P>(bo + c);
        Pack<T, P> mix, out;
        GK_UNROLL
        for (int i = 0; i < P; ++i) {
          const A vo = value<A>(other, i);
          const A v_cross = vo + value<A>(value_bias, i);
          const A v_delta = value<A>(noise, i) + value<A>(self, i) - vo;
          set_value(mix, i, value_mix(v_cross, v_delta, a));
          set_value(out, i, value<A>(x, i) + value<A>(out_bias, i));
        }
        store_pack(mixed + c, mix);
        store_pack(y + c, out);
      }
    }
  }
};

// ---- backward stages --------------------------------------------------------------------------

// From d/d mixed and the saved gates: the recomputed mixed (for d/dWo), d/d dk, and the gradients
// of the query and value columns of g. In place: mixed over grad_mixed, grad_dk over dk, grad_g
// over g (each pack read before it is written).
struct MixBackward {
  static constexpr Access kReads[] = {{Buffer::G0, kAttentionColumns}, {Buffer::G1, kAttentionColumns}, {Buffer::Dk},
                                     {Buffer::GradMixed}, {Buffer::Gate}};
  static constexpr Access kWrites[] = {{Buffer::Mixed}, {Buffer::GradDk}, {Buffer::GradG0, kAttentionColumns},
                                      {Buffer::GradG1, kAttentionColumns}};
  GK_HD_TEMPLATE
  template <class Team, class T, int kHeadWidth = 0>
  GK_HD static void run(const Team& team, const FusionBuffers& b, int64_t r) {
    using A = typename Acc<T>::type;
    constexpr int P = Team::kPack;
    const int C = b.channels;
    const int width = kHeadWidth > 0 ? kHeadWidth : C / b.heads;
    const A scale = static_cast<A>(b.scale);
    const RowIndex ix(r, b.pixels);
    const GRow<const T> g(b.g[ix.d], b.g[ix.other], ix.pixel, C);
    const GRow<T> grad(b.grad_g[ix.d], b.grad_g[ix.other], ix.pixel, C);
    const T* q_raw = g.query_raw;
    const T* v_self = g.value_self;
    const T* v_other = g.value_other;
    const T* dk = cptr<T>(b.dk) + ix.row * C;
    const T* bq = cptr<T>(b.bq) + ix.d * C;
    const T* bv = cptr<T>(b.bv) + ix.d * C;
    const T* vn = cptr<T>(b.vn_proj) + ix.d * C;
    const T* grad_mixed = cptr<T>(b.grad_mixed) + ix.row * C;
    const A* gate = cptr<A>(b.gate) + ix.row * b.heads;
    T* mixed = mptr<T>(b.mixed) + ix.row * C;
    T* grad_dk = mptr<T>(b.grad_dk) + ix.row * C;
    T* grad_q_raw = grad.query_raw;
    T* grad_v_self = grad.value_self;
    T* grad_v_other = grad.value_other;

    for (int j = 0; j < b.heads; ++j) {
      const int lo = j * width, hi = lo + width;
      const A a = gate[j];
      A grad_a = 0;
      GK_SIMD_SUM(grad_a)
      for (int c = lo + P * team.first(); c < hi; c += P * team.stride()) {
        const Pack<T, P> noise = load_pack<P>(vn + c), self = load_pack<P>(v_self + c),
                         other = load_pack<P>(v_other + c), gm = load_pack<P>(grad_mixed + c);
        GK_UNROLL
        for (int i = 0; i < P; ++i)
          grad_a += value<A>(gm, i) * (value<A>(noise, i) + value<A>(self, i) - value<A>(other, i));
      }
      const A grad_logit = team.sum(grad_a) * two_way_softmax_grad(a);
      GK_SIMD
      for (int c = lo + P * team.first(); c < hi; c += P * team.stride()) {
        const Pack<T, P> other = load_pack<P>(v_other + c), self = load_pack<P>(v_self + c),
                         query = load_pack<P>(q_raw + c), query_bias = load_pack<P>(bq + c),
                         key = load_pack<P>(dk + c), gm = load_pack<P>(grad_mixed + c),
                         value_bias = load_pack<P>(bv + c), noise = load_pack<P>(vn + c);
        Pack<T, P> mix, g_key, g_query, g_self, g_other;
        GK_UNROLL
        for (int i = 0; i < P; ++i) {
          const A vo = value<A>(other, i);
          const A q = (value<A>(query, i) + value<A>(query_bias, i)) * scale;
          const A grad_out = value<A>(gm, i);
          const A v_cross = vo + value<A>(value_bias, i);
          const A v_delta = value<A>(noise, i) + value<A>(self, i) - vo;
          set_value(mix, i, value_mix(v_cross, v_delta, a));
          set_value(g_key, i, grad_logit * q);
          set_value(g_query, i, grad_logit * value<A>(key, i) * scale);
          set_value(g_self, i, a * grad_out);             // v_delta carries +Wv s
          set_value(g_other, i, (A(1) - a) * grad_out);  // v_cross +Wv o, v_delta -Wv o
        }
        store_pack(mixed + c, mix);
        store_pack(grad_dk + c, g_key);
        store_pack(grad_q_raw + c, g_query);
        store_pack(grad_v_self + c, g_self);
        store_pack(grad_v_other + c, g_other);
      }
    }
  }
};

// From d/de: d/dz of the relation softmax (written over z) and the elementwise part of d/dx_d,
// which is the residual's grad_y plus d/de * (1 - r). In place: grad_x over grad_e.
struct RelationBackward {
  static constexpr Access kReads[] = {{Buffer::Z},      {Buffer::Lse},    {Buffer::X0},     {Buffer::X1},
                                     {Buffer::GradE0}, {Buffer::GradE1}, {Buffer::GradY0}, {Buffer::GradY1}};
  // d/dz over z: the chain gives GradZ the storage of Z
  static constexpr Access kWrites[] = {{Buffer::GradZ}, {Buffer::GradX0}, {Buffer::GradX1}};
  GK_HD_TEMPLATE
  template <class Team, class T>
  GK_HD static void run(const Team& team, const FusionBuffers& b, int64_t r) {
    using A = typename Acc<T>::type;
    constexpr int P = Team::kPack;
    const int C = b.channels;
    const RowIndex ix(r, b.pixels);
    T* z = mptr<T>(b.z) + ix.row * C;  // in: z; out: d/dz
    const T* b2 = cptr<T>(b.b2);
    const T* s = cptr<T>(b.x[ix.d]) + ix.pixel * C;
    const T* grad_e = cptr<T>(b.grad_e[ix.d]) + ix.pixel * C;
    const T* grad_y = cptr<T>(b.grad_y[ix.d]) + ix.pixel * C;
    T* grad_x = mptr<T>(b.grad_x[ix.d]) + ix.pixel * C;
    const A lse = cptr<A>(b.lse)[ix.row];

    // d/dr_c = -d/de_c * s_c; the softmax backward needs sum_c r_c d/dr_c.
    A dot = 0;
    GK_SIMD_SUM(dot)
    for (int c = P * team.first(); c < C; c += P * team.stride()) {
      const Pack<T, P> zc = load_pack<P>(z + c), bias = load_pack<P>(b2 + c);
      A rel[P];
      Pack<T, P> parked;
      GK_UNROLL
      for (int i = 0; i < P; ++i) {
        rel[i] = exp_(value<A>(zc, i) + value<A>(bias, i) - lse);
        set_value(parked, i, rel[i]);
      }
      if constexpr (stores_accumulator<T>()) store_pack(z + c, parked);  // to spare the second exp below
      // (grad_e and s loaded after the exps: loaded with z, they stay live across the exps, and ptxas
      // spilled the float64 stage)
      const Pack<T, P> ge = load_pack<P>(grad_e + c), self = load_pack<P>(s + c);
      GK_UNROLL
      for (int i = 0; i < P; ++i) {
        // The very grad_rel of the loop below, rounded alike: where the softmax saturates (rel = 1 on
        // one channel), grad_rel - dot must cancel exactly, as it does in the oracle.
        const A grad_rel = -mul_rn(value<A>(ge, i), value<A>(self, i));
        dot += mul_rn(rel[i], grad_rel);
      }
    }
    dot = team.sum(dot);
    GK_SIMD
    for (int c = P * team.first(); c < C; c += P * team.stride()) {
      const Pack<T, P> zc = load_pack<P>(z + c), ge = load_pack<P>(grad_e + c), self = load_pack<P>(s + c),
                       gy = load_pack<P>(grad_y + c);
      Pack<T, P> bias;
      if constexpr (!stores_accumulator<T>()) bias = load_pack<P>(b2 + c);
      Pack<T, P> grad_z, gx;
      GK_UNROLL
      for (int i = 0; i < P; ++i) {
        const A rel = stores_accumulator<T>() ? value<A>(zc, i) : exp_(value<A>(zc, i) + value<A>(bias, i) - lse);
        const A g = value<A>(ge, i);
        const A grad_rel = -mul_rn(g, value<A>(self, i));
        set_value(grad_z, i, rel * (grad_rel - dot));
        set_value(gx, i, value<A>(gy, i) + g * key_delta_ds(rel));
      }
      store_pack(z + c, grad_z);
      store_pack(grad_x + c, gx);
    }
  }
};

// d/du = d/dhidden * GELU'(u), written to both g columns that feed u (see FusionBuffers). In
// place: grad_g over g.
struct HiddenBackward {
  static constexpr Access kReads[] = {{Buffer::G0, kFc1Columns}, {Buffer::G1, kFc1Columns}, {Buffer::GradHidden}};
  static constexpr Access kWrites[] = {{Buffer::GradG0, kFc1Columns}, {Buffer::GradG1, kFc1Columns}};
  GK_HD_TEMPLATE
  template <class Team, class T>
  GK_HD static void run(const Team& team, const FusionBuffers& b, int64_t r) {
    using A = typename Acc<T>::type;
    constexpr int P = Team::kPack;
    const int C = b.channels;
    const RowIndex ix(r, b.pixels);
    const GRow<const T> g(b.g[ix.d], b.g[ix.other], ix.pixel, C);
    const GRow<T> grad(b.grad_g[ix.d], b.grad_g[ix.other], ix.pixel, C);
    const T* b1 = cptr<T>(b.b1);
    const T* grad_hidden = cptr<T>(b.grad_hidden) + ix.row * C;
    for (int c = P * team.first(); c < C; c += P * team.stride()) {
      const Pack<T, P> self = load_pack<P>(g.fc1_self + c), other = load_pack<P>(g.fc1_other + c),
                       bias = load_pack<P>(b1 + c), gh = load_pack<P>(grad_hidden + c);
      Pack<T, P> grad_u;
      GK_UNROLL
      for (int i = 0; i < P; ++i) {
        const A u = value<A>(self, i) + value<A>(other, i) + value<A>(bias, i);
        set_value(grad_u, i, value<A>(gh, i) * gelu_grad(u));
      }
      store_pack(grad.fc1_self + c, grad_u);
      store_pack(grad.fc1_other + c, grad_u);
    }
  }
};

// Whether a stage walks the row one head at a time (the mix stages): the host instantiates those per
// head width (fusion_host.cpp), the CUDA launcher sizes their lane groups by the head (fusion_kernels.cu).
template <class StageT>
constexpr bool walks_heads() {
  return std::is_same_v<StageT, MixForward> || std::is_same_v<StageT, MixBackward>;
}

}  // namespace gk
