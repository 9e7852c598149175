// Native ops for inference (llamaherd.kernels). matvec: matrix-vector products for decoding (a few rows of x
// against a large weight), split by output rows over torch's intra-op threads so one product uses every core.
// Weights are read once, in their stored precision: float32, bfloat16 (raw uint16 bits) or int8 with one float
// scale per output row (llamaherd.quantize). Each dot product accumulates in float32; gcc vectorizes the inner
// loops (-O3 -march=native). rms_norm, rope_qk, silu_mul: the other ops of a decode step, each in one op;
// llama_decode_layers: every LLaMA block of a decode step (llama_decode_block each), then the final norm and head.
#include "kernels_common.h"

namespace {

#if defined(__AVX512F__) || defined(LLAMAHERD_AVX2)
struct Ahead {  // cache lines to fetch while this block computes: a later block's weights
  const char* next;
  const char* end;
  int64_t per_step;  // lines per step of 16 k (8 with AVX2)
  void fetch(int hint) {
    for (int64_t j = 0; j < per_step && next < end; ++j, next += 64)
      hint == 0 ? _mm_prefetch(next, _MM_HINT_T0) : _mm_prefetch(next, _MM_HINT_T1);
  }
};
#else
struct Ahead {};
#endif

// out[i] = sum_k rows[i][k] * x[k] for R weight rows: R independent sums hide the latency of the fused
// multiply-adds and each loaded x vector serves R rows. AVX-512 by hand (gcc's vectorization of the widening
// loads measured 2-3x slower), bf16 x bf16 with AVX512-BF16's pair dot products (no widening at all);
// elsewhere what gcc makes of the portable loop. x is float32, or bf16 bits when both are bf16. With AVX2, `ahead`
// (optional) spreads the prefetch of a later block over the k steps.
template <typename W, typename X, int R>
inline void dots(const W* const* rows, const X* x, int64_t K, float* out, [[maybe_unused]] Ahead* ahead = nullptr) {
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
#elif defined(LLAMAHERD_AVX2)
  if constexpr (std::is_same_v<X, float>) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      if (ahead) ahead->fetch(0);
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(load8(rows[i] + k), xv, acc[i]);
    }
    for (int i = 0; i < R; ++i) out[i] = sum8(acc[i]);
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
inline void dots_tile(const W* const* rows, const float* const* xs, int64_t K, float* out, Ahead& ahead) {
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm512_loadu_ps(xs[c] + k);
    ahead.fetch(1);
    for (int i = 0; i < R; ++i) {
      const __m512 wv = load16(rows[i] + k);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(wv, xv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) out[i * C + c] = _mm512_reduce_add_ps(acc[i][c]);
}
#elif defined(LLAMAHERD_AVX2)
// dots_tile for AVX2's 16 vector registers: R x C sums of 8 lanes, in the same lanes and k order as dots' AVX2
// loop and the same reduction (sum8), so a sequence's result is again bit for bit what it gets alone. K % 8 == 0.
template <typename W, int R, int C>
inline void dots_tile(const W* const* rows, const float* const* xs, int64_t K, float* out, Ahead& ahead) {
  __m256 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm256_loadu_ps(xs[c] + k);
    ahead.fetch(1);
    for (int i = 0; i < R; ++i) {
      const __m256 wv = load8(rows[i] + k);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm256_fmadd_ps(wv, xv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) out[i * C + c] = sum8(acc[i][c]);
}
#endif

// Which 8-row blocks of a product each thread computes: about the first 7/8 of the blocks in equal runs, one run
// per thread (one sequential stream each), then the rest one block at a time to whichever thread asks first. With
// runs alone, one thread finished each product ~10% before the other and waited (SmolLM2 decode on a 2-core
// Zen 3 VM: bf16 9.4 us of an 87 us product on average, int8 4.0 of 43; with the shared rest 1.2 and 1.1): the
// VM's memory and the other processes do not serve both cores alike. Decode steps, alternating builds in one
// process: int8 8.92 -> 8.27 ms, fp32 21.10 -> 20.79, bf16 the same (12.24 / 12.33). A thread takes its blocks
// two ahead of the one it computes, so that it can prefetch them (so up to three shared blocks wait on one
// thread: SmolLM2's 576-row products share 9). Which thread computes a row does not change its sum: each row's
// dot product is its own, and whether it is in a block or past the last one depends on N alone.
class BlockQueue {
 public:
  struct Shared {
    int64_t blocks, run;  // all blocks, and each thread's run
    std::atomic<int64_t> next;  // the next block of the shared rest
  };
  static constexpr int64_t kSharedDivisor = 8;  // 1/8 of the blocks (and what the runs leave) are shared

  BlockQueue(Shared& shared, int64_t thread) : s_(shared), own_(thread * shared.run), end_(own_ + shared.run) {}
  // The next block for this thread, or -1 when there are none left.
  int64_t take() {
    if (own_ < end_) return own_++;
    const int64_t b = s_.next.fetch_add(1, std::memory_order_relaxed);
    return b < s_.blocks ? b : -1;
  }

 private:
  Shared& s_;
  int64_t own_, end_;
};

// Block `block` (rows 8 * block to 8 * block + 7) of y = x @ w.T (see rows_times); next_block, then_block: the
// blocks this thread computes after it (-1: none), whose weights it fetches while this block computes.
template <typename W, typename X>
void rows_block(const X* x, const W* w, const float* scale, const float* bias, float* y, int64_t B, int64_t N,
                int64_t K, int64_t block, int64_t next_block, int64_t then_block) {
  const int64_t o = block * 8;
  float sums[8];
  const W* rows[8];
  for (int i = 0; i < 8; ++i) rows[i] = w + (o + i) * K;
  [[maybe_unused]] const char* near_p =
      next_block < 0 ? nullptr : reinterpret_cast<const char*>(w + next_block * 8 * K);
  [[maybe_unused]] const char* far_p =
      then_block < 0 ? nullptr : reinterpret_cast<const char*>(w + then_block * 8 * K);
  [[maybe_unused]] const int64_t block_bytes = 8 * K * static_cast<int64_t>(sizeof(W));
  int64_t b = 0;
  Ahead* ahead_p = nullptr;
#if defined(__AVX512F__)
  // bf16 / int8: fetch the block after next, so its weights are in cache when their turn comes (int8 went
  // from 9.0 to 11.3 GB/s, bf16 13.1 to 13.9; fp32 streams at the read bandwidth without it, 23% slower with)
  if constexpr (sizeof(W) < 4) {
    if (far_p)
      for (int64_t off = 0; off < block_bytes; off += 64) _mm_prefetch(far_p + off, _MM_HINT_T0);
  }
  if constexpr (std::is_same_v<X, float>) {
    if (K % 16 == 0) {
      float tile[16];
      // fp32: fetch the next block's rows (K / 2 lines) a few per step of this block's tiles, so the weights
      // stream while the tiles compute (16 rows, SmolLM2's 121 products: 48.8 -> 34.8 ms); bf16 and int8
      // fetch ahead above
      const int64_t steps = B / 4 * 2 * (K / 16);
      Ahead ahead{near_p, near_p ? near_p + block_bytes : nullptr,
                  sizeof(W) == 4 && steps ? (K / 2 + steps - 1) / steps : 0};
      for (; b + 4 <= B; b += 4) {
        const float* xs[4] = {x + b * K, x + (b + 1) * K, x + (b + 2) * K, x + (b + 3) * K};
        for (int half = 0; half < 8; half += 4) {
          dots_tile<W, 4, 4>(rows + half, xs, K, tile, ahead);
          for (int i = 0; i < 4; ++i)
            for (int c = 0; c < 4; ++c)
              finish<W>(tile[i * 4 + c], o + half + i, scale, bias, y + (b + c) * N + o + half + i);
        }
      }
    }
  }
#elif defined(LLAMAHERD_AVX2)
  // One row of bf16 / int8 weights: fetch the block after next a line or two per k step rather than all at once
  // (one row of SmolLM2's 121 products on a Zen 3, alternating builds: int8 11.4-15.1 -> 6.6-8.5 ms, bf16
  // 14.4-18.0 -> 11.8-15.6; a standalone loop over 115 MB of int8 rows: 12 GB/s without, 17 all at once, 29
  // spread). fp32 rows stream at the read bandwidth without it.
  // A step (8 k of 8 rows) reads sizeof(W) lines. For the inputs past the tiles' (B % 4; all of them when
  // K % 8 != 0):
  Ahead ahead{far_p, far_p ? far_p + block_bytes : nullptr, static_cast<int64_t>(sizeof(W))};
  if (sizeof(W) < 4) ahead_p = &ahead;
  if constexpr (std::is_same_v<X, float>) {
    if (K % 8 == 0) {  // as above with tiles of 2 rows x 4 inputs (8 sums + 4 inputs + 1 weight registers;
      // 16-27% more multiply-adds a second than 4 x 2 in a single-thread loop over weights in L2, Zen 3)
      // any weight dtype: the next block's lines spread over all this block's tile steps
      float tile[8];
      const int64_t steps = B / 4 * 4 * (K / 8), lines = block_bytes / 64;
      Ahead next{near_p, near_p ? near_p + block_bytes : nullptr, steps ? (lines + steps - 1) / steps : 0};
      for (; b + 4 <= B; b += 4) {
        const float* xs[4] = {x + b * K, x + (b + 1) * K, x + (b + 2) * K, x + (b + 3) * K};
        for (int pair = 0; pair < 8; pair += 2) {
          dots_tile<W, 2, 4>(rows + pair, xs, K, tile, next);
          for (int i = 0; i < 2; ++i)
            for (int c = 0; c < 4; ++c)
              finish<W>(tile[i * 4 + c], o + pair + i, scale, bias, y + (b + c) * N + o + pair + i);
        }
      }
    }
  }
#endif
  for (; b < B; ++b) {
    dots<W, X, 8>(rows, x + b * K, K, sums, ahead_p);
    for (int i = 0; i < 8; ++i) finish<W>(sums[i], o + i, scale, bias, y + b * N + o + i);
  }
}

// y (B, N) = x (B, K) @ w (N, K).T, times scale per row (int8), plus bias: blocks of 8 output rows shared out
// over torch's intra-op threads (BlockQueue); each weight row is used for all B inputs while it sits in L1. x (B
// rows of a few KiB) stays in L1/L2.
template <typename W, typename X>
void rows_times(const X* x, const W* w, const float* scale, const float* bias, float* y,
                int64_t B, int64_t N, int64_t K) {
  const int64_t full = N / 8;  // whole blocks; the last N % 8 rows go one at a time, after them
  const int64_t team = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 63) / 64));
  const int64_t run = (full - full / BlockQueue::kSharedDivisor) / team;
  BlockQueue::Shared shared{full, run, {run * team}};
  at::parallel_for(0, team, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {  // one thread each, unless this runs within another parallel region
      BlockQueue queue(shared, t);
      int64_t block = queue.take(), next_block = queue.take(), then_block = queue.take();
      while (block >= 0) {
        rows_block(x, w, scale, bias, y, B, N, K, block, next_block, then_block);
        block = next_block, next_block = then_block, then_block = queue.take();
      }
    }
  });
  float sums[1];
  for (int64_t o = full * 8; o < N; ++o) {  // the last rows when N is not a multiple of 8
    const W* rows[1] = {w + o * K};
    for (int64_t b = 0; b < B; ++b) {
      dots<W, X, 1>(rows, x + b * K, K, sums);
      finish<W>(sums[0], o, scale, bias, y + b * N + o);
    }
  }
}

