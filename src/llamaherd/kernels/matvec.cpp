// Matrix-vector products for decoding (a few rows of x against a large weight), split by output rows over
// torch's intra-op threads so one product uses every core. Weights are read once, in their stored precision:
// float32, bfloat16 (raw uint16 bits) or int8 with one float scale per output row (llamaherd.quantize).
// Each thread's dot products accumulate in float32; gcc vectorizes the inner loop (-O3 -march=native).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t v) {  // bfloat16 bits -> float32: the high half of a float's bits
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
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

// x (B, K) float32, weight (N, K) float32 / bfloat16 / int8, scale (N,) float32 or empty (int8 needs it),
// bias (N,) float32 or empty -> (B, N) float32.
at::Tensor matvec(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "matvec: shapes ", x.sizes(),
              " and ", weight.sizes(), " do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "matvec: x must be float32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "matvec: x and weight must be contiguous");
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  const float* s = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  TORCH_CHECK(!s || scale.numel() == N, "matvec: scale needs one value per output row");
  TORCH_CHECK(!b || bias.numel() == N, "matvec: bias needs one value per output row");
  at::Tensor y = at::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (weight.scalar_type()) {
    case at::kFloat:
      rows_times(xp, weight.data_ptr<float>(), s, b, yp, B, N, K);
      break;
    case at::kBFloat16:
      rows_times(xp, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), s, b, yp, B, N, K);
      break;
    case at::kChar:
      TORCH_CHECK(s, "matvec: an int8 weight needs its scale");
      rows_times(xp, weight.data_ptr<int8_t>(), s, b, yp, B, N, K);
      break;
    default:
      TORCH_CHECK(false, "matvec: unsupported weight dtype ", weight.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(llamaherd, m) { m.def("matvec(Tensor x, Tensor weight, Tensor scale, Tensor bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(llamaherd, CPU, m) { m.impl("matvec", &matvec); }
