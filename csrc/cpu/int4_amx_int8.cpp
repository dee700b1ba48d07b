// The engine's int4 x int8 GEMM on AMX int8 tiles, for batches of decode rows (`amx_batch`).
//
// Why a second AMX kernel: a batch of 8-32 decode rows is one or two activation tiles, so the bf16 kernel's
// dequantization of every weight tile (scale and zero into each of 16 x 64 values) is shared by too few rows
// and dominates; unpacking nibbles to bytes is a third of that work. Each 64-channel unit's tile product
// (tdpbusd, 16 x 16 x 64) is the exact integer the VNNI path computes from the same int8 activation codes
// (prep_q8) and int4 codes; it leaves the tile after every unit to be scaled by s[n, u] * sx[m, u], with
// the zero-point term zc[n, u] * xsum[m, u] (only the order of the float sums differs from the VNNI path).
// Four C tiles rotate and the inputs alternate between two tile pairs, so four products are in flight.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "amx_tiles.h"
#include "llama_decode.h"

namespace optistack_cpu {

#ifdef OPTISTACK_AMX_BUILD
// One activation row's unit u in natural channel order (prep_q8 pairs units: low halves, then high halves).
static inline __m512i unit_codes(const XQ& x, int64_t U, int64_t u) {
  int64_t lo, hi;
  xq_unit_offsets(U, u, lo, hi);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(x.q + lo))),
                            _mm256_loadu_si256((const __m256i*)(x.q + hi)), 1);
}

void amx8_pack(const XQ* xs, int64_t M, int64_t K, int64_t t0, int64_t t1, int8_t* tiles, float* sxT, float* xsT) {
  const int64_t U = K / 64;
  for (int64_t t = t0; t < t1; ++t) {  // tile t = (m-tile t / U, unit t % U)
    const int64_t m0 = (t / U) * 16, u = t % U;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = m0 + i < M ? unit_codes(xs[m0 + i], U, u) : _mm512_setzero_si512();
    transpose16(r);  // r[q] = channels 4q..4q+3 of each of the 16 rows: the VNNI tile layout
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tiles + t * 1024 + i * 64, r[i]);
    for (int i = 0; i < 16; ++i) {
      sxT[t * 16 + i] = m0 + i < M ? xs[m0 + i].sx[u] : 0.f;
      xsT[t * 16 + i] = m0 + i < M ? xs[m0 + i].xsum[u] : 0.f;
    }
  }
}

__attribute__((target("amx-tile,amx-int8")))
static inline void unit_product(int c, const uint8_t* a_tile, const int8_t* b_tile, int32_t* out) {
#define OPTISTACK_UNIT(C, A, B) \
  _tile_loadd(A, a_tile, 64);   \
  _tile_loadd(B, b_tile, 64);   \
  _tile_zero(C);                \
  _tile_dpbusd(C, A, B);        \
  _tile_stored(C, out, 64);     \
  break;
  switch (c) {
    case 0: OPTISTACK_UNIT(0, 4, 5)
    case 1: OPTISTACK_UNIT(1, 6, 7)
    case 2: OPTISTACK_UNIT(2, 4, 5)
    default: OPTISTACK_UNIT(3, 6, 7)
  }
#undef OPTISTACK_UNIT
}

