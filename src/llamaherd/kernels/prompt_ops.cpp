// Native ops for prompt chunks (llamaherd.kernels, issue 12): prompt_linear, x @ weight.T for many rows in
// register tiles over weight panels widened to float32 as they are packed; prompt_attention, causal attention
// of prompt chunks over their cache rows in the same tiles. Each output's sum runs over k in one order whatever
// the number of rows, so a prompt position's keys do not depend on how the engine chunked the prompt.
#include "kernels_common.h"

namespace {

// Attention of prompt chunks (several queries per row, issue 12): q (B, H, T, hd) at positions (B, T), each query
// over keys [0, its position] of its cache row slots[b] (k_cache, v_cache: (rows, n_kv, max_len, hd), this pass's
// keys already stored), in float32 whatever the dtypes. The queries of one kv head's G heads at TQ positions form
// a block of up to G * TQ rows, and both products of the block run as register tiles in the outer-product form
// GEMM kernels use (tile_product): scores = block . keys^T against the keys transposed once per (row, kv head),
// then softmax numerators over each query's visible keys (the rest zeroed), then numerators . values. ATen's CPU
// flash attention runs the same products as many small MKL calls: a 512-token SmolLM2 prompt spent ~190 ms of
// its ~1.1 s in attention (bf16, AVX2 EPYC), more with a mask (a later chunk, or prompts batched with padding).
constexpr int kTileRows = 6, kTileCols = 2 * kVec;  // 12 accumulators, 2 loads and a broadcast: 15 registers

// c (R x kTileCols, row stride ldc) = a (R rows of n, stride lda) . b (n rows of kTileCols, stride ldb): each
// loaded b vector serves R rows, each broadcast a value two vectors. A row's sums do not depend on R (each is
// its own chain of multiply-adds over k in order), so a short last tile gives its rows what a full one would.
template <int R = kTileRows>
inline void tile_product(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, float* c,
                         int64_t ldc) {
  VecF acc[R][2];
  for (auto& row : acc) row[0] = row[1] = vzero();
  for (int64_t k = 0; k < n; ++k) {
    const VecF b0 = vload(b + k * ldb), b1 = vload(b + k * ldb + kVec);
    for (int i = 0; i < R; ++i) {
      const VecF ai = vset1(a[i * lda + k]);
      acc[i][0] = vfma(ai, b0, acc[i][0]);
      acc[i][1] = vfma(ai, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    vstore(c + i * ldc, acc[i][0]);
    vstore(c + i * ldc + kVec, acc[i][1]);
  }
}

// tile_product of the last `rows` (1 to kTileRows - 1) rows of a product.
inline void short_tile_product(int rows, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n,
                               float* c, int64_t ldc) {
  static_assert(kTileRows == 6, "short_tile_product covers 1 to 5 rows");
  switch (rows) {
    case 1: return tile_product<1>(a, lda, b, ldb, n, c, ldc);
    case 2: return tile_product<2>(a, lda, b, ldb, n, c, ldc);
    case 3: return tile_product<3>(a, lda, b, ldb, n, c, ldc);
    case 4: return tile_product<4>(a, lda, b, ldb, n, c, ldc);
    case 5: return tile_product<5>(a, lda, b, ldb, n, c, ldc);
    default: TORCH_CHECK(false, "short_tile_product: ", rows, " rows");
  }
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <typename T>
void attend_prompt(const T* q, const int64_t* qs, const T* k, const T* v, const int64_t* cs, const int64_t* slots,
                   const int64_t* positions, int64_t B, int64_t H, int64_t T_, int64_t n_kv, int64_t hd, T* out) {
  constexpr int64_t TQ = 16;  // query positions per block
  const int64_t G = H / n_kv, blocks = (T_ + TQ - 1) / TQ, hdp = round_up(hd, kTileCols);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  std::vector<int64_t> keys(B);  // keys any query of row b sees: its largest position + 1
  for (int64_t b = 0; b < B; ++b)
    keys[b] = *std::max_element(positions + b * T_, positions + (b + 1) * T_) + 1;
  const int64_t ldk = round_up(*std::max_element(keys.begin(), keys.end()), kTileCols);
  // Each (row, kv head)'s keys transposed (hd x ldk) and values (ldk x hdp) in float32, zero past its keys.
  std::vector<float> kt(B * n_kv * hd * ldk), vp(B * n_kv * ldk * hdp);
  at::parallel_for(0, B * n_kv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / n_kv, g = i % n_kv, n = keys[b];
      const T* ki = k + slots[b] * cs[0] + g * cs[1];
      const T* vi = v + slots[b] * cs[0] + g * cs[1];
      float* kti = kt.data() + i * hd * ldk;  // zero past its keys and dims, as constructed
      float* vpi = vp.data() + i * ldk * hdp;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < hd; ++d) {
          kti[d * ldk + j] = widen(ki[j * cs[2] + d]);
          vpi[j * hdp + d] = widen(vi[j * cs[2] + d]);
        }
    }
  });
  // Blocks with the most keys first, handed out one at a time: the causal triangle makes later blocks dearer.
  const int64_t items = B * n_kv * blocks;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qb, s, o, inv;
    std::vector<int64_t> lim;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t c = blocks - 1 - item / (B * n_kv), b = item % (B * n_kv) / n_kv, g = item % n_kv;
      const int64_t t0 = c * TQ, nt = std::min(TQ, T_ - t0), R = G * nt, Rp = round_up(R, kTileRows);
      qb.assign(Rp * hd, 0.f);
      lim.assign(Rp, 0);
      int64_t L = 0;
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t h = 0; h < G; ++h) {
          const int64_t r = t * G + h;
          const T* qi = q + b * qs[0] + (g * G + h) * qs[1] + (t0 + t) * qs[2];
          for (int64_t d = 0; d < hd; ++d) qb[r * hd + d] = widen(qi[d * qs[3]]) * scale;
          lim[r] = positions[b * T_ + t0 + t] + 1;
          L = std::max(L, lim[r]);
        }
      const int64_t ls = round_up(L, kTileCols);  // score columns
      s.resize(Rp * ls);
      o.resize(Rp * hdp);
      inv.resize(Rp);
      const float* kti = kt.data() + (b * n_kv + g) * hd * ldk;
      const float* vpi = vp.data() + (b * n_kv + g) * ldk * hdp;
      for (int64_t j0 = 0; j0 < ls; j0 += kTileCols)
        for (int64_t r0 = 0; r0 < Rp; r0 += kTileRows)
          tile_product(qb.data() + r0 * hd, hd, kti + j0, ldk, hd, s.data() + r0 * ls + j0, ls);
      for (int64_t r = 0; r < Rp; ++r) {
        float* sr = s.data() + r * ls;
        inv[r] = r < R ? 1.f / softmax_numerators(sr, lim[r]) : 0.f;
        std::fill(sr + (r < R ? lim[r] : 0), sr + ls, 0.f);
      }
      for (int64_t d0 = 0; d0 < hdp; d0 += kTileCols)
        for (int64_t r0 = 0; r0 < Rp; r0 += kTileRows)
          tile_product(s.data() + r0 * ls, ls, vpi + d0, hdp, ls, o.data() + r0 * hdp + d0, hdp);
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t h = 0; h < G; ++h) {
          const int64_t r = t * G + h;
          T* outr = out + ((b * T_ + t0 + t) * H + g * G + h) * hd;
          for (int64_t d = 0; d < hd; ++d) store(o[r * hdp + d] * inv[r], outr + d);
        }
    }
  }
}

