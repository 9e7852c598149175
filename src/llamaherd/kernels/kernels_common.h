// What the kernels' sources share (decode_ops.cpp, prompt_ops.cpp): the ISA switches, weights widened to
// float32, bf16 rounding bit for bit as c10's, one vector type for the loops written once for AVX-512, AVX2
// and plain C++, float views of small inputs, a vectorized exp and softmax numerators, stores in any dtype.
// Everything here is internal to each source (an unnamed namespace), as it was in one file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
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
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLAMAHERD_AVX2 1  // AVX2 + FMA without AVX-512 (AMD Zen 2/3, Intel Haswell to Comet Lake): 8 floats a vector
#endif
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define LLAMAHERD_AMX 1
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
inline float widen(at::Half v) { return static_cast<float>(v); }

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

// 16 floats rounded to bf16 and back, bit for bit as c10::BFloat16 rounds one (round_to_nearest_even: add
// 0x7FFF plus the kept part's lowest bit, drop the low 16 bits; NaN becomes 0x7FC0).
inline __m512 round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(r);
}
#endif

#if defined(LLAMAHERD_AVX2)
// The same for 8 values: widened weights, a sum of lanes, and bf16 rounding bit for bit as c10::BFloat16's.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline float sum8(__m256 v) {  // (lanes 0-3 + 4-7), then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 round_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                          _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
#endif