__attribute__((target("amx-tile,amx-int8")))
void q4_rows_amx8(const Q4Weight& w, const int8_t* tiles, const float* sxT, const float* xsT, int64_t M, int64_t n0,
                  int64_t n1, float* y, int64_t ystride, bool add, uint8_t* wbuf) {
  const int64_t U = w.K / 64, rb = w.K / 2, mtiles = (M + 15) / 16;
  float* st = reinterpret_cast<float*>(wbuf + U * 1024);  // [16][U] scales of this weight tile's rows
  float* zt = st + U * 16;                                // [16][U] their zc (0 beyond the last row)
  int32_t* cbuf = reinterpret_cast<int32_t*>(zt + U * 16);  // [U][16 x 16] one activation tile's products
  tile_config();
  for (int64_t nt = n0; nt < n1; nt += 16) {
    const int64_t nr = std::min<int64_t>(16, n1 - nt);
    for (int i = 0; i < 16; ++i)  // 16 units of a row at a time (float16 scales: one conversion for 16)
      for (int64_t u = 0; u < U; u += 16) {
        const __mmask16 all = tail_mask(U - u), m = i < nr ? all : __mmask16(0);
        const int64_t at = (nt + i) * U + u;
        const __m512 sv = w.s16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.s16 + at)) : _mm512_maskz_loadu_ps(m, w.s + at);
        const __m512 zv = w.zc16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.zc16 + at)) : _mm512_maskz_loadu_ps(m, w.zc + at);
        _mm512_mask_storeu_ps(st + i * U + u, all, sv);
        _mm512_mask_storeu_ps(zt + i * U + u, all, zv);
      }
    for (int64_t u = 0; u < U; ++u)  // this weight tile's A tiles, every unit: 16 rows x 64 codes 0..15
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_si512(wbuf + u * 1024 + i * 64,
                            i < nr ? unpack_unit(w.q + (nt + i) * rb + u * 32) : _mm512_setzero_si512());
    const __mmask16 nmask = __mmask16((1u << nr) - 1);
    const __m512 bias = w.bias ? _mm512_maskz_loadu_ps(nmask, w.bias + nt) : _mm512_setzero_ps();
    for (int64_t mt = 0; mt < mtiles; ++mt) {
      for (int64_t u = 0; u < U; ++u)
        unit_product(int(u & 3), wbuf + u * 1024, tiles + (mt * U + u) * 1024, cbuf + u * 256);
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t u = 0; u < U; ++u) {  // acc[n][m] += C[n][m] * s[n] * sx[m] + zc[n] * xsum[m]
        const int64_t t = mt * U + u;
        const int32_t* c = cbuf + u * 256;
        const __m512 sx = _mm512_loadu_ps(sxT + t * 16), xsum = _mm512_loadu_ps(xsT + t * 16);
        for (int i = 0; i < 16; ++i) {  // all 16 (rows past the weight's end are zeros): acc stays in registers
          const __m512 cv = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + i * 16));
          acc[i] = _mm512_fmadd_ps(cv, _mm512_mul_ps(sx, _mm512_set1_ps(st[i * U + u])), acc[i]);
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(zt[i * U + u]), xsum, acc[i]);
        }
      }
      __m512i r[16];  // acc[n] holds 16 m values: transpose so r[m] holds 16 n values, a slice of y's row m
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(acc[i]);
      transpose16(r);
      const int64_t mr = std::min<int64_t>(16, M - mt * 16);
      for (int64_t j = 0; j < mr; ++j) {
        float* dst = y + (mt * 16 + j) * ystride + nt;
        __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[j]), bias);
        if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(nmask, dst));
        _mm512_mask_storeu_ps(dst, nmask, v);
      }
    }
  }
  _tile_release();
}
// The int8 head for a batch of rows (amx_batch): int8 weights [V, K] straight from memory as A tiles (16 rows
// at a stride of K bytes), the rows quantized to int8 with one scale each as B tiles; the products accumulate
// over the whole row inside the tile (one weight scale per row and one activation scale per row: nothing
// to scale per unit), so the 28 MB head of SmolLM2 streams once at memory speed for every row of the batch.
float quantize_i8_row(const float* x, int64_t K, int8_t* out) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(K - k), x + k)));
  const float amax = _mm512_reduce_max_ps(mx);
  if (!std::isfinite(amax)) return -1.f;
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask(K - k);
    _mm_mask_storeu_epi8(out + k, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), inv))));
  }
  return amax / 127.f;
}

void amx8_pack_rows(const int8_t* x, int64_t xstride, int64_t M, int64_t K, int64_t t0, int64_t t1, int8_t* tiles) {
  const int64_t kt = K / 64;
  for (int64_t t = t0; t < t1; ++t) {  // tile t = (m-tile t / kt, 64 channels t % kt)
    const int64_t m0 = (t / kt) * 16, k0 = (t % kt) * 64;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = m0 + i < M ? _mm512_loadu_si512(x + (m0 + i) * xstride + k0) : _mm512_setzero_si512();
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tiles + t * 1024 + i * 64, r[i]);
  }
}

__attribute__((target("amx-tile,amx-int8")))
void head_amx8(const int8_t* qw, const float* sc, int64_t K, const int8_t* tiles, const float* sx, int64_t M, int64_t n0,
               int64_t n1, float* y, int64_t N) {
  const int64_t kt = K / 64, mtiles = (M + 15) / 16;
  alignas(64) int32_t cbuf[256];
  tile_config();
  for (int64_t nt = n0; nt < n1; nt += 16)  // n0, n1: multiples of 16 within the weight's rows
    for (int64_t mt = 0; mt < mtiles; ++mt) {
      _tile_zero(0);
      for (int64_t k = 0; k < kt; ++k) {
        _tile_loadd(4, qw + nt * K + k * 64, K);
        _tile_loadd(5, tiles + (mt * kt + k) * 1024, 64);
        _tile_dpbssd(0, 4, 5);
      }
      _tile_stored(0, cbuf, 64);
      __m512i r[16];  // C[n][m]: transpose so r[m] holds 16 n values
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(cbuf + i * 16);
      transpose16(r);
      const __m512 s = _mm512_loadu_ps(sc + nt);
      const int64_t mr = std::min<int64_t>(16, M - mt * 16);
      for (int64_t j = 0; j < mr; ++j) {
        const int64_t m = mt * 16 + j;
        _mm512_storeu_ps(y + m * N + nt, _mm512_mul_ps(_mm512_cvtepi32_ps(r[j]), _mm512_mul_ps(s, _mm512_set1_ps(sx[m]))));
      }
    }
  _tile_release();
}
#else
float quantize_i8_row(const float*, int64_t, int8_t*) { TORCH_CHECK(false, "optistack_cpu: this build has no AMX path"); }
void amx8_pack_rows(const int8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int8_t*) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
void head_amx8(const int8_t*, const float*, int64_t, const int8_t*, const float*, int64_t, int64_t, int64_t, float*,
               int64_t) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
void amx8_pack(const XQ*, int64_t, int64_t, int64_t, int64_t, int8_t*, float*, float*) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
void q4_rows_amx8(const Q4Weight&, const int8_t*, const float*, const float*, int64_t, int64_t, int64_t, float*, int64_t,
                  bool, uint8_t*) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
#endif

}  // namespace optistack_cpu