// A panel of nn <= kTileCols weight rows (row-major, K apiece) widened to float32 and laid out k-major:
// panel[k * kTileCols + j] = w[j][k], zero for j >= nn. With AVX2, 8 x 8 blocks transposed in registers: the
// scalar loop cost ~2 ms a layer of SmolLM2 whatever the rows, which made short prompt chunks (a few rows, for
// which this product runs so that a position's keys do not depend on its chunk) 9x slower than the decode kernel.
template <typename W>
void pack_panel(const W* w, int64_t nn, int64_t K, float* panel) {
  int64_t k0 = 0;
#if defined(LLAMAHERD_AVX2)
  if (nn == kTileCols) {
    for (; k0 + 8 <= K; k0 += 8)
      for (int64_t j0 = 0; j0 < kTileCols; j0 += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = load8(w + (j0 + j) * K + k0);
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        const __m256 cols[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                                _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                                _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                                _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(panel + (k0 + k) * kTileCols + j0, cols[k]);
      }
  }
#endif
  for (int64_t k = k0; k < K; ++k)
    for (int64_t j = 0; j < kTileCols; ++j) panel[k * kTileCols + j] = j < nn ? widen(w[j * K + k]) : 0.f;
}

// y (M, N) = x (M, K) @ w (N, K).T (times scale per output for int8, + bias) for prompt chunks (issue 12): the
// weight in panels of kTileCols rows, each widened to float32 and laid out k-major once (K x kTileCols, in L2),
// then every 6 rows of x times the panel in tile_product's register tiles; the threads take panels. bf16 and int8
// weights are widened while packing, so their prompts need no float32 copy of each weight (ATen's route without
// bf16 matrix units: convert, then MKL's sgemm; int8's: dequantize, then the same). SmolLM2's four products at
// 510 rows on an AVX2 EPYC, medians: 143-155 GFLOP/s against MKL's 124-137 (fp32), 135-148 against 118-131 (bf16
// weights, with the conversion).
template <typename W>
void panel_product(const float* x, const W* w, const float* scale, const float* bias, float* y, int64_t M,
                   int64_t N, int64_t K) {
  const int64_t panels = (N + kTileCols - 1) / kTileCols;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(K * kTileCols), tile(kTileRows * kTileCols);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kTileCols, nn = std::min<int64_t>(kTileCols, N - n0);
      pack_panel(w + n0 * K, nn, K, panel.data());
#if defined(__AVX512F__) || defined(LLAMAHERD_AVX2)
      // bf16 only: the next panel's weights on their way to L2 while this one computes (a short prompt chunk
      // computes too little per panel to hide the packing's loads from memory otherwise). With the short last
      // tile below, SmolLM2's 120 layer products, alternating builds (Zen 3): 1 row 21.4 -> 16.7 ms, 15 rows
      // 43.6 -> 39.9, 512 rows 747 -> 689. For fp32 weights the prefetch gained nothing (1.00-1.03x slower);
      // the short tile alone took their 1 row from 30.0 to 26.5 ms.
      if (sizeof(W) < 4 && p + 1 < end) {
        const char* next = reinterpret_cast<const char*>(w + (n0 + kTileCols) * K);
        const int64_t bytes = std::min<int64_t>(kTileCols, N - n0 - kTileCols) * K * sizeof(W);
        for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T1);
      }
#endif
      for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
        const int64_t mm = std::min<int64_t>(kTileRows, M - m0);
        if (mm == kTileRows)
          tile_product(x + m0 * K, K, panel.data(), kTileCols, K, tile.data(), kTileCols);
        else
          short_tile_product(static_cast<int>(mm), x + m0 * K, K, panel.data(), kTileCols, K, tile.data(), kTileCols);
        for (int64_t i = 0; i < mm; ++i)
          for (int64_t j = 0; j < nn; ++j)
            y[(m0 + i) * N + n0 + j] =
                tile[i * kTileCols + j] * (scale ? scale[n0 + j] : 1.f) + (bias ? bias[n0 + j] : 0.f);
      }
    }
  });
}

