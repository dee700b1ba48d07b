// Weight-only int4 matmul (y = x @ w.T, w = (q - 8) * scale + zero per group of input channels).
//
// Layout (made by int4_prepack in optistack/passes/kernels/cpu.py): K is cut into chunks of up to
// 4096 input channels, stored one after the other, each a [N, width/2] matrix (int4_layout.h says why).
// In a chunk each output row is width/2 bytes,
// cut into blocks of 128 input channels (64 bytes) plus at most one 64-channel tail block (32 bytes).
// Rows are interleaved in groups of 4 (block b of rows 4i..4i+3 side by side, then block b+1, ...;
// the rows after the last full group stay plain), so the 4-row kernel reads one sequential stream
// (short per-row streams keep the hardware prefetcher from reaching full memory bandwidth).
// Inside a block of B bytes with W = B/2 (32 or 16): byte b = 16*lane + 8*half + j holds
// k = half*W + 8*lane + j in its low nibble and k + 2W in its high nibble. That is exactly the order in
// which _mm512_unpack{lo,hi}_epi8 spread the nibbles into 16-bit words, so decoding a block is an AND,
// a shift and four unpacks, and the words come out in natural k order (x needs no shuffling).
//
// Unpacking each nibble next to the byte 0x43 makes the bfloat16 number 128 + q, so the AVX512_BF16
// dot product (vdpbf16ps) multiplies codes by bf16 activations exactly, accumulating in float32:
//   y = sum_g s_g * sum_k (128 + q_k) x_k + (z_g - 136 s_g) * sum_k x_k
// with the per-group sums of x computed once per call. float32 activations are split into
// x = hi + lo (two bfloat16s, 16 significant bits) and both halves are multiplied.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "int4_gemm_prep.h"
#include "int4_layout.h"
#include "kernels.h"
#include "simd.h"

namespace optistack_cpu {

#if defined(OPTISTACK_AVX512) && defined(OPTISTACK_AVX512BF16)
static inline __m512 dp(__m512 acc, __m512i w, const uint16_t* x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
}
static inline __m256 dp(__m256 acc, __m256i w, const uint16_t* x) {
  return _mm256_dpbf16_ps(acc, (__m256bh)w, (__m256bh)_mm256_loadu_si256((const __m256i*)x));
}

// Broadcast of one scale (float32, or bfloat16 widened by a shift) to 16 lanes.
static inline __m512 bcast(const float* p) { return _mm512_set1_ps(*p); }
static inline __m512 bcast(const bf16* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_set1_epi16(short(bits)), 16));
}