// One vector of floats (kVec lanes) for the loops written once for AVX-512, AVX2 and plain C++.
#if defined(__AVX512F__)
using VecF = __m512;
constexpr int kVec = 16;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vset1(float s) { return _mm512_set1_ps(s); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF vmax(VecF a, VecF b) { return _mm512_max_ps(a, b); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline float vsum(VecF v) { return _mm512_reduce_add_ps(v); }
#elif defined(LLAMAHERD_AVX2)
using VecF = __m256;
constexpr int kVec = 8;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vset1(float s) { return _mm256_set1_ps(s); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vmax(VecF a, VecF b) { return _mm256_max_ps(a, b); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline float vsum(VecF v) { return sum8(v); }
#else
using VecF = float;
constexpr int kVec = 1;
inline VecF vzero() { return 0.f; }
inline VecF vload(const float* p) { return *p; }
inline VecF vset1(float s) { return s; }
inline VecF vfma(VecF a, VecF b, VecF c) { return a * b + c; }
inline void vstore(float* p, VecF v) { *p = v; }
inline VecF vmax(VecF a, VecF b) { return a > b ? a : b; }  // as MAXPS: b when either is NaN
inline VecF vadd(VecF a, VecF b) { return a + b; }
inline float vsum(VecF v) { return v; }
#endif

// Whether a bf16 model's products read its bf16 activations as stored (bf16 pairs: AVX512-BF16's dot products or
// the AMX tiles). Elsewhere they read them widened to float32, which is exact, in the float32 tiles.
#if defined(__AVX512BF16__) || defined(LLAMAHERD_AMX)
constexpr bool kBf16Pairs = true;
#else
constexpr bool kBf16Pairs = false;
#endif

// A float32 view of a small input (a norm weight, scales, cos/sin, a row of activations): its own data when it
// is float32 and contiguous, else a converted copy that `keep` holds.
inline const float* floats(const at::Tensor& t, at::Tensor& keep) {
  keep = t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

// The same for the small inputs of llama_decode_block, converted by a loop into `keep` rather than by an ATen op:
// each of those cost ~13 us, and a bf16 decode step of SmolLM2 made 180 of them (2.5 ms of a 28 ms step).
inline const float* floats(const at::Tensor& t, std::vector<float>& keep) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  const at::Tensor c = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf ? t.contiguous()
                                                                                          : t.to(at::kFloat).contiguous();
  keep.resize(c.numel());
  switch (c.scalar_type()) {
    case at::kBFloat16: {
      const auto* p = reinterpret_cast<const uint16_t*>(c.data_ptr<at::BFloat16>());
      for (size_t i = 0; i < keep.size(); ++i) keep[i] = widen(p[i]);
      break;
    }
    case at::kHalf: {
      const at::Half* p = c.data_ptr<at::Half>();
      for (size_t i = 0; i < keep.size(); ++i) keep[i] = widen(p[i]);
      break;
    }
    default:
      std::copy(c.data_ptr<float>(), c.data_ptr<float>() + keep.size(), keep.begin());
  }
  return keep.data();
}

// t as `rows` float rows of `cols` values with unit column stride, for ops that take a row stride: its own data
// when it already is (a row view into a fused product), else a converted copy; `keep` holds the rows (its
// stride(0) is the row stride).
inline const float* float_rows(const at::Tensor& t, int64_t rows, int64_t cols, at::Tensor& keep) {
  const at::Tensor r = t.reshape({rows, cols});
  keep = r.scalar_type() == at::kFloat && r.stride(1) == 1 ? r : r.to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

// Rounds n float values to `dtype` (bf16/fp16) and back, as storing them in that dtype would; float32: nothing.
inline void round_all(float* v, int64_t n, at::ScalarType dtype) {
  if (dtype == at::kFloat) return;
  int64_t i = 0;
#if defined(__AVX512F__)
  if (dtype == at::kBFloat16)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, round_bf16(_mm512_loadu_ps(v + i)));
#elif defined(LLAMAHERD_AVX2)
  if (dtype == at::kBFloat16)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, round_bf16(_mm256_loadu_ps(v + i)));
#endif
  for (; i < n; ++i) v[i] = round_to(v[i], dtype);
}

#if defined(__AVX512F__)
// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact), e^r by its Taylor series
// to r^7 / 7! (truncation below 6e-9 relative, under float32's rounding), times 2^n by scalef; within a few ulp of
// std::exp. Inputs are clamped to [-104, 89]: 0 and inf beyond.
inline __m512 exp16(__m512 x) {
  constexpr float inverse_factorials[8] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040};
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(inverse_factorials[7]);
  for (int j = 6; j >= 0; --j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(inverse_factorials[j]));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 first(int64_t n) {  // the first min(n, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
#elif defined(LLAMAHERD_AVX2)
// exp16's steps for 8 floats. AVX2 has no scalef, so 2^n is two exact powers of two built in the exponent field,
// 2^(n / 2) and 2^(n - n / 2) (each within a normal float's range for n in [-150, 128]), and only the second
// multiplication rounds, as scalef rounds once.
inline __m256 exp8(__m256 x) {
  constexpr float inverse_factorials[8] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040};
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(89.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f),
                                    _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
  __m256 p = _mm256_set1_ps(inverse_factorials[7]);
  for (int j = 6; j >= 0; --j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(inverse_factorials[j]));
  const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  auto power = [](__m256i e) {  // 2^e: e + 127 in the exponent field
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, power(n1)), power(n2));
}
#endif

// e^v[i] in place: exp16 with AVX-512 (exp8 with AVX2, std::exp for a tail), else std::exp.
inline void exp_inplace(float* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < n; i += 16) _mm512_mask_storeu_ps(v + i, first(n - i), exp16(_mm512_maskz_loadu_ps(first(n - i), v + i)));
#elif defined(LLAMAHERD_AVX2)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
#endif
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

// Softmax numerators in place, p[j] = e^(p[j] - max p) (exp_inplace), returning their sum, the denominator.
// The max and the sum run kVec lanes at a time (a float sum one value at a time is a chain of dependent adds:
// a quarter of a prompt's attention time went there).
inline float softmax_numerators(float* p, int64_t n) {
  VecF lanes = vset1(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) lanes = vmax(vload(p + j), lanes);  // a NaN score is skipped, as by std::max
  alignas(64) float part[kVec];
  vstore(part, lanes);
  float top = *std::max_element(part, part + kVec);
  for (; j < n; ++j) top = std::max(top, p[j]);
  for (j = 0; j < n; ++j) p[j] -= top;
  exp_inplace(p, n);
  lanes = vzero();
  for (j = 0; j + kVec <= n; j += kVec) lanes = vadd(lanes, vload(p + j));
  vstore(part, lanes);
  float sum = 0.f;
  for (; j < n; ++j) sum += p[j];
  for (int i = 0; i < kVec; ++i) sum += part[i];
  return sum;
}

inline void store(float v, float* p) { *p = v; }
inline void store(float v, uint16_t* p) { *p = static_cast<at::BFloat16>(v).x; }
inline void store(float v, at::Half* p) { *p = static_cast<at::Half>(v); }

}  // namespace
