// Native ops for inference (llamaherd.kernels). matvec: matrix-vector products for decoding (a few rows of x
// against a large weight), split by output rows over torch's intra-op threads so one product uses every core.
// Weights are read once, in their stored precision: float32, bfloat16 (raw uint16 bits) or int8 with one float
// scale per output row (llamaherd.quantize). Each dot product accumulates in float32; gcc vectorizes the inner
// loops (-O3 -march=native). rms_norm, rope_qk, silu_mul: the other ops of a decode step, each in one op;
// llama_decode_block: all of a LLaMA block's decode step in one call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

#if defined(__AVX512F__)
// 16 weights widened to float32: plain floats, bfloat16 bits shifted into a float's high half, int8 sign-extended.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// out[i] = sum_k rows[i][k] * x[k] for R weight rows: R independent sums hide the latency of the fused
// multiply-adds and each loaded x vector serves R rows. AVX-512 by hand (gcc's vectorization of the widening
// loads measured 2-3x slower), bf16 x bf16 with AVX512-BF16's pair dot products (no widening at all);
// elsewhere what gcc makes of the portable loop. x is float32, or bf16 bits when both are bf16.
template <typename W, typename X, int R>
inline void dots(const W* const* rows, const X* x, int64_t K, float* out) {
  int64_t k = 0;
  for (int i = 0; i < R; ++i) out[i] = 0.f;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<X, uint16_t>) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int i = 0; i < R; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(rows[i] + k), xv);
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
  }
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<X, float>) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(load16(rows[i] + k), xv, acc[i]);
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
  }
#endif
  if (k == 0) {
    for (int i = 0; i < R; ++i) {
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t j = 0; j < K; ++j) a += widen(rows[i][j]) * widen(x[j]);
      out[i] = a;
    }
    k = K;
  }
  for (; k < K; ++k)
    for (int i = 0; i < R; ++i) out[i] += widen(rows[i][k]) * widen(x[k]);
}

