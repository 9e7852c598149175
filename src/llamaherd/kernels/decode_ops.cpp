// Native ops for inference (llamaherd.kernels). matvec: matrix-vector products for decoding (a few rows of x
// against a large weight), split by output rows over torch's intra-op threads so one product uses every core.
// Weights are read once, in their stored precision: float32, bfloat16 (raw uint16 bits) or int8 with one float
// scale per output row (llamaherd.quantize). Each dot product accumulates in float32; gcc vectorizes the inner
// loops (-O3 -march=native). rms_norm, rope_qk, silu_mul: the other ops of a decode step, each in one op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t v) {  // bfloat16 bits -> float32: the high half of a float's bits
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float round_to(float v, at::ScalarType dtype) {  // float -> bf16/fp16 -> float, round to nearest even
  return dtype == at::kBFloat16 ? static_cast<float>(static_cast<at::BFloat16>(v))
                                : static_cast<float>(static_cast<at::Half>(v));
}

template <typename W>
inline void finish(float acc, int64_t o, const float* scale, const float* bias, float* y) {
  if (scale) acc *= scale[o];
  if (bias) acc += bias[o];
  *y = acc;
}

template <typename W>
void rows_times(const float* x, const W* w, const float* scale, const float* bias, float* y,
                int64_t B, int64_t N, int64_t K) {
  // Blocks of output rows per thread. Four rows at a time: four independent sums hide the latency of the
  // fused multiply-adds, and each loaded x vector serves four rows. x (a few KiB) stays in L1.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    int64_t o = begin;
    for (; o + 4 <= end; o += 4) {
      const W *r0 = w + o * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * K;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < K; ++k) {
          const float xk = xb[k];
          a0 += widen(r0[k]) * xk;
          a1 += widen(r1[k]) * xk;
          a2 += widen(r2[k]) * xk;
          a3 += widen(r3[k]) * xk;
        }
        float* yb = y + b * N;
        finish<W>(a0, o, scale, bias, yb + o);
        finish<W>(a1, o + 1, scale, bias, yb + o + 1);
        finish<W>(a2, o + 2, scale, bias, yb + o + 2);
        finish<W>(a3, o + 3, scale, bias, yb + o + 3);
      }
    }
    for (; o < end; ++o) {  // the last rows of a block that is not a multiple of four
      const W* row = w + o * K;
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * K;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += widen(row[k]) * xb[k];
        finish<W>(acc, o, scale, bias, y + b * N + o);
      }
    }
  });
}

// x (..., K) in float32 / bfloat16 / float16, weight (N, K) float32 / bfloat16 / int8, scale (N,) for int8,
// bias (N,) -> (..., N) in x's dtype. The dtype and shape work happens here rather than in Python: a decode
// step makes some 120 of these calls, and each Python-side op costs microseconds.
at::Tensor matvec(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "matvec: shapes ", x.sizes(), " and ",
              weight.sizes(), " do not match");
  TORCH_CHECK(weight.is_contiguous(), "matvec: the weight must be contiguous");
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor rows = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t B = rows.size(0);
  at::Tensor s, b;
  if (scale.has_value()) s = scale->to(at::kFloat).contiguous();
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(!s.defined() || s.numel() == N, "matvec: scale needs one value per output row");
  TORCH_CHECK(!b.defined() || b.numel() == N, "matvec: bias needs one value per output row");
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({B, N}, rows.options());
  const float* xp = rows.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (weight.scalar_type()) {
    case at::kFloat:
      rows_times(xp, weight.data_ptr<float>(), sp, bp, yp, B, N, K);
      break;
    case at::kBFloat16:
      rows_times(xp, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), sp, bp, yp, B, N, K);
      break;
    case at::kChar:
      TORCH_CHECK(sp, "matvec: an int8 weight needs its scale");
      rows_times(xp, weight.data_ptr<int8_t>(), sp, bp, yp, B, N, K);
      break;
    default:
      TORCH_CHECK(false, "matvec: unsupported weight dtype ", weight.scalar_type());
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

