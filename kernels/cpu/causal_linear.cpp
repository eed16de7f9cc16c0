// Causal linear attention on the CPU: y_i = sum_{j <= i} (q_i . k_j) v_j + q_i^T S0, forward and backward.
//
// The forward runs the recurrence token by token, with the m x e state held in registers a block at a time
// (see "Forward, token-major" below): exactly the 4 m e multiply-adds per token the sum needs, inputs and
// outputs read and written row by row as they lie in memory.
//
// The backward splits the work into chunks of C tokens per (batch, head). Inside a chunk everything lives in
// small fp32 (fp64 for double inputs) buffers that fit in L1/L2; across chunks only the m x e state is carried,
// so memory is O(n) and no n x m x e tensor ever exists. Its chunk buffers are stored transposed
// ("feature-major", token index fastest) so that every product is C += A * B where B's rows are contiguous
// vectors of length C (the chunk) or m_pad (the feature size rounded up to 16). A is read one scalar at a time
// (broadcast) with arbitrary strides, so the odd sizes (e = d_v + 1 because of the normaliser column) only
// appear as row counts, never as vector widths: no lane is wasted on them.

// Only the ATen headers it needs and no pybind11: the first-use build takes seconds, not a minute.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMR = 6;  // 6 rows x 4 vectors = 24 accumulators of the 32 zmm registers
constexpr int kNV = 4;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kMR = 6;  // 6 x 2 = 12 accumulators of the 16 ymm registers
constexpr int kNV = 2;
#else
constexpr int kVecBytes = 16;
constexpr int kMR = 4;
constexpr int kNV = 2;
#endif

template <typename T>
struct Vec {
  static constexpr int W = kVecBytes / static_cast<int>(sizeof(T));
  // aligned(sizeof(T)): loads and stores may be unaligned.
  typedef T type __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
};

constexpr int kPad = 16;  // feature sizes are rounded up to this (a multiple of every vector width)

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// C[MR x NV*W] += A[MR x K] * B[K x NV*W]; A(i, k) = A[i * rsa + k * csa], B row k at B + k * ldb.
template <typename T, int MR, int NV>
inline void tile(int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B, int64_t ldb, T* C,
                 int64_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = *reinterpret_cast<const V*>(C + i * ldc + v * W);
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V*>(B + k * ldb + v * W);
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * rsa + k * csa];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(C + i * ldc + v * W) = acc[i][v];
}

template <typename T, int NV>
inline void rows(int64_t M, int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B, int64_t ldb, T* C,
                 int64_t ldc) {
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) tile<T, kMR, NV>(K, A + i * rsa, rsa, csa, B, ldb, C + i * ldc, ldc);
  const int64_t rest = M - i;
  A += i * rsa;
  C += i * ldc;
  // The remainder rows, one small fixed-size tile each (kMR <= 6).
  switch (rest) {
    case 5: tile<T, (5 < kMR ? 5 : 1), NV>(K, A, rsa, csa, B, ldb, C, ldc); break;
    case 4: tile<T, (4 < kMR ? 4 : 1), NV>(K, A, rsa, csa, B, ldb, C, ldc); break;
    case 3: tile<T, 3, NV>(K, A, rsa, csa, B, ldb, C, ldc); break;
    case 2: tile<T, 2, NV>(K, A, rsa, csa, B, ldb, C, ldc); break;
    case 1: tile<T, 1, NV>(K, A, rsa, csa, B, ldb, C, ldc); break;
    default: break;
  }
}

enum class KRange { kFull, kUpTo, kFrom };

// C[M x N] += A[M x K] * B[K x N], N a multiple of the vector width. With kUpTo, B(k, n) is known to be
// zero for k > n (lower-triangular-free columns), so each column block stops at its last column; with
// kFrom, B(k, n) is zero for k < n, so each column block starts at its first column.
template <typename T>
void gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B, int64_t ldb,
              T* C, int64_t ldc, KRange range, int64_t block) {
  constexpr int W = Vec<T>::W;
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t nb = std::min(block, N - n0);
    int64_t k0 = 0, k1 = K;
    if (range == KRange::kUpTo) k1 = std::min(K, n0 + nb);
    if (range == KRange::kFrom) k0 = std::min(K, n0);
    if (k1 <= k0) continue;
    const T* a = A + k0 * csa;
    const T* b = B + k0 * ldb + n0;
    T* c = C + n0;
    int64_t done = 0;
    for (; done + kNV * W <= nb; done += kNV * W) rows<T, kNV>(M, k1 - k0, a, rsa, csa, b + done, ldb, c + done, ldc);
    for (; done < nb; done += W) rows<T, 1>(M, k1 - k0, a, rsa, csa, b + done, ldb, c + done, ldc);
  }
}

// Keep X(r, c) only where c >= r (keep_upper) or c <= r (otherwise); X is C x C, row stride C.
template <typename T>
void mask_square(T* X, int64_t C, bool keep_upper) {
  for (int64_t r = 0; r < C; ++r) {
    T* row = X + r * C;
    if (keep_upper)
      std::fill(row, row + r, T(0));
    else
      std::fill(row + r + 1, row + C, T(0));
  }
}

#if defined(__AVX__)
// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block of floats, in registers: the element-wise transposes
// below were a third of the causal forward's time (a strided gather per element).
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
// Rows r < 8 of d (stride ld) times s[r].
inline void scale_rows8(float* d, int64_t ld, const float* s) {
  for (int64_t r = 0; r < 8; ++r) _mm256_storeu_ps(d + r * ld, _mm256_mul_ps(_mm256_loadu_ps(d + r * ld), _mm256_set1_ps(s[r])));
}
constexpr bool kTranspose8 = true;
#else
inline void transpose8(const float*, int64_t, float*, int64_t) {}
inline void scale_rows8(float*, int64_t, const float*) {}
constexpr bool kTranspose8 = false;
#endif

// Copy rows [t0, t0 + L) of a (n, w) matrix into dst, transposed to (w, C) (token index fastest).
template <typename In, typename T>
void load_t(const In* src, int64_t t0, int64_t L, int64_t w, T* dst, int64_t C) {
  int64_t f8 = 0, i8 = 0;  // [0, f8) x [0, i8) goes by 8 x 8 blocks, the rest element by element
  if constexpr (kTranspose8 && std::is_same_v<In, float> && std::is_same_v<T, float>) {
    f8 = w / 8 * 8;
    i8 = L / 8 * 8;
    for (int64_t f = 0; f < f8; f += 8)
      for (int64_t i = 0; i < i8; i += 8) transpose8(src + (t0 + i) * w + f, w, dst + f * C + i, C);
  }
  for (int64_t f = 0; f < w; ++f) {
    T* d = dst + f * C;
    for (int64_t i = f < f8 ? i8 : 0; i < L; ++i) d[i] = static_cast<T>(src[(t0 + i) * w + f]);
    std::fill(d + L, d + C, T(0));
  }
}

// Copy rows [t0, t0 + L) of a (n, w) matrix into dst as (C, wp), zero padded.
template <typename In, typename T>
void load_rows(const In* src, int64_t t0, int64_t L, int64_t w, T* dst, int64_t C, int64_t wp) {
  std::fill(dst, dst + C * wp, T(0));
  for (int64_t i = 0; i < L; ++i) {
    const In* s = src + (t0 + i) * w;
    T* d = dst + i * wp;
    for (int64_t f = 0; f < w; ++f) d[f] = static_cast<T>(s[f]);
  }
}

