// Decoding at batch 1 on a CPU: what one generated token runs.
//
// decode_gemv(x, weight, bias?)        y = x weight^T (+ bias) for a handful of rows of x.
//   A decoding step is a matrix-vector product per weight, bound by reading the weight once from memory.
//   The BLAS this PyTorch ships reads a (out, in) weight at about half the speed of a plain streaming read
//   on this kind of CPU (measured: 11 GB/s against 20-30 GB/s for a sum). Here each weight row is read
//   once, in memory order (a single forward stream the hardware prefetcher follows), and multiplied with
//   every row of x, which stays in L1.
//
// linear_decode_step(q, k, v, kv, k_sum, key_mask?, feature, eps)  one token of causal linear attention:
//   phi(q), phi(k) (elu + 1 or relu, applied here), S' = S + phi(k) v^T, z' = z + phi(k),
//   out = phi(q) S' / (phi(q) . z' + eps). One call instead of about twenty small PyTorch ops; the new
//   state is a fresh (batch, heads, m, d_v + 1) tensor (kv with k_sum as its last column), so a state a
//   caller still holds (a reused cache, a beam before reordering) is never written.
//
// decoder_block_step(x, weights, biases, cos?, sin?, state..., heads, kv_heads, head_dim, feature, window, ...)
//   a whole pre-norm decoder block (Llama, Mistral, Qwen2 and linear-lm layouts) with linear or window-linear
//   attention for one new token per row, in one call.
// decoder_stack_step(x, blocks, norm_weight?, eps, head_weight?, head_bias?)  a decoding step's blocks (each as
//   decoder_block_step), then its final norm and head, in one call.
// decode_rms_norm, rotary_cos_sin, rope_cos_sin: a decoding step's final norm and rotary table.
//
// Every index is checked against the shapes before any pointer is formed (TORCH_CHECK), so no input can
// make these kernels read or write out of bounds.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

// ------------------------------------------------------------------ a small vector abstraction
#if defined(__AVX512F__)
using vec = __m512;
constexpr int64_t kLanes = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int64_t kLanes = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
using vec = float;
constexpr int64_t kLanes = 1;
inline vec vzero() { return 0.0f; }
inline vec vload(const float* p) { return *p; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vadd(vec a, vec b) { return a + b; }
inline float vsum(vec a) { return a; }
#endif

constexpr int64_t kMaxRows = 4;  // rows of x per call (batch x new tokens); more rows go to the BLAS

// y[r, o] = sum_i x[r, i] w[o, i] (+ bias[o]) for R rows of x; U independent accumulators per row hide the
// latency of the fused multiply-add, so the loop runs at the speed the weight streams in.
// One row of x against two weight rows far apart (row o and row o + half): two independent streams sharing each
// load of x. A core keeps more reads in flight over two streams: measured 8-10% faster than a row at a time on
// the decoding weights here (about the speed of a plain sum over the same bytes).
//
// The weights are read with a non-temporal prefetch a few cache lines ahead: a step streams far more weight bytes
// than the caches hold, and ordinary reads would evict everything else on the way through (the interpreter, the
// framework's dispatch, the states), which the step then reads again from memory between its kernels. With the
// hint, scripts/bench_generate.py measured linear-lm at 1.24-1.26x its weight-read floor, 1.5-1.7x without.
constexpr int64_t kPrefetchAhead = 256;  // bytes ahead of the current read, per stream

inline void prefetch_nta(const float* p) {
  const char* c = reinterpret_cast<const char*>(p) + kPrefetchAhead;
  for (int64_t line = 0; line < kLanes * 4 * static_cast<int64_t>(sizeof(float)); line += 64)
    __builtin_prefetch(c + line, 0, 0);  // read, no temporal locality (prefetchnta on x86)
}

inline void dot_pair(const float* x, int64_t in, const float* w0, const float* w1, float* y0, float* y1) {
  constexpr int U = 4;
  vec a[U], b[U];
  for (int u = 0; u < U; ++u) a[u] = b[u] = vzero();
  int64_t i = 0;
  for (; i + U * kLanes <= in; i += U * kLanes) {
    prefetch_nta(w0 + i);
    prefetch_nta(w1 + i);
    for (int u = 0; u < U; ++u) {
      const vec xv = vload(x + i + u * kLanes);
      a[u] = vfma(vload(w0 + i + u * kLanes), xv, a[u]);
      b[u] = vfma(vload(w1 + i + u * kLanes), xv, b[u]);
    }
  }
  for (; i + kLanes <= in; i += kLanes) {
    const vec xv = vload(x + i);
    a[0] = vfma(vload(w0 + i), xv, a[0]);
    b[0] = vfma(vload(w1 + i), xv, b[0]);
  }
  for (int u = 1; u < U; ++u) {
    a[0] = vadd(a[0], a[u]);
    b[0] = vadd(b[0], b[u]);
  }
  float s0 = vsum(a[0]), s1 = vsum(b[0]);
  for (; i < in; ++i) {
    s0 += w0[i] * x[i];
    s1 += w1[i] * x[i];
  }
  *y0 = s0;
  *y1 = s1;
}

template <int R>
void gemv_rows(const float* x, int64_t in, const float* w, int64_t ldw, int64_t out, const float* bias, float* y) {
  if constexpr (R == 1) {
    if (out >= 2) {
      const int64_t half = out / 2;
      for (int64_t o = 0; o < half; ++o) dot_pair(x, in, w + o * ldw, w + (o + half) * ldw, y + o, y + o + half);
      if (bias != nullptr)
        for (int64_t o = 0; o < 2 * half; ++o) y[o] += bias[o];
      if (out == 2 * half) return;
      // an odd row count: the last row alone, below
      w += 2 * half * ldw;
      y += 2 * half;
      if (bias != nullptr) bias += 2 * half;
      out = 1;
    }
  }
  // 8 vectors a row per iteration at one row (measured a few percent faster than 4 on a streaming weight)
  constexpr int U = R == 1 ? 8 : (R == 2 ? 2 : 1);
  constexpr int64_t step = U * kLanes;
  for (int64_t o = 0; o < out; ++o) {
    const float* wr = w + o * ldw;
    vec acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = vzero();
    int64_t i = 0;
    for (; i + step <= in; i += step) {
      for (int u = 0; u < U; ++u) {
        __builtin_prefetch(reinterpret_cast<const char*>(wr + i + u * kLanes) + kPrefetchAhead, 0, 0);
        const vec wv = vload(wr + i + u * kLanes);
        for (int r = 0; r < R; ++r) acc[r][u] = vfma(wv, vload(x + r * in + i + u * kLanes), acc[r][u]);
      }
    }
    for (; i + kLanes <= in; i += kLanes) {  // whole vectors left over (in not a multiple of the unrolled step)
      const vec wv = vload(wr + i);
      for (int r = 0; r < R; ++r) acc[r][0] = vfma(wv, vload(x + r * in + i), acc[r][0]);
    }
    for (int r = 0; r < R; ++r) {
      vec total = acc[r][0];
      for (int u = 1; u < U; ++u) total = vadd(total, acc[r][u]);
      float s = vsum(total);
      for (int64_t j = i; j < in; ++j) s += wr[j] * x[r * in + j];
      y[r * out + o] = bias != nullptr ? s + bias[o] : s;
    }
  }
}

at::Tensor decode_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "decode_gemv: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "decode_gemv: float32 x and weight only, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "decode_gemv: weight must be (out, in), got ", weight.dim(), " dims");
  TORCH_CHECK(x.dim() >= 1, "decode_gemv: x must have at least one dimension");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.size(-1) == in, "decode_gemv: x has ", x.size(-1), " features, weight expects ", in);
  TORCH_CHECK(weight.stride(1) == 1 && (out <= 1 || weight.stride(0) >= in),
              "decode_gemv: weight rows must be contiguous");
  const int64_t rows = in > 0 ? x.numel() / in : 0;
  TORCH_CHECK(rows <= kMaxRows, "decode_gemv: at most ", kMaxRows, " rows of x, got ", rows);
  const float* bias_ptr = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == out,
                "decode_gemv: bias must be a float32 (out,) = (", out, ",) CPU tensor");
    bias_ptr = b.data_ptr<float>();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  if (y.numel() == 0) return y;
  if (in == 0) {  // an empty product: the bias (or zeros)
    return bias_ptr != nullptr ? y.copy_(b.expand_as(y)) : y.zero_();
  }
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t ldw = out > 1 ? weight.stride(0) : in;
  float* yp = y.data_ptr<float>();
  switch (rows) {
    case 1: gemv_rows<1>(xp, in, wp, ldw, out, bias_ptr, yp); break;
    case 2: gemv_rows<2>(xp, in, wp, ldw, out, bias_ptr, yp); break;
    case 3: gemv_rows<3>(xp, in, wp, ldw, out, bias_ptr, yp); break;
    default: gemv_rows<4>(xp, in, wp, ldw, out, bias_ptr, yp); break;
  }
  return y;
}