#if defined(LLAMAHERD_AMX)
// Whether this process may use the AMX tile registers: Linux hands them out on request (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, Documentation/arch/x86/xstate.rst); asked once per process.
bool amx_ready() {
  static const bool ready = [] {
    constexpr int kReqPerm = 0x1023, kGetPerm = 0x1022, kTileData = 18;
    unsigned long granted = 0;
    return syscall(SYS_arch_prctl, kReqPerm, kTileData) == 0 && syscall(SYS_arch_prctl, kGetPerm, &granted) == 0 &&
           (granted >> kTileData & 1);
  }();
  return ready;
}

// out[n][m] = in[m][n] for a 16 x 16 block of floats (rows of 16): pairs, then quads of rows interleaved, then
// 128-bit lanes exchanged twice.
void transpose16(const float* in, float* out) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + 16 * i);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + 16 * i, r[i]);
}

// y (B, N) = x (B, K) @ w (N, K).T for a bf16 model on the AMX tile unit: each 16 x 32 block of weights, loaded
// as stored (an A tile of 16 rows), times 32 values of up to 16 inputs (a B tile: pairs of consecutive k per
// input, as TDPBF16PS takes them) adds into a 16 x 16 float32 tile of sums. Element (row, input) reads only
// that row and that input, in the same k order whatever B is, so a sequence's result does not depend on the
// rest of the batch; every row count takes this path (1 row streams the weights as fast as the AVX-512 loop).
// SmolLM2 bf16's 121 products for 16 rows: 41.8 ms with `dots` (which reloads the weights per row), 17.7 ms here;
// 1 row 14.3-14.8 ms either way. The sums leave through an in-register transpose (scalar stores cost 8 ms).
// K % 32 == 0; rows past the last multiple of 16 take `dots`.
void amx_rows_times(const uint16_t* x, const uint16_t* w, const float* bias, float* y, int64_t B, int64_t N,
                    int64_t K) {
  const int64_t tiles = N / 16, kb_count = K / 32;
  std::vector<uint16_t> packed;
  for (int64_t b0 = 0; b0 < B; b0 += 16) {
    const int64_t nb = std::min<int64_t>(16, B - b0), block = 32 * nb;
    // The B tile of k block kb, 16 rows of nb bf16 pairs: row p holds x[n][32 kb + 2p] and x[n][32 kb + 2p + 1]
    // for each input n; written in order, a pair (32 bits) at a time
    packed.resize(kb_count * block);
    uint32_t* pairs = reinterpret_cast<uint32_t*>(packed.data());
    for (int64_t p = 0; p < K / 2; ++p)
      for (int64_t n = 0; n < nb; ++n) std::memcpy(pairs++, x + (b0 + n) * K + 2 * p, sizeof(uint32_t));
    at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
      alignas(64) unsigned char config[64] = {};
      config[0] = 1;  // palette 1: 8 tiles of up to 16 rows of 64 bytes
      for (int t = 0; t < 8; ++t) {  // 16 rows each; bytes per row: 64 for weights, 4 per input for the rest
        config[16 + 2 * t] = t == 4 || t == 5 ? 64 : static_cast<unsigned char>(4 * nb);
        config[48 + t] = 16;
      }
      _tile_loadconfig(config);
      alignas(64) float sums[4][16][16] = {};  // columns past nb stay 0
      const int64_t ldw = K * static_cast<int64_t>(sizeof(uint16_t));
      auto store = [&](int64_t t, int j) {  // tile t's sums, held in sums[j] as [row][input], to y's rows
        alignas(64) float by_input[16][16];
        transpose16(sums[j][0], by_input[0]);
        for (int64_t n = 0; n < nb; ++n) {
          __m512 v = _mm512_load_ps(by_input[n]);
          if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + t * 16));
          _mm512_storeu_ps(y + (b0 + n) * N + t * 16, v);
        }
      };
      int64_t t = begin;
      for (; t + 4 <= end; t += 4) {  // four tiles of rows share each loaded B tile
        const uint16_t* r = w + t * 16 * K;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kb_count; ++kb) {
          _tile_loadd(6, packed.data() + kb * block, 4 * nb);
          _tile_loadd(4, r + kb * 32, ldw);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(5, r + 16 * K + kb * 32, ldw);
          _tile_dpbf16ps(1, 5, 6);
          _tile_loadd(4, r + 32 * K + kb * 32, ldw);
          _tile_dpbf16ps(2, 4, 6);
          _tile_loadd(5, r + 48 * K + kb * 32, ldw);
          _tile_dpbf16ps(3, 5, 6);
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        _tile_stored(2, sums[2], 64);
        _tile_stored(3, sums[3], 64);
        for (int j = 0; j < 4; ++j) store(t + j, j);
      }
      for (; t < end; ++t) {
        const uint16_t* r = w + t * 16 * K;
        _tile_zero(0);
        for (int64_t kb = 0; kb < kb_count; ++kb) {
          _tile_loadd(6, packed.data() + kb * block, 4 * nb);
          _tile_loadd(4, r + kb * 32, ldw);
          _tile_dpbf16ps(0, 4, 6);
        }
        _tile_stored(0, sums[0], 64);
        store(t, 0);
      }
      _tile_release();
    });
  }
  for (int64_t o = tiles * 16; o < N; ++o) {  // the last rows of a weight that is not a multiple of 16
    const uint16_t* rows[1] = {w + o * K};
    for (int64_t b = 0; b < B; ++b) {
      float sum;
      dots<uint16_t, uint16_t, 1>(rows, x + b * K, K, &sum);
      finish<uint16_t>(sum, o, nullptr, bias, y + b * N + o);
    }
  }
}
#endif