// dst rows [t0, t0 + L) of a (n, w) matrix = transpose of the (w, C) buffer, each row times scale[i] when
// scale is given.
template <typename Out, typename T>
void store_t(const T* buf, int64_t t0, int64_t L, int64_t w, Out* dst, int64_t C, const T* scale = nullptr) {
  int64_t f8 = 0, i8 = 0;
  if constexpr (kTranspose8 && std::is_same_v<Out, float> && std::is_same_v<T, float>) {
    f8 = w / 8 * 8;
    i8 = L / 8 * 8;
    for (int64_t f = 0; f < f8; f += 8)
      for (int64_t i = 0; i < i8; i += 8) {
        float* d = dst + (t0 + i) * w + f;
        transpose8(buf + f * C + i, C, d, w);
        if (scale) scale_rows8(d, w, scale + i);
      }
  }
  for (int64_t i = 0; i < L; ++i) {
    Out* d = dst + (t0 + i) * w;
    const T s = scale ? scale[i] : T(1);
    for (int64_t f = i < i8 ? f8 : 0; f < w; ++f) d[f] = static_cast<Out>(scale ? buf[f * C + i] * s : buf[f * C + i]);
  }
}

template <typename T>
struct Buffer {
  std::vector<T> data;
  explicit Buffer(int64_t size) : data(size + 64 / sizeof(T)) {}
  T* get() {  // 64-byte aligned start
    auto p = reinterpret_cast<std::uintptr_t>(data.data());
    return reinterpret_cast<T*>((p + 63) & ~std::uintptr_t(63));
  }
};

// ---------------------------------------------------------------------------------------------------------
// Built-in feature maps applied to the chunk buffers as they are loaded (the fused path): phi(q), phi(k)
// never exist at full size, and the backward recomputes them. 1 = elu(x) + 1, 2 = relu(x); 0 = the inputs
// are features already. Both maps have phi'(x) as a function of phi(x): elu + 1 gives min(phi, 1) (phi > 1
// exactly when x > 0, and phi = exp(x) = phi'(x) below), relu gives [phi > 0].
enum Feature : int64_t { kGiven = 0, kElu = 1, kRelu = 2 };

using VF = Vec<float>::type;
typedef int32_t VI __attribute__((vector_size(kVecBytes), aligned(4)));

inline VF splat(float x) { return VF{} + x; }

// exp(x) for float lanes: exp(r) * 2^n with x = n ln2 + r, |r| <= ln2 / 2, a degree-6 Taylor polynomial
// (relative error ~1e-7). Inputs below -87 give exp(-87) ~ 1.6e-38 instead of a denormal. x <= 0 here.
inline VF vexp_nonpositive(VF x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const VF t = x * splat(1.44269504088896341f);
  const VI n = __builtin_convertvector(t - splat(0.5f), VI);  // round to nearest for t <= 0
  const VF nf = __builtin_convertvector(n, VF);
  const VF r = (x - nf * splat(0.693145751953125f)) - nf * splat(1.428606765330187e-6f);
  VF p = splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const VI bits = (n + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline T phi_scalar(T x, int64_t feature) {
  if (x != x) return x;  // NaN stays NaN
  if (feature == kElu) return x > T(0) ? x + T(1) : std::exp(x);
  return x > T(0) ? x : T(0);
}

template <typename T>
inline T dphi_scalar(T phi, int64_t feature) {
  if (feature == kElu) return phi > T(1) ? T(1) : phi;
  return phi > T(0) ? T(1) : T(0);
}

#if defined(__AVX512F__)
// elu(x) + 1 on 16 lanes with the AVX-512 rounding and scaling instructions: about half the instructions of
// vexp_nonpositive plus its selects (the feature map is a sixth of the causal forward). The same reduction and
// polynomial, so the same values up to rounding. NaN stays NaN: vmaxps returns its second operand when either
// is NaN, and NaN then runs through every step.
inline __m512 elu1_avx512(__m512 x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(1.428606765330187e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 ex = _mm512_scalef_ps(p, nf);  // exp(x) for x <= 0; the lanes x > 0 are replaced below
  const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mask_add_ps(ex, pos, x, _mm512_set1_ps(1.0f));
}
#endif

// phi on one vector of floats.
inline VF phi_vec(VF v, int64_t feature) {
  const VF zero{};
  if (feature != kElu) {
    const VF y = v > zero ? v : zero;
    return v != v ? v : y;
  }
#if defined(__AVX512F__)
  return reinterpret_cast<VF>(elu1_avx512(reinterpret_cast<__m512>(v)));
#else
  const VF y = v > zero ? v + splat(1.0f) : vexp_nonpositive(v < zero ? v : zero);
  return v != v ? v : y;
#endif
}

// x[0, len) = phi(x[0, len)).
template <typename T>
void apply_phi(T* x, int64_t len, int64_t feature) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int W = Vec<float>::W;
    for (; i + W <= len; i += W)
      *reinterpret_cast<VF*>(x + i) = phi_vec(*reinterpret_cast<const VF*>(x + i), feature);
  }
  for (; i < len; ++i) x[i] = phi_scalar(x[i], feature);
}

// g[0, len) *= phi'(x) given phi[0, len) = phi(x).
template <typename T>
void apply_dphi(T* g, const T* phi, int64_t len, int64_t feature) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {  // the same selects as dphi_scalar, a vector at a time
    constexpr int W = Vec<float>::W;
    const VF zero{}, one = splat(1.0f);
    for (; i + W <= len; i += W) {
      const VF p = *reinterpret_cast<const VF*>(phi + i);
      const VF d = feature == kElu ? (p > one ? one : p) : (p > zero ? one : zero);
      *reinterpret_cast<VF*>(g + i) *= d;
    }
  }
  for (; i < len; ++i) g[i] *= dphi_scalar(phi[i], feature);
}

