// Weight-only int8 matmul with one scale per output channel: y = x @ (q * s[:, None]).T.
// Made for the lm_head (49152 x 576 on SmolLM2: 28 MB of int8 instead of 113 MB of float32).
//
// Each activation row is quantized on the fly to int16 with its own scale (amax / 32767: 15
// significant bits, far below the weight's own 8-bit rounding), so the dot products run in integers:
// sign-extend 32 weights to int16 (vpmovsxbw) and multiply-add pairs into int32 lanes (vpdpwssd on
// AVX512_VNNI, vpmaddwd + vpaddd without it): two or three instructions per 32 weights, where widening
// to float32 costs three per 16. A lane gains at most 2 * 127 * 32767 per step, so the int32
// accumulators are flushed to float32 every kFlushK channels, long before they could overflow.
// Weights stay in torch's plain [N, K] layout (four consecutive rows are one contiguous stream).
// Four weight rows share every activation load; up to four activation rows share every weight load,
// so a batch of decode rows streams the weight once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "llama_decode.h"
#include "simd.h"

namespace optistack_cpu {

constexpr int64_t kFlushK = 4096;    // channels per int32 accumulation: 4096/32 * 2*127*32767 < 2^31
constexpr int64_t kRowBlock = 64;     // output rows per parallel work item
constexpr int64_t kMinParallel = 1 << 16;  // weight bytes x activation rows below which one thread is faster

// One activation row as int16 codes (zero-padded to a multiple of 32); returns its scale, or -1 when
// the row holds inf or NaN (the caller recomputes that row in float so they propagate as in torch).
float int8_quantize_f32(const float* xr, int64_t K, int64_t Kp, int16_t* out) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::fabs(xr[k]) > amax ? std::fabs(xr[k]) : amax;
  bool finite = std::isfinite(amax);
  for (int64_t k = 0; finite && k < K; ++k) finite = !std::isnan(xr[k]);
  std::fill(out + K, out + Kp, int16_t(0));
  if (!finite || amax == 0.f) {
    std::fill(out, out + K, int16_t(0));
    return finite ? 0.f : -1.f;
  }
  const float inv = 32767.f / amax;
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<int16_t>(std::lrintf(xr[k] * inv));
  return amax / 32767.f;
}

static float quantize_row(const at::Tensor& x, int64_t m, int64_t K, int64_t Kp, int16_t* out) {
  if (x.scalar_type() == at::kFloat) return int8_quantize_f32(x.data_ptr<float>() + m * K, K, Kp, out);
  std::vector<float> tmp(K);
  const bf16* xb = x.data_ptr<bf16>() + m * K;
  for (int64_t k = 0; k < K; ++k) tmp[k] = to_f32(xb[k]);
  return int8_quantize_f32(tmp.data(), K, Kp, out);
}

#ifdef OPTISTACK_AVX512
static inline __m512i dot32(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

// R weight rows (row stride K) x MB activation rows (int16, stride Kp): out[mb * R + r] = integer dot.
template <int R, int MB>
static inline void dot_block(const int8_t* w, int64_t K, const int16_t* xq, int64_t Kp, float* out) {
  __m512 facc[R * MB];
  for (int i = 0; i < R * MB; ++i) facc[i] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < K; c0 += kFlushK) {
    const int64_t c1 = std::min(K, c0 + kFlushK);
    __m512i acc[R * MB];
    for (int i = 0; i < R * MB; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t k = c0; k < c1; k += 32) {
      const __mmask32 mask = c1 - k >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1ull << (c1 - k)) - 1);
      __m512i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + r * K + k));
      for (int mb = 0; mb < MB; ++mb) {
        const __m512i xv = _mm512_loadu_si512(xq + mb * Kp + k);
        for (int r = 0; r < R; ++r) acc[mb * R + r] = dot32(acc[mb * R + r], wv[r], xv);
      }
    }
    for (int i = 0; i < R * MB; ++i) facc[i] = _mm512_add_ps(facc[i], _mm512_cvtepi32_ps(acc[i]));
  }
  // Four rows of one activation row at a time (R = 4), else one by one: a row's sum never depends on how
  // many activation rows share the call (a decode row gives the same logits alone or in a batch).
  int i = 0;
  if constexpr (R == 4)
    for (; i + 4 <= R * MB; i += 4) _mm_storeu_ps(out + i, reduce4(facc[i], facc[i + 1], facc[i + 2], facc[i + 3]));
  for (; i < R * MB; ++i) out[i] = _mm512_reduce_add_ps(facc[i]);
}
#else
template <int R, int MB>
static inline void dot_block(const int8_t* w, int64_t K, const int16_t* xq, int64_t Kp, float* out) {
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) {
      double acc = 0.0;  // exact: every partial sum is an integer below 2^53
      for (int64_t k = 0; k < K; ++k) acc += double(w[r * K + k]) * double(xq[mb * Kp + k]);
      out[mb * R + r] = float(acc);
    }
}
#endif

template <int MB, typename T>
static void rows_mb(const int8_t* qw, const float* sc, int64_t K, const int16_t* xq, int64_t Kp, const float* sx,
                    int64_t n0, int64_t n1, T* y, int64_t N) {
  float d[4 * MB];
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    dot_block<4, MB>(qw + n * K, K, xq, Kp, d);
    for (int mb = 0; mb < MB; ++mb)
      for (int r = 0; r < 4; ++r) y[mb * N + n + r] = from_f32<T>(d[mb * 4 + r] * sx[mb] * sc[n + r]);
  }
  for (; n < n1; ++n) {
    dot_block<1, MB>(qw + n * K, K, xq, Kp, d);
    for (int mb = 0; mb < MB; ++mb) y[mb * N + n] = from_f32<T>(d[mb] * sx[mb] * sc[n]);
  }
}