// x (..., K) float32 or bf16, weight (N, K) float32, bf16 or int8 (contiguous), bias (N,), scale (N,) for int8
// -> (..., N) in x's dtype (panel_product, accumulated in float32; a bf16 result rounded once at the end, as
// F.linear's on widened inputs).
at::Tensor prompt_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1) && weight.is_contiguous(),
              "prompt_linear: x (..., K) and a contiguous weight (N, K), got ", x.sizes(), " and ", weight.sizes());
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor rows = x.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor b, sc;
  const float* bp = bias.has_value() ? floats(*bias, b) : nullptr;
  const float* sp = scale.has_value() ? floats(*scale, sc) : nullptr;
  TORCH_CHECK(!bp || b.numel() == N, "prompt_linear: bias needs one value per output row");
  TORCH_CHECK(!sp || sc.numel() == N, "prompt_linear: scale needs one value per output row");
  TORCH_CHECK((weight.scalar_type() == at::kChar) == (sp != nullptr),
              "prompt_linear: an int8 weight needs its scale, and only an int8 weight takes one");
  at::Tensor y = at::empty({rows.size(0), N}, rows.options());
  const float* xp = rows.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t M = rows.size(0);
  switch (weight.scalar_type()) {
    case at::kFloat:
      panel_product(xp, weight.data_ptr<float>(), sp, bp, yp, M, N, K);
      break;
    case at::kBFloat16:
      panel_product(xp, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), sp, bp, yp, M, N, K);
      break;
    case at::kChar:
      panel_product(xp, weight.data_ptr<int8_t>(), sp, bp, yp, M, N, K);
      break;
    default:
      TORCH_CHECK(false, "prompt_linear: float32, bf16 or int8 weights, got ", weight.scalar_type());
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

