// Decoding at batch 1 on a CPU: the two operations one generated token runs per layer.
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
// Every index is checked against the shapes before any pointer is formed (TORCH_CHECK), so no input can
// make these kernels read or write out of bounds.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
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
template <int R>
void gemv_rows(const float* x, int64_t in, const float* w, int64_t ldw, int64_t out, const float* bias, float* y) {
  constexpr int U = R == 1 ? 4 : (R == 2 ? 2 : 1);
  constexpr int64_t step = U * kLanes;
  for (int64_t o = 0; o < out; ++o) {
    const float* wr = w + o * ldw;
    vec acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = vzero();
    int64_t i = 0;
    for (; i + step <= in; i += step) {
      for (int u = 0; u < U; ++u) {
        const vec wv = vload(wr + i + u * kLanes);
        for (int r = 0; r < R; ++r) acc[r][u] = vfma(wv, vload(x + r * in + i + u * kLanes), acc[r][u]);
      }
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
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == out,
                "decode_gemv: bias must be float32 (out,) = (", out, ",)");
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
    if (real) {
      for (int64_t e = 0; e < E; ++e) dst[e] = src[e * kv_e] + pk * v[e];
      dst[E] = z[m * z_m] + pk;
    } else {
      for (int64_t e = 0; e < E; ++e) dst[e] = src[e * kv_e];
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
void check_matrix(const at::Tensor& w, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) == rows &&
                  w.size(1) == cols && w.is_contiguous(),
              "linear_lm_decode_layer: ", name, " must be a contiguous float32 (", rows, ", ", cols, ") CPU tensor");
}

void check_vector(const at::Tensor& w, int64_t n, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == n &&
                  w.is_contiguous(),
              "linear_lm_decode_layer: ", name, " must be a contiguous float32 (", n, ",) CPU tensor");
}

void gemv(const float* x, int64_t rows, int64_t in, const at::Tensor& w, float* y) {
  const int64_t out = w.size(0);
  const float* wp = w.data_ptr<float>();
  switch (rows) {
    case 1: gemv_rows<1>(x, in, wp, in, out, nullptr, y); break;
    case 2: gemv_rows<2>(x, in, wp, in, out, nullptr, y); break;
    case 3: gemv_rows<3>(x, in, wp, in, out, nullptr, y); break;
    default: gemv_rows<4>(x, in, wp, in, out, nullptr, y); break;
  }
}