// dst (cols x ldd) = transpose of src (rows x lds), the first rows x cols block; 8 x 8 blocks in registers
// where it can.
template <typename T>
void transpose_buf(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  int64_t r8 = 0, c8 = 0;
  if constexpr (kTranspose8 && std::is_same_v<T, float>) {
    r8 = rows / 8 * 8;
    c8 = cols / 8 * 8;
    for (int64_t r = 0; r < r8; r += 8)
      for (int64_t c = 0; c < c8; c += 8) transpose8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Rows of padded keys (key_ok false) get zero features: they add nothing to any sum. rows: (C, mp).
template <typename T>
void zero_padded_rows(T* rows, int64_t t0, int64_t L, int64_t m, int64_t mp, const bool* key_ok) {
  if (!key_ok) return;
  for (int64_t i = 0; i < L; ++i)
    if (!key_ok[t0 + i]) std::fill(rows + i * mp, rows + i * mp + m, T(0));
}

// The normalised variant: v comes without the normaliser column (width d = e - 1); the kernel appends a
// column of ones while loading, and divides by it while storing: out = num / (den + eps). The backward
// turns grad_out into the gradient of (num, den) on the fly, so no (n, e) tensor is ever built.
template <typename In>
using Acc = std::conditional_t<std::is_same_v<In, double>, double, float>;

template <typename In>
struct Norm {
  bool on = false;
  double eps = 0;
  Acc<In>* den_out = nullptr;    // forward: (n) denominators, in the accumulation dtype, for the backward
  const Acc<In>* den = nullptr;  // backward: the saved denominators
  const In* out = nullptr;       // backward: the forward's normalised output (n, d)
};

// Vt (e x C) from v: plain, or (n, e - 1) plus a row of ones for the real tokens.
template <typename In, typename T>
void load_v(const In* v, int64_t t0, int64_t L, int64_t e, T* Vt, int64_t C, bool append_ones) {
  if (!append_ones) return load_t(v, t0, L, e, Vt, C);
  load_t(v, t0, L, e - 1, Vt, C);
  T* ones = Vt + (e - 1) * C;
  std::fill(ones, ones + L, T(1));
  std::fill(ones + L, ones + C, T(0));
}

// Gt (e x C), the gradient of the unnormalised output, from grad_out: d num = g / (den + eps) and
// d den = -(g . out) / (den + eps).
template <typename In, typename T>
void load_g(const In* gy, int64_t t0, int64_t L, int64_t e, T* Gt, int64_t C, const Norm<In>& nrm) {
  if (!nrm.on) return load_t(gy, t0, L, e, Gt, C);
  const int64_t d = e - 1;
  load_t(gy, t0, L, d, Gt, C);
  T* gden = Gt + d * C;
  thread_local std::vector<T> inv;
  inv.resize(L);
  for (int64_t i = 0; i < L; ++i) {  // rows of grad_out and out are contiguous: the dot products go by rows
    inv[i] = T(1) / (static_cast<T>(nrm.den[t0 + i]) + static_cast<T>(nrm.eps));
    const In* o = nrm.out + (t0 + i) * d;
    const In* g = gy + (t0 + i) * d;
    T dot = 0;
    for (int64_t f = 0; f < d; ++f) dot += static_cast<T>(g[f]) * static_cast<T>(o[f]);
    gden[i] = -dot * inv[i];
  }
  for (int64_t f = 0; f < d; ++f)
    for (int64_t i = 0; i < L; ++i) Gt[f * C + i] *= inv[i];
  std::fill(gden + L, gden + C, T(0));
}

// ---------------------------------------------------------------------------------------------------------
// Forward, token-major: the recurrence itself, S_i = S_{i-1} + phi(k_i) v_i^T and y_i = phi(q_i)^T S_i, with
// S (m x d) held in registers a block of rows at a time. For each block of R state rows and NV vectors of
// value columns, one sweep over a chunk's tokens does
//     s[r] += k_i[p0 + r] * v_i        (the block of S_i)
//     y_i  += q_i[p0 + r] * s[r]       (that block's share of the output row)
// so every multiply-add is one of the 2 m d per token the recurrence needs: no masked square inside a chunk
// (which costs C (m + d) / 2 more per token), no transposes, and each token's row of v, y, phi(q), phi(k) is
// read as it lies in memory. The chunk only keeps those rows in L1/L2 while the blocks cycle over them. The
// normaliser den_i = phi(q_i) . z_i (z_i the running key sum) is a dot product per token along the features.
// A non-finite key or value reaches S only from its own token on, so it spoils exactly the rows that see it.

// Rows [t0, t0 + L) of a (n, w) matrix into dst (L x ld) with phi applied (kGiven: copied), the columns
// [w, ld) zero.
template <typename In, typename T>
void load_rows_phi(const In* src, int64_t t0, int64_t L, int64_t w, T* dst, int64_t ld, int64_t feature) {
  for (int64_t i = 0; i < L; ++i) {
    const In* s = src + (t0 + i) * w;
    T* d = dst + i * ld;
    int64_t f = 0;
    if constexpr (std::is_same_v<In, float> && std::is_same_v<T, float>) {
      constexpr int W = Vec<float>::W;
      if (feature != kGiven)  // phi on the way in: one pass over the row
        for (; f + W <= w; f += W) *reinterpret_cast<VF*>(d + f) = phi_vec(*reinterpret_cast<const VF*>(s + f), feature);
    }
    if constexpr (std::is_same_v<In, T>) {
      if (f < w) std::memcpy(d + f, s + f, sizeof(T) * (w - f));
    } else {
      for (int64_t c = f; c < w; ++c) d[c] = static_cast<T>(s[c]);
    }
    if (feature != kGiven) apply_phi(d + f, w - f, feature);
    std::fill(d + w, d + ld, T(0));
  }
}

// Issues software prefetches (to L2) for the next chunk's input rows, one 64-byte line per step(), so that the
// reads from memory overlap the arithmetic of this chunk instead of stalling the next chunk's loads.
struct Prefetch {
  const char* begin[3];
  const char* end[3];
  int count = 0, at = 0;
  const char* cur = nullptr;
  void add(const void* p, int64_t bytes) {
    if (bytes <= 0) return;
    begin[count] = static_cast<const char*>(p);
    end[count] = begin[count] + bytes;
    if (count++ == 0) cur = begin[0];
  }
  inline void step() {
    if (at == count) return;
    __builtin_prefetch(cur, 0, 2);
    cur += 64;
    if (cur >= end[at] && ++at < count) cur = begin[at];
  }
};

// One block of the recurrence over L tokens: rows [p0, p0 + R) of S (S points at S(p0, f0), row stride lds),
// value columns [f0, f0 + NV W). Qc, Kc point at feature p0 of the chunk's rows (stride ldf); Vc, Y at column
// f0 of its value and partial-output rows (stride ldv). First: the output rows start from zero. Last: the
// finished rows, times scale[i] (when given), go to O (row stride ldo) instead of Y.
template <typename T, int R, int NV, bool First, bool Last>
inline void recurrent_block(int64_t L, const T* Qc, const T* Kc, int64_t ldf, const T* Vc, T* Y, int64_t ldv, T* S,
                            int64_t lds, T* O, int64_t ldo, const T* scale, Prefetch& pf) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V s[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) s[r][v] = *reinterpret_cast<const V*>(S + r * lds + v * W);
  for (int64_t t = 0; t < L; ++t) {
    const T* kt = Kc + t * ldf;
    const T* qt = Qc + t * ldf;
    V x[NV], y[NV];
    for (int v = 0; v < NV; ++v) x[v] = *reinterpret_cast<const V*>(Vc + t * ldv + v * W);
    for (int r = 0; r < R; ++r) {
      const T a = kt[r];
      for (int v = 0; v < NV; ++v) s[r][v] += a * x[v];
    }
    for (int v = 0; v < NV; ++v) y[v] = First ? V{} : *reinterpret_cast<const V*>(Y + t * ldv + v * W);
    for (int r = 0; r < R; ++r) {
      const T a = qt[r];
      for (int v = 0; v < NV; ++v) y[v] += a * s[r][v];
    }
    if constexpr (Last) {
      const T c = scale ? scale[t] : T(1);
      for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(O + t * ldo + v * W) = y[v] * c;
    } else {
      for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(Y + t * ldv + v * W) = y[v];
    }
    pf.step();
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(S + r * lds + v * W) = s[r][v];
}

#if defined(__AVX512F__)
constexpr int kRR = 4, kRNV = 4;  // 16 accumulators + 4 value + 4 output vectors of the 32 registers
#else
constexpr int kRR = 4, kRNV = 2;  // 8 + 2 + 2 of 16
#endif

template <typename T>
struct ChunkRows {
  const T *q, *k, *v;
  T* y;
  int64_t ldf, ldv;
  T* out;  // where the finished rows go (the output tensor, or y itself to be converted after)
  int64_t ldo;
  const T* scale;
};

template <typename T, int R, int NV>
inline void block_at(bool first, bool last, int64_t L, const ChunkRows<T>& c, int64_t p, int64_t f0, T* S,
                     int64_t lds, Prefetch& pf) {
  const T *q = c.q + p, *k = c.k + p, *v = c.v + f0;
  T *y = c.y + f0, *s = S + p * lds + f0, *o = c.out + f0;
  if (first && last) recurrent_block<T, R, NV, true, true>(L, q, k, c.ldf, v, y, c.ldv, s, lds, o, c.ldo, c.scale, pf);
  else if (first) recurrent_block<T, R, NV, true, false>(L, q, k, c.ldf, v, y, c.ldv, s, lds, o, c.ldo, c.scale, pf);
  else if (last) recurrent_block<T, R, NV, false, true>(L, q, k, c.ldf, v, y, c.ldv, s, lds, o, c.ldo, c.scale, pf);
  else recurrent_block<T, R, NV, false, false>(L, q, k, c.ldf, v, y, c.ldv, s, lds, o, c.ldo, c.scale, pf);
}

// All rows [0, m) of S (m >= 1) for the value columns [f0, f0 + NV W).
template <typename T, int NV>
void recurrent_columns(int64_t L, int64_t m, const ChunkRows<T>& c, int64_t f0, T* S, int64_t lds, Prefetch& pf) {
  int64_t p = 0;
  for (; p + kRR <= m; p += kRR) block_at<T, kRR, NV>(p == 0, p + kRR == m, L, c, p, f0, S, lds, pf);
  switch (m - p) {  // kRR <= 4
    case 3: block_at<T, 3, NV>(p == 0, true, L, c, p, f0, S, lds, pf); break;
    case 2: block_at<T, 2, NV>(p == 0, true, L, c, p, f0, S, lds, pf); break;
    case 1: block_at<T, 1, NV>(p == 0, true, L, c, p, f0, S, lds, pf); break;
    default: break;
  }
}

// Tokens per block of the forward: the block's rows of phi(q), phi(k), v and the output stay in L2 (128 KiB of
// rows; 128 tokens at m = d_v = 64 in float32), with the next block's inputs prefetched beside them. The result
// does not depend on it: the sums run in token order whatever the block.
int64_t forward_block(int64_t m, int64_t w, int64_t bytes) {
  const int64_t row = (2 * round_up(m, kPad) + 2 * round_up(w, kPad)) * bytes;
  return std::clamp<int64_t>((int64_t(128) << 10) / std::max<int64_t>(row, 1) / kPad * kPad, kPad, 1024);
}

template <typename In, typename T>
void forward_head(const In* q, const In* k, const In* v, const In* init, In* y, In* state, int64_t n,
                  int64_t m, int64_t e, const Norm<In>& nrm, int64_t feature, const bool* key_ok) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  const int64_t w = nrm.on ? e - 1 : e;  // v's columns
  const int64_t C = forward_block(m, w, sizeof(T));
  const int64_t mp = round_up(m, kPad), wp = round_up(w, kPad);
  Buffer<T> bQ(C * mp), bK(C * mp), bV(C * wp), bY(C * wp), bS(m * wp), bZ(mp), bInv(C);
  T *Qc = bQ.get(), *Kc = bK.get(), *Vc = bV.get(), *Y = bY.get(), *S = bS.get(), *Z = bZ.get(), *Inv = bInv.get();
  std::fill(S, S + m * wp, T(0));
  std::fill(Z, Z + mp, T(0));
  if (init)
    for (int64_t p = 0; p < m; ++p) {
      for (int64_t f = 0; f < w; ++f) S[p * wp + f] = static_cast<T>(init[p * e + f]);
      if (nrm.on) Z[p] = static_cast<T>(init[p * e + w]);
    }
  // The blocks compute wv columns, v's rounded up to the vector width (the buffers' rows are padded further,
  // to kPad). Rows go straight from the registers to the output when no conversion or padding stands between.
  const int64_t wv = round_up(w, W);
  const bool direct = std::is_same_v<In, T> && wv == w;
  for (int64_t t0 = 0; t0 < n; t0 += C) {
    const int64_t L = std::min(C, n - t0);
    Prefetch pf;
    if (t0 + C < n) {
      const int64_t Ln = std::min(C, n - t0 - C);
      pf.add(q + (t0 + C) * m, Ln * m * int64_t(sizeof(In)));
      pf.add(k + (t0 + C) * m, Ln * m * int64_t(sizeof(In)));
      pf.add(v + (t0 + C) * w, Ln * w * int64_t(sizeof(In)));
    }
    load_rows_phi(q, t0, L, m, Qc, mp, feature);
    load_rows_phi(k, t0, L, m, Kc, mp, feature);
    load_rows_phi(v, t0, L, w, Vc, wp, kGiven);
    if (key_ok)  // a padded key adds nothing, whatever its key or value holds
      for (int64_t i = 0; i < L; ++i)
        if (!key_ok[t0 + i]) {
          std::fill(Kc + i * mp, Kc + i * mp + m, T(0));
          std::fill(Vc + i * wp, Vc + i * wp + w, T(0));
        }
    if (nrm.on)  // den_i = phi(q_i) . z_i, z_i the key sum up to and including i
      for (int64_t i = 0; i < L; ++i) {
        V acc{};
        for (int64_t p = 0; p < mp; p += W) {
          const V z = *reinterpret_cast<const V*>(Z + p) + *reinterpret_cast<const V*>(Kc + i * mp + p);
          *reinterpret_cast<V*>(Z + p) = z;
          acc += *reinterpret_cast<const V*>(Qc + i * mp + p) * z;
        }
        T den = 0;
        for (int l = 0; l < W; ++l) den += acc[l];
        nrm.den_out[t0 + i] = den;
        Inv[i] = T(1) / (den + static_cast<T>(nrm.eps));
      }
    ChunkRows<T> c{Qc, Kc, Vc, Y, mp, wp, Y, wp, nrm.on ? Inv : nullptr};
    if constexpr (std::is_same_v<In, T>)
      if (direct) {
        c.out = y + t0 * w;
        c.ldo = w;
      }
    if (m == 0) {  // no features: every output is 0 (or 0 / eps)
      std::fill(Y, Y + L * wp, T(0));
      c.out = Y;
      c.ldo = wp;
    }
    for (int64_t f0 = 0; m > 0 && f0 < wv; f0 += kRNV * W) {
      switch (std::min<int64_t>(kRNV, (wv - f0) / W)) {
        case 4: recurrent_columns<T, (4 <= kRNV ? 4 : 1)>(L, m, c, f0, S, wp, pf); break;
        case 3: recurrent_columns<T, (3 <= kRNV ? 3 : 1)>(L, m, c, f0, S, wp, pf); break;
        case 2: recurrent_columns<T, 2>(L, m, c, f0, S, wp, pf); break;
        default: recurrent_columns<T, 1>(L, m, c, f0, S, wp, pf); break;
      }
    }
    if (c.out == Y)  // the rows were finished in Y: convert them out
      for (int64_t i = 0; i < L; ++i)
        for (int64_t f = 0; f < w; ++f) y[(t0 + i) * w + f] = static_cast<In>(Y[i * wp + f]);
  }
  for (int64_t p = 0; p < m; ++p) {
    for (int64_t f = 0; f < w; ++f) state[p * e + f] = static_cast<In>(S[p * wp + f]);
    if (nrm.on) state[p * e + w] = static_cast<In>(Z[p]);
  }
}

template <typename In, typename T>
void backward_head(const In* q, const In* k, const In* v, const In* init, const In* gy, const In* gs, In* dq,
                   In* dk, In* dv, In* dinit, int64_t n, int64_t m, int64_t e, int64_t C, const Norm<In>& nrm,
                   int64_t feature, const bool* key_ok) {
  const int64_t mp = round_up(m, kPad);
  const int64_t blk = Vec<T>::W * kNV;
  const int64_t W = Vec<T>::W;
  Buffer<T> bQt(m * C), bQc(C * mp), bKt(m * C), bKc(C * mp), bVt(e * C), bGt(e * C), bX(C * C), bY(C * C),
      bOut(std::max(m, e) * C), bOut2(e * C), bSt(e * mp);
  T *Qt = bQt.get(), *Qc = bQc.get(), *Kt = bKt.get(), *Kc = bKc.get(), *Vt = bVt.get(), *Gt = bGt.get();
  T *X = bX.get(), *Y = bY.get(), *Out = bOut.get(), *Out2 = bOut2.get(), *St = bSt.get();

  // Pass 1, forward in time: dq_i = S_i g_i with S_i the state after token i.
  std::fill(St, St + e * mp, T(0));
  if (init)
    for (int64_t p = 0; p < m; ++p)
      for (int64_t f = 0; f < e; ++f) St[f * mp + p] = static_cast<T>(init[p * e + f]);
  for (int64_t t0 = 0; t0 < n; t0 += C) {
    const int64_t L = std::min(C, n - t0);
    load_rows(k, t0, L, m, Kc, C, mp);
    if (feature != kGiven) {
      for (int64_t i = 0; i < L; ++i) apply_phi(Kc + i * mp, m, feature);
      zero_padded_rows(Kc, t0, L, m, mp, key_ok);
    }
    load_v(v, t0, L, e, Vt, C, nrm.on);
    load_g(gy, t0, L, e, Gt, C, nrm);
    // X(j, i) = v_j . g_i for i >= j.
    std::fill(X, X + C * C, T(0));
    gemm_acc<T>(C, C, e, Vt, 1, C, Gt, C, X, C, KRange::kFull, blk);
    mask_square(X, C, /*keep_upper=*/true);
    // dQt = S Gt + K^T X, with S(p, f) = St[f * mp + p].
    std::fill(Out, Out + m * C, T(0));
    gemm_acc<T>(m, C, e, St, 1, mp, Gt, C, Out, C, KRange::kFull, blk);
    gemm_acc<T>(m, C, C, Kc, 1, mp, X, C, Out, C, KRange::kUpTo, W);
    gemm_acc<T>(e, mp, L, Vt, C, 1, Kc, mp, St, mp, KRange::kFull, blk);
    store_t(Out, t0, L, m, dq, C);  // the gradient of phi(q); pass 2 applies phi'(q) when it has phi(q)
  }

  // Pass 2, backward in time: R = dS_final + sum_{i >= j} q_i g_i^T, carried as Rt = R^T (e x mp).
  T* Rt = St;
  std::fill(Rt, Rt + e * mp, T(0));
  if (gs)
    for (int64_t p = 0; p < m; ++p)
      for (int64_t f = 0; f < e; ++f) Rt[f * mp + p] = static_cast<T>(gs[p * e + f]);
  const int64_t last = (n - 1) / C * C;
  for (int64_t t0 = last; t0 >= 0; t0 -= C) {
    const int64_t L = std::min(C, n - t0);
    load_t(q, t0, L, m, Qt, C);
    load_t(k, t0, L, m, Kt, C);
    if (feature != kGiven) {
      for (int64_t f = 0; f < m; ++f) {
        apply_phi(Qt + f * C, L, feature);
        apply_phi(Kt + f * C, L, feature);
      }
      if (key_ok)  // padded keys: phi = 0, hence phi'(k) = 0 below and no gradient reaches them
        for (int64_t i = 0; i < L; ++i)
          if (!key_ok[t0 + i])
            for (int64_t f = 0; f < m; ++f) Kt[f * C + i] = T(0);
      std::fill(Qc, Qc + C * mp, T(0));  // Qc = Qt^T
      transpose_buf(Qt, m, L, C, Qc, mp);
      for (int64_t i = 0; i < L; ++i) {  // dq of pass 1 was the gradient of phi(q)
        In* row = dq + (t0 + i) * m;
        if constexpr (std::is_same_v<In, T>) {
          apply_dphi(row, Qc + i * mp, m, feature);
        } else {
          for (int64_t f = 0; f < m; ++f)
            row[f] = static_cast<In>(static_cast<T>(row[f]) * dphi_scalar(Qc[i * mp + f], feature));
        }
      }
    } else {
      load_rows(q, t0, L, m, Qc, C, mp);
    }
    load_v(v, t0, L, e, Vt, C, nrm.on);
    load_g(gy, t0, L, e, Gt, C, nrm);
    // X(i, j) = g_i . v_j and Y(i, j) = q_i . k_j, both kept for i >= j.
    std::fill(X, X + C * C, T(0));
    gemm_acc<T>(C, C, e, Gt, 1, C, Vt, C, X, C, KRange::kFull, blk);
    mask_square(X, C, /*keep_upper=*/false);
    std::fill(Y, Y + C * C, T(0));
    gemm_acc<T>(C, C, m, Qt, 1, C, Kt, C, Y, C, KRange::kFull, blk);
    mask_square(Y, C, /*keep_upper=*/false);
    // dKt = R Vt + Qt X.
    std::fill(Out, Out + m * C, T(0));
    gemm_acc<T>(m, C, e, Rt, 1, mp, Vt, C, Out, C, KRange::kFull, blk);
    gemm_acc<T>(m, C, C, Qt, C, 1, X, C, Out, C, KRange::kFrom, W);
    if (feature != kGiven)
      for (int64_t f = 0; f < m; ++f) apply_dphi(Out + f * C, Kt + f * C, L, feature);
    store_t(Out, t0, L, m, dk, C);
    // dVt = R^T Kt + Gt Y.
    std::fill(Out2, Out2 + e * C, T(0));
    gemm_acc<T>(e, C, m, Rt, mp, 1, Kt, C, Out2, C, KRange::kFull, blk);
    gemm_acc<T>(e, C, C, Gt, C, 1, Y, C, Out2, C, KRange::kFrom, W);
    store_t(Out2, t0, L, nrm.on ? e - 1 : e, dv, C);  // the ones column has no gradient to return
    // Rt += Gt Q: this chunk's queries join the reverse state.
    gemm_acc<T>(e, mp, L, Gt, C, 1, Qc, mp, Rt, mp, KRange::kFull, blk);
  }
  for (int64_t p = 0; p < m; ++p)
    for (int64_t f = 0; f < e; ++f) dinit[p * e + f] = static_cast<In>(Rt[f * mp + p]);
}

// ---------------------------------------------------------------------------------------------------------
// Non-causal linear attention with the built-in feature map inside: out_i = phi(q_i) S / (phi(q_i) . z + eps)
// with S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j), carried together as one e x mp buffer St (e = d_v + 1:
// the last row is z, from the column of ones load_v appends). One pass over the keys builds St, one pass over
// the queries reads it; phi(q), phi(k) only ever exist one chunk at a time, and the backward recomputes them.
// Padded keys (key_ok false) are skipped outright: their features and values are zeroed in the chunk, so even
// a NaN value under the mask changes nothing.

// Zero the token columns i of a (w x C) buffer whose key is padded.
template <typename T>
void zero_padded_cols(T* Xt, int64_t t0, int64_t L, int64_t w, int64_t C, const bool* key_ok) {
  if (!key_ok) return;
  for (int64_t i = 0; i < L; ++i)
    if (!key_ok[t0 + i])
      for (int64_t f = 0; f < w; ++f) Xt[f * C + i] = T(0);
}

// St (e x mp) = [sum_j v_j phi(k_j)^T ; sum_j phi(k_j)^T] over the nk keys.
template <typename In, typename T>
void noncausal_state(const In* k, const In* v, int64_t nk, int64_t m, int64_t e, int64_t C, int64_t feature,
                     const bool* key_ok, T* St) {
  const int64_t mp = round_up(m, kPad);
  const int64_t blk = Vec<T>::W * kNV;
  Buffer<T> bK(C * mp), bVt(e * C);
  T *Kc = bK.get(), *Vt = bVt.get();
  std::fill(St, St + e * mp, T(0));
  for (int64_t t0 = 0; t0 < nk; t0 += C) {
    const int64_t L = std::min(C, nk - t0);
    load_rows(k, t0, L, m, Kc, C, mp);
    for (int64_t i = 0; i < L; ++i) apply_phi(Kc + i * mp, m, feature);
    zero_padded_rows(Kc, t0, L, m, mp, key_ok);
    load_v(v, t0, L, e, Vt, C, true);
    zero_padded_cols(Vt, t0, L, e, C, key_ok);
    gemm_acc<T>(e, mp, L, Vt, C, 1, Kc, mp, St, mp, KRange::kFull, blk);
  }
}

// a . b over len entries, len a multiple of the vector width.
template <typename T>
inline T dot_padded(const T* a, const T* b, int64_t len) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V acc{};
  for (int64_t i = 0; i < len; i += W) acc += *reinterpret_cast<const V*>(a + i) * *reinterpret_cast<const V*>(b + i);
  T total = 0;
  for (int w = 0; w < W; ++w) total += acc[w];
  return total;
}