// y (B, N) = x (B, K) @ weight (N, K).T, times scale (N,) per row for int8, plus bias (N,), on raw rows: x is
// float32 (xf), or bf16 bits (xb) for bf16 x bf16 (read as stored, kBf16Pairs). Shared by matvec and
// llama_decode_block.
void product(const float* xf, const uint16_t* xb, const at::Tensor& weight, const float* sp, const float* bp,
             float* y, int64_t B, int64_t N, int64_t K) {
  switch (weight.scalar_type()) {
    case at::kFloat:
      rows_times(xf, weight.data_ptr<float>(), sp, bp, y, B, N, K);
      break;
    case at::kBFloat16: {
      const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
      if (xb) {  // a bf16 model: bf16 x bf16 products, exact in float32
#if defined(LLAMAHERD_AMX)
        if (K % 32 == 0 && amx_ready()) {
          amx_rows_times(xb, wp, bp, y, B, N, K);
          break;
        }
#endif
        rows_times(xb, wp, sp, bp, y, B, N, K);
      } else {
        rows_times(xf, wp, sp, bp, y, B, N, K);
      }
      break;
    }
    case at::kChar:
      TORCH_CHECK(sp, "matvec: an int8 weight needs its scale");
      rows_times(xf, weight.data_ptr<int8_t>(), sp, bp, y, B, N, K);
      break;
    default:
      TORCH_CHECK(false, "matvec: unsupported weight dtype ", weight.scalar_type());
  }
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
  const bool half_pair = kBf16Pairs && weight.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16;
  const at::Tensor flat = x.reshape({-1, K});
  const at::Tensor rows = half_pair ? flat.contiguous() : flat.to(at::kFloat).contiguous();
  const int64_t B = rows.size(0);
  at::Tensor s, b;
  const float* sp = scale.has_value() ? floats(*scale, s) : nullptr;
  const float* bp = bias.has_value() ? floats(*bias, b) : nullptr;
  TORCH_CHECK(!sp || s.numel() == N, "matvec: scale needs one value per output row");
  TORCH_CHECK(!bp || b.numel() == N, "matvec: bias needs one value per output row");
  at::Tensor y = at::empty({B, N}, rows.options().dtype(at::kFloat));
  product(half_pair ? nullptr : rows.data_ptr<float>(),
          half_pair ? reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>()) : nullptr, weight, sp, bp,
          y.data_ptr<float>(), B, N, K);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

// The sum of the squares of D floats in one fixed order (vector lanes, then their tree), written out: gcc's
// `omp simd` reduction gave a row another sum in some passes (the first row of a pass starting at row 20 of a
// 64-wide fp32 prompt, against the same row within a longer pass), so a prompt position's norm, hence its keys,
// depended on its chunk.
inline float sum_squares(const float* x, int64_t D) {
  VecF acc = vzero();
  int64_t d = 0;
  for (; d + kVec <= D; d += kVec) {
    const VecF v = vload(x + d);
    acc = vfma(v, v, acc);
  }
  float ss = vsum(acc);
  for (; d < D; ++d) ss = std::fma(x[d], x[d], ss);
  return ss;
}