// ------------------------------------------------------------------ one token of causal linear attention
// a . b over n floats. Two vector accumulators: a single scalar chain is bound by the latency of each add, which
// made the window's scores cost more than the rest of the attention.
inline float dot(const float* a, const float* b, int64_t n) {
  vec s0 = vzero(), s1 = vzero();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    s0 = vfma(vload(a + i), vload(b + i), s0);
    s1 = vfma(vload(a + i + kLanes), vload(b + i + kLanes), s1);
  }
  for (; i + kLanes <= n; i += kLanes) s0 = vfma(vload(a + i), vload(b + i), s0);
  float s = vsum(vadd(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[e] += a * x[e * stride] for e < n; the unit stride (a state the kernels wrote) is its own loop, so the
// compiler vectorises it.
inline void axpy(float a, const float* x, int64_t stride, float* y, int64_t n) {
  if (stride == 1) {
    for (int64_t e = 0; e < n; ++e) y[e] += a * x[e];
  } else {
    for (int64_t e = 0; e < n; ++e) y[e] += a * x[e * stride];
  }
}

// y[e] = x[e * stride] for e < n
inline void copy_strided(const float* x, int64_t stride, float* y, int64_t n) {
  if (stride == 1) {
    std::copy(x, x + n, y);
  } else {
    for (int64_t e = 0; e < n; ++e) y[e] = x[e * stride];
  }
}

// A copy into a state buffer the step allocated: streaming (non-temporal) stores where the vectors allow. The next
// step reads the buffer after the weights have streamed through the caches, so a cached write would only fetch
// the destination's old contents from memory first (and evict something to make room), then be evicted itself.
inline void stream_copy(const float* src, float* dst, int64_t n) {
  if (n <= 0) return;  // nothing kept (a window of 1 keeps no buffered key)
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  constexpr int64_t kAlign = kLanes * static_cast<int64_t>(sizeof(float));
  if (reinterpret_cast<uintptr_t>(dst) % kAlign == 0) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
#if defined(__AVX512F__)
      _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#else
      _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    }
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  std::copy(src, src + n, dst);
}

inline float feature(float x, int64_t kind) {
  // kind 1: elu(x) + 1; kind 2: relu(x). NaN stays NaN in both (as torch's elu and relu).
  if (kind == 1) return x > 0.0f ? x + 1.0f : std::exp(x);
  return x > 0.0f ? x : (x == x ? 0.0f : x);
}

// One (batch, head) of the step on float inputs: q, k (M), v (E); the state before the token kv (M x E, strides
// kv_m, kv_e) and z (M, stride z_m); writes the new packed state s (M x (E + 1)) and out (E). phi_q, phi_k and
// num are scratch of M, M and E floats.
void attend_one(const float* q, const float* k, const float* v, const float* kv, int64_t kv_m, int64_t kv_e,
                const float* z, int64_t z_m, bool real, int64_t M, int64_t E, int64_t kind, float eps, float* s,
                float* out, float* phi_q, float* phi_k, float* num) {
  for (int64_t m = 0; m < M; ++m) {
    phi_q[m] = feature(q[m], kind);
    // a padded key is skipped, not multiplied by 0: a NaN under the mask changes nothing
    phi_k[m] = real ? feature(k[m], kind) : 0.0f;
  }
  for (int64_t e = 0; e < E; ++e) num[e] = 0.0f;
  float den = 0.0f;
  for (int64_t m = 0; m < M; ++m) {
    const float* src = kv + m * kv_m;
    float* dst = s + m * (E + 1);
    const float pk = phi_k[m], pq = phi_q[m];
    copy_strided(src, kv_e, dst, E);
    if (real) {
      axpy(pk, v, 1, dst, E);
      dst[E] = z[m * z_m] + pk;
    } else {
      dst[E] = z[m * z_m];
    }
    for (int64_t e = 0; e < E; ++e) num[e] += pq * dst[e];
    den += pq * dst[E];
  }
  const float inv = 1.0f / (den + eps);
  for (int64_t e = 0; e < E; ++e) out[e] = num[e] * inv;
}

template <typename scalar_t>
void step_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv,
                 const at::Tensor& k_sum, const bool* mask, int64_t kind, float eps, at::Tensor& out,
                 at::Tensor& state) {
  const int64_t B = q.size(0), H = q.size(1), M = q.size(3), E = v.size(3);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const float* kvp = kv.data_ptr<float>();
  const float* zp = k_sum.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* sp = state.data_ptr<float>();
  std::vector<float> qf(M), kf(M), vf(E), of(E), phi_q(M), phi_k(M), num(E);
  for (int64_t b = 0; b < B; ++b) {
    const bool real = mask == nullptr || mask[b];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t qk_off = (b * H + h) * M, v_off = (b * H + h) * E;
      for (int64_t m = 0; m < M; ++m) {
        qf[m] = static_cast<float>(qp[qk_off + m]);
        kf[m] = static_cast<float>(kp[qk_off + m]);
      }
      for (int64_t e = 0; e < E; ++e) vf[e] = static_cast<float>(vp[v_off + e]);
      attend_one(qf.data(), kf.data(), vf.data(), kvp + b * kv.stride(0) + h * kv.stride(1), kv.stride(2),
                 kv.stride(3), zp + b * k_sum.stride(0) + h * k_sum.stride(1), k_sum.stride(2), real, M, E, kind, eps,
                 sp + (b * H + h) * M * (E + 1), of.data(), phi_q.data(), phi_k.data(), num.data());
      for (int64_t e = 0; e < E; ++e) op[v_off + e] = static_cast<scalar_t>(of[e]);
    }
  }
}