// The query pass works token-major: Y (C x dp) = phi(Q) (C x mp) times S (mp x dp), so the queries are copied
// row by row and the output rows are written straight out, with no transpose on either side; the normaliser
// phi(q_i) . z is a dot product per row.
template <typename In, typename T>
void noncausal_forward_head(const In* q, const In* k, const In* v, In* out, T* state, T* den, int64_t nq, int64_t nk,
                            int64_t m, int64_t e, int64_t C, double eps, int64_t feature, const bool* key_ok) {
  const int64_t mp = round_up(m, kPad);
  const int64_t d = e - 1;
  const int64_t dp = round_up(d, kPad);
  const int64_t blk = Vec<T>::W * kNV;
  Buffer<T> bSt(e * mp), bS(mp * dp), bZ(mp), bQc(C * mp), bY(C * dp);
  T *St = bSt.get(), *S = bS.get(), *Z = bZ.get(), *Qc = bQc.get(), *Y = bY.get();
  noncausal_state(k, v, nk, m, e, C, feature, key_ok, St);
  std::fill(S, S + mp * dp, T(0));
  std::fill(Z, Z + mp, T(0));
  for (int64_t p = 0; p < m; ++p) {
    for (int64_t f = 0; f < d; ++f) S[p * dp + f] = St[f * mp + p];
    Z[p] = St[d * mp + p];
  }
  for (int64_t t0 = 0; t0 < nq; t0 += C) {
    const int64_t L = std::min(C, nq - t0);
    load_rows(q, t0, L, m, Qc, C, mp);
    for (int64_t i = 0; i < L; ++i) apply_phi(Qc + i * mp, m, feature);
    std::fill(Y, Y + L * dp, T(0));
    gemm_acc<T>(L, dp, m, Qc, mp, 1, S, dp, Y, dp, KRange::kFull, blk);
    for (int64_t i = 0; i < L; ++i) {
      const T dn = dot_padded(Qc + i * mp, Z, mp);
      const T inv = T(1) / (dn + static_cast<T>(eps));
      den[t0 + i] = dn;
      const T* y = Y + i * dp;
      In* o = out + (t0 + i) * d;
      for (int64_t f = 0; f < d; ++f) o[f] = static_cast<In>(y[f] * inv);
    }
  }
  for (int64_t p = 0; p < m; ++p)  // (m, e): the layout of the causal kernels' packed state
    for (int64_t f = 0; f < e; ++f) state[p * e + f] = St[f * mp + p];
}