// Floats per vector in the register tiles (tile_product): 16 with AVX-512, 8 with AVX2, 1 in plain C++.
int64_t tile_lanes() { return kVec; }

// prompt_attention's dtype dispatch: q (B, H, T, hd) any strides; k_cache, v_cache (rows, n_kv, max_len, hd) with
// unit stride in hd, in q's dtype (float32, bf16, fp16); slots (B,), positions (B, T) int64 -> (B, T, H * hd).
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1,
              "prompt_attention: q (B, H, T, hd), caches (rows, n_kv, max_len, hd) with unit stride in hd");
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), hd = q.size(3), n_kv = k_cache.size(1);
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  hd == k_cache.size(3) && n_kv > 0 && H % n_kv == 0,
              "prompt_attention: q and the caches need one dtype and head dim, and H a multiple of n_kv");
  const at::Tensor s = slots.to(at::kLong).contiguous(), p = positions.to(at::kLong).contiguous();
  TORCH_CHECK(s.numel() == B && p.dim() == 2 && p.size(0) == B && p.size(1) == T_,
              "prompt_attention: slots (B,) and positions (B, T)");
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* pp = p.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sp[b] >= 0 && sp[b] < k_cache.size(0), "prompt_attention: slot ", sp[b], " out of range");
  for (int64_t i = 0; i < B * T_; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < k_cache.size(2), "prompt_attention: position ", pp[i], " out of range");
  at::Tensor out = at::empty({B, T_, H * hd}, q.options());
  if (out.numel() == 0) return out;
  const int64_t qs[4] = {q.stride(0), q.stride(1), q.stride(2), q.stride(3)};
  const int64_t cs[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  switch (q.scalar_type()) {
    case at::kFloat:
      attend_prompt(q.data_ptr<float>(), qs, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), cs, sp, pp, B,
                    H, T_, n_kv, hd, out.data_ptr<float>());
      break;
    case at::kBFloat16:
      attend_prompt(reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()), qs,
                    reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>()),
                    reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>()), cs, sp, pp, B, H, T_, n_kv,
                    hd, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
      break;
    case at::kHalf:
      attend_prompt(q.data_ptr<at::Half>(), qs, k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), cs, sp,
                    pp, B, H, T_, n_kv, hd, out.data_ptr<at::Half>());
      break;
    default:
      TORCH_CHECK(false, "prompt_attention: float32, bf16 or fp16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamaherd, m) {
  m.def("prompt_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions) -> Tensor");
  m.def("prompt_linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? scale=None) -> Tensor");
  m.def("tile_lanes() -> int", &tile_lanes);
}
TORCH_LIBRARY_IMPL(llamaherd, CPU, m) {
  m.impl("prompt_attention", &prompt_attention);
  m.impl("prompt_linear", &prompt_linear);
}