std::vector<at::Tensor> linear_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& kv, const at::Tensor& k_sum,
                                           const c10::optional<at::Tensor>& key_mask, int64_t feature_kind,
                                           double eps) {
  TORCH_CHECK(feature_kind == 1 || feature_kind == 2, "linear_decode_step: feature must be 1 (elu) or 2 (relu)");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "linear_decode_step: q, k, v must be 4-D");
  TORCH_CHECK(q.size(2) == 1 && k.size(2) == 1 && v.size(2) == 1, "linear_decode_step: one new token only");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(3), E = v.size(3);
  TORCH_CHECK(M > 0 && E > 0, "linear_decode_step: d and d_v must be positive");
  TORCH_CHECK(k.sizes() == q.sizes(), "linear_decode_step: k must have q's shape");
  TORCH_CHECK(v.size(0) == B && v.size(1) == H, "linear_decode_step: v must be (batch, heads, 1, d_v)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "linear_decode_step: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "linear_decode_step: float32 or bfloat16 q, k, v only");
  TORCH_CHECK(kv.scalar_type() == at::kFloat && k_sum.scalar_type() == at::kFloat,
              "linear_decode_step: the state must be float32");
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == B && kv.size(1) == H && kv.size(2) == M && kv.size(3) == E,
              "linear_decode_step: kv must be (batch, heads, d, d_v)");
  TORCH_CHECK(k_sum.dim() == 3 && k_sum.size(0) == B && k_sum.size(1) == H && k_sum.size(2) == M,
              "linear_decode_step: k_sum must be (batch, heads, d)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && kv.device().is_cpu() &&
                  k_sum.device().is_cpu(),
              "linear_decode_step: CPU tensors only");
  for (const at::Tensor* t : {&kv, &k_sum})
    for (int64_t d = 0; d < t->dim(); ++d) TORCH_CHECK(t->stride(d) >= 0, "linear_decode_step: negative stride");
  const bool* mask = nullptr;
  at::Tensor mc;
  if (key_mask.has_value() && key_mask->defined()) {
    mc = key_mask->contiguous();
    TORCH_CHECK(mc.scalar_type() == at::kBool && mc.numel() == B, "linear_decode_step: key_mask must be (batch,) bool");
    mask = mc.data_ptr<bool>();
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty({B, H, 1, E}, q.options());
  at::Tensor state = at::empty({B, H, M, E + 1}, kv.options());
  if (B * H == 0) return {out, state};
  const float e = static_cast<float>(eps);
  if (q.scalar_type() == at::kFloat) {
    step_kernel<float>(qc, kc, vc, kv, k_sum, mask, feature_kind, e, out, state);
  } else {
    step_kernel<c10::BFloat16>(qc, kc, vc, kv, k_sum, mask, feature_kind, e, out, state);
  }
  return {out, state};
}

// ------------------------------------------------------------------ one decoder layer of linear-lm
void check_matrix(const at::Tensor& w, int64_t rows, int64_t cols, const char* op, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) == rows &&
                  w.size(1) == cols && w.is_contiguous(),
              op, ": ", name, " must be a contiguous float32 (", rows, ", ", cols, ") CPU tensor");
}

void check_vector(const at::Tensor& w, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == n &&
                  w.is_contiguous(),
              op, ": ", name, " must be a contiguous float32 (", n, ",) CPU tensor");
}

// y = x / sqrt(mean(x^2) + eps) * weight, per row of n (torch.nn.RMSNorm in float32)
// (the sum of squares in double: a float sum in order loses a few bits over thousands of features)
void rms_norm(const float* x, int64_t rows, int64_t n, const float* weight, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[r * n + i]) * x[r * n + i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + eps);
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = x[r * n + i] * inv * weight[i];
  }
}

// x * cos + rotate_half(x) * sin on each head of D features, rotate_half(x) = (-x[D/2:], x[:D/2])
void rotate(float* x, int64_t heads, int64_t D, const float* cos, const float* sin, float* scratch) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * D;
    for (int64_t j = 0; j < D; ++j) scratch[j] = j < half ? -xh[j + half] : xh[j - half];
    for (int64_t j = 0; j < D; ++j) xh[j] = xh[j] * cos[j] + scratch[j] * sin[j];
  }
}

// y = x w^T (+ bias) for B rows of x (in features each) into y (B x out)
void gemv_bias(const float* x, int64_t rows, int64_t in, const at::Tensor& w, const float* bias, float* y) {
  const int64_t out = w.size(0);
  const float* wp = w.data_ptr<float>();
  switch (rows) {
    case 1: gemv_rows<1>(x, in, wp, in, out, bias, y); break;
    case 2: gemv_rows<2>(x, in, wp, in, out, bias, y); break;
    case 3: gemv_rows<3>(x, in, wp, in, out, bias, y); break;
    default: gemv_rows<4>(x, in, wp, in, out, bias, y); break;
  }
}