// R weight rows times MB activation rows over one chunk of Kc input channels starting at channel c0:
// each decoded block feeds R*MB dot products and each activation load R of them. GS (the group size) is
// a constant so the loops unroll into straight-line code with the accumulators in registers.
// q/il/j0: the rows' RowRef in the chunk; sc: row 0's scales (row stride G, whole row).
// out[mb * R + r] gets the chunk's partial dot product (the zero-point correction is separate).
template <int R, int MB, bool SPLIT, int GS, typename S>
static inline void dot_rows(const uint8_t* q, int il, int j0, const S* sc, int64_t G, int64_t c0,
                            int64_t Kc, const XPrep* xps, float* out) {
  static_assert(R <= 4, "R rows come from one 4-row group");
  constexpr int A = R * MB;
  // bf16 scales widened once per row into a stack buffer: a broadcast from float memory is a plain
  // load, where broadcasting a bf16 costs a shuffle and a shift per group in the hot loop.
  constexpr int64_t kMaxGroups = kChunkK / 32;
  float sbuf[std::is_same_v<S, float> ? 1 : R * kMaxGroups];
  const int64_t g0c = c0 / GS, gn = Kc / GS;  // the chunk's groups
  const float* sf[R];                          // sf[r][g]: scale of chunk-local group g
  for (int r = 0; r < R; ++r) {
    if constexpr (std::is_same_v<S, float>) {
      sf[r] = sc + r * G + g0c;
    } else {
      for (int64_t g = 0; g < gn; g += 16)
        store16(sbuf + r * kMaxGroups + g, load16(sc + r * G + g0c + g, tail_mask(gn - g)), tail_mask(gn - g));
      sf[r] = sbuf + r * kMaxGroups;
    }
  }
  const __m512i nib = _mm512_set1_epi8(0x0F), magic = _mm512_set1_epi8(0x43);
  __m512 acc[A], g0[A], g1[A];
  for (int i = 0; i < A; ++i) acc[i] = g0[i] = g1[i] = _mm512_setzero_ps();
  const int64_t K128 = Kc / 128 * 128;
  for (int64_t k = 0; k < K128; k += 128) {  // chunk-local k; the activations are at c0 + k
    for (int r = 0; r < R; ++r) {
      const uint8_t* qb = q + (k / 2) * il + (j0 + r) * 64;
      _mm_prefetch((const char*)(qb + 1024), _MM_HINT_T0);
      __m512i b = _mm512_loadu_si512(qb);
      __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
      __m512i v0 = _mm512_unpacklo_epi8(lo, magic), v1 = _mm512_unpackhi_epi8(lo, magic);
      __m512i v2 = _mm512_unpacklo_epi8(hi, magic), v3 = _mm512_unpackhi_epi8(hi, magic);
      const float* s = sf[r];
      for (int mb = 0; mb < MB; ++mb) {
        const int i = mb * R + r;
        const uint16_t* xh = xps[mb].hi + c0 + k;
        const uint16_t* xl = SPLIT ? xps[mb].lo + c0 + k : nullptr;
        if constexpr (GS == 32) {
          __m512 d0 = dp(_mm512_setzero_ps(), v0, xh), d1 = dp(_mm512_setzero_ps(), v1, xh + 32);
          __m512 d2 = dp(_mm512_setzero_ps(), v2, xh + 64), d3 = dp(_mm512_setzero_ps(), v3, xh + 96);
          if constexpr (SPLIT) {
            d0 = dp(d0, v0, xl); d1 = dp(d1, v1, xl + 32); d2 = dp(d2, v2, xl + 64); d3 = dp(d3, v3, xl + 96);
          }
          acc[i] = _mm512_fmadd_ps(d0, bcast(s + k / 32), acc[i]);
          g0[i] = _mm512_fmadd_ps(d1, bcast(s + k / 32 + 1), g0[i]);
          acc[i] = _mm512_fmadd_ps(d2, bcast(s + k / 32 + 2), acc[i]);
          g0[i] = _mm512_fmadd_ps(d3, bcast(s + k / 32 + 3), g0[i]);
        } else if constexpr (GS == 64) {
          __m512 d0 = dp(dp(_mm512_setzero_ps(), v0, xh), v1, xh + 32);
          __m512 d1 = dp(dp(_mm512_setzero_ps(), v2, xh + 64), v3, xh + 96);
          if constexpr (SPLIT) {
            d0 = dp(dp(d0, v0, xl), v1, xl + 32);
            d1 = dp(dp(d1, v2, xl + 64), v3, xl + 96);
          }
          acc[i] = _mm512_fmadd_ps(d0, bcast(s + k / 64), acc[i]);
          g0[i] = _mm512_fmadd_ps(d1, bcast(s + k / 64 + 1), g0[i]);
        } else {  // 128 or 256: two chains, scaled when the group ends
          g0[i] = dp(dp(g0[i], v0, xh), v2, xh + 64);
          g1[i] = dp(dp(g1[i], v1, xh + 32), v3, xh + 96);
          if constexpr (SPLIT) {
            g0[i] = dp(dp(g0[i], v0, xl), v2, xl + 64);
            g1[i] = dp(dp(g1[i], v1, xl + 32), v3, xl + 96);
          }
          if ((k + 128) % GS == 0) {
            acc[i] = _mm512_fmadd_ps(_mm512_add_ps(g0[i], g1[i]), bcast(s + k / GS), acc[i]);
            g0[i] = g1[i] = _mm512_setzero_ps();
          }
        }
      }
    }
  }
  if constexpr (GS <= 64) {
    if (K128 < Kc) {  // one 64-channel tail block (the last chunk only)
      const __m256i nib8 = _mm256_set1_epi8(0x0F), magic8 = _mm256_set1_epi8(0x43);
      const int64_t k = K128;
      for (int r = 0; r < R; ++r) {
        __m256i b = _mm256_loadu_si256((const __m256i*)(q + (k / 2) * il + (j0 + r) * 32));
        __m256i lo = _mm256_and_si256(b, nib8), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib8);
        __m256i v0 = _mm256_unpacklo_epi8(lo, magic8), v1 = _mm256_unpackhi_epi8(lo, magic8);
        __m256i v2 = _mm256_unpacklo_epi8(hi, magic8), v3 = _mm256_unpackhi_epi8(hi, magic8);
        const float* s = sf[r];
        for (int mb = 0; mb < MB; ++mb) {
          const uint16_t* xh = xps[mb].hi + c0 + k;
          const uint16_t* xl = SPLIT ? xps[mb].lo + c0 + k : nullptr;
          __m256 d0 = dp(dp(_mm256_setzero_ps(), v0, xh), v1, xh + 16);
          __m256 d1 = dp(dp(_mm256_setzero_ps(), v2, xh + 32), v3, xh + 48);
          if constexpr (SPLIT) {
            d0 = dp(dp(d0, v0, xl), v1, xl + 16);
            d1 = dp(dp(d1, v2, xl + 32), v3, xl + 48);
          }
          __m256 t = GS == 32 ? _mm256_fmadd_ps(d1, _mm512_castps512_ps256(bcast(s + k / 32 + 1)),
                                                _mm256_mul_ps(d0, _mm512_castps512_ps256(bcast(s + k / 32))))
                              : _mm256_mul_ps(_mm256_add_ps(d0, d1), _mm512_castps512_ps256(bcast(s + k / 64)));
          acc[mb * R + r] = _mm512_add_ps(acc[mb * R + r], _mm512_zextps256_ps512(t));
        }
      }
    }
  }
  __m512 v[A];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) {
      const int i = mb * R + r;
      v[i] = _mm512_add_ps(acc[i], _mm512_add_ps(g0[i], g1[i]));
    }
  int i = 0;
  for (; i + 4 <= A; i += 4) _mm_storeu_ps(out + i, reduce4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  for (; i < A; ++i) out[i] = _mm512_reduce_add_ps(v[i]);
}