#if defined(__AVX512F__)
// R weight rows times C inputs at once (R x C accumulators), for several sequences decoding together: each loaded
// weight vector serves C inputs and each input vector R rows, so the multiply-adds rather than the loads set the
// pace (dots reloads x per row block: 16 inputs ran at 38 ms per SmolLM2 step against 14 for one). Each
// (row, input) sum runs in the same lanes and k order as dots' and ends in the same reduction, so a sequence's
// result is bit for bit what it gets alone: its tokens do not depend on the rest of the batch. K % 16 == 0.
template <typename W, int R, int C>
inline void dots_tile(const W* const* rows, const float* const* xs, int64_t K, float* out) {
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm512_loadu_ps(xs[c] + k);
    for (int i = 0; i < R; ++i) {
      const __m512 wv = load16(rows[i] + k);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(wv, xv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) out[i * C + c] = _mm512_reduce_add_ps(acc[i][c]);
}
#endif

template <typename W, typename X>
void rows_times(const X* x, const W* w, const float* scale, const float* bias, float* y,
                int64_t B, int64_t N, int64_t K) {
  // Blocks of output rows per thread, four rows at a time; each weight row is used for all B inputs while it
  // sits in L1. x (B rows of a few KiB) stays in L1/L2.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    int64_t o = begin;
    float sums[8];
    for (; o + 8 <= end; o += 8) {
      const W* rows[8];
      for (int i = 0; i < 8; ++i) rows[i] = w + (o + i) * K;
#if defined(__AVX512F__)
      // bf16 / int8: fetch the block after next, so its weights are in cache when their turn comes (int8 went
      // from 9.0 to 11.3 GB/s, bf16 13.1 to 13.9; fp32 streams at the read bandwidth without it, 23% slower with)
      if constexpr (sizeof(W) < 4) {
        if (o + 24 <= end) {
          const char* ahead = reinterpret_cast<const char*>(w + (o + 16) * K);
          for (int64_t off = 0; off < 8 * K * static_cast<int64_t>(sizeof(W)); off += 64)
            _mm_prefetch(ahead + off, _MM_HINT_T0);
        }
      }
#endif
      int64_t b = 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<X, float>) {
        if (K % 16 == 0) {
          float tile[16];
          for (; b + 4 <= B; b += 4) {
            const float* xs[4] = {x + b * K, x + (b + 1) * K, x + (b + 2) * K, x + (b + 3) * K};
            for (int half = 0; half < 8; half += 4) {
              dots_tile<W, 4, 4>(rows + half, xs, K, tile);
              for (int i = 0; i < 4; ++i)
                for (int c = 0; c < 4; ++c)
                  finish<W>(tile[i * 4 + c], o + half + i, scale, bias, y + (b + c) * N + o + half + i);
            }
          }
        }
      }
#endif
      for (; b < B; ++b) {
        dots<W, X, 8>(rows, x + b * K, K, sums);
        for (int i = 0; i < 8; ++i) finish<W>(sums[i], o + i, scale, bias, y + b * N + o + i);
      }
    }
    for (; o < end; ++o) {  // the last rows of a block that is not a multiple of four
      const W* rows[1] = {w + o * K};
      for (int64_t b = 0; b < B; ++b) {
        dots<W, X, 1>(rows, x + b * K, K, sums);
        finish<W>(sums[0], o, scale, bias, y + b * N + o);
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
  // bf16 x bf16 reads x as stored; everything else reads a float32 copy of x
  const bool half_pair = weight.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16;
  const at::Tensor flat = x.reshape({-1, K});
  const at::Tensor rows = half_pair ? flat.contiguous() : flat.to(at::kFloat).contiguous();
  const int64_t B = rows.size(0);
  at::Tensor s, b;
  if (scale.has_value()) s = scale->to(at::kFloat).contiguous();
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(!s.defined() || s.numel() == N, "matvec: scale needs one value per output row");
  TORCH_CHECK(!b.defined() || b.numel() == N, "matvec: bias needs one value per output row");
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({B, N}, rows.options().dtype(at::kFloat));
  const float* xp = half_pair ? nullptr : rows.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (weight.scalar_type()) {
    case at::kFloat:
      rows_times(xp, weight.data_ptr<float>(), sp, bp, yp, B, N, K);
      break;
    case at::kBFloat16: {
      const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
      if (half_pair) {  // a bf16 model: bf16 x bf16 products, exact in float32
        rows_times(reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>()), wp, sp, bp, yp, B, N, K);
      } else {
        rows_times(xp, wp, sp, bp, yp, B, N, K);
      }
      break;
    }
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

// Training's SwiGLU backward (llamaherd.lean_autograd): the gradients of silu(gate) * up for the incoming `grad`,
// given sig = sigmoid(gate): grad_gate = grad * up * sig * (1 + gate * (1 - sig)), grad_up = grad * gate * sig, in one
// pass over the rows on torch's threads (the same formula as eight ATen ops, each a pass with its own temporary).
// fp32, same sizes; gate and up may be row views into the fused gate/up product (unit column stride).
std::tuple<at::Tensor, at::Tensor> silu_mul_backward(const at::Tensor& gate, const at::Tensor& up,
                                                     const at::Tensor& sig, const at::Tensor& grad) {
  for (const at::Tensor* t : {&up, &sig, &grad}) {
    TORCH_CHECK(t->sizes() == gate.sizes(), "silu_mul_backward: ", t->sizes(), " and gate ", gate.sizes(), " differ");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "silu_mul_backward: fp32 only");
  }
  TORCH_CHECK(gate.scalar_type() == at::kFloat, "silu_mul_backward: fp32 only");
  const int64_t cols = gate.dim() ? gate.size(-1) : 1, rows = cols ? gate.numel() / cols : 0;
  auto as_rows = [&](const at::Tensor& t) {
    at::Tensor r = t.reshape({rows, cols});
    return r.stride(1) == 1 ? r : r.contiguous();
  };
  const at::Tensor g = as_rows(gate), u = as_rows(up), e = as_rows(sig), d = as_rows(grad);
  at::Tensor grad_gate = at::empty({rows, cols}, g.options()), grad_up = at::empty({rows, cols}, g.options());
  const float *gp = g.data_ptr<float>(), *upp = u.data_ptr<float>(), *ep = e.data_ptr<float>(),
              *dp = d.data_ptr<float>();
  float *ggp = grad_gate.data_ptr<float>(), *gup = grad_up.data_ptr<float>();
  const int64_t gs = g.stride(0), us = u.stride(0), es = e.stride(0), ds = d.stride(0);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *x = gp + r * gs, *y = upp + r * us, *s = ep + r * es, *dy = dp + r * ds;
      float *out_g = ggp + r * cols, *out_u = gup + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        out_g[c] = dy[c] * y[c] * s[c] * (1.f + x[c] * (1.f - s[c]));
        out_u[c] = dy[c] * x[c] * s[c];
      }
    }
  });
  return {grad_gate.view(gate.sizes()), grad_up.view(gate.sizes())};
}