// One (batch, head) of window-linear attention for the new token: softmax over the r buffered keys kb (r x D,
// real where mb) and the new key, plus the linear state of the older keys (kv, z; skipped when has_linear is
// false); the same arithmetic as hf_efficient.attention.window_linear (a row's largest allowed score is
// subtracted, a non-finite largest score is not). scores: scratch of r + 1; phi_q, num: scratch of D.
void window_one(const float* q, const float* k_new, const float* v_new, const float* kb, const float* vb,
                const bool* mb, int64_t r, int64_t D, float scale, bool has_linear, const float* kv, int64_t kv_m,
                int64_t kv_e, const float* z, int64_t z_m, int64_t kind, float eps, float* out, float* scores,
                float* phi_q, float* num) {
  float m = -INFINITY;
  for (int64_t j = 0; j < r; ++j) {
    if (!mb[j]) continue;
    scores[j] = scale * dot(q, kb + j * D, D);
    if (scores[j] > m) m = scores[j];
  }
  scores[r] = scale * dot(q, k_new, D);
  if (scores[r] > m) m = scores[r];
  if (!std::isfinite(m)) m = 0.0f;
  for (int64_t e = 0; e < D; ++e) num[e] = 0.0f;
  float den = 0.0f;
  for (int64_t j = 0; j <= r; ++j) {
    if (j < r && !mb[j]) continue;
    const float w = std::exp(scores[j] - m);
    const float* vj = j < r ? vb + j * D : v_new;
    for (int64_t e = 0; e < D; ++e) num[e] += w * vj[e];
    den += w;
  }
  if (has_linear) {
    for (int64_t i = 0; i < D; ++i) phi_q[i] = feature(q[i], kind);
    for (int64_t i = 0; i < D; ++i) {
      const float pq = phi_q[i];
      axpy(pq, kv + i * kv_m, kv_e, num, D);
      den += pq * z[i * z_m];
    }
  }
  const float inv = 1.0f / (den + eps);
  for (int64_t e = 0; e < D; ++e) out[e] = num[e] * inv;
}

// What one block step needs besides x and the weights.
struct BlockState {
  // linear part: kv (B, H, D, D), k_sum (B, H, D) float32; undefined for window-linear before any key left the window
  at::Tensor kv, k_sum;
  // window-linear only (window > 0): the r most recent keys/values (B, H, r, D) float32 and their mask (B, r) bool,
  // each row contiguous (keys/values: stride D in dim 2, 1 in dim 3; mask: stride 1 in dim 1), any batch/head strides
  at::Tensor keys, values, key_mask;
  int64_t window = 0;
  // append: the rows after the buffered ones are free (checked by check_append): the new key goes there and the
  // kept keys stay where they are, instead of all moving to a new buffer
  bool append = false;
};

// Rows a new window buffer has room for: the window's w - 1 keys plus as many again as half of them (at least 16),
// so that keys are appended in place for that many steps before the buffer is copied to a new one.
inline int64_t window_capacity(int64_t window) {
  const int64_t kept = std::max<int64_t>(window - 1, 0);
  return kept == 0 ? 0 : kept + std::max<int64_t>(16, kept / 2);
}