// y = x / sqrt(mean(x^2) + eps) * weight, per row of n (torch.nn.RMSNorm in float32)
void rms_norm(const float* x, int64_t rows, int64_t n, const float* weight, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; ++i) ss += x[r * n + i] * x[r * n + i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
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

// x: (B, 1, C) hidden states of one new token per row; the weights of one pre-norm block (RMSNorm -> q, k, v ->
// rotary -> causal linear attention step -> o -> residual; RMSNorm -> SwiGLU MLP -> residual); cos/sin (B or 1,
// 1, 1, D) or undefined (no rotary); the attention state kv (B, H, D, D), k_sum (B, H, D) float32. Returns the
// block's output (B, 1, C) and the new packed state (B, H, D, D + 1); the inputs are not written.
std::vector<at::Tensor> linear_lm_decode_layer(
    const at::Tensor& x, const at::Tensor& norm1, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
    const at::Tensor& wo, const at::Tensor& norm2, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
    const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, const at::Tensor& kv,
    const at::Tensor& k_sum, const c10::optional<at::Tensor>& key_mask, int64_t heads, int64_t feature_kind,
    double eps, double rms_eps) {
  TORCH_CHECK(feature_kind == 1 || feature_kind == 2, "linear_lm_decode_layer: feature must be 1 (elu) or 2 (relu)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(1) == 1,
              "linear_lm_decode_layer: x must be a float32 (batch, 1, hidden) CPU tensor");
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "linear_lm_decode_layer: 1 to ", kMaxRows, " rows, got ", B);
  TORCH_CHECK(heads >= 1 && C % heads == 0 && C / heads > 0, "linear_lm_decode_layer: hidden ", C,
              " is not a multiple of heads ", heads);
  const int64_t H = heads, D = C / heads, I = wg.dim() == 2 ? wg.size(0) : -1;
  TORCH_CHECK(I > 0, "linear_lm_decode_layer: gate weight must be (intermediate, hidden)");
  check_vector(norm1, C, "norm1");
  check_vector(norm2, C, "norm2");
  check_matrix(wq, C, C, "q weight");
  check_matrix(wk, C, C, "k weight");
  check_matrix(wv, C, C, "v weight");
  check_matrix(wo, C, C, "o weight");
  check_matrix(wg, I, C, "gate weight");
  check_matrix(wu, I, C, "up weight");
  check_matrix(wd, C, I, "down weight");
  const bool rotary = cos.has_value() && cos->defined();
  TORCH_CHECK(rotary == (sin.has_value() && sin->defined()), "linear_lm_decode_layer: pass both cos and sin or neither");
  at::Tensor cc, sc;
  if (rotary) {
    TORCH_CHECK(D % 2 == 0, "linear_lm_decode_layer: rotary needs an even head dimension");
    cc = cos->contiguous();
    sc = sin->contiguous();
    for (const at::Tensor* t : {&cc, &sc})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 4 &&
                      (t->size(0) == B || t->size(0) == 1) && t->size(1) == 1 && t->size(2) == 1 && t->size(3) == D,
                  "linear_lm_decode_layer: cos/sin must be float32 (batch or 1, 1, 1, head_dim)");
    TORCH_CHECK(cc.size(0) == sc.size(0), "linear_lm_decode_layer: cos and sin must have the same shape");
  }
  TORCH_CHECK(kv.device().is_cpu() && kv.scalar_type() == at::kFloat && kv.dim() == 4 && kv.size(0) == B &&
                  kv.size(1) == H && kv.size(2) == D && kv.size(3) == D,
              "linear_lm_decode_layer: kv must be float32 (batch, heads, head_dim, head_dim)");
  TORCH_CHECK(k_sum.device().is_cpu() && k_sum.scalar_type() == at::kFloat && k_sum.dim() == 3 &&
                  k_sum.size(0) == B && k_sum.size(1) == H && k_sum.size(2) == D,
              "linear_lm_decode_layer: k_sum must be float32 (batch, heads, head_dim)");
  for (const at::Tensor* t : {&kv, &k_sum})
    for (int64_t d = 0; d < t->dim(); ++d) TORCH_CHECK(t->stride(d) >= 0, "linear_lm_decode_layer: negative stride");
  const bool* mask = nullptr;
  at::Tensor mc;
  if (key_mask.has_value() && key_mask->defined()) {
    mc = key_mask->contiguous();
    TORCH_CHECK(mc.scalar_type() == at::kBool && mc.numel() == B, "linear_lm_decode_layer: key_mask must be (batch,) bool");
    mask = mc.data_ptr<bool>();
  }
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  at::Tensor y = at::empty({B, 1, C}, x.options());
  at::Tensor state = at::empty({B, H, D, D + 1}, kv.options());
  float* yp = y.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  const float e = static_cast<float>(eps), re = static_cast<float>(rms_eps);

  std::vector<float> h(B * C), q(B * C), k(B * C), v(B * C), att(B * C), o(B * C), g(B * I), u(B * I);
  std::vector<float> scratch(D), phi_q(D), phi_k(D), num(D);
  rms_norm(xp, B, C, norm1.data_ptr<float>(), re, h.data());
  gemv(h.data(), B, C, wq, q.data());
  gemv(h.data(), B, C, wk, k.data());
  gemv(h.data(), B, C, wv, v.data());
  const float* kvp = kv.data_ptr<float>();
  const float* zp = k_sum.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (rotary) {
      const int64_t rb = cc.size(0) == 1 ? 0 : b;
      rotate(q.data() + b * C, H, D, cc.data_ptr<float>() + rb * D, sc.data_ptr<float>() + rb * D, scratch.data());
      rotate(k.data() + b * C, H, D, cc.data_ptr<float>() + rb * D, sc.data_ptr<float>() + rb * D, scratch.data());
    }
    const bool real = mask == nullptr || mask[b];
    for (int64_t hh = 0; hh < H; ++hh) {
      const int64_t off = b * C + hh * D;
      attend_one(q.data() + off, k.data() + off, v.data() + off, kvp + b * kv.stride(0) + hh * kv.stride(1),
                 kv.stride(2), kv.stride(3), zp + b * k_sum.stride(0) + hh * k_sum.stride(1), k_sum.stride(2), real, D,
                 D, feature_kind, e, sp + (b * H + hh) * D * (D + 1), att.data() + off, phi_q.data(), phi_k.data(),
                 num.data());
    }
  }
  gemv(att.data(), B, C, wo, o.data());
  for (int64_t i = 0; i < B * C; ++i) o[i] += xp[i];  // the residual: o is now the block's middle state
  rms_norm(o.data(), B, C, norm2.data_ptr<float>(), re, h.data());
  gemv(h.data(), B, C, wg, g.data());
  gemv(h.data(), B, C, wu, u.data());
  for (int64_t i = 0; i < B * I; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];  // silu(gate) * up
  gemv(g.data(), B, I, wd, yp);
  for (int64_t i = 0; i < B * C; ++i) yp[i] += o[i];
  return {y, state};
}

}  // namespace

TORCH_LIBRARY(hf_efficient_decode_cpu, lib) {
  lib.def("decode_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &decode_gemv);
  lib.def(
      "linear_decode_step(Tensor q, Tensor k, Tensor v, Tensor kv, Tensor k_sum, Tensor? key_mask, int feature, "
      "float eps) -> Tensor[]",
      &linear_decode_step);
  lib.def(
      "linear_lm_decode_layer(Tensor x, Tensor norm1, Tensor wq, Tensor wk, Tensor wv, Tensor wo, Tensor norm2, "
      "Tensor wg, Tensor wu, Tensor wd, Tensor? cos, Tensor? sin, Tensor kv, Tensor k_sum, Tensor? key_mask, "
      "int heads, int feature, float eps, float rms_eps) -> Tensor[]",
      &linear_lm_decode_layer);
}