// RMSNorm of `rows` rows of D values for inference: y = x / rms(x) * w in float32; for a half-precision dtype the
// normalized value is rounded to it before the weight scales it, and the result is rounded too, as Hugging Face's
// LlamaRMSNorm does (llamaherd.model.RMSNorm).
void rms_rows(const float* x, const float* w, float* y, int64_t rows, int64_t D, double eps, at::ScalarType dtype) {
  const bool half = dtype != at::kFloat;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * D;
      float* yr = y + r * D;
      const float ss = sum_squares(xr, D);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      if (!half) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * inv * w[d];
        continue;
      }
      int64_t d = 0;
#if defined(__AVX512F__)
      if (dtype == at::kBFloat16) {
        const __m512 iv = _mm512_set1_ps(inv);
        for (; d + 16 <= D; d += 16) {
          const __m512 normed = round_bf16(_mm512_mul_ps(_mm512_loadu_ps(xr + d), iv));
          _mm512_storeu_ps(yr + d, round_bf16(_mm512_mul_ps(normed, _mm512_loadu_ps(w + d))));
        }
      }
#elif defined(LLAMAHERD_AVX2)
      if (dtype == at::kBFloat16) {
        const __m256 iv = _mm256_set1_ps(inv);
        for (; d + 8 <= D; d += 8) {
          const __m256 normed = round_bf16(_mm256_mul_ps(_mm256_loadu_ps(xr + d), iv));
          _mm256_storeu_ps(yr + d, round_bf16(_mm256_mul_ps(normed, _mm256_loadu_ps(w + d))));
        }
      }
#endif
      for (; d < D; ++d) yr[d] = round_to(round_to(xr[d] * inv, dtype) * w[d], dtype);
    }
  });
}

// RMSNorm over the last dim, one op instead of the ~10 of its composite (rms_rows).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "rms_norm: weight of ", weight.numel(), " values for rows of ", D);
  at::Tensor rows, w;
  const float* xp = floats(x.reshape({-1, D}), rows);
  const float* wp = floats(weight, w);
  at::Tensor y = at::empty({rows.size(0), D}, rows.options());
  rms_rows(xp, wp, y.data_ptr<float>(), rows.size(0), D, eps, x.scalar_type());
  return y.view(x.sizes()).to(x.scalar_type());
}

// RoPE (rotate-half layout, as llamaherd.model.apply_rope) of `rows` rows of `heads` heads of hd values, the rows
// `stride` floats apart (views into the fused q/k/v product are fine), row r with cos and sin c, s + r * d, d <= hd
// rotated dims: out (rows, heads * hd). A half dtype rounds each product and the sum, as the eager ops do.
void rope_rows(const float* x, int64_t stride, const float* c, const float* s, float* out, int64_t rows,
               int64_t heads, int64_t hd, int64_t d, at::ScalarType dtype) {
  const int64_t half_d = d / 2;
  const bool half = dtype != at::kFloat;
  auto r = [&](float v) { return half ? round_to(v, dtype) : v; };
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float *cb = c + b * d, *sb = s + b * d;
      for (int64_t h = 0; h < heads; ++h) {
        const float* xr = x + b * stride + h * hd;
        float* orow = out + (b * heads + h) * hd;
        int64_t i = 0;
#if defined(__AVX512F__)
        if (dtype == at::kBFloat16) {  // the same roundings, 16 dims at a time (the scalar loops finish a tail)
          const __m512 minus = _mm512_set1_ps(-1.f);
          for (; i + 16 <= half_d; i += 16) {
            const __m512 lo = _mm512_loadu_ps(xr + i), hi = _mm512_loadu_ps(xr + i + half_d);
            const __m512 c1 = _mm512_loadu_ps(cb + i), s1 = _mm512_loadu_ps(sb + i);
            const __m512 c2 = _mm512_loadu_ps(cb + i + half_d), s2 = _mm512_loadu_ps(sb + i + half_d);
            _mm512_storeu_ps(orow + i, round_bf16(_mm512_add_ps(round_bf16(_mm512_mul_ps(lo, c1)),
                                                                round_bf16(_mm512_mul_ps(_mm512_mul_ps(hi, minus), s1)))));
            _mm512_storeu_ps(orow + i + half_d, round_bf16(_mm512_add_ps(round_bf16(_mm512_mul_ps(hi, c2)),
                                                                         round_bf16(_mm512_mul_ps(lo, s2)))));
          }
        }
#elif defined(LLAMAHERD_AVX2)
        if (dtype == at::kBFloat16) {  // the same, 8 dims at a time
          const __m256 minus = _mm256_set1_ps(-1.f);
          for (; i + 8 <= half_d; i += 8) {
            const __m256 lo = _mm256_loadu_ps(xr + i), hi = _mm256_loadu_ps(xr + i + half_d);
            const __m256 c1 = _mm256_loadu_ps(cb + i), s1 = _mm256_loadu_ps(sb + i);
            const __m256 c2 = _mm256_loadu_ps(cb + i + half_d), s2 = _mm256_loadu_ps(sb + i + half_d);
            const __m256 minus_hi_s1 = _mm256_mul_ps(_mm256_mul_ps(hi, minus), s1);
            _mm256_storeu_ps(orow + i, round_bf16(_mm256_add_ps(round_bf16(_mm256_mul_ps(lo, c1)),
                                                                round_bf16(minus_hi_s1))));
            _mm256_storeu_ps(orow + i + half_d, round_bf16(_mm256_add_ps(round_bf16(_mm256_mul_ps(hi, c2)),
                                                                         round_bf16(_mm256_mul_ps(lo, s2)))));
          }
        }
#endif
        for (int64_t j = i; j < half_d; ++j) orow[j] = r(r(xr[j] * cb[j]) + r(-xr[j + half_d] * sb[j]));
        for (int64_t j = half_d + i; j < d; ++j) orow[j] = r(r(xr[j] * cb[j]) + r(xr[j - half_d] * sb[j]));
        for (int64_t i = d; i < hd; ++i) orow[i] = xr[i];
      }
    }
  });
}