// One decoder block for one new token per row (pre-norm: RMSNorm -> q/k/v (+ bias) -> rotary -> attention -> o
// (+ bias) -> residual; RMSNorm -> SwiGLU MLP (+ biases) -> residual). Attention is causal linear attention
// (window == 0) or window-linear; H query heads share H_kv key/value heads (each query head keeps its own state,
// as the PyTorch path keeps repeated keys).
// Returns y (B, 1, C), the new packed linear state (B, H, D, D + 1) (empty when window-linear has none yet) and,
// for window-linear, the new keys, values (B, H, r', D) and mask (B, r'). No input is written.
std::vector<at::Tensor> block_step(const at::Tensor& x, const std::vector<at::Tensor>& w, const float* const* bias,
                                   const at::Tensor& cc, const at::Tensor& sc, const BlockState& st,
                                   int64_t H, int64_t Hkv, int64_t D, int64_t kind,
                                   float eps, float rms_eps, float scale) {
  const int64_t B = x.size(0), C = x.size(2), I = w[6].size(0), QD = H * D, KD = Hkv * D;
  const bool rotary = cc.defined();
  const bool windowed = st.window > 0;
  const bool has_linear = st.kv.defined();
  const int64_t r = windowed ? st.keys.size(2) : 0;
  const bool fold = windowed && r + 1 > st.window - 1;  // the oldest key leaves the window
  const int64_t r_new = windowed ? r + 1 - (fold ? 1 : 0) : 0;
  const bool linear_after = !windowed || has_linear || fold;
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  at::Tensor y = at::empty({B, 1, C}, x.options());
  at::Tensor packed = linear_after ? at::empty({B, H, D, D + 1}, x.options()) : at::empty({0}, x.options());
  // where the buffer after the token lives: appended in place (the same buffers, the view moved on by `start`
  // rows) or in new buffers of window_capacity rows (the kept rows copied to their front)
  const bool append = windowed && st.append;
  const int64_t start = fold ? 1 : 0;
  at::Tensor keys_buf, values_buf, mask_buf;
  int64_t ks0 = 0, ks1 = 0, ms0 = 0;
  if (windowed && append) {
    keys_buf = st.keys;
    values_buf = st.values;
    mask_buf = st.key_mask;
    ks0 = st.keys.stride(0);
    ks1 = st.keys.stride(1);
    ms0 = st.key_mask.stride(0);
  } else if (windowed) {
    const int64_t cap = std::max(window_capacity(st.window), r_new);
    keys_buf = at::empty({B, H, cap, D}, x.options());
    values_buf = at::empty({B, H, cap, D}, x.options());
    mask_buf = at::empty({B, cap}, st.key_mask.options());
    ks0 = H * cap * D;
    ks1 = cap * D;
    ms0 = cap;
  }
  float* yp = y.data_ptr<float>();

  std::vector<float> h(B * C), q(B * QD), k(B * KD), v(B * KD), att(B * QD), o(B * C), g(B * I), u(B * I);
  std::vector<float> scratch(D), phi_q(D), phi_k(D), num(D), scores(r + 1);
  rms_norm(xp, B, C, w[0].data_ptr<float>(), rms_eps, h.data());
  gemv_bias(h.data(), B, C, w[1], bias[0], q.data());
  gemv_bias(h.data(), B, C, w[2], bias[1], k.data());
  gemv_bias(h.data(), B, C, w[3], bias[2], v.data());
  const int64_t groups = H / Hkv;
  for (int64_t b = 0; b < B; ++b) {
    if (rotary) {
      const int64_t rb = cc.size(0) == 1 ? 0 : b;
      const float* cp = cc.data_ptr<float>() + rb * D;
      const float* sp = sc.data_ptr<float>() + rb * D;
      rotate(q.data() + b * QD, H, D, cp, sp, scratch.data());
      rotate(k.data() + b * KD, Hkv, D, cp, sp, scratch.data());
    }
    for (int64_t hh = 0; hh < H; ++hh) {
      const float* qh = q.data() + b * QD + hh * D;
      const float* kh = k.data() + b * KD + (hh / groups) * D;
      const float* vh = v.data() + b * KD + (hh / groups) * D;
      float* out = att.data() + b * QD + hh * D;
      float* sp = has_linear || fold || !windowed ? packed.data_ptr<float>() + (b * H + hh) * D * (D + 1) : nullptr;
      const float* kvp = has_linear ? st.kv.data_ptr<float>() + b * st.kv.stride(0) + hh * st.kv.stride(1) : nullptr;
      const float* zp =
          has_linear ? st.k_sum.data_ptr<float>() + b * st.k_sum.stride(0) + hh * st.k_sum.stride(1) : nullptr;
      const int64_t kv_m = has_linear ? st.kv.stride(2) : 0, kv_e = has_linear ? st.kv.stride(3) : 0;
      const int64_t z_m = has_linear ? st.k_sum.stride(2) : 0;
      if (!windowed) {
        attend_one(qh, kh, vh, kvp, kv_m, kv_e, zp, z_m, true, D, D, kind, eps, sp, out, phi_q.data(), phi_k.data(),
                   num.data());
        continue;
      }
      const float* kb = st.keys.data_ptr<float>() + b * st.keys.stride(0) + hh * st.keys.stride(1);
      const float* vb = st.values.data_ptr<float>() + b * st.values.stride(0) + hh * st.values.stride(1);
      const bool* mb = st.key_mask.data_ptr<bool>() + b * st.key_mask.stride(0);
      window_one(qh, kh, vh, kb, vb, mb, r, D, scale, has_linear, kvp, kv_m, kv_e, zp, z_m, kind, eps, out,
                 scores.data(), phi_q.data(), num.data());
      if (sp != nullptr) {  // the linear state after the token: the old one (or zeros) plus a leaving key
        for (int64_t i = 0; i < D; ++i) {
          float* row = sp + i * (D + 1);
          if (has_linear) {
            copy_strided(kvp + i * kv_m, kv_e, row, D);
            row[D] = zp[i * z_m];
          } else {
            for (int64_t e = 0; e <= D; ++e) row[e] = 0.0f;
          }
        }
        const bool leaving_real = r > 0 ? mb[0] : true;
        if (fold && leaving_real) {  // a padded key is skipped, not multiplied by 0: a NaN under the mask stays out
          const float* k0 = r > 0 ? kb : kh;
          const float* v0 = r > 0 ? vb : vh;
          for (int64_t i = 0; i < D; ++i) {
            const float pk = feature(k0[i], kind);
            float* row = sp + i * (D + 1);
            for (int64_t e = 0; e < D; ++e) row[e] += pk * v0[e];
            row[D] += pk;
          }
        }
      }
      // the buffer after the token: the kept buffered keys, then the new one. Appending writes only the row after
      // the buffered ones (outside every view handed out); a new buffer gets the kept rows (contiguous in both) first.
      float* kn = keys_buf.data_ptr<float>() + b * ks0 + hh * ks1;
      float* vn = values_buf.data_ptr<float>() + b * ks0 + hh * ks1;
      if (!append) {
        stream_copy(kb + start * D, kn, (r - start) * D);
        stream_copy(vb + start * D, vn, (r - start) * D);
      }
      const int64_t new_pos = append ? r : r - start;  // r - start is -1 when the new key itself leaves (window 1)
      const bool keep_new = r_new > 0;
      if (keep_new) {
        std::copy(kh, kh + D, kn + new_pos * D);
        std::copy(vh, vh + D, vn + new_pos * D);
      }
      if (hh == 0) {
        bool* mn = mask_buf.data_ptr<bool>() + b * ms0;
        if (!append)
          for (int64_t j = start; j < r; ++j) mn[j - start] = mb[j];
        if (keep_new) mn[new_pos] = true;
      }
    }
  }
  gemv_bias(att.data(), B, QD, w[4], bias[3], o.data());
  for (int64_t i = 0; i < B * C; ++i) o[i] += xp[i];  // the residual: o is now the block's middle state
  rms_norm(o.data(), B, C, w[5].data_ptr<float>(), rms_eps, h.data());
  gemv_bias(h.data(), B, C, w[6], bias[4], g.data());
  gemv_bias(h.data(), B, C, w[7], bias[5], u.data());
  for (int64_t i = 0; i < B * I; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];  // silu(gate) * up
  gemv_bias(g.data(), B, I, w[8], bias[6], yp);
  for (int64_t i = 0; i < B * C; ++i) yp[i] += o[i];
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  _mm_sfence();  // the streaming stores above are ordered before anything after the step
#endif
  if (!windowed) return {y, packed};
  // the new views: r_new rows from `start` of the appended buffers, or from the front of the new ones
  const int64_t first = append ? start : 0;
  at::Tensor keys_new = keys_buf.as_strided({B, H, r_new, D}, {ks0, ks1, D, 1}, keys_buf.storage_offset() + first * D);
  at::Tensor values_new =
      values_buf.as_strided({B, H, r_new, D}, {ks0, ks1, D, 1}, values_buf.storage_offset() + first * D);
  at::Tensor mask_new = mask_buf.as_strided({B, r_new}, {ms0, 1}, mask_buf.storage_offset() + first);
  return {y, packed, keys_new, values_new, mask_new};
}

void check_state_tensor(const at::Tensor& t, std::initializer_list<int64_t> shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == static_cast<int64_t>(shape.size()),
              "decoder_block_step: ", name, " must be a float32 CPU tensor of ", shape.size(), " dims");
  int64_t d = 0;
  for (int64_t n : shape) {
    TORCH_CHECK(t.size(d) == n, "decoder_block_step: ", name, " has size ", t.size(d), " in dim ", d, ", expected ", n);
    TORCH_CHECK(t.stride(d) >= 0, "decoder_block_step: ", name, " has a negative stride");
    ++d;
  }
}

// Shapes, dtypes and devices of a block step, checked before any pointer is formed; returns (C, I).
std::pair<int64_t, int64_t> check_block(const at::Tensor& x, const std::vector<at::Tensor>& w, int64_t H, int64_t Hkv,
                                        int64_t D, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(1) == 1,
              op, ": x must be a float32 (batch, 1, hidden) CPU tensor");
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(B >= 1 && B <= kMaxRows, op, ": 1 to ", kMaxRows, " rows, got ", B);
  TORCH_CHECK(w.size() == 9, op, ": 9 weights (norm1, q, k, v, o, norm2, gate, up, down), got ", w.size());
  TORCH_CHECK(H >= 1 && Hkv >= 1 && D >= 1 && H % Hkv == 0, op, ": heads (", H, ") must be a positive multiple of ",
              "key/value heads (", Hkv, ") and head_dim (", D, ") positive");
  const int64_t I = w[6].dim() == 2 ? w[6].size(0) : -1;
  TORCH_CHECK(I > 0, op, ": gate weight must be (intermediate, hidden)");
  check_vector(w[0], C, op, "norm1");
  check_vector(w[5], C, op, "norm2");
  check_matrix(w[1], H * D, C, op, "q weight");
  check_matrix(w[2], Hkv * D, C, op, "k weight");
  check_matrix(w[3], Hkv * D, C, op, "v weight");
  check_matrix(w[4], C, H * D, op, "o weight");
  check_matrix(w[6], I, C, op, "gate weight");
  check_matrix(w[7], I, C, op, "up weight");
  check_matrix(w[8], C, I, op, "down weight");
  return {C, I};
}