// Gradients: with G the gradient of the unnormalised product [num, den] (load_g),
//   dphi(q_i) = [S z] G_i,   R = sum_i phi(q_i) G_i^T (m x e),   dphi(k_j) = R [v_j; 1],   dv_j = R_num^T phi(k_j).
template <typename In, typename T>
void noncausal_backward_head(const In* q, const In* k, const In* v, const In* gy, const T* state, In* dq, In* dk,
                             In* dv, int64_t nq, int64_t nk, int64_t m, int64_t e, int64_t C, const Norm<In>& nrm,
                             int64_t feature, const bool* key_ok) {
  const int64_t mp = round_up(m, kPad);
  const int64_t d = e - 1;
  const int64_t blk = Vec<T>::W * kNV;
  Buffer<T> bSt(e * mp), bRt(e * mp), bQt(m * C), bQc(C * mp), bGt(e * C), bOut(std::max(m, e) * C);
  T *St = bSt.get(), *Rt = bRt.get(), *Qt = bQt.get(), *Qc = bQc.get(), *Gt = bGt.get(), *Out = bOut.get();
  std::fill(St, St + e * mp, T(0));
  for (int64_t p = 0; p < m; ++p)
    for (int64_t f = 0; f < e; ++f) St[f * mp + p] = state[p * e + f];
  std::fill(Rt, Rt + e * mp, T(0));
  std::fill(Qc, Qc + C * mp, T(0));
  // Pass 1, over the queries: dq, and R accumulated as Rt = R^T (e x mp).
  for (int64_t t0 = 0; t0 < nq; t0 += C) {
    const int64_t L = std::min(C, nq - t0);
    load_t(q, t0, L, m, Qt, C);
    for (int64_t f = 0; f < m; ++f) apply_phi(Qt + f * C, L, feature);
    transpose_buf(Qt, m, L, C, Qc, mp);
    load_g(gy, t0, L, e, Gt, C, nrm);
    std::fill(Out, Out + m * C, T(0));  // dphi(q) (m x C) = S^T-layout St read column-wise, times Gt
    gemm_acc<T>(m, C, e, St, 1, mp, Gt, C, Out, C, KRange::kFull, blk);
    for (int64_t f = 0; f < m; ++f) apply_dphi(Out + f * C, Qt + f * C, L, feature);
    store_t(Out, t0, L, m, dq, C);
    gemm_acc<T>(e, mp, L, Gt, C, 1, Qc, mp, Rt, mp, KRange::kFull, blk);
  }
  // Pass 2, over the keys: dk and dv from R.
  T* Kt = Qt;
  T* Vt = Gt;
  Buffer<T> bOut2(e * C);
  T* Out2 = bOut2.get();
  for (int64_t t0 = 0; t0 < nk; t0 += C) {
    const int64_t L = std::min(C, nk - t0);
    load_t(k, t0, L, m, Kt, C);
    for (int64_t f = 0; f < m; ++f) apply_phi(Kt + f * C, L, feature);
    zero_padded_cols(Kt, t0, L, m, C, key_ok);
    load_v(v, t0, L, e, Vt, C, true);
    zero_padded_cols(Vt, t0, L, e, C, key_ok);
    std::fill(Out, Out + m * C, T(0));  // dphi(k) = R [v; 1]
    gemm_acc<T>(m, C, e, Rt, 1, mp, Vt, C, Out, C, KRange::kFull, blk);
    for (int64_t f = 0; f < m; ++f) apply_dphi(Out + f * C, Kt + f * C, L, feature);
    zero_padded_cols(Out, t0, L, m, C, key_ok);
    store_t(Out, t0, L, m, dk, C);
    std::fill(Out2, Out2 + e * C, T(0));  // dv = R_num^T phi(k): the first d rows of Rt times Kt
    gemm_acc<T>(d, C, m, Rt, mp, 1, Kt, C, Out2, C, KRange::kFull, blk);
    zero_padded_cols(Out2, t0, L, d, C, key_ok);
    store_t(Out2, t0, L, d, dv, C);
  }
}