// Rows [n0, n1) for M activation rows, weights read once: each block of four weight rows (in L1 after its
// first use) meets every activation row, two at a time, before the next block is read. A row's result does
// not depend on how many rows share the call (four weight rows are always reduced together).
void int8_rows_f32(const int8_t* qw, const float* sc, int64_t K, const int16_t* xq, int64_t Kp, const float* sx,
                   int64_t M, int64_t n0, int64_t n1, float* y, int64_t N) {
  // two activation rows at a time: four weight rows x four (int32 and float32 accumulators for each pair)
  // spill the 32 vector registers, which measured 2.5x slower on a batch of 8 decode rows
  int64_t n = n0;
  [[maybe_unused]] const bool far = prefetch_far();  // the block 16 rows ahead into L2 (simd.h), as the int4 GEMV does
  for (; n + 4 <= n1; n += 4) {
#ifdef OPTISTACK_AVX512
    if (far && n + 20 <= n1)
      for (int64_t o = 0; o < 4 * K; o += 64) _mm_prefetch((const char*)(qw + (n + 16) * K + o), _MM_HINT_T1);
#endif
    for (int64_t m = 0; m < M; m += 2) {
      if (M - m >= 2) rows_mb<2, float>(qw, sc, K, xq + m * Kp, Kp, sx + m, n, n + 4, y + m * N, N);
      else rows_mb<1, float>(qw, sc, K, xq + m * Kp, Kp, sx + m, n, n + 4, y + m * N, N);
    }
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) rows_mb<1, float>(qw, sc, K, xq + m * Kp, Kp, sx + m, n, n + 1, y + m * N, N);
}

// The exact mode's float32 head: the model's own weights, no rounding but float32's. Each weight row (in L1
// after its first use) meets every activation row; two accumulators of 16 lanes each, summed at the end.
void float_rows_f32(const float* w, int64_t K, const float* x, int64_t M, int64_t n0, int64_t n1, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      int64_t k = 0;
      float d = 0.f;
#ifdef OPTISTACK_AVX512
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (; k + 32 <= K; k += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(xr + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k + 16), _mm512_loadu_ps(xr + k + 16), a1);
      }
      for (; k < K; k += 16) {
        const __mmask16 mk = tail_mask(K - k);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, wr + k), _mm512_maskz_loadu_ps(mk, xr + k), a0);
      }
      d = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
      for (; k < K; ++k) d += wr[k] * xr[k];
      y[m * N + n] = d;
    }
  }
}

at::Tensor int8_matmul(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "optistack_cpu.int8_matmul: x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(),
              "optistack_cpu.int8_matmul: qweight must be a contiguous int8 [N, K] matrix");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(),
              "optistack_cpu.int8_matmul: scale must be float32 with one value per output row (", N, ")");
  TORCH_CHECK(x_in.size(-1) == K, "optistack_cpu.int8_matmul: x has ", x_in.size(-1), " input features, weight ", K);
  at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0), Kp = (K + 31) / 32 * 32;
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.reshape(out_shape);

  thread_local std::vector<int16_t> xq_arena;  // reused across decode calls: no allocation per token
  thread_local std::vector<float> sx_arena;
  xq_arena.resize(M * Kp);
  sx_arena.resize(M);
  int16_t* xq = xq_arena.data();
  float* sx = sx_arena.data();
  for (int64_t m = 0; m < M; ++m) sx[m] = quantize_row(x, m, K, Kp, xq + m * Kp);

  const int8_t* qw = qweight.data_ptr<int8_t>();
  const float* sc = scale.data_ptr<float>();
  auto run = [&](auto t) {
    using T = decltype(t);
    T* yp = y.data_ptr<T>();
    auto body = [&](int64_t b, int64_t e) {
      const int64_t n0 = b * kRowBlock, n1 = std::min(N, e * kRowBlock);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) rows_mb<4, T>(qw, sc, K, xq + m * Kp, Kp, sx + m, n0, n1, yp + m * N, N);
      if (M - m == 3) rows_mb<3, T>(qw, sc, K, xq + m * Kp, Kp, sx + m, n0, n1, yp + m * N, N);
      else if (M - m == 2) rows_mb<2, T>(qw, sc, K, xq + m * Kp, Kp, sx + m, n0, n1, yp + m * N, N);
      else if (M - m == 1) rows_mb<1, T>(qw, sc, K, xq + m * Kp, Kp, sx + m, n0, n1, yp + m * N, N);
    };
    const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
    if (N * K * M < kMinParallel) body(0, blocks);
    else at::parallel_for(0, blocks, 1, body);
  };
  if (x.scalar_type() == at::kBFloat16) run(bf16{});
  else run(float{});
  for (int64_t m = 0; m < M; ++m)  // rows with inf/NaN: in float, so they propagate as in torch
    if (sx[m] < 0.f) y[m].copy_(at::linear(x[m].to(at::kFloat), qweight.to(at::kFloat) * scale.unsqueeze(1)));
  return y.reshape(out_shape);
}

}  // namespace optistack_cpu