// Attention of one query per row (a decode step) over the first lengths[b] keys of its row, in fp32 whatever the
// cache's dtype (fp32 or bf16 bits): what at::scaled_dot_product_attention gives with the step's mask, up to
// rounding, without its per-call set-up (50-70 us a layer for SmolLM2's 9 heads and a short context, a sixth of a
// layer's non-product time) and without reading the masked keys. q (B, n_head, 1, hd); keys, values
// (B, n_kv, S, hd) with unit stride in hd (cache views or gathered rows); grouped-query heads share their kv head.
template <typename T>
void attend_rows(const float* q, const T* k, const T* v, const int64_t* ks, const int64_t* vs,
                 const std::vector<int64_t>& lengths, int64_t H, int64_t n_kv, int64_t hd, float* out) {
  const int64_t group = H / n_kv, B = static_cast<int64_t>(lengths.size());
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, acc(hd);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, kv = h / group, n = lengths[b];
      const float* qi = q + i * hd;
      const T* kb = k + b * ks[0] + kv * ks[1];
      const T* vb = v + b * vs[0] + kv * vs[1];
      p.resize(n);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const T* kj = kb + j * ks[2];
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int64_t d = 0; d < hd; ++d) a += qi[d] * widen(kj[d]);
        p[j] = a * scale;
        top = std::max(top, p[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - top));
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* vj = vb + j * vs[2];
        const float w = p[j];
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) acc[d] += w * widen(vj[d]);
      }
      for (int64_t d = 0; d < hd; ++d) out[i * hd + d] = acc[d] / sum;
    }
  });
}

// decode_attention's result, or nullopt for what it does not serve (other dtypes, strided head dims).
std::optional<at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                           const std::vector<int64_t>& lengths) {
  const at::ScalarType kt = keys.scalar_type();
  if ((kt != at::kFloat && kt != at::kBFloat16) || values.scalar_type() != kt || keys.stride(3) != 1 ||
      values.stride(3) != 1 || q.size(1) % keys.size(1) != 0)
    return std::nullopt;
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3);
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, 1, hd}, qf.options());
  const int64_t ks[3] = {keys.stride(0), keys.stride(1), keys.stride(2)};
  const int64_t vs[3] = {values.stride(0), values.stride(1), values.stride(2)};
  if (kt == at::kFloat)
    attend_rows(qf.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), ks, vs, lengths, H,
                keys.size(1), hd, out.data_ptr<float>());
  else
    attend_rows(qf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>()),
                reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()), ks, vs, lengths, H,
                keys.size(1), hd, out.data_ptr<float>());
  return out.to(q.scalar_type());
}