// RoPE of queries and keys in one op: q (B, T, n_head * hd), k (B, T, n_kv * hd) (views into the fused q/k/v
// product are fine), cos and sin (B, 1, T, d) -> q (B, n_head, T, hd) and k (B, n_kv, T, hd) in q's dtype, laid
// out as view(B, T, heads, hd).transpose(1, 2) of a contiguous tensor, as the eager path's are (rope_rows).
std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                           const at::Tensor& sin, int64_t n_head, int64_t n_kv) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == q.size(0) && k.size(1) == q.size(1), "rope_qk: q ",
              q.sizes(), " and k ", k.sizes(), " are not (B, T, heads * hd) of the same positions");
  const int64_t B = q.size(0), T = q.size(1), d = cos.size(-1), hd = q.size(-1) / n_head;
  TORCH_CHECK(cos.numel() == B * T * d && sin.numel() == B * T * d && d % 2 == 0 && d <= hd, "rope_qk: cos ",
              cos.sizes(), " does not fit q ", q.sizes());
  at::Tensor c, s, qf, kf;
  const float* cp = floats(cos.reshape({B * T, d}), c);
  const float* sp = floats(sin.reshape({B * T, d}), s);
  auto rotate = [&](const at::Tensor& x, int64_t heads, at::Tensor& keep) {
    const float* xp = float_rows(x, B * T, heads * hd, keep);
    at::Tensor out = at::empty({B, T, heads, hd}, keep.options());
    rope_rows(xp, keep.stride(0), cp, sp, out.data_ptr<float>(), B * T, heads, hd, d, q.scalar_type());
    return out.to(q.scalar_type()).transpose(1, 2);
  };
  return {rotate(q, n_head, qf), rotate(k, n_kv, kf)};
}

// silu(gate) * up for `rows` rows of `cols` values, gate and up rows `gs` and `us` floats apart (halves of the
// fused gate/up product are fine): out (rows, cols). A half dtype rounds silu's result and the product, as
// F.silu(gate) * up does.
void silu_mul_rows(const float* gate, const float* up, int64_t gs, int64_t us, float* out, int64_t rows,
                   int64_t cols, at::ScalarType dtype) {
  const bool half = dtype != at::kFloat;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *g = gate + r * gs, *u = up + r * us;
      float* y = out + r * cols;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i < cols; i += 16) {  // silu(gate) = gate / (1 + e^-gate), 16 at a time; times up unless half
        const __mmask16 m = first(cols - i);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        const __m512 a = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_mask_storeu_ps(y + i, m, half ? a : _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, u + i)));
      }
      if (half) {
        int64_t j = 0;
        if (dtype == at::kBFloat16)
          for (; j + 16 <= cols; j += 16)
            _mm512_storeu_ps(y + j, round_bf16(_mm512_mul_ps(round_bf16(_mm512_loadu_ps(y + j)), _mm512_loadu_ps(u + j))));
        for (; j < cols; ++j) y[j] = round_to(round_to(y[j], dtype) * u[j], dtype);
      }
#elif defined(LLAMAHERD_AVX2)
      if (dtype == at::kFloat || dtype == at::kBFloat16) {  // fp16 takes the scalar loop
        const __m256 one = _mm256_set1_ps(1.f);
        for (; i + 8 <= cols; i += 8) {
          const __m256 gv = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i);
          const __m256 a = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
          _mm256_storeu_ps(y + i, half ? round_bf16(_mm256_mul_ps(round_bf16(a), uv)) : _mm256_mul_ps(a, uv));
        }
      }
#endif
      for (; i < cols; ++i) {
        const float a = g[i] / (1.f + std::exp(-g[i]));
        y[i] = half ? round_to(round_to(a, dtype) * u[i], dtype) : a * u[i];
      }
    }
  });
}

// silu(gate) * up (gate and up may be the halves of the fused gate/up product: rows read in place), in gate's
// dtype (silu_mul_rows).
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul: gate ", gate.sizes(), " and up ", up.sizes(), " differ");
  const int64_t cols = gate.dim() ? gate.size(-1) : 1, rows = cols ? gate.numel() / cols : 0;
  at::Tensor g, u;
  const float* gp = float_rows(gate, rows, cols, g);
  const float* upp = float_rows(up, rows, cols, u);
  at::Tensor y = at::empty({rows, cols}, g.options());
  silu_mul_rows(gp, upp, g.stride(0), u.stride(0), y.data_ptr<float>(), rows, cols, gate.scalar_type());
  return y.view(gate.sizes()).to(gate.scalar_type());
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

#if defined(__AVX512F__)
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Sixteen vectors to one: lane j holds the sum of v[j]'s lanes (a transposing tree of 45 ops instead of 16
// horizontal reductions of 7 each).
inline __m512 sum_each(const __m512* v) {
  __m512 t[4];
  for (int g = 0; g < 4; ++g) {
    const __m512* w = v + 4 * g;
    const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    t[g] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));  // block i: 4 partials
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x88), _mm512_shuffle_f32x4(t[0], t[1], 0xDD));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x88), _mm512_shuffle_f32x4(t[2], t[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// G query heads of 16 * HD dims sharing one kv head, over n keys: each key and value is read once for the G
// heads, and the scores of 16 keys are reduced together (sum_each). k, v: the head's first key and value,
// `stride` elements apart; p: G * n floats of scratch; outs[g]: head g's result.
template <typename T, int HD, int G>
void attend_heads(const float* const* qs, const T* k, const T* v, int64_t stride, int64_t n, float scale,
                  float* p, float* const* outs) {
  __m512 q[G][HD];
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < HD; ++d) q[g][d] = _mm512_loadu_ps(qs[g] + 16 * d);
  alignas(64) __m512 part[G][16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    for (int64_t jj = 0; jj < m; ++jj) {
      const T* kj = k + (j0 + jj) * stride;
      __m512 kv[HD];
      for (int d = 0; d < HD; ++d) kv[d] = load16(kj + 16 * d);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(q[g][0], kv[0]);
        for (int d = 1; d < HD; ++d) a = _mm512_fmadd_ps(q[g][d], kv[d], a);
        part[g][jj] = a;
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int64_t jj = m; jj < 16; ++jj) part[g][jj] = _mm512_setzero_ps();
      _mm512_mask_storeu_ps(p + g * n + j0, first(m), _mm512_mul_ps(sum_each(part[g]), _mm512_set1_ps(scale)));
    }
  }
  float sums[G];
  for (int g = 0; g < G; ++g) {  // softmax numerators in place; their sum divides at the end
    float* pg = p + g * n;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = first(n - j);
      top = _mm512_mask_max_ps(top, mask, top, _mm512_maskz_loadu_ps(mask, pg + j));
    }
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = first(n - j);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, pg + j), shift));
      _mm512_mask_storeu_ps(pg + j, mask, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
    }
    sums[g] = _mm512_reduce_add_ps(total);
  }
  __m512 acc[G][HD];
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < HD; ++d) acc[g][d] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * stride;
    __m512 vv[HD];
    for (int d = 0; d < HD; ++d) vv[d] = load16(vj + 16 * d);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * n + j]);
      for (int d = 0; d < HD; ++d) acc[g][d] = _mm512_fmadd_ps(w, vv[d], acc[g][d]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < HD; ++d)
      _mm512_storeu_ps(outs[g] + 16 * d, _mm512_div_ps(acc[g][d], _mm512_set1_ps(sums[g])));
}

