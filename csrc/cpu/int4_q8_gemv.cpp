// The int4 GEMV of the decode engine (llama_decode.cpp): int4 weights times int8 activations, VNNI.
//
// Weight layout (made by optistack/kernels/llama_engine.py): units of 64 input channels, 32 bytes per
// unit and row: byte j holds channel j in its low nibble and channel j + 32 in its high nibble (codes
// 0..15, w = q * s + zc per unit, zc = zero - 8 * scale, both float32 [N, K/64]); rows are contiguous,
// so a 4-row block is one sequential stream.
// Activations are quantized per unit to int8 (scale amax / 127, like llama.cpp's Q8 blocks), so one
// vpdpbusd multiplies 64 codes (u8) by 64 activations (s8). Unit pairs are laid out so that one
// 64-byte weight load, an AND and a shift give the low and high nibbles of two units, which meet
// activations arranged [u0 ch 0..31 | u1 ch 0..31] and [u0 ch 32..63 | u1 ch 32..63]; the two units'
// scales go to the lower and upper 8 lanes. The zero-point term uses the sums of each unit's
// quantized activations. Against the float32 product the error is that of the int8 activations
// (about 0.2% of a dot product's scale), the price llama.cpp's Q8 activations pay too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "llama_decode.h"
#include "simd.h"

namespace optistack_cpu {

#if defined(OPTISTACK_AVX512) && defined(__AVX512VNNI__)
bool llama_engine_supported() { return true; }

// A unit's 64 activations into v[4]; returns their largest magnitude.
static inline float load_unit(const float* xu, __m512* v) {
  __m512 mx = _mm512_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_loadu_ps(xu + 16 * i);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v[i]));
  }
  return _mm512_reduce_max_ps(mx);
}

void prep_q8(const float* x, int64_t K, const XQ& o) {
  const int64_t U = K / 64, P = U / 2;
  for (int64_t u = 0; u < U; ++u) {
    __m512 v[4];
    const float amax = load_unit(x + u * 64, v);
    o.sx[u] = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    int8_t q[64];
    __m512i qs = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
      qs = _mm512_add_epi32(qs, qi);
      _mm_storeu_si128((__m128i*)(q + 16 * i), _mm512_cvtsepi32_epi8(qi));
    }
    // The zero-point term takes the sum of the quantized activations, so a row's result is exactly its
    // float weights times the int8 activations (the codes 0..15 are not centred: with exact sums the
    // rounding of every activation would reach the result through 8 * scale, unbalanced).
    o.xsum[u] = float(_mm512_reduce_add_epi32(qs)) * o.sx[u];
    const int64_t p = u / 2;
    if (p < P) {  // paired: low halves side by side, then high halves
      const int64_t slot = u % 2;
      std::memcpy(o.q + p * 128 + slot * 32, q, 32);
      std::memcpy(o.q + p * 128 + 64 + slot * 32, q + 32, 32);
    } else {  // the odd last unit: low half then high half
      std::memcpy(o.q + P * 128, q, 64);
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    __m512 a = _mm512_set1_ps(o.sx[2 * p]), b = _mm512_set1_ps(o.sx[2 * p + 1]);
    _mm512_storeu_ps(o.sxp + p * 16, _mm512_mask_blend_ps(0xFF00, a, b));
  }
}