// One decode step through a LLaMA block (RMSNorm, fused q/k/v, RoPE, grouped-query attention over the KV cache,
// output projection, RMSNorm, fused gate/up, SwiGLU, down projection, both residuals) in one call: a decode step
// of a small model is bound by per-op dispatch from Python otherwise (issue 12). The steps are the ops above
// and ATen's attention, in the order and precision llamaherd.model.Block runs them.
// x (B, 1, D); weights as FusedProjections / the modules hold them (int8 with its scales); cos, sin (B, 1, 1, d);
// k_cache, v_cache: this layer's (max_batch, n_kv, max_len, hd); slots, positions (B,) int64; `first_slot` the
// first of B neighbouring slots, read as a view, or -1 (gathered); `end` keys are read; `mask` (B, 1, 1, end) bool
// or none (every row sees all `end` keys). Both come from llamaherd.model.SlotCache.rows. Returns (B, 1, D).
at::Tensor llama_decode_block(const at::Tensor& x, const at::Tensor& norm1, const at::Tensor& qkv_w,
                              const std::optional<at::Tensor>& qkv_s, const at::Tensor& o_w,
                              const std::optional<at::Tensor>& o_s, const at::Tensor& norm2, const at::Tensor& gu_w,
                              const std::optional<at::Tensor>& gu_s, const at::Tensor& down_w,
                              const std::optional<at::Tensor>& down_s, double eps, int64_t n_head, int64_t n_kv,
                              const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& positions,
                              int64_t first_slot, int64_t end, const std::optional<at::Tensor>& mask) {
  const int64_t B = x.size(0), hd = k_cache.size(3), nq = n_head * hd, nk = n_kv * hd;
  const at::Tensor qkv = matvec(rms_norm(x, norm1, eps), qkv_w, qkv_s, std::nullopt);  // (B, 1, nq + 2 nk)
  auto [q, k] = rope_qk(qkv.narrow(2, 0, nq), qkv.narrow(2, nq, nk), cos, sin, n_head, n_kv);
  const at::Tensor v = qkv.narrow(2, nq + nk, nk).reshape({B, n_kv, 1, hd});
  const auto slot = slots.accessor<int64_t, 1>();
  const auto pos = positions.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b) {  // each row's new key and value at its own position of its own slot
    k_cache.select(0, slot[b]).select(1, pos[b]).copy_(k.select(0, b).select(1, 0));
    v_cache.select(0, slot[b]).select(1, pos[b]).copy_(v.select(0, b).select(1, 0));
  }
  const bool span = first_slot >= 0;
  // The first `end` positions only, before any gather: index_select of whole rows copied max_len positions each.
  const at::Tensor k_read = k_cache.narrow(2, 0, end), v_read = v_cache.narrow(2, 0, end);
  const at::Tensor keys = span ? k_read.narrow(0, first_slot, B) : k_read.index_select(0, slots);
  const at::Tensor values = span ? v_read.narrow(0, first_slot, B) : v_read.index_select(0, slots);
  std::vector<int64_t> lengths(B);  // keys each row sees: up to its own position under a mask, else all `end`
  for (int64_t b = 0; b < B; ++b) lengths[b] = mask.has_value() ? pos[b] + 1 : end;
  const std::optional<at::Tensor> own = decode_attention(q, keys, values, lengths);
  const at::Tensor y = own ? *own
                           : at::scaled_dot_product_attention(q, keys, values, mask, 0.0, false, std::nullopt,
                                                              n_kv != n_head);
  const at::Tensor h = x + matvec(y.transpose(1, 2).reshape({B, 1, nq}), o_w, o_s, std::nullopt);
  const at::Tensor gu = matvec(rms_norm(h, norm2, eps), gu_w, gu_s, std::nullopt);
  const int64_t f = gu.size(2) / 2;
  return h + matvec(silu_mul(gu.narrow(2, 0, f), gu.narrow(2, f, f)), down_w, down_s, std::nullopt);
}

}  // namespace

TORCH_LIBRARY(llamaherd, m) {
  m.def("matvec(Tensor x, Tensor weight, Tensor? scale=None, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, int n_head, int n_kv) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_backward(Tensor gate, Tensor up, Tensor sig, Tensor grad) -> (Tensor, Tensor)");
  m.def("llama_decode_block(Tensor x, Tensor norm1, Tensor qkv_w, Tensor? qkv_s, Tensor o_w, Tensor? o_s, "
        "Tensor norm2, Tensor gu_w, Tensor? gu_s, Tensor down_w, Tensor? down_s, float eps, int n_head, int n_kv, "
        "Tensor cos, Tensor sin, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions, int first_slot, "
        "int end, "
        "Tensor? mask) -> Tensor");
}
TORCH_LIBRARY_IMPL(llamaherd, CPU, m) {
  m.impl("matvec", &matvec);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_qk", &rope_qk);
  m.impl("silu_mul", &silu_mul);
  m.impl("silu_mul_backward", &silu_mul_backward);
  m.impl("llama_decode_block", &llama_decode_block);
}