// at::empty for an output the kernel is about to fill. A large fresh tensor is new memory from the system, and
// touching it page by page costs more than the attention itself at long lengths (a 32 MiB output: 8192 page
// faults, about 15 ms of CPU measured on a 2-core EPYC, against 3 ms with 2 MiB pages), so on Linux the 2 MiB
// pages inside it are marked for transparent huge pages first. It is advice only: where THP is off, or the
// memory was already in use, nothing changes.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
  const std::uintptr_t bytes = t.nbytes();
  if (bytes >= 2 * kHuge) {
    const auto p = reinterpret_cast<std::uintptr_t>(t.data_ptr());
    const std::uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "causal_linear: q, k, v must be 4-D");
  TORCH_CHECK(q.device().is_cpu(), "causal_linear (cpu kernel): tensors must be on the CPU");
  TORCH_CHECK(q.sizes() == k.sizes(), "causal_linear: phi_q and phi_k must have the same shape");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "causal_linear: v must be (batch, heads, n, e) matching phi_q");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "causal_linear: phi_q, phi_k, v must share a dtype");
}

// Heads per parallel task: small problems run on the calling thread, since waking a thread team costs more
// than they do (and a lot more on a busy machine).
int64_t grain(int64_t n, int64_t m, int64_t e) {
  const int64_t work = std::max<int64_t>(1, n * (m + e) * 64);
  return std::max<int64_t>(1, (int64_t(1) << 22) / work);
}

}  // namespace

namespace {

// e: columns of the unnormalised product (v's width, plus one when normalising).
// The (B, n) bool key mask of the causal kernels, contiguous (true = real key), or an undefined tensor
// without one; only a built-in feature map takes a mask.
at::Tensor causal_key_mask(const std::optional<at::Tensor>& key_mask, int64_t feature, int64_t B, int64_t n) {
  if (!key_mask.has_value() || !key_mask->defined()) return at::Tensor();
  TORCH_CHECK(feature != kGiven, "causal_linear: key_mask needs a built-in feature map");
  TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == B &&
                  key_mask->size(1) == n,
              "causal_linear: key_mask must be a (batch, n) bool tensor");
  return key_mask->contiguous();
}