constexpr int kLanes = 16;
// Whether attend_heads takes G heads of HD vectors at once: their queries and sums fit the 32 vector registers.
constexpr bool heads_fit(int G, int HD) { return G <= 2 || HD <= 4; }
#elif defined(LLAMAHERD_AVX2)
// Eight vectors to one: lane j holds the sum of v[j]'s lanes (two rounds of pairwise hadd, then the two halves).
inline __m256 sum_each(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// attend_heads with AVX2's 16 vector registers: no query kept in registers (G heads' scores of one key in G
// accumulators, the key read once), the scores of 8 keys reduced together, and the values in slices of the head
// dim small enough for G heads' accumulators (each value slice read once for the G heads).
template <typename T, int HD, int G>
void attend_heads(const float* const* qs, const T* k, const T* v, int64_t stride, int64_t n, float scale,
                  float* p, float* const* outs) {
  alignas(32) __m256 part[G][8];
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t m = std::min<int64_t>(8, n - j0);
    for (int64_t jj = 0; jj < m; ++jj) {
      const T* kj = k + (j0 + jj) * stride;
      __m256 a[G];
      for (int g = 0; g < G; ++g) a[g] = _mm256_setzero_ps();
      for (int d = 0; d < HD; ++d) {
        const __m256 kv = load8(kj + 8 * d);
        for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qs[g] + 8 * d), kv, a[g]);
      }
      for (int g = 0; g < G; ++g) part[g][jj] = a[g];
    }
    for (int g = 0; g < G; ++g) {
      for (int64_t jj = m; jj < 8; ++jj) part[g][jj] = _mm256_setzero_ps();
      alignas(32) float s[8];
      _mm256_store_ps(s, _mm256_mul_ps(sum_each(part[g]), _mm256_set1_ps(scale)));
      std::memcpy(p + g * n + j0, s, m * sizeof(float));
    }
  }
  float sums[G];  // each head's softmax denominator, which divides at the end
  for (int g = 0; g < G; ++g) sums[g] = softmax_numerators(p + g * n, n);
  constexpr int slice = G == 1 ? 8 : G <= 3 ? 4 : 2;  // vectors of the head dim at once: G * slice accumulators
  static_assert(HD % slice == 0);
  for (int d0 = 0; d0 < HD; d0 += slice) {
    __m256 acc[G][slice];
    for (int g = 0; g < G; ++g)
      for (int d = 0; d < slice; ++d) acc[g][d] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const T* vj = v + j * stride + 8 * d0;
      __m256 vv[slice];
      for (int d = 0; d < slice; ++d) vv[d] = load8(vj + 8 * d);
      for (int g = 0; g < G; ++g) {
        const __m256 w = _mm256_set1_ps(p[g * n + j]);
        for (int d = 0; d < slice; ++d) acc[g][d] = _mm256_fmadd_ps(w, vv[d], acc[g][d]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int d = 0; d < slice; ++d)
        _mm256_storeu_ps(outs[g] + 8 * (d0 + d), _mm256_div_ps(acc[g][d], _mm256_set1_ps(sums[g])));
  }
}

constexpr int kLanes = 8;
constexpr bool heads_fit(int G, int) { return G <= 4; }  // no query in registers; value slices shrink with G
#endif

#if defined(__AVX512F__) || defined(LLAMAHERD_AVX2)
// attend_heads for G (1 to 4) heads of HD vectors, chosen at run time.
template <typename T, int HD>
void attend_heads_n(int G, const float* const* qs, const T* k, const T* v, int64_t stride, int64_t n, float scale,
                    float* p, float* const* outs) {
  switch (G) {
    case 1: return attend_heads<T, HD, 1>(qs, k, v, stride, n, scale, p, outs);
    case 2: if constexpr (heads_fit(2, HD)) return attend_heads<T, HD, 2>(qs, k, v, stride, n, scale, p, outs); break;
    case 3: if constexpr (heads_fit(3, HD)) return attend_heads<T, HD, 3>(qs, k, v, stride, n, scale, p, outs); break;
    case 4: if constexpr (heads_fit(4, HD)) return attend_heads<T, HD, 4>(qs, k, v, stride, n, scale, p, outs); break;
  }
  TORCH_CHECK(false, "attend_heads: ", G, " heads of ", kLanes * HD, " dims at once");
}
#endif

// Attention of one query per row (a decode step) over keys [0, lengths[b]) of the cache row slots[b], in float32
// whatever the cache's dtype (float32, bf16 bits, fp16): what at::scaled_dot_product_attention gives with the
// step's causal mask, up to rounding, without its per-call set-up (50-70 us a layer for SmolLM2's 9 heads and a
// short context), without gathering the rows, and without reading the hidden keys. q (B, H, hd) float32; cache
// (max_batch, n_kv, max_len, hd) with unit stride in hd, strides cs; grouped-query heads share their kv head.
// out (B, H * hd), heads in order (what transpose(1, 2).reshape gives). With AVX-512 or AVX2 and a head dim of 64
// or 128, the query heads of one kv head go together in chunks (attend_heads: each key read once per chunk; a
// SmolLM2 16-row step at 512 positions spent 38 ms in attention before, reading each key per query head, on a
// Xeon; at 700 positions on a Zen 3 the whole step went from 115 to 98 ms), split finer when there are too few
// chunks for the threads.
template <typename T>
void attend_rows(const float* q, const T* k, const T* v, const int64_t* cs, const int64_t* slots,
                 const std::vector<int64_t>& lengths, int64_t H, int64_t n_kv, int64_t hd, float* out) {
  const int64_t group = H / n_kv, B = static_cast<int64_t>(lengths.size());
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
#if defined(__AVX512F__) || defined(LLAMAHERD_AVX2)
  if (hd == 64 || hd == 128) {
    const int64_t most = heads_fit(4, static_cast<int>(hd / kLanes)) ? 4 : 2;  // heads at once
    int64_t chunks = (group + most - 1) / most;
    while (chunks < group && B * n_kv * chunks < 2 * at::get_num_threads()) ++chunks;
    at::parallel_for(0, B * n_kv * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> p;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (n_kv * chunks), kv = i / chunks % n_kv, c = i % chunks;
        const int64_t h0 = kv * group + c * group / chunks, G = (c + 1) * group / chunks - c * group / chunks;
        const float* qs[4];
        float* outs[4];
        for (int64_t g = 0; g < G; ++g) {
          qs[g] = q + (b * H + h0 + g) * hd;
          outs[g] = out + (b * H + h0 + g) * hd;
        }
        const int64_t n = lengths[b], row = slots[b] * cs[0] + kv * cs[1];
        p.resize(G * n);
        if (hd == 64)
          attend_heads_n<T, 64 / kLanes>(G, qs, k + row, v + row, cs[2], n, scale, p.data(), outs);
        else
          attend_heads_n<T, 128 / kLanes>(G, qs, k + row, v + row, cs[2], n, scale, p.data(), outs);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, acc(hd);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, n = lengths[b];
      const int64_t row = slots[b] * cs[0] + (h / group) * cs[1];
      const float* qi = q + i * hd;
      p.resize(n);
      for (int64_t j = 0; j < n; ++j) {
        const T* kj = k + row + j * cs[2];
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int64_t d = 0; d < hd; ++d) a += qi[d] * widen(kj[d]);
        p[j] = a * scale;
      }
      const float sum = softmax_numerators(p.data(), n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* vj = v + row + j * cs[2];
        const float w = p[j];
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) acc[d] += w * widen(vj[d]);
      }
      for (int64_t d = 0; d < hd; ++d) out[i * hd + d] = acc[d] / sum;
    }
  });
}