// Adds each row's zero-point term sum_u zc[u] * xsum[u] to its accumulator, then out[mb * R + r] = its sum.
template <int R, int MB>
static inline void zero_term_and_reduce(const Q4Weight& w, int64_t n, const XQ* xs, __m512* acc, float* out) {
  const int64_t U = w.K / 64;
  for (int r = 0; r < R; ++r) {
    const int64_t row = (n + r) * U;
    for (int mb = 0; mb < MB; ++mb) {
      __m512 z = _mm512_setzero_ps();
      for (int64_t u = 0; u < U; u += 16) {
        const __mmask16 m = tail_mask(U - u);
        const __m512 zc = w.zc16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.zc16 + row + u))
                                 : _mm512_maskz_loadu_ps(m, w.zc + row + u);
        z = _mm512_fmadd_ps(zc, _mm512_maskz_loadu_ps(m, xs[mb].xsum + u), z);
      }
      acc[mb * R + r] = _mm512_add_ps(acc[mb * R + r], z);
    }
  }
  int i = 0;
  for (; i + 4 <= R * MB; i += 4) _mm_storeu_ps(out + i, reduce4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
  for (; i < R * MB; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// The next rows' weights (simd.h: prefetch_far).
template <bool FAR>
static inline void prefetch_rows(const uint8_t* qb, int64_t rb) {
  if constexpr (FAR) _mm_prefetch((const char*)(qb + 16 * rb), _MM_HINT_T1);
  else _mm_prefetch((const char*)(qb + 4 * rb), _MM_HINT_T0);
}

// R weight rows from row n times MB activation rows: out[mb * R + r] = the row's dot product.
template <int R, int MB, bool FAR>
static inline void q4_block(const Q4Weight& w, int64_t n, const XQ* xs, float* out) {
  const int64_t U = w.K / 64, P = U / 2, rb = w.K / 2;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[R * MB];
  for (int i = 0; i < R * MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i xl[MB], xh[MB];
    __m512 sxp[MB];
    for (int mb = 0; mb < MB; ++mb) {
      xl[mb] = _mm512_loadu_si512(xs[mb].q + p * 128);
      xh[mb] = _mm512_loadu_si512(xs[mb].q + p * 128 + 64);
      sxp[mb] = _mm512_loadu_ps(xs[mb].sxp + p * 16);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* qb = w.q + (n + r) * rb + p * 64;
      prefetch_rows<FAR>(qb, rb);
      const __m512i b = _mm512_loadu_si512(qb);
      const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
      const __m128 s2 = w.s16 ? _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t*)(w.s16 + (n + r) * U + 2 * p)))
                              : _mm_castpd_ps(_mm_load_sd((const double*)(w.s + (n + r) * U + 2 * p)));
      const __m512 sw = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s2));
      for (int mb = 0; mb < MB; ++mb) {
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl[mb]);
        d = _mm512_dpbusd_epi32(d, hi, xh[mb]);
        acc[mb * R + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, sxp[mb]), acc[mb * R + r]);
      }
    }
  }
  if (U & 1) {  // the odd last unit, in 256-bit halves
    const __m256i nib8 = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < R; ++r) {
      const __m256i b = _mm256_loadu_si256((const __m256i*)(w.q + (n + r) * rb + P * 64));
      const __m256i lo = _mm256_and_si256(b, nib8), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib8);
      const float s = w.scale((n + r) * U + U - 1);
      for (int mb = 0; mb < MB; ++mb) {
        const int8_t* xq = xs[mb].q + P * 128;
        __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i*)xq));
        d = _mm256_dpbusd_epi32(d, hi, _mm256_loadu_si256((const __m256i*)(xq + 32)));
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s * xs[mb].sx[U - 1]));
        acc[mb * R + r] = _mm512_add_ps(acc[mb * R + r], _mm512_zextps256_ps512(f));
      }
    }
  }
  zero_term_and_reduce<R, MB>(w, n, xs, acc, out);
}

// int16 activations (act=int16): each unit's codes in natural order, 64 words, amax / 32767 per unit.
void prep_q16(const float* x, int64_t K, const XQ& o) {
  const int64_t U = K / 64;
  for (int64_t u = 0; u < U; ++u) {
    __m512 v[4];
    const float amax = load_unit(x + u * 64, v);
    o.sx[u] = amax / 32767.f;
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    __m512i qs = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
      qs = _mm512_add_epi32(qs, qi);
      _mm256_storeu_si256((__m256i*)(o.q16 + u * 64 + 16 * i), _mm512_cvtsepi32_epi16(qi));
    }
    o.xsum[u] = float(_mm512_reduce_add_epi32(qs)) * o.sx[u];
  }
}

