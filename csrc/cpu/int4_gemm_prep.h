// The int4 GEMM's activation preparation (int4_gemm.cpp): x as bfloat16 words (float32 split into hi + lo)
// with per-group sums, and the per-row zero-point correction those sums feed.
#pragma once
#include <ATen/ATen.h>

#include <cstring>
#include <vector>

#include "simd.h"

namespace optistack_cpu {

template <typename S> static inline float sval(const S* p, int64_t i) { return to_f32(p[i]); }

// One call's activations: bf16 words (hi and, for float32 x, lo) and per-group sums of what is used.
// They point into a per-thread arena that is reused from call to call (no allocation per decode step).
struct XPrep {
  const uint16_t* hi = nullptr;
  const uint16_t* lo = nullptr;  // null: x was bf16, no low half
  const float* gsum = nullptr;
};

struct XArena {
  std::vector<XPrep> preps;
  std::vector<float> gsum;
  std::vector<uint16_t> words;  // hi then lo halves of float32 rows
};

static inline void prep_x(const at::Tensor& x, int64_t m, int64_t K, int64_t group, float* gsum, uint16_t* hb,
                   uint16_t* lb, XPrep& p) {
  const int64_t G = K / group;
  p.gsum = gsum;
  if (x.scalar_type() == at::kBFloat16) {
    const bf16* xr = x.data_ptr<bf16>() + m * K;
    p.hi = reinterpret_cast<const uint16_t*>(xr);
    p.lo = nullptr;
#ifdef OPTISTACK_AVX512
    for (int64_t g = 0; g < G; ++g) {  // group is a multiple of 32
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) acc = _mm512_add_ps(acc, load16(xr + k, 0xFFFF));
      gsum[g] = _mm512_reduce_add_ps(acc);
    }
#else
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) acc += to_f32(xr[k]);
      gsum[g] = acc;
    }
#endif
    return;
  }
  const float* xr = x.data_ptr<float>() + m * K;
  // x = hi + lo, and the group sums are of hi + lo (what the dot products see), so 128*sum cancels.
#ifdef OPTISTACK_AVX512
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
      __m512 v = _mm512_loadu_ps(xr + k);
      __m256i h = f32_to_bf16_bits(v);
      __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      __m256i l = f32_to_bf16_bits(_mm512_sub_ps(v, hf));
      __m512 lf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(l), 16));
      _mm256_storeu_si256((__m256i*)(hb + k), h);
      _mm256_storeu_si256((__m256i*)(lb + k), l);
      acc = _mm512_add_ps(acc, _mm512_add_ps(hf, lf));
    }
    gsum[g] = _mm512_reduce_add_ps(acc);
  }
#else
  for (int64_t g = 0; g < G; ++g) {
    float acc = 0.f;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      bf16 h = bf16(xr[k]);
      bf16 l = bf16(xr[k] - float(h));
      std::memcpy(hb + k, &h, 2);
      std::memcpy(lb + k, &l, 2);
      acc += float(h) + float(l);
    }
    gsum[g] = acc;
  }
#endif
  p.hi = hb;
  p.lo = lb;
}

// sum_g (z_g - 136 s_g) * gsum_g: the zero points and the 128 + q offset, per output row.
#ifdef OPTISTACK_AVX512
// The same as 16 partial sums (added to a row's accumulator before its one horizontal sum).
template <typename S>
static inline __m512 group_correction16(const S* s, const S* z, const float* gsum, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 c136 = _mm512_set1_ps(136.f);
  for (int64_t g = 0; g < G; g += 16) {
    __mmask16 m = tail_mask(G - g);
    __m512 b = _mm512_fnmadd_ps(c136, load16(s + g, m), load16(z + g, m));
    acc = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m, gsum + g), acc);
  }
  return acc;
}
#endif

template <typename S>
static inline float group_correction(const S* s, const S* z, const float* gsum, int64_t G) {
#ifdef OPTISTACK_AVX512
  return _mm512_reduce_add_ps(group_correction16(s, z, gsum, G));
#else
  float corr = 0.f;
  for (int64_t g = 0; g < G; ++g) corr += (to_f32(z[g]) - 136.f * to_f32(s[g])) * gsum[g];
  return corr;
#endif
}
}  // namespace optistack_cpu