// cos/sin (batch or 1, ..., head_dim) with head_dim * (batch or 1) elements, float32; both or neither
std::pair<at::Tensor, at::Tensor> check_rotary(const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                                               int64_t B, int64_t D, const char* op) {
  const bool rotary = cos.has_value() && cos->defined();
  TORCH_CHECK(rotary == (sin.has_value() && sin->defined()), op, ": pass both cos and sin or neither");
  if (!rotary) return {at::Tensor(), at::Tensor()};
  TORCH_CHECK(D % 2 == 0, op, ": rotary needs an even head dimension");
  at::Tensor cc = cos->contiguous(), sc = sin->contiguous();
  for (const at::Tensor* t : {&cc, &sc})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() >= 1 && t->size(-1) == D &&
                    (t->size(0) == B || t->size(0) == 1) && t->numel() == t->size(0) * D,
                op, ": cos/sin must be float32 (batch or 1, ..., head_dim) with one position per row");
  TORCH_CHECK(cc.size(0) == sc.size(0), op, ": cos and sin must have the same shape");
  return {cc, sc};
}

const float* bias_of(const c10::optional<at::Tensor>& b, int64_t n, const char* name, std::vector<at::Tensor>& keep) {
  if (!b.has_value() || !b->defined()) return nullptr;
  TORCH_CHECK(b->device().is_cpu() && b->scalar_type() == at::kFloat && b->dim() == 1 && b->size(0) == n,
              "decoder_block_step: ", name, " bias must be a float32 (", n, ",) CPU tensor");
  keep.push_back(b->contiguous());
  return keep.back().data_ptr<float>();
}

// One past the last element a write of `extent` elements from element `first` (a row index) of every (batch,
// head) touches, counted from the start of t's storage, or -1 when that does not fit in an int64 (strides and
// offsets come from the caller: a crafted view must not wrap the sum around to an address inside the storage).
int64_t write_end(const at::Tensor& t, int64_t B, int64_t H, int64_t first, int64_t extent) {
  int64_t end = t.storage_offset(), term = 0;
  const int64_t dims[3][2] = {{B - 1, t.stride(0)}, {H - 1, t.dim() == 4 ? t.stride(1) : 0},
                              {first, t.stride(t.dim() == 4 ? 2 : 1)}};
  for (const auto& d : dims) {
    if (d[0] < 0 || d[1] < 0 || __builtin_mul_overflow(d[0], d[1], &term) || __builtin_add_overflow(end, term, &end))
      return -1;
  }
  return __builtin_add_overflow(end, extent, &end) ? -1 : end;
}

// An in-place append writes row r of every (batch, head) of keys/values and element r of every mask row: the
// buffers must be laid out as new ones are ((B, H, cap, D) and (B, cap) with cap > r, the view starting anywhere in
// them), those slots inside the storage, and no other input in the same memory. Which slots no view handed out
// covers is the caller's to know (the cache layer that made the buffer); this keeps the writes inside the buffer,
// off the view's own rows and off every other input.
void check_append(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask, int64_t B, int64_t H,
                  int64_t r, int64_t D, int64_t window, const std::vector<const at::Tensor*>& others, const char* op) {
  TORCH_CHECK(window >= 2 && r >= 1, op, ": append needs a window of at least 2 and a buffered key (got window ",
              window, " and ", r, " keys)");
  const int64_t s1 = keys.stride(1), s0 = keys.stride(0);
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == D && s1 % D == 0 && s1 > 0 && (B == 1 || s0 == H * s1) &&
                  values.strides() == keys.strides(),
              op, ": append needs keys and values laid out as (batch, heads, capacity, head_dim) buffers");
  // the view's first row within its head's rows, and the row after the view inside them too (not the next head's)
  for (const at::Tensor* t : {&keys, &values})
    TORCH_CHECK(t->storage_offset() % D == 0 && (t->storage_offset() % s1) / D + r + 1 <= s1 / D, op,
                ": append needs room for a row after the ", r, " buffered ones (the buffer's capacity is ", s1 / D,
                " rows)");
  for (const at::Tensor* t : {&keys, &values}) {
    const int64_t end = write_end(*t, B, H, r, D);
    TORCH_CHECK(end >= 0 && end <= static_cast<int64_t>(t->storage().nbytes() / sizeof(float)), op,
                ": append would write past the end of the keys/values buffer");
  }
  const int64_t m0 = mask.stride(0);
  TORCH_CHECK(mask.stride(1) == 1 && (B == 1 || (m0 > 0 && (mask.storage_offset() % m0) + r + 1 <= m0)), op,
              ": append needs the mask laid out as a (batch, capacity) buffer with room after its ", r, " entries");
  const int64_t mask_end = write_end(mask, B, 1, r, 1);
  TORCH_CHECK(mask_end >= 0 && mask_end <= static_cast<int64_t>(mask.storage().nbytes()), op,
              ": append would write past the end of the mask buffer");
  // the written rows must not be anything else the step reads or returns
  TORCH_CHECK(!keys.is_alias_of(values) && !keys.is_alias_of(mask) && !values.is_alias_of(mask), op,
              ": append needs keys, values and key_mask in buffers of their own");
  for (const at::Tensor* o : others)
    TORCH_CHECK(!o->defined() || (!o->is_alias_of(keys) && !o->is_alias_of(values) && !o->is_alias_of(mask)), op,
                ": append needs keys, values and key_mask in buffers no other input shares");
}

