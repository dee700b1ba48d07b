// The engine's int4 weights as panels of 16 rows (int4_panel.h): the decode rows' GEMV/GEMM without AMX.
//
// Why: the row layout (int4_q8_gemv.cpp) puts one weight row's 64 channels in a vector's lanes, so every unit
// of every (weight row, activation row) pair ends in its own convert and scale (3 of every 5 instructions
// beside the 2 vpdpbusd), and a batch of 8 decode rows ran at ~40 GMAC/s a core against the chunk GEMM's
// ~165. A panel puts 16 weight rows in the lanes instead: 64 bytes hold 4 channels of 16 rows in their low
// nibbles and 4 more in their high ones, so one load, an AND and a shift feed two vpdpbusd per activation row
// (its 4 codes broadcast from where prep_q8 put them), and each unit's integer sums are scaled once per 16
// weight rows. A row's result is the same instructions whatever else shares the call.
#include "int4_panel.h"

#include <ATen/Parallel.h>

#include <cstring>

#include "simd.h"

namespace optistack_cpu {

void q4_panel_pack(const Q4Weight& w, uint8_t* qp, float* sp, float* zp) {
  const int64_t U = w.K / 64, rb = w.K / 2;
  at::parallel_for(0, w.N / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t u = 0; u < U; ++u) {
        uint8_t* dst = qp + (nb * U + u) * kPanelUnitBytes;
        for (int64_t v = 0; v < 8; ++v)
          for (int64_t r = 0; r < 16; ++r)  // row r's unit bytes 4v..4v+3: channels 4v.. (low), 32 + 4v.. (high)
            std::memcpy(dst + v * 64 + r * 4, w.q + (nb * 16 + r) * rb + u * 32 + v * 4, 4);
        for (int64_t r = 0; r < 16; ++r) {
          sp[(nb * U + u) * 16 + r] = w.scale((nb * 16 + r) * U + u);
          zp[(nb * U + u) * 16 + r] = w.zero((nb * 16 + r) * U + u);
        }
      }
  });
}

#if defined(OPTISTACK_AVX512) && defined(__AVX512VNNI__)
static inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One panel (16 weight rows from row 16 * nb) times MB activation rows; the integer sums run in C chains per
// row (two for few rows, so a vpdpbusd's latency is not what a short batch waits on).
template <int MB, bool FAR>
static inline void panel_block(const Q4Weight& w, int64_t nb, const XQ* xs, float* y,
                               int64_t ystride, bool add) {
  constexpr int C = MB < 4 ? 2 : 1;
  const int64_t U = w.K / 64;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const uint8_t* qb = w.pq + nb * U * kPanelUnitBytes;
  const float* sb = w.ps + nb * U * 16;
  const float* zb = w.pzc + nb * U * 16;
  __m512 acc[MB];
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
  for (int64_t u = 0; u < U; ++u) {
    int64_t lo_off, hi_off;
    xq_unit_offsets(U, u, lo_off, hi_off);
    const uint8_t* qu = qb + u * kPanelUnitBytes;
    // the panel 8 units ahead into L2 (prefetch_far, the default), 2 into L1 with near (a Xeon with AMX: 8 rows
    // 7.1 ms near, 6.3 far); without it,
    // SmolLM2 on a Zen 4, 3 alternating processes, a step of 1 row took 3.34 / 3.64 / 3.83 ms against 3.28 / 2.96 /
    // 2.94 with it, of 8 rows 9.89 / 9.82 / 8.78 against 8.03 / 7.62 / 7.68
    if constexpr (FAR) {
      for (int i = 0; i < 8; ++i) _mm_prefetch((const char*)(qu + 8 * kPanelUnitBytes + i * 64), _MM_HINT_T1);
    } else {
      for (int i = 0; i < 8; ++i) _mm_prefetch((const char*)(qu + 2 * kPanelUnitBytes + i * 64), _MM_HINT_T0);
    }
    __m512i d[C][MB];
    for (int c = 0; c < C; ++c)
      for (int mb = 0; mb < MB; ++mb) d[c][mb] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
      const __m512i b = _mm512_loadu_si512(qu + v * 64);
      const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
      for (int mb = 0; mb < MB; ++mb) {
        d[0][mb] = _mm512_dpbusd_epi32(d[0][mb], lo, bcast4(xs[mb].q + lo_off + 4 * v));
        d[C - 1][mb] = _mm512_dpbusd_epi32(d[C - 1][mb], hi, bcast4(xs[mb].q + hi_off + 4 * v));
      }
    }
    const __m512 s = _mm512_loadu_ps(sb + u * 16), z = _mm512_loadu_ps(zb + u * 16);
    for (int mb = 0; mb < MB; ++mb) {
      __m512i dd = d[0][mb];
      if constexpr (C == 2) dd = _mm512_add_epi32(dd, d[1][mb]);
      acc[mb] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dd), _mm512_mul_ps(s, _mm512_set1_ps(xs[mb].sx[u])), acc[mb]);
      acc[mb] = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[mb].xsum[u]), acc[mb]);
    }
  }
  const __m512 bias = w.bias ? _mm512_loadu_ps(w.bias + nb * 16) : _mm512_setzero_ps();
  for (int mb = 0; mb < MB; ++mb) {
    float* dst = y + mb * ystride + nb * 16;
    __m512 v = _mm512_add_ps(acc[mb], bias);
    if (add) v = _mm512_add_ps(_mm512_loadu_ps(dst), v);
    _mm512_storeu_ps(dst, v);
  }
}

template <bool FAR>
static void panel_rows_t(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y,
                         int64_t ystride, bool add) {
  for (int64_t nb = n0 / 16; nb < n1 / 16; ++nb) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) panel_block<8, FAR>(w, nb, xs + m, y + m * ystride, ystride, add);
    float* ym = y + m * ystride;
    switch (M - m) {
      case 7: panel_block<7, FAR>(w, nb, xs + m, ym, ystride, add); break;
      case 6: panel_block<6, FAR>(w, nb, xs + m, ym, ystride, add); break;
      case 5: panel_block<5, FAR>(w, nb, xs + m, ym, ystride, add); break;
      case 4: panel_block<4, FAR>(w, nb, xs + m, ym, ystride, add); break;
      case 3: panel_block<3, FAR>(w, nb, xs + m, ym, ystride, add); break;
      case 2: panel_block<2, FAR>(w, nb, xs + m, ym, ystride, add); break;
      case 1: panel_block<1, FAR>(w, nb, xs + m, ym, ystride, add); break;
      default: break;
    }
  }
}

void q4_rows_panel(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y,
                   int64_t ystride, bool add) {
  if (prefetch_far()) panel_rows_t<true>(w, xs, M, n0, n1, y, ystride, add);
  else panel_rows_t<false>(w, xs, M, n0, n1, y, ystride, add);
}
#else
void q4_rows_panel(const Q4Weight&, const XQ*, int64_t, int64_t, int64_t, float*, int64_t, bool) {
  TORCH_CHECK(false, "optistack_cpu: the int4 panels need AVX512-VNNI");
}
#endif

}  // namespace optistack_cpu