template <int R, int MB, typename S>
static inline void dot_rows_any(RowRef ref, const S* sc, int64_t G, int64_t group, int64_t c0,
                                int64_t Kc, const XPrep* xps, float* out) {
  const bool split = xps[0].lo != nullptr;
#define OPTISTACK_DOT(GS)                                                                                   \
  if (group == GS) {                                                                                        \
    if (split) dot_rows<R, MB, true, GS, S>(ref.base, ref.il, ref.j, sc, G, c0, Kc, xps, out);          \
    else dot_rows<R, MB, false, GS, S>(ref.base, ref.il, ref.j, sc, G, c0, Kc, xps, out);               \
    return;                                                                                                 \
  }
  OPTISTACK_DOT(32)
  OPTISTACK_DOT(64)
  OPTISTACK_DOT(128)
  OPTISTACK_DOT(256)
#undef OPTISTACK_DOT
}
#define OPTISTACK_INT4_SIMD 1
#endif

// Rows [n0, n1) of y for MB activation rows (y row stride N): dot products plus the zero correction.
template <int MB, typename S, typename T>
static void gemv_rows(const uint8_t* qw, const S* sc, const S* zr, int64_t K, int64_t group, const XPrep* xps,
                      int64_t n0, int64_t n1, T* y, int64_t N) {
  const int64_t G = K / group;
  auto finish = [&](int64_t n, int mb, float dot) { y[mb * N + n] = from_f32<T>(dot); };  // dot: corrected
#ifdef OPTISTACK_INT4_SIMD
  // Rows in tiles of kTile. In a tile: first every row's zero-point correction, in a loop of its own
  // (at the end of each row's dot product, or between rows, it cost 20% of a K=576 GEMV); then chunk by
  // chunk (see int4_layout.h), all the tile's rows over one chunk before the next, partial sums kept per
  // row. Tiles keep the scales cached between the two loops and the weight stream in long runs.
  constexpr int R = MB == 1 ? 4 : 1;
  constexpr int64_t kTile = 256;
  float partial[kTile * MB];
  float d[4 * MB];
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    for (int mb = 0; mb < MB; ++mb) {
      int64_t n = t0;
      for (; n + 4 <= t1; n += 4) {
        __m512 c[4];
        for (int r = 0; r < 4; ++r) c[r] = group_correction16(sc + (n + r) * G, zr + (n + r) * G, xps[mb].gsum, G);
        float t[4];
        _mm_storeu_ps(t, reduce4(c[0], c[1], c[2], c[3]));
        for (int r = 0; r < 4; ++r) partial[(n + r - t0) * MB + mb] = t[r];
      }
      for (; n < t1; ++n) partial[(n - t0) * MB + mb] = group_correction(sc + n * G, zr + n * G, xps[mb].gsum, G);
    }
    for (int64_t c0 = 0; c0 < K; c0 += kChunkK) {
      const int64_t Kc = chunk_width(K, c0);
      const uint8_t* chunk = chunk_base(qw, N, c0);
      const bool last = c0 + Kc == K;
      auto put = [&](int64_t n, int mb, float v) {
        float& p = partial[(n - t0) * MB + mb];
        if (last) finish(n, mb, p + v);
        else p += v;
      };
      int64_t n = t0;
      for (; n + R <= t1; n += R) {
        dot_rows_any<R, MB, S>(row_ref(chunk, n, N, Kc), sc + n * G, G, group, c0, Kc, xps, d);
        for (int mb = 0; mb < MB; ++mb)
          for (int r = 0; r < R; ++r) put(n + r, mb, d[mb * R + r]);
      }
      for (; n < t1; ++n) {
        dot_rows_any<1, MB, S>(row_ref(chunk, n, N, Kc), sc + n * G, G, group, c0, Kc, xps, d);
        for (int mb = 0; mb < MB; ++mb) put(n, mb, d[mb]);
      }
    }
  }