// One decode step's keys k (B, n_kv * hd) and values v (B rows `v_stride` floats apart) into the cache rows
// slots[b] at positions[b], then attention over each row's keys [0, positions[b]] (attend_rows) into out.
template <typename T>
void cache_and_attend(const float* q, const float* k, const float* v, int64_t v_stride, T* kc, T* vc,
                      const int64_t* cs, const int64_t* slots, const int64_t* positions, int64_t B, int64_t H,
                      int64_t n_kv, int64_t hd, float* out) {
  std::vector<int64_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < n_kv; ++h) {
      const int64_t at = slots[b] * cs[0] + h * cs[1] + positions[b] * cs[2];
      for (int64_t d = 0; d < hd; ++d) {
        store(k[b * n_kv * hd + h * hd + d], kc + at + d);
        store(v[b * v_stride + h * hd + d], vc + at + d);
      }
    }
    lengths[b] = positions[b] + 1;
  }
  attend_rows(q, static_cast<const T*>(kc), static_cast<const T*>(vc), cs, slots, lengths, H, n_kv, hd, out);
}

// y (B, N) = x (B, K) @ weight.T (times the int8 scales), rounded to the activations' dtype `act` as matvec's
// result is; a bf16 model's bf16 weights read x as bf16 (its values are bf16 already: exact), through `bits`.
void project(const float* x, int64_t B, int64_t K, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
             float* y, at::ScalarType act, std::vector<uint16_t>& bits) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.is_contiguous(), "llama_decode_block: weight ",
              weight.sizes(), " does not take ", K, " inputs, or is not contiguous");
  const int64_t N = weight.size(0);
  at::Tensor s;
  const float* sp = scale.has_value() ? floats(*scale, s) : nullptr;
  const bool half_pair = kBf16Pairs && weight.scalar_type() == at::kBFloat16 && act == at::kBFloat16;
  if (half_pair) {
    bits.resize(B * K);
    for (int64_t i = 0; i < B * K; ++i) bits[i] = static_cast<at::BFloat16>(x[i]).x;
  }
  product(half_pair ? nullptr : x, half_pair ? bits.data() : nullptr, weight, sp, nullptr, y, B, N, K);
  round_all(y, B * N, act);
}

// One decode step through a LLaMA block (RMSNorm, fused q/k/v, RoPE, grouped-query attention over the KV cache,
// output projection, RMSNorm, fused gate/up, SwiGLU, down projection, both residuals) in one call, on raw float32
// rows with no ATen op between the products: a decode step of a small model is bound by per-op costs otherwise
// (issue 12). The steps and their rounding are llamaherd.model.Block's: for a half dtype every step's result is
// rounded to it, as the eager ops store it.
// x (B, 1, D); weights as FusedProjections / the modules hold them (int8 with its scales); cos, sin (B, 1, 1, d);
// k_cache, v_cache: this layer's (max_batch, n_kv, max_len, hd) in x's dtype; slots, positions (B,) int64: row b
// writes its key and value at positions[b] of slot slots[b] and attends to that slot's keys [0, positions[b]].
// Returns (B, 1, D) in x's dtype.
at::Tensor llama_decode_block(const at::Tensor& x, const at::Tensor& norm1, const at::Tensor& qkv_w,
                              const std::optional<at::Tensor>& qkv_s, const at::Tensor& o_w,
                              const std::optional<at::Tensor>& o_s, const at::Tensor& norm2, const at::Tensor& gu_w,
                              const std::optional<at::Tensor>& gu_s, const at::Tensor& down_w,
                              const std::optional<at::Tensor>& down_s, double eps, int64_t n_head, int64_t n_kv,
                              const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& positions) {
  const at::ScalarType act = x.scalar_type();
  const int64_t B = x.size(0), D = x.size(-1), hd = k_cache.size(3), nq = n_head * hd, nk = n_kv * hd;
  const int64_t nqkv = nq + 2 * nk, F = gu_w.size(0) / 2, d = cos.size(-1);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "llama_decode_block: x ", x.sizes(), " is not one decode step");
  TORCH_CHECK(n_kv > 0 && n_head % n_kv == 0 && k_cache.size(1) == n_kv && qkv_w.size(0) == nqkv,
              "llama_decode_block: ", n_head, " heads and ", n_kv, " kv heads do not fit q/k/v ", qkv_w.sizes(),
              " and the cache ", k_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == act && v_cache.scalar_type() == act && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1,
              "llama_decode_block: the cache must be x's dtype with unit stride in the head dim");
  TORCH_CHECK(cos.numel() == B * d && sin.numel() == B * d && d % 2 == 0 && d <= hd,
              "llama_decode_block: cos ", cos.sizes(), " does not fit ", B, " rows of head dim ", hd);
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.numel() == B &&
                  positions.numel() == B, "llama_decode_block: slots and positions must be (B,) int64");
  const at::Tensor slot_t = slots.contiguous(), pos_t = positions.contiguous();
  const int64_t *slot = slot_t.data_ptr<int64_t>(), *pos = pos_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(slot[b] >= 0 && slot[b] < k_cache.size(0) && pos[b] >= 0 && pos[b] < k_cache.size(2),
                "llama_decode_block: slot ", slot[b], " position ", pos[b], " outside the cache ", k_cache.sizes());
  std::vector<float> keep_x, keep_n1, keep_n2, keep_c, keep_s;
  const float* xp = floats(x, keep_x);
  const float *n1 = floats(norm1, keep_n1), *n2 = floats(norm2, keep_n2);
  const float *cp = floats(cos, keep_c), *sp = floats(sin, keep_s);
  // Every intermediate in one buffer: normed x, q/k/v, rotated q and k, attention, residual, gate/up, SwiGLU.
  std::vector<float> buffer(B * (2 * D + nqkv + nq + nk + nq + 2 * F + F));
  float *normed = buffer.data(), *qkv = normed + B * D, *q = qkv + B * nqkv, *k = q + B * nq, *att = k + B * nk;
  float *h = att + B * nq, *gu = h + B * D, *swiglu = gu + B * 2 * F;
  std::vector<uint16_t> bits;
  at::Tensor out = at::empty({B, 1, D}, x.options().dtype(act));
  std::vector<float> rounded;  // a half dtype's result before it is stored (its values already rounded to it)
  if (act != at::kFloat) rounded.resize(B * D);
  float* y = act == at::kFloat ? out.data_ptr<float>() : rounded.data();

  rms_rows(xp, n1, normed, B, D, eps, act);
  project(normed, B, D, qkv_w, qkv_s, qkv, act, bits);
  rope_rows(qkv, nqkv, cp, sp, q, B, n_head, hd, d, act);
  rope_rows(qkv + nq, nqkv, cp, sp, k, B, n_kv, hd, d, act);
  const int64_t cs[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  switch (act) {
    case at::kFloat:
      cache_and_attend(q, k, qkv + nq + nk, nqkv, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), cs, slot,
                       pos, B, n_head, n_kv, hd, att);
      break;
    case at::kBFloat16:
      cache_and_attend(q, k, qkv + nq + nk, nqkv, reinterpret_cast<uint16_t*>(k_cache.data_ptr<at::BFloat16>()),
                       reinterpret_cast<uint16_t*>(v_cache.data_ptr<at::BFloat16>()), cs, slot, pos, B, n_head,
                       n_kv, hd, att);
      break;
    case at::kHalf:
      cache_and_attend(q, k, qkv + nq + nk, nqkv, k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), cs,
                       slot, pos, B, n_head, n_kv, hd, att);
      break;
    default:
      TORCH_CHECK(false, "llama_decode_block: activations of dtype ", act);
  }
  round_all(att, B * nq, act);
  project(att, B, nq, o_w, o_s, h, act, bits);
  for (int64_t i = 0; i < B * D; ++i) h[i] = xp[i] + h[i];
  round_all(h, B * D, act);
  rms_rows(h, n2, normed, B, D, eps, act);
  project(normed, B, D, gu_w, gu_s, gu, act, bits);
  silu_mul_rows(gu, gu + F, 2 * F, 2 * F, swiglu, B, F, act);
  project(swiglu, B, F, down_w, down_s, y, act, bits);
  for (int64_t i = 0; i < B * D; ++i) y[i] = h[i] + y[i];
  round_all(y, B * D, act);
  if (act == at::kBFloat16) {
    auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < B * D; ++i) store(y[i], o + i);
  } else if (act == at::kHalf) {
    at::Half* o = out.data_ptr<at::Half>();
    for (int64_t i = 0; i < B * D; ++i) store(y[i], o + i);
  }
  return out;
}