// As q4_block with int16 activations: nibbles widened to 16-bit words, vpdpwssd, one scale per unit.
template <int R, int MB, bool FAR>
static inline void q4_block16(const Q4Weight& w, int64_t n, const XQ* xs, float* out) {
  const int64_t U = w.K / 64, P = U / 2, rb = w.K / 2;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 acc[R * MB];
  for (int i = 0; i < R * MB; ++i) acc[i] = _mm512_setzero_ps();
  auto unit = [&](int r, int64_t u, __m512i wlo, __m512i whi) {
    const float s = w.scale((n + r) * U + u);
    for (int mb = 0; mb < MB; ++mb) {
      const int16_t* xq = xs[mb].q16 + u * 64;
      __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wlo, _mm512_loadu_si512(xq));
      d = _mm512_dpwssd_epi32(d, whi, _mm512_loadu_si512(xq + 32));
      acc[mb * R + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s * xs[mb].sx[u]), acc[mb * R + r]);
    }
  };
  for (int64_t p = 0; p < P; ++p) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* qb = w.q + (n + r) * rb + p * 64;
      prefetch_rows<FAR>(qb, rb);
      const __m512i b = _mm512_loadu_si512(qb);
      const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
      unit(r, 2 * p, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)), _mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)));
      unit(r, 2 * p + 1, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1)),
           _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1)));
    }
  }
  if (U & 1) {
    const __m256i nib8 = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < R; ++r) {
      const __m256i b = _mm256_loadu_si256((const __m256i*)(w.q + (n + r) * rb + P * 64));
      unit(r, U - 1, _mm512_cvtepu8_epi16(_mm256_and_si256(b, nib8)),
           _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), nib8)));
    }
  }
  zero_term_and_reduce<R, MB>(w, n, xs, acc, out);
}

// Rows [n0, n1) of y = x @ w.T (+ bias) for M activation rows; `add`: y += instead. The weight rows go
// by blocks of four, and each block (4 x K/2 bytes, in L1 after its first use) meets every activation
// row, two at a time, before the next block is read: the weights stream once per call, whatever M is.
// A row's instructions do not depend on M or on its partner, so its result is the same alone or batched.
template <int R, bool A16, bool FAR>
static inline void q4_rblock(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n, float* y, int64_t ystride,
                             bool add) {
  float d[2 * R];
  auto put = [&](int64_t m, int mb) {
    for (int r = 0; r < R; ++r) {
      float v = d[mb * R + r];
      if (w.bias) v += w.bias[n + r];
      float& dst = y[m * ystride + n + r];
      dst = add ? dst + v : v;
    }
  };
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    if constexpr (A16) q4_block16<R, 2, FAR>(w, n, xs + m, d);
    else q4_block<R, 2, FAR>(w, n, xs + m, d);
    put(m, 0);
    put(m + 1, 1);
  }
  if (m < M) {
    if constexpr (A16) q4_block16<R, 1, FAR>(w, n, xs + m, d);
    else q4_block<R, 1, FAR>(w, n, xs + m, d);
    put(m, 0);
  }
}

template <bool A16, bool FAR>
static void q4_rows_t(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ystride,
                      bool add) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) q4_rblock<4, A16, FAR>(w, xs, M, n, y, ystride, add);
  for (; n < n1; ++n) q4_rblock<1, A16, FAR>(w, xs, M, n, y, ystride, add);
}

void q4_rows(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ystride, bool add,
             bool act16) {
  // the prefetches differ, the arithmetic does not: a row's numbers do not depend on prefetch_far()
  const bool far = prefetch_far();
  if (act16 && far) q4_rows_t<true, true>(w, xs, M, n0, n1, y, ystride, add);
  else if (act16) q4_rows_t<true, false>(w, xs, M, n0, n1, y, ystride, add);
  else if (far) q4_rows_t<false, true>(w, xs, M, n0, n1, y, ystride, add);
  else q4_rows_t<false, false>(w, xs, M, n0, n1, y, ystride, add);
}

#else
bool llama_engine_supported() { return false; }
void prep_q8(const float*, int64_t, const XQ&) { TORCH_CHECK(false, "optistack_cpu: the decode engine needs AVX512-VNNI"); }
void prep_q16(const float*, int64_t, const XQ&) { TORCH_CHECK(false, "optistack_cpu: the decode engine needs AVX512-VNNI"); }
void q4_rows(const Q4Weight&, const XQ*, int64_t, int64_t, int64_t, float*, int64_t, bool, bool) {
  TORCH_CHECK(false, "optistack_cpu: the decode engine needs AVX512-VNNI");
}
#endif

}  // namespace optistack_cpu