#else
  std::vector<uint8_t> codes(K);
  std::vector<float> xf(K);
  for (int mb = 0; mb < MB; ++mb) {
    const XPrep& xp = xps[mb];
    for (int64_t k = 0; k < K; ++k) {
      uint16_t h = xp.hi[k], l = xp.lo ? xp.lo[k] : 0;
      bf16 hb, lb;
      std::memcpy(&hb, &h, 2);
      std::memcpy(&lb, &l, 2);
      xf[k] = float(hb) + float(lb);
    }
    for (int64_t n = n0; n < n1; ++n) {
      decode_row(qw, n, N, K, codes.data());
      float dot = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) s += (128.f + codes[k]) * xf[k];
        dot += s * sval(sc + n * G, g);
      }
      finish(n, mb, dot + group_correction(sc + n * G, zr + n * G, xp.gsum, G));
    }
  }
#endif
}

constexpr int64_t kArenaValues = 1 << 16;  // activation values (M x K) a thread's reusable arena serves
constexpr int64_t kParallelWork = 1 << 17;  // weight bytes x activation rows below which one thread is faster
// bfloat16 activations with at least this many rows (prefill) go through int4_dequant and a bf16
// GEMM instead (see int4_dequant.cpp; the crossover was measured on AVX512_BF16, 2 cores).
constexpr int64_t kDequantRows = 12;

at::Tensor int4_matmul(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale,
                       const at::Tensor& zero, int64_t group) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "optistack_cpu.int4_matmul: x must be float32 or bfloat16, got ", x_in.scalar_type());
  check_int4_packed("int4_matmul", qweight, scale, zero, group);
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = K / group;
  TORCH_CHECK(x_in.size(-1) == K, "optistack_cpu.int4_matmul: x has ", x_in.size(-1), " input features, weight ", K);
  // Decode calls pass [1, K] or [1, 1, K]: reshape only when needed (each view costs ~0.2 us here).
  const bool flat = x_in.dim() == 2;
  at::Tensor x = flat ? x_in.contiguous() : x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  auto shaped = [&](at::Tensor y) {
    if (flat) return y;
    std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
    out_shape.back() = N;
    return y.reshape(out_shape);
  };
  if (x.scalar_type() == at::kBFloat16 && M >= kDequantRows) return shaped(at::linear(x, int4_dequant(qweight, scale, zero, group)));
  const uint8_t* qw = qweight.data_ptr<uint8_t>();

  // One parallel region per call: each thread takes blocks of 16 output rows and runs every
  // activation row over them, four at a time (the block stays in cache while it is reused).
  at::Tensor y = at::empty({M, N}, x.options());
  // Decode-sized calls reuse the thread's arena; a large call gets its own buffers, so that one big
  // float32 prefill does not pin its split activations in memory for the life of the thread.
  thread_local XArena arena;
  XArena local;
  const bool split = x.scalar_type() == at::kFloat;
  XArena& buf = M * K <= kArenaValues ? arena : local;
  buf.preps.resize(M);
  buf.gsum.resize(M * G);
  if (split) buf.words.resize(M * K * 2);
  XPrep* xps = buf.preps.data();
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* hb = split ? buf.words.data() + m * 2 * K : nullptr;
    prep_x(x, m, K, group, buf.gsum.data() + m * G, hb, split ? hb + K : nullptr, xps[m]);
  }
  auto run = [&](auto s, auto t) {
    using S = decltype(s);
    using T = decltype(t);
    const S* sc = scale.data_ptr<S>();
    const S* zr = zero.data_ptr<S>();
    T* yp = y.data_ptr<T>();
    auto body = [&](int64_t b, int64_t e) {
      const int64_t n0 = b * 16, n1 = std::min(N, e * 16);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) gemv_rows<4, S, T>(qw, sc, zr, K, group, &xps[m], n0, n1, yp + m * N, N);
      for (; m < M; ++m) gemv_rows<1, S, T>(qw, sc, zr, K, group, &xps[m], n0, n1, yp + m * N, N);
    };
    const int64_t blocks = (N + 15) / 16;
    if (N * K / 2 * M < kParallelWork) body(0, blocks);
    else at::parallel_for(0, blocks, 1, body);
  };
  bool sb = scale.scalar_type() == at::kBFloat16, xb = x.scalar_type() == at::kBFloat16;
  if (sb && xb) run(bf16{}, bf16{});
  else if (sb) run(bf16{}, float{});
  else if (xb) run(float{}, bf16{});
  else run(float{}, float{});
  return shaped(y);
}

}  // namespace optistack_cpu