// Every block of a LLaMA model for one decode step: llama_decode_block for layer i with the i-th entry of each
// list and layer i of the caches k_cache, v_cache (n_layer, rows, n_kv, max_len, head_dim); then, given norm
// and head_w, the final RMSNorm and the head (head_s: an int8 head's scales) as rms_norm and matvec compute them:
// logits (rows, 1, vocab), else the last block's output (rows, 1, D). One call for all 30 blocks of SmolLM2
// instead of one per block from Python: 0.4-0.8 ms less a step (AVX2 VM, alternating); the norm and head in it
// too: another 0.24-0.42 ms (Python's ops run slowly after a step has streamed the weights through the caches).
at::Tensor llama_decode_layers(const at::Tensor& x, at::TensorList norm1, at::TensorList qkv_w,
                               const c10::List<std::optional<at::Tensor>>& qkv_s, at::TensorList o_w,
                               const c10::List<std::optional<at::Tensor>>& o_s, at::TensorList norm2,
                               at::TensorList gu_w, const c10::List<std::optional<at::Tensor>>& gu_s,
                               at::TensorList down_w, const c10::List<std::optional<at::Tensor>>& down_s, double eps,
                               int64_t n_head, int64_t n_kv, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                               const at::Tensor& positions, const std::optional<at::Tensor>& norm,
                               const std::optional<at::Tensor>& head_w, const std::optional<at::Tensor>& head_s) {
  const size_t L = norm1.size();
  TORCH_CHECK(qkv_w.size() == L && qkv_s.size() == L && o_w.size() == L && o_s.size() == L && norm2.size() == L &&
                  gu_w.size() == L && gu_s.size() == L && down_w.size() == L && down_s.size() == L,
              "llama_decode_layers: every weight list needs one entry per layer (", L, ")");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == static_cast<int64_t>(L) && v_cache.sizes() == k_cache.sizes(),
              "llama_decode_layers: caches ", k_cache.sizes(), " and ", v_cache.sizes(), " are not (", L,
              ", rows, n_kv, max_len, head_dim)");
  TORCH_CHECK(norm.has_value() == head_w.has_value() && (head_w.has_value() || !head_s.has_value()),
              "llama_decode_layers: give the final norm and the head together (and head_s only with them)");
  const std::vector<at::Tensor> keys = k_cache.unbind(0), values = v_cache.unbind(0);  // one view per layer
  at::Tensor h = x;
  for (size_t i = 0; i < L; ++i)
    h = llama_decode_block(h, norm1[i], qkv_w[i], qkv_s.get(i), o_w[i], o_s.get(i), norm2[i], gu_w[i], gu_s.get(i),
                           down_w[i], down_s.get(i), eps, n_head, n_kv, cos, sin, keys[i], values[i], slots,
                           positions);
  if (!head_w.has_value()) return h;
  return matvec(rms_norm(h, *norm, eps), *head_w, head_s, std::nullopt);  // the final norm shares the blocks' eps
}

// Whether bf16 x bf16 products run on the AMX tile unit here (amx_rows_times): compiled for a CPU that has one,
// and the OS lets this process use it.
bool bf16_tiles() {
#if defined(LLAMAHERD_AMX)
  return amx_ready();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(llamaherd, m) {
  m.def("bf16_tiles() -> bool", &bf16_tiles);
  m.def("matvec(Tensor x, Tensor weight, Tensor? scale=None, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, int n_head, int n_kv) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_backward(Tensor gate, Tensor up, Tensor sig, Tensor grad) -> (Tensor, Tensor)");
  m.def("llama_decode_layers(Tensor x, Tensor[] norm1, Tensor[] qkv_w, Tensor?[] qkv_s, Tensor[] o_w, Tensor?[] o_s, "
        "Tensor[] norm2, Tensor[] gu_w, Tensor?[] gu_s, Tensor[] down_w, Tensor?[] down_s, float eps, int n_head, "
        "int n_kv, Tensor cos, Tensor sin, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions, "
        "Tensor? norm=None, Tensor? head_w=None, Tensor? head_s=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(llamaherd, CPU, m) {
  m.impl("matvec", &matvec);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_qk", &rope_qk);
  m.impl("silu_mul", &silu_mul);
  m.impl("silu_mul_backward", &silu_mul_backward);
  m.impl("llama_decode_layers", &llama_decode_layers);
}