std::vector<at::Tensor> forward_impl(at::Tensor q, at::Tensor k, at::Tensor v, const std::optional<at::Tensor>& initial,
                                     bool normalize, double eps, int64_t feature = kGiven,
                                     const std::optional<at::Tensor>& key_mask = std::nullopt) {
  check_inputs(q, k, v);
  TORCH_CHECK(feature == kGiven || feature == kElu || feature == kRelu, "causal_linear: unknown feature map ", feature);
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), m = q.size(3), w = v.size(3);
  const at::Tensor mask_c = causal_key_mask(key_mask, feature, B, n);
  const bool* pmask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  const int64_t e = normalize ? w + 1 : w;
  at::Tensor init;
  if (initial.has_value() && initial->defined()) {
    TORCH_CHECK(initial->numel() == B * H * m * e, "causal_linear: initial must be (batch, heads, m, e)");
    init = initial->to(q.scalar_type()).contiguous();
  }
  auto y = empty_output({B, H, n, w}, v.options());
  auto state = at::empty({B, H, m, e}, v.options());
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto den = at::empty({normalize ? B : 0, H, n}, v.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_linear_forward", [&] {
    using In = scalar_t;
    using T = Acc<In>;
    const In *pq = q.data_ptr<In>(), *pk = k.data_ptr<In>(), *pv = v.data_ptr<In>();
    const In* pi = init.defined() ? init.data_ptr<In>() : nullptr;
    In *py = y.data_ptr<In>(), *ps = state.data_ptr<In>();
    T* pden = normalize ? den.data_ptr<T>() : nullptr;
    at::parallel_for(0, B * H, grain(n, m, e), [&](int64_t lo, int64_t hi) {
      for (int64_t bh = lo; bh < hi; ++bh) {
        Norm<In> nrm;
        nrm.on = normalize;
        nrm.eps = eps;
        nrm.den_out = normalize ? pden + bh * n : nullptr;
        forward_head<In, T>(pq + bh * n * m, pk + bh * n * m, pv + bh * n * w, pi ? pi + bh * m * e : nullptr,
                            py + bh * n * w, ps + bh * m * e, n, m, e, nrm, feature,
                            pmask ? pmask + (bh / H) * n : nullptr);
      }
    });
  });
  if (normalize) return {y, state, den};
  return {y, state};
}

std::vector<at::Tensor> backward_impl(at::Tensor q, at::Tensor k, at::Tensor v, const std::optional<at::Tensor>& initial,
                                      at::Tensor grad_y, const std::optional<at::Tensor>& grad_state, int64_t chunk,
                                      bool normalize, const at::Tensor& out, const at::Tensor& den, double eps,
                                      int64_t feature = kGiven,
                                      const std::optional<at::Tensor>& key_mask = std::nullopt) {
  check_inputs(q, k, v);
  TORCH_CHECK(feature == kGiven || feature == kElu || feature == kRelu, "causal_linear: unknown feature map ", feature);
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const auto dtype = q.scalar_type();
  grad_y = grad_y.to(dtype).contiguous();
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), m = q.size(3), w = v.size(3);
  const at::Tensor mask_c = causal_key_mask(key_mask, feature, B, n);
  const bool* pmask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  const int64_t e = normalize ? w + 1 : w;
  TORCH_CHECK(grad_y.numel() == B * H * n * w, "causal_linear_backward: grad_y must have the output's shape");
  at::Tensor init, gs, out_c, den_c;
  if (initial.has_value() && initial->defined()) init = initial->to(dtype).contiguous();
  if (grad_state.has_value() && grad_state->defined()) gs = grad_state->to(dtype).contiguous();
  if (normalize) {
    out_c = out.to(dtype).contiguous();
    den_c = den.to(dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
    TORCH_CHECK(out_c.numel() == B * H * n * w && den_c.numel() == B * H * n,
                "causal_linear_backward: out/den do not match the inputs");
  }
  // Always returned (the gradient an initial state would get), so the op has a fixed signature.
  auto dinit = at::empty({B, H, m, e}, v.options());
  auto dq = empty_output(q.sizes(), q.options()), dk = empty_output(k.sizes(), k.options());
  auto dv = empty_output(v.sizes(), v.options());
  if (n == 0) {
    if (gs.defined())
      dinit.copy_(gs);
    else
      dinit.zero_();
    return {dq, dk, dv, dinit};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "causal_linear_backward", [&] {
    using In = scalar_t;
    using T = Acc<In>;
    const int64_t C = round_up(std::max<int64_t>(chunk, 1), kPad);
    const In *pq = q.data_ptr<In>(), *pk = k.data_ptr<In>(), *pv = v.data_ptr<In>(), *pg = grad_y.data_ptr<In>();
    const In* pi = init.defined() ? init.data_ptr<In>() : nullptr;
    const In* pgs = gs.defined() ? gs.data_ptr<In>() : nullptr;
    const In* pout = normalize ? out_c.data_ptr<In>() : nullptr;
    const T* pden = normalize ? den_c.data_ptr<T>() : nullptr;
    In *pdq = dq.data_ptr<In>(), *pdk = dk.data_ptr<In>(), *pdv = dv.data_ptr<In>();
    In* pdi = dinit.data_ptr<In>();
    at::parallel_for(0, B * H, grain(n, m, e), [&](int64_t lo, int64_t hi) {
      for (int64_t bh = lo; bh < hi; ++bh) {
        Norm<In> nrm;
        nrm.on = normalize;
        nrm.eps = eps;
        nrm.den = normalize ? pden + bh * n : nullptr;
        nrm.out = normalize ? pout + bh * n * w : nullptr;
        backward_head<In, T>(pq + bh * n * m, pk + bh * n * m, pv + bh * n * w, pi ? pi + bh * m * e : nullptr,
                             pg + bh * n * w, pgs ? pgs + bh * m * e : nullptr, pdq + bh * n * m,
                             pdk + bh * n * m, pdv + bh * n * w, pdi + bh * m * e, n, m, e, C, nrm, feature,
                             pmask ? pmask + (bh / H) * n : nullptr);
      }
    });
  });
  return {dq, dk, dv, dinit};
}


// Shapes and dtypes of the non-causal ops, checked before any pointer is read: q (B, H, nq, m), k (B, H, nk, m),
// v (B, H, nk, d), key_mask (B, nk) bool.
void check_noncausal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_mask, int64_t feature) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "linear_fused: q, k, v must be 4-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "linear_fused (cpu kernel): tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "linear_fused: q, k, v must share a dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "linear_fused: k must be (batch, heads, n_k, d) matching q");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == k.size(2),
              "linear_fused: v must be (batch, heads, n_k, d_v) matching k");
  TORCH_CHECK(feature == kElu || feature == kRelu, "linear_fused: feature must be 1 (elu + 1) or 2 (relu), got ",
              feature);
  if (key_mask.has_value() && key_mask->defined())
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == q.size(0) &&
                    key_mask->size(1) == k.size(2),
                "linear_fused: key_mask must be a (batch, n_k) bool tensor");
}

std::vector<at::Tensor> linear_fused_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                             double eps, int64_t feature, const std::optional<at::Tensor>& key_mask) {
  check_noncausal(q_in, k_in, v_in, key_mask, feature);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), nk = k.size(2), m = q.size(3), d = v.size(3);
  const int64_t e = d + 1;
  at::Tensor mask_c;
  if (key_mask.has_value() && key_mask->defined()) mask_c = key_mask->contiguous();
  const bool* pmask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = empty_output({B, H, nq, d}, v.options());
  auto state = at::empty({B, H, m, e}, v.options().dtype(acc_dtype));
  auto den = at::empty({B, H, nq}, v.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "linear_fused_forward", [&] {
    using In = scalar_t;
    using T = Acc<In>;
    const int64_t C = 64;
    const In *pq = q.data_ptr<In>(), *pk = k.data_ptr<In>(), *pv = v.data_ptr<In>();
    In* po = out.data_ptr<In>();
    T *ps = state.data_ptr<T>(), *pden = den.data_ptr<T>();
    at::parallel_for(0, B * H, grain(std::max(nq, nk), m, e), [&](int64_t lo, int64_t hi) {
      for (int64_t bh = lo; bh < hi; ++bh)
        noncausal_forward_head<In, T>(pq + bh * nq * m, pk + bh * nk * m, pv + bh * nk * d, po + bh * nq * d,
                                      ps + bh * m * e, pden + bh * nq, nq, nk, m, e, C, eps, feature,
                                      pmask ? pmask + (bh / H) * nk : nullptr);
    });
  });
  return {out, state, den};
}