// RMSNorm over the last dim for inference, one op instead of the ~10 of its composite: y = x / rms(x) * w,
// in float32; for a half-precision x the normalized value is rounded to x's dtype before the weight scales it,
// as Hugging Face's LlamaRMSNorm does (llamaherd.model.RMSNorm).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "rms_norm: weight of ", weight.numel(), " values for rows of ", D);
  const at::Tensor rows = x.reshape({-1, D}).to(at::kFloat).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const bool half = x.scalar_type() != at::kFloat;
  at::Tensor y = at::empty_like(rows);
  const float *xp = rows.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t d = 0; d < D; ++d) {
        float n = xr[d] * inv;
        if (half) n = round_to(n, x.scalar_type());
        yr[d] = n * wp[d];
      }
    }
  });
  return y.view(x.sizes()).to(x.scalar_type());
}

// RoPE of one decode step's queries and keys in one op (rotate-half layout, as llamaherd.model.apply_rope):
// q (B, 1, n_head * hd), k (B, 1, n_kv * hd) (views into the fused q/k/v product are fine), cos and sin
// (B, 1, 1, d) with d <= hd rotated dims -> q (B, n_head, 1, hd), k (B, n_kv, 1, hd) in q's dtype. A half
// dtype rounds each product and the sum, as the eager ops do.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s, int64_t heads) {
  const int64_t B = x.size(0), hd = x.size(-1) / heads, d = c.size(-1), half_d = d / 2;
  const at::ScalarType dtype = x.scalar_type();
  const bool half = dtype != at::kFloat;
  const at::Tensor xf = x.reshape({B, heads, hd}).to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(xf);
  const float *xp = xf.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto r = [&](float v) { return half ? round_to(v, dtype) : v; };
  for (int64_t b = 0; b < B; ++b) {
    const float *cb = cp + b * d, *sb = sp + b * d;
    for (int64_t h = 0; h < heads; ++h) {
      const float* xr = xp + (b * heads + h) * hd;
      float* orow = op + (b * heads + h) * hd;
      for (int64_t i = 0; i < half_d; ++i) orow[i] = r(r(xr[i] * cb[i]) + r(-xr[i + half_d] * sb[i]));
      for (int64_t i = half_d; i < d; ++i) orow[i] = r(r(xr[i] * cb[i]) + r(xr[i - half_d] * sb[i]));
      for (int64_t i = d; i < hd; ++i) orow[i] = xr[i];
    }
  }
  return out.view({B, heads, 1, hd}).to(dtype);
}

std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                           const at::Tensor& sin, int64_t n_head, int64_t n_kv) {
  TORCH_CHECK(q.dim() == 3 && q.size(1) == 1 && k.size(0) == q.size(0), "rope_qk: q ", q.sizes(), " and k ",
              k.sizes(), " are not one decode step");
  const int64_t B = q.size(0);
  TORCH_CHECK(cos.numel() == B * cos.size(-1) && cos.size(-1) % 2 == 0 && cos.size(-1) <= q.size(-1) / n_head,
              "rope_qk: cos ", cos.sizes(), " does not fit q ", q.sizes());
  const at::Tensor c = cos.reshape({B, cos.size(-1)}).to(at::kFloat).contiguous();
  const at::Tensor s = sin.reshape({B, sin.size(-1)}).to(at::kFloat).contiguous();
  return {rotate(q, c, s, n_head), rotate(k, c, s, n_kv)};
}

// silu(gate) * up for one decode step (gate and up may be views into the fused gate/up product), in gate's
// dtype; a half dtype rounds silu's result and the product, as F.silu(gate) * up does.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul: gate ", gate.sizes(), " and up ", up.sizes(), " differ");
  const at::ScalarType dtype = gate.scalar_type();
  const bool half = dtype != at::kFloat;
  const at::Tensor g = gate.to(at::kFloat).contiguous(), u = up.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *upp = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t n = g.numel();
  for (int64_t i = 0; i < n; ++i) {
    float a = gp[i] / (1.f + std::exp(-gp[i]));
    if (half) a = round_to(a, dtype);
    yp[i] = a * upp[i];
  }
  return y.to(dtype);
}

}  // namespace

TORCH_LIBRARY(llamaherd, m) {
  m.def("matvec(Tensor x, Tensor weight, Tensor? scale=None, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, int n_head, int n_kv) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
}
TORCH_LIBRARY_IMPL(llamaherd, CPU, m) {
  m.impl("matvec", &matvec);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_qk", &rope_qk);
  m.impl("silu_mul", &silu_mul);
}
