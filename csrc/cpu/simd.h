// Small SIMD helpers shared by the CPU kernels.
//
// OPTISTACK_AVX512 is defined when the build enabled AVX-512 F/BW/VL (chosen by probing the CPU in
// optistack/passes/kernels/build.py); OPTISTACK_AVX512BF16 additionally when the CPU has AVX512_BF16.
// Without them the kernels take portable loops that the compiler vectorizes for whatever -m flags
// the build used (AVX2+FMA on other x86 CPUs).
#pragma once

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define OPTISTACK_AVX512 1
#include <immintrin.h>
#if defined(__AVX512BF16__)
#define OPTISTACK_AVX512BF16 1
#endif
#endif

namespace optistack_cpu {

using bf16 = c10::BFloat16;

// How the decode GEMVs ask for the weights they read next (int4_q8_gemv.cpp, int8_gemm.cpp, int4_panel.cpp):
// "far" = 16 rows ahead into L2 (prefetcht1), "near" = 4 rows ahead into L1 (prefetcht0). Why: a GEMV block
// reads 4 rows interleaved 64 bytes at a time, four streams of one row each (a few KB) that the hardware
// prefetcher does not follow, so the reads wait on DRAM; near prefetches hold L1's few miss buffers. On a Zen 4
// (2 threads, a 115 MB int4 matrix at K = 2048, a C++ copy of the GEMV) near read 16-18 GB/s, far 27-28, a plain
// sequential read 24-29; on a Xeon with AMX far decoded the ~1.1B Llama 5.5% faster and a step of 8 SmolLM2 rows
// on panels 7.1 -> 6.3 ms (docs/decoding.md). Far everywhere; $OPTISTACK_PREFETCH=far|near overrides (read once).
inline bool prefetch_far() {
  static const bool far = [] {
    const char* env = std::getenv("OPTISTACK_PREFETCH");
    return !(env && std::strcmp(env, "near") == 0);
  }();
  return far;
}

inline float to_f32(float v) { return v; }
inline float to_f32(bf16 v) { return static_cast<float>(v); }
template <typename T> inline T from_f32(float v) { return static_cast<T>(v); }  // bf16: round to nearest even

#ifdef OPTISTACK_AVX512
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline __m256i f32_to_bf16_bits(__m512 v) {
#ifdef OPTISTACK_AVX512BF16
  return (__m256i)_mm512_cvtneps_pbh(v);
#else  // round to nearest even; NaN stays NaN (quiet bit forced)
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
#endif
}
inline void store16(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, f32_to_bf16_bits(v)); }

// exp(x), relative error < 2e-7: x = n*ln2 + r, |r| <= ln2/2, degree-6 polynomial, then scalef.
// x is clamped to [-88, 88] so the result stays finite (callers take 1/(1+exp) and need no inf).
inline __m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// The four horizontal sums of a, b, c, d in one __m128: a transpose-and-add tree, about a third of
// the instructions of four separate reductions (which showed in K=576 rows, 4.5 blocks long).
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a b a b per 128 bits
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // a b c d
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// 1/x with rcp14 + one Newton step (relative error ~1e-8 before rounding).
inline __m512 recip16(__m512 x) {
  __m512 r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.f)));
}
#endif

}  // namespace optistack_cpu