std::vector<at::Tensor> linear_fused_backward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                              const at::Tensor& out_in, const at::Tensor& den_in,
                                              const at::Tensor& state_in, const at::Tensor& grad_out, double eps,
                                              int64_t feature, const std::optional<at::Tensor>& key_mask) {
  check_noncausal(q_in, k_in, v_in, key_mask, feature);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto dtype = q.scalar_type();
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), nk = k.size(2), m = q.size(3), d = v.size(3);
  const int64_t e = d + 1;
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef({B, H, nq, d}) && grad_out.sizes() == out_in.sizes(),
              "linear_fused_backward: out and grad_out must be (batch, heads, n_q, d_v)");
  TORCH_CHECK(den_in.sizes() == at::IntArrayRef({B, H, nq}), "linear_fused_backward: den must be (batch, heads, n_q)");
  TORCH_CHECK(state_in.sizes() == at::IntArrayRef({B, H, m, e}),
              "linear_fused_backward: state must be (batch, heads, d, d_v + 1)");
  const at::Tensor out = out_in.to(dtype).contiguous(), gy = grad_out.to(dtype).contiguous();
  const at::Tensor den = den_in.to(acc_dtype).contiguous(), state = state_in.to(acc_dtype).contiguous();
  at::Tensor mask_c;
  if (key_mask.has_value() && key_mask->defined()) mask_c = key_mask->contiguous();
  const bool* pmask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  auto dq = empty_output(q.sizes(), q.options()), dk = empty_output(k.sizes(), k.options());
  auto dv = empty_output(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "linear_fused_backward", [&] {
    using In = scalar_t;
    using T = Acc<In>;
    const int64_t C = 64;
    const In *pq = q.data_ptr<In>(), *pk = k.data_ptr<In>(), *pv = v.data_ptr<In>(), *pg = gy.data_ptr<In>();
    const In* pout = out.data_ptr<In>();
    const T *pden = den.data_ptr<T>(), *ps = state.data_ptr<T>();
    In *pdq = dq.data_ptr<In>(), *pdk = dk.data_ptr<In>(), *pdv = dv.data_ptr<In>();
    at::parallel_for(0, B * H, grain(std::max(nq, nk), m, e), [&](int64_t lo, int64_t hi) {
      for (int64_t bh = lo; bh < hi; ++bh) {
        Norm<In> nrm;
        nrm.on = true;
        nrm.eps = eps;
        nrm.den = pden + bh * nq;
        nrm.out = pout + bh * nq * d;
        noncausal_backward_head<In, T>(pq + bh * nq * m, pk + bh * nk * m, pv + bh * nk * d, pg + bh * nq * d,
                                       ps + bh * m * e, pdq + bh * nq * m, pdk + bh * nk * m, pdv + bh * nk * d, nq,
                                       nk, m, e, C, nrm, feature, pmask ? pmask + (bh / H) * nk : nullptr);
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace

std::vector<at::Tensor> causal_linear_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::optional<at::Tensor>& initial, int64_t /*chunk*/) {
  // chunk sizes the backward's blocks; the forward sizes its own (forward_block), and the result depends on neither
  return forward_impl(q, k, v, initial, false, 0.0);
}

std::vector<at::Tensor> causal_linear_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& initial, const at::Tensor& grad_y,
                                               const std::optional<at::Tensor>& grad_state, int64_t chunk) {
  return backward_impl(q, k, v, initial, grad_y, grad_state, chunk, false, at::Tensor(), at::Tensor(), 0.0);
}

std::vector<at::Tensor> causal_linear_normalized_forward(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const std::optional<at::Tensor>& initial,
                                                         double eps, int64_t /*chunk*/) {
  return forward_impl(q, k, v, initial, true, eps);
}

std::vector<at::Tensor> causal_linear_normalized_backward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::optional<at::Tensor>& initial,
                                                          const at::Tensor& out, const at::Tensor& den,
                                                          const at::Tensor& grad_out,
                                                          const std::optional<at::Tensor>& grad_state, double eps,
                                                          int64_t chunk) {
  return backward_impl(q, k, v, initial, grad_out, grad_state, chunk, true, out, den, eps);
}

// The normalised variant with a built-in feature map applied inside: q and k are the raw queries and keys.
std::vector<at::Tensor> causal_linear_fused_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& initial, double eps, int64_t /*chunk*/,
                                                    int64_t feature, const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(feature != kGiven, "causal_linear_fused: feature must be 1 (elu + 1) or 2 (relu)");
  return forward_impl(q, k, v, initial, true, eps, feature, key_mask);
}

std::vector<at::Tensor> causal_linear_fused_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& initial, const at::Tensor& out,
                                                     const at::Tensor& den, const at::Tensor& grad_out,
                                                     const std::optional<at::Tensor>& grad_state, double eps,
                                                     int64_t chunk, int64_t feature,
                                                     const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(feature != kGiven, "causal_linear_fused: feature must be 1 (elu + 1) or 2 (relu)");
  return backward_impl(q, k, v, initial, grad_out, grad_state, chunk, true, out, den, eps, feature, key_mask);
}

// Raw ops; kernels/ops.py wraps them as hf_efficient::* custom ops with fake kernels and autograd.
TORCH_LIBRARY(hf_efficient_cpu, lib) {
  lib.def("causal_linear_forward(Tensor q, Tensor k, Tensor v, Tensor? initial, int chunk) -> Tensor[]",
          &causal_linear_forward);
  lib.def(
      "causal_linear_backward(Tensor q, Tensor k, Tensor v, Tensor? initial, Tensor grad_y, Tensor? grad_state, "
      "int chunk) -> Tensor[]",
      &causal_linear_backward);
  lib.def(
      "causal_linear_normalized_forward(Tensor q, Tensor k, Tensor v, Tensor? initial, float eps, int chunk) "
      "-> Tensor[]",
      &causal_linear_normalized_forward);
  lib.def(
      "causal_linear_normalized_backward(Tensor q, Tensor k, Tensor v, Tensor? initial, Tensor out, Tensor den, "
      "Tensor grad_out, Tensor? grad_state, float eps, int chunk) -> Tensor[]",
      &causal_linear_normalized_backward);
  lib.def(
      "causal_linear_fused_forward(Tensor q, Tensor k, Tensor v, Tensor? initial, float eps, int chunk, int feature, "
      "Tensor? key_mask) -> Tensor[]",
      &causal_linear_fused_forward);
  lib.def(
      "causal_linear_fused_backward(Tensor q, Tensor k, Tensor v, Tensor? initial, Tensor out, Tensor den, "
      "Tensor grad_out, Tensor? grad_state, float eps, int chunk, int feature, Tensor? key_mask) -> Tensor[]",
      &causal_linear_fused_backward);
  lib.def("linear_fused_forward(Tensor q, Tensor k, Tensor v, float eps, int feature, Tensor? key_mask) -> Tensor[]",
          &linear_fused_forward);
  lib.def(
      "linear_fused_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor den, Tensor state, Tensor grad_out, "
      "float eps, int feature, Tensor? key_mask) -> Tensor[]",
      &linear_fused_backward);
  lib.def("vector_bytes() -> int", [] { return static_cast<int64_t>(kVecBytes); });
}
