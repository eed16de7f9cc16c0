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
  const int64_t kv_b = kv.stride(0), kv_h = kv.stride(1), kv_m = kv.stride(2), kv_e = kv.stride(3);
  const int64_t z_b = k_sum.stride(0), z_h = k_sum.stride(1), z_m = k_sum.stride(2);
  std::vector<float> phi_q(M), phi_k(M), vv(E), num(E);
  for (int64_t b = 0; b < B; ++b) {
    const bool real = mask == nullptr || mask[b];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t qk_off = (b * H + h) * M, v_off = (b * H + h) * E;
      for (int64_t m = 0; m < M; ++m) {
        phi_q[m] = feature(static_cast<float>(qp[qk_off + m]), kind);
        // a padded key is skipped, not multiplied by 0: a NaN under the mask changes nothing
        phi_k[m] = real ? feature(static_cast<float>(kp[qk_off + m]), kind) : 0.0f;
      }
      for (int64_t e = 0; e < E; ++e) {
        vv[e] = static_cast<float>(vp[v_off + e]);
        num[e] = 0.0f;
      }
      float den = 0.0f;
      const float* kv_bh = kvp + b * kv_b + h * kv_h;
      const float* z_bh = zp + b * z_b + h * z_h;
      float* s_bh = sp + (b * H + h) * M * (E + 1);
      for (int64_t m = 0; m < M; ++m) {
        const float* src = kv_bh + m * kv_m;
        float* dst = s_bh + m * (E + 1);
        const float pk = phi_k[m], pq = phi_q[m];
        if (real) {
          for (int64_t e = 0; e < E; ++e) dst[e] = src[e * kv_e] + pk * vv[e];
          dst[E] = z_bh[m * z_m] + pk;
        } else {
          for (int64_t e = 0; e < E; ++e) dst[e] = src[e * kv_e];
          dst[E] = z_bh[m * z_m];
        }
        for (int64_t e = 0; e < E; ++e) num[e] += pq * dst[e];
        den += pq * dst[E];
      }
      const float inv = 1.0f / (den + eps);
      scalar_t* o_bh = op + v_off;
      for (int64_t e = 0; e < E; ++e) o_bh[e] = static_cast<scalar_t>(num[e] * inv);
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

}  // namespace

TORCH_LIBRARY(hf_efficient_decode_cpu, lib) {
  lib.def("decode_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &decode_gemv);
  lib.def(
      "linear_decode_step(Tensor q, Tensor k, Tensor v, Tensor kv, Tensor k_sum, Tensor? key_mask, int feature, "
      "float eps) -> Tensor[]",
      &linear_decode_step);
}
