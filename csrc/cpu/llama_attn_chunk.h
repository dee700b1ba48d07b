// Causal attention for a prompt chunk (llama_decode.cpp): many consecutive rows of one slot against its cache.
//
// Why a second kernel: attend() (llama_ops.h) serves one row at a time and sums each score across a head's
// channels (a horizontal reduction per four positions), and converts every float16 key and value once per
// query head. A prompt chunk has many rows reading the same keys, so here a block of 16 keys is converted and
// transposed once (channel-major, so 16 positions fill one vector) and then scored against every query of the
// block's rows, four at a time with no reduction; values are read once for four queries (the per-row kernel
// took 8.4 of a 37 ms SmolLM2 prefill; the prefill with both is in docs/decoding.md). A chunk's rows differ
// from the same rows decoded one by one only in the order of float sums.
#pragma once
#include "amx_tiles.h"
#include "llama_ops.h"

namespace optistack_cpu {

#if defined(OPTISTACK_AVX512) && defined(__AVX512VNNI__)
// s[t] = exp(s[t] - max) for t < n, in place; returns 1 / their sum (the softmax's normalizer). Shared by the
// float32 chunk kernel and the tile one (llama_attn_amx.h), which differ only in what they do with it.
static inline float softmax_exp(float* s, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(n - t), s + t));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 mk = tail_mask(n - t);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), m)));
    _mm512_mask_storeu_ps(s + t, mk, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// Rows i = 0..M-1 of one slot at positions p0 + i and the G query heads (of one key/value head) of each:
// query (i, g) at q + i * qstride + g * D (RoPE already applied), its output at out + i * ostride + g * D.
// Row i attends to positions 0..p0 + i of k and v (written before this call returns to the caller's phase).
// sc: M * G rows of round-up-16(p0 + M) floats; ks, vs: an int8 cache's scales per position (else null).
template <typename KV>
static void attend_chunk(const float* q, int64_t qstride, int64_t M, int64_t G, int64_t p0, const KV* k, const KV* v,
                         const float* ks, const float* vs, int64_t D, float* sc, float* out, int64_t ostride) {
  const int64_t R = M * G, T = p0 + M, Tp = (T + 15) / 16 * 16;
  const float scale = 1.f / std::sqrt(float(D));
  alignas(64) float kt[256 * 16];  // one block of 16 keys, channel-major (D <= 256)
  auto qrow = [&](int64_t r) { return q + (r / G) * qstride + (r % G) * D; };
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    const int64_t nk = std::min<int64_t>(16, T - t0);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512i c[16];
      for (int64_t l = 0; l < 16; ++l) c[l] = l < nk ? _mm512_castps_si512(ld(k + (t0 + l) * D + d0)) : _mm512_setzero_si512();
      transpose16(c);  // c[j] = channel d0 + j of the 16 keys
      for (int64_t j = 0; j < 16; ++j) _mm512_store_si512(kt + (d0 + j) * 16, c[j]);
    }
    __m512 kscale = _mm512_set1_ps(scale);
    if constexpr (kv_int8<KV>) kscale = _mm512_mul_ps(kscale, _mm512_maskz_loadu_ps(tail_mask(nk), ks + t0));
    const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(int(t0)), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                       10, 11, 12, 13, 14, 15));
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const float* qs[4];
      for (int j = 0; j < 4; ++j) qs[j] = qrow(std::min(r0 + j, R - 1));
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t d = 0; d < D; ++d) {
        const __m512 kv = _mm512_load_ps(kt + d * 16);
        for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(qs[j][d]), kv, acc[j]);
      }
      for (int j = 0; j < 4 && r0 + j < R; ++j) {  // positions past the row's own are -inf
        const int64_t r = r0 + j, last = p0 + r / G;
        const __mmask16 ok = _mm512_cmple_epi32_mask(lane, _mm512_set1_epi32(int(last)));
        _mm512_storeu_ps(sc + r * Tp + t0, _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), ok, acc[j], kscale));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // softmax over the row's own positions, times an int8 cache's value scales
    float* s = sc + r * Tp;
    const int64_t Tr = p0 + r / G + 1;
    const __m512 inv = _mm512_set1_ps(softmax_exp(s, Tr));
    for (int64_t t = 0; t < Tp; t += 16) {  // zeros past Tr, so a block of rows can run to its longest row
      const __mmask16 mk = t < Tr ? tail_mask(Tr - t) : __mmask16(0);
      __m512 p = _mm512_maskz_mul_ps(mk, _mm512_loadu_ps(s + t), inv);
      if constexpr (kv_int8<KV>) p = _mm512_mul_ps(p, _mm512_maskz_loadu_ps(mk, vs + t));
      _mm512_storeu_ps(s + t, p);
    }
  }
  for (int64_t r0 = 0; r0 < R; r0 += 4) {  // out = p @ v, four queries and 32 channels at a time
    const int64_t rn = std::min<int64_t>(4, R - r0), Tr = p0 + (r0 + rn - 1) / G + 1;
    const float* ps[4];
    for (int j = 0; j < 4; ++j) ps[j] = sc + std::min(r0 + j, R - 1) * Tp;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      __m512 acc[4][2];
      for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
      for (int64_t t = 0; t < Tr; ++t) {  // only written positions: p is 0 past a row's own
        const __m512 v0 = ld(v + t * D + d0), v1 = ld(v + t * D + d0 + 16);
        for (int j = 0; j < 4; ++j) {
          const __m512 p = _mm512_set1_ps(ps[j][t]);
          acc[j][0] = _mm512_fmadd_ps(p, v0, acc[j][0]);
          acc[j][1] = _mm512_fmadd_ps(p, v1, acc[j][1]);
        }
      }
      for (int64_t j = 0; j < rn; ++j) {
        const int64_t r = r0 + j;
        float* o = out + (r / G) * ostride + (r % G) * D + d0;
        _mm512_storeu_ps(o, acc[j][0]);
        _mm512_storeu_ps(o + 16, acc[j][1]);
      }
    }
  }
}
#endif

}  // namespace optistack_cpu