// The block step of a decoder patched with linear (window == 0) or window-linear attention (window >= 1), with
// grouped-query heads and optional biases (Llama, Mistral, Qwen2 blocks). weights: norm1, q, k, v, o, norm2, gate,
// up, down; biases: q, k, v, o, gate, up, down (each optional). State: kv/k_sum (linear; window-linear: both or
// neither), keys/values (B, H, r, D) and key_mask (B, r) bool (window-linear, r <= window - 1; rows contiguous).
// Returns y (B, 1, C), the new kv (B, H, D, D) and k_sum (B, H, D) (views of one buffer; empty tensors while
// window-linear has no linear state) and, for window-linear, the new keys, values (B, H, r', D) and mask (B, r'):
// views of new buffers with room for more rows, or with append, of the given ones, whose row r (the one after the
// view) is then the only thing written (see check_append). Nothing else of an input is written.
std::vector<at::Tensor> decoder_block_step(const at::Tensor& x, std::vector<at::Tensor> weights,
                                           std::vector<c10::optional<at::Tensor>> biases,
                                           const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                                           const c10::optional<at::Tensor>& kv, const c10::optional<at::Tensor>& k_sum,
                                           const c10::optional<at::Tensor>& keys,
                                           const c10::optional<at::Tensor>& values,
                                           const c10::optional<at::Tensor>& key_mask, int64_t heads, int64_t kv_heads,
                                           int64_t head_dim, int64_t feature_kind, int64_t window, double scale,
                                           double eps, double rms_eps, bool append) {
  const char* op = "decoder_block_step";
  TORCH_CHECK(feature_kind == 1 || feature_kind == 2, op, ": feature must be 1 (elu) or 2 (relu)");
  TORCH_CHECK(window >= 0, op, ": window must be 0 (linear) or positive (window-linear), got ", window);
  TORCH_CHECK(std::isfinite(scale) && std::isfinite(eps) && std::isfinite(rms_eps), op, ": non-finite scale or eps");
  const int64_t H = heads, Hkv = kv_heads, D = head_dim;
  auto [C, I] = check_block(x, weights, H, Hkv, D, op);
  (void)C;
  (void)I;
  const int64_t B = x.size(0);
  auto [cc, sc] = check_rotary(cos, sin, B, D, op);
  TORCH_CHECK(biases.size() == 7, op, ": 7 biases (q, k, v, o, gate, up, down; each may be None), got ", biases.size());
  std::vector<at::Tensor> keep;
  keep.reserve(7);
  const int64_t sizes[7] = {H * D, Hkv * D, Hkv * D, x.size(2), weights[6].size(0), weights[7].size(0), x.size(2)};
  const char* names[7] = {"q", "k", "v", "o", "gate", "up", "down"};
  const float* bias[7];
  for (int i = 0; i < 7; ++i) bias[i] = bias_of(biases[i], sizes[i], names[i], keep);
  BlockState st;
  st.window = window;
  const bool has_kv = kv.has_value() && kv->defined(), has_z = k_sum.has_value() && k_sum->defined();
  TORCH_CHECK(has_kv == has_z, op, ": pass both kv and k_sum or neither");
  TORCH_CHECK(has_kv || window > 0, op, ": linear attention needs its state kv and k_sum");
  if (has_kv) {
    check_state_tensor(*kv, {B, H, D, D}, "kv");
    check_state_tensor(*k_sum, {B, H, D}, "k_sum");
    st.kv = *kv;
    st.k_sum = *k_sum;
  }
  if (window > 0) {
    TORCH_CHECK(keys.has_value() && keys->defined() && values.has_value() && values->defined() &&
                    key_mask.has_value() && key_mask->defined(),
                op, ": window-linear needs the buffered keys, values and key_mask");
    const int64_t r = keys->dim() == 4 ? keys->size(2) : -1;
    TORCH_CHECK(r >= 0 && r <= window - 1, op, ": the buffer holds ", r, " keys; window ", window, " keeps at most ",
                window - 1);
    check_state_tensor(*keys, {B, H, r, D}, "keys");
    check_state_tensor(*values, {B, H, r, D}, "values");
    TORCH_CHECK(key_mask->device().is_cpu() && key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 &&
                    key_mask->size(0) == B && key_mask->size(1) == r && key_mask->stride(0) >= 0,
                op, ": key_mask must be a bool (batch, ", r, ") CPU tensor");
    // rows are read (and copied) whole: each must be contiguous; batch and head strides may be anything
    for (const at::Tensor* t : {&*keys, &*values})
      TORCH_CHECK(r == 0 || ((D == 1 || t->stride(3) == 1) && (r == 1 || t->stride(2) == D)), op,
                  ": keys and values must have contiguous rows (strides (..., ", D, ", 1))");
    TORCH_CHECK(r <= 1 || key_mask->stride(1) == 1, op, ": key_mask must have contiguous rows");
    st.keys = *keys;
    st.values = *values;
    st.key_mask = *key_mask;
    st.append = append;
    if (append) {
      std::vector<const at::Tensor*> others = {&x, &cc, &sc};
      for (const at::Tensor& w : weights) others.push_back(&w);
      for (const at::Tensor& b : keep) others.push_back(&b);
      if (has_kv) {
        others.push_back(&*kv);
        others.push_back(&*k_sum);
      }
      check_append(*keys, *values, *key_mask, B, H, r, D, window, others, op);
    }
  } else {
    TORCH_CHECK(!append, op, ": append is for window-linear buffers only");
  }
  std::vector<at::Tensor> out = block_step(x, weights, bias, cc, sc, st, H, Hkv, D, feature_kind,
                                           static_cast<float>(eps), static_cast<float>(rms_eps),
                                           static_cast<float>(scale));
  // the new linear state as the views the state keeps (kv, k_sum of one packed buffer), made here rather than by
  // two indexing calls from Python for every layer of every token
  const at::Tensor packed = out[1];
  std::vector<at::Tensor> result;
  result.reserve(out.size() + 1);
  result.push_back(out[0]);
  result.push_back(packed.numel() ? packed.narrow(3, 0, D) : packed);
  result.push_back(packed.numel() ? packed.select(3, D) : packed);
  for (size_t i = 2; i < out.size(); ++i) result.push_back(out[i]);
  return result;
}

// out (..., n) = the RMSNorm of each row of x (..., n) with weight (n,): a decoder's final norm at one token per
// row, which through torch.rms_norm costs several dispatched ops for a few hundred floats.
at::Tensor decode_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
              "decode_rms_norm: x must be a float32 CPU tensor of at least one dimension");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                  weight.size(0) == n && weight.is_contiguous(),
              "decode_rms_norm: weight must be a contiguous float32 (", n, ",) CPU tensor");
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous();
  rms_norm(xc.data_ptr<float>(), xc.numel() / n, n, weight.data_ptr<float>(), static_cast<float>(eps),
           y.data_ptr<float>());
  return y;
}

// (cos, sin) (1, 1, 2 * len(inv_freq)) of the one position `position`: transformers' rotary table (the frequencies
// twice over, times attention_scaling), the same float32 values as the Python expression. The products are the
// tensor ops' own (a float32 tensor times a Python number multiplies by the number rounded to float32); cos and sin
// are ATen's, whose vector code a C++ loop would not match to the bit.
std::vector<at::Tensor> rotary_cos_sin(const at::Tensor& inv_freq, int64_t position, double scaling) {
  TORCH_CHECK(inv_freq.device().is_cpu() && inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1,
              "rotary_cos_sin: inv_freq must be a float32 (head_dim / 2,) CPU tensor");
  const int64_t half = inv_freq.size(0);
  const at::Tensor f = inv_freq.contiguous();
  at::Tensor emb = at::empty({1, 1, 2 * half}, f.options());
  const float* fp = f.data_ptr<float>();
  float* ep = emb.data_ptr<float>();
  const float pos = static_cast<float>(position);
  for (int64_t j = 0; j < half; ++j) ep[j] = ep[j + half] = fp[j] * pos;
  at::Tensor cos = emb.cos(), sin = emb.sin();
  if (scaling != 1.0) {  // a product with 1.0 changes nothing
    const float sf = static_cast<float>(scaling);
    for (at::Tensor* t : {&cos, &sin}) {
      float* p = t->data_ptr<float>();
      for (int64_t j = 0; j < 2 * half; ++j) p[j] *= sf;
    }
  }
  return {cos, sin};
}

// (cos, sin) (1, 1, 1, head_dim) (batch, heads, seq, head_dim) of position `position` for rotary frequencies
// theta^(-2j / head_dim), j < head_dim / 2: the inverse frequencies as the Python expression
// 1.0 / (theta ** (arange(0, head_dim, 2) / head_dim)) computes them in float32 (a reciprocal, times 1.0), then
// rotary_cos_sin.
std::vector<at::Tensor> rope_cos_sin(int64_t head_dim, double theta, int64_t position) {
  TORCH_CHECK(head_dim >= 2 && head_dim % 2 == 0, "rope_cos_sin: head_dim must be even and positive, got ", head_dim);
  const at::Tensor exponents = at::arange(0, head_dim, 2, at::TensorOptions().dtype(at::kFloat)).div(head_dim);
  std::vector<at::Tensor> table = rotary_cos_sin(at::pow(theta, exponents).reciprocal(), position, 1.0);
  for (at::Tensor& t : table) t = t.view({1, 1, 1, head_dim});
  return table;
}

// One block's arguments to decoder_block_step after x, as decoder_stack_step receives them.
struct BlockArguments {
  std::vector<at::Tensor> weights;
  std::vector<c10::optional<at::Tensor>> biases;
  c10::optional<at::Tensor> cos, sin, kv, k_sum, keys, values, key_mask;
  int64_t heads, kv_heads, head_dim, feature, window;
  double scale, eps, rms_eps;
  bool append;
};

}  // namespace

// A decoding step's decoder stack in one call: decoder_block_step for each block in turn (each block's input the
// output of the one before), then the final RMSNorm (norm_weight given) and the head's product (head_weight given).
// blocks: one tuple per block of decoder_block_step's arguments after x. Returns the last output (the logits with a
// head: (B, 1, vocab)) and each block's state tensors (decoder_block_step's results after its output).
//
// Between blocks a step through Python runs the interpreter on code and data the previous block's weight stream
// evicted from the caches; here nothing runs between the streams. The arguments are read with the interpreter
// lock held, the blocks run without it. A block that fails raises after the blocks before it ran; nothing they
// returned is kept, and what they wrote in place is only an appended row past every view (see check_append).
std::tuple<at::Tensor, std::vector<std::vector<at::Tensor>>> decoder_stack_step(
    const at::Tensor& x, const pybind11::list& blocks, const c10::optional<at::Tensor>& norm_weight, double norm_eps,
    const c10::optional<at::Tensor>& head_weight, const c10::optional<at::Tensor>& head_bias) {
  const char* op = "decoder_stack_step";
  std::vector<BlockArguments> args;
  args.reserve(blocks.size());
  for (const pybind11::handle item : blocks) {
    const auto t = item.cast<pybind11::tuple>();
    TORCH_CHECK(t.size() == 18, op, ": each block takes decoder_block_step's 18 arguments after x, got ", t.size());
    args.push_back({t[0].cast<std::vector<at::Tensor>>(), t[1].cast<std::vector<c10::optional<at::Tensor>>>(),
                    t[2].cast<c10::optional<at::Tensor>>(), t[3].cast<c10::optional<at::Tensor>>(),
                    t[4].cast<c10::optional<at::Tensor>>(), t[5].cast<c10::optional<at::Tensor>>(),
                    t[6].cast<c10::optional<at::Tensor>>(), t[7].cast<c10::optional<at::Tensor>>(),
                    t[8].cast<c10::optional<at::Tensor>>(), t[9].cast<int64_t>(), t[10].cast<int64_t>(),
                    t[11].cast<int64_t>(), t[12].cast<int64_t>(), t[13].cast<int64_t>(), t[14].cast<double>(),
                    t[15].cast<double>(), t[16].cast<double>(), t[17].cast<bool>()});
  }
  TORCH_CHECK(!args.empty(), op, ": no blocks");
  TORCH_CHECK(!(head_bias.has_value() && head_bias->defined()) || (head_weight.has_value() && head_weight->defined()),
              op, ": a head bias without a head weight");
  at::Tensor hidden = x;
  std::vector<std::vector<at::Tensor>> states;
  states.reserve(args.size());
  {
    pybind11::gil_scoped_release unlocked;
    for (BlockArguments& a : args) {
      std::vector<at::Tensor> out = decoder_block_step(
          hidden, a.weights, a.biases, a.cos, a.sin, a.kv, a.k_sum, a.keys, a.values, a.key_mask, a.heads,
          a.kv_heads, a.head_dim, a.feature, a.window, a.scale, a.eps, a.rms_eps, a.append);
      hidden = out[0];
      states.emplace_back(std::make_move_iterator(out.begin() + 1), std::make_move_iterator(out.end()));
    }
    if (norm_weight.has_value() && norm_weight->defined()) hidden = decode_rms_norm(hidden, *norm_weight, norm_eps);
    if (head_weight.has_value() && head_weight->defined()) hidden = decode_gemv(hidden, *head_weight, head_bias);
  }
  return {hidden, std::move(states)};
}

// The same functions as Python calls: a decoding step calls them for every layer of every token, and a call
// through torch.ops costs about 6 us of argument matching against the schema, against about 1.5 us here. The
// kernels run without the interpreter lock, as the torch.ops calls do.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const auto unlocked = py::call_guard<py::gil_scoped_release>();
  m.def("decode_gemv", &decode_gemv, unlocked);
  m.def("decoder_block_step", &decoder_block_step, unlocked);
  m.def("decode_rms_norm", &decode_rms_norm, unlocked);
  m.def("rotary_cos_sin", &rotary_cos_sin, unlocked);
  m.def("rope_cos_sin", &rope_cos_sin, unlocked);
  m.def("decoder_stack_step", &decoder_stack_step);  // releases the lock itself, after reading its arguments
}

TORCH_LIBRARY(hf_efficient_decode_cpu, lib) {
  lib.def("decode_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &decode_gemv);
  lib.def(
      "linear_decode_step(Tensor q, Tensor k, Tensor v, Tensor kv, Tensor k_sum, Tensor? key_mask, int feature, "
      "float eps) -> Tensor[]",
      &linear_decode_step);
  lib.def(
      "decoder_block_step(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? cos, Tensor? sin, Tensor? kv, "
      "Tensor? k_sum, Tensor? keys, Tensor? values, Tensor? key_mask, int heads, int kv_heads, int head_dim, "
      "int feature, int window, float scale, float eps, float rms_eps, bool append=False) -> Tensor[]",
      &decoder_block_step);
}
