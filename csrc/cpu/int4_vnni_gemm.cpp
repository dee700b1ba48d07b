// The engine's int4 x int8 GEMM for prompt chunks on CPUs without AMX (Zen 4, Ice Lake, Cascade Lake).
//
// Why not q4_rows (int4_q8_gemv.cpp) for a chunk: it is a GEMV that meets two activation rows per weight
// block, so each 64-byte weight load is unpacked (and, shift, scales) for two rows only, and each product
// pays a conversion and a multiply-add per unit pair: about a quarter of its instructions are vpdpbusd. Here
// 32 weight rows are unpacked once per call into a panel in the VNNI layout (per unit and 4-channel quad, a
// 64-byte vector of 16 rows x 4 codes: transpose16), and the chunk's rows meet it six at a time: each 4-byte
// group of a row's int8 codes is broadcast from where prep_q8 put it (no packing of activations) into 12
// vpdpbusd, 2 of 16 weight rows each x 6 rows. A unit's products (16 quads, exact int32) are then scaled
// by s[n, u] * sx[m, u] with the zero-point term zc[n, u] * xsum[m, u] added, as the other int8 paths do:
// the same integers as q4_rows from the same codes, only the order of the float sums differs.
#include <ATen/ATen.h>

#include <algorithm>

#include "amx_tiles.h"
#include "llama_decode.h"

namespace optistack_cpu {

int64_t vnni_gemm_wbuf_bytes(int64_t K) { return K / 64 * kGemmPanelUnitBytes + 64; }

#if defined(OPTISTACK_AMX_BUILD) && defined(__AVX512VNNI__)
namespace {

constexpr int kRows = 6;  // activation rows per pass over the panel (12 int32 + 12 float accumulators)

// The panel of weight rows [nt, nt + nr), nr <= 32: per unit, 16 quads x 128 bytes (rows 0-15, then 16-31,
// codes 0..15 as bytes, zeros past nr), then the unit's 32 scales and 32 zc (zeros past nr).
void pack_panel(const Q4Weight& w, int64_t nt, int64_t nr, uint8_t* panel) {
  const int64_t U = w.K / 64, rb = w.K / 2;
  for (int64_t u = 0; u < U; ++u) {
    uint8_t* pu = panel + u * kGemmPanelUnitBytes;
    for (int h = 0; h < 2; ++h) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = 16 * h + i;
        r[i] = row < nr ? unpack_unit(w.q + (nt + row) * rb + u * 32) : _mm512_setzero_si512();
      }
      transpose16(r);  // r[t] = channels 4t..4t+3 of each of the 16 rows
      for (int t = 0; t < 16; ++t) _mm512_store_si512(pu + t * 128 + h * 64, r[t]);
    }
    float* st = reinterpret_cast<float*>(pu + 2048);
    for (int64_t i = 0; i < 32; ++i) {
      st[i] = i < nr ? w.scale((nt + i) * U + u) : 0.f;
      st[32 + i] = i < nr ? w.zero((nt + i) * U + u) : 0.f;
    }
  }
}

// Rows [m0, m0 + MR) of the chunk against the panel: out[m][nt .. nt + nr) (+ bias, += with add).
template <int MR>
void panel_rows(const Q4Weight& w, const uint8_t* panel, const XQ* xs, int64_t m0, int64_t nt, int64_t nr, float* y,
                int64_t ystride, bool add) {
  const int64_t U = w.K / 64;
  __m512 accf[MR][2];
  for (int i = 0; i < MR; ++i) accf[i][0] = accf[i][1] = _mm512_setzero_ps();
  const int8_t* xq[MR];
  for (int i = 0; i < MR; ++i) xq[i] = xs[m0 + i].q;
  for (int64_t u = 0; u < U; ++u) {
    const uint8_t* pu = panel + u * kGemmPanelUnitBytes;
    int64_t lo, hi;
    xq_unit_offsets(U, u, lo, hi);
    __m512i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {  // unrolled: GCC otherwise rotates the 12 accumulators through copies
      const __m512i b0 = _mm512_load_si512(pu + t * 128), b1 = _mm512_load_si512(pu + t * 128 + 64);
      const int64_t off = t < 8 ? lo + 4 * t : hi + 4 * (t - 8);
      for (int i = 0; i < MR; ++i) {
        const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq[i] + off));
        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], b0, a);
        acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], b1, a);
      }
    }
    const float* st = reinterpret_cast<const float*>(pu + 2048);
    const __m512 s0 = _mm512_load_ps(st), s1 = _mm512_load_ps(st + 16);
    const __m512 z0 = _mm512_load_ps(st + 32), z1 = _mm512_load_ps(st + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512 sx = _mm512_set1_ps(xs[m0 + i].sx[u]), xsum = _mm512_set1_ps(xs[m0 + i].xsum[u]);
      accf[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(s0, sx), accf[i][0]);
      accf[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(s1, sx), accf[i][1]);
      accf[i][0] = _mm512_fmadd_ps(z0, xsum, accf[i][0]);
      accf[i][1] = _mm512_fmadd_ps(z1, xsum, accf[i][1]);
    }
  }
  const __mmask16 k0 = tail_mask(nr), k1 = tail_mask(nr > 16 ? nr - 16 : 0);
  const __m512 bias0 = w.bias ? _mm512_maskz_loadu_ps(k0, w.bias + nt) : _mm512_setzero_ps();
  const __m512 bias1 = w.bias ? _mm512_maskz_loadu_ps(k1, w.bias + nt + 16) : _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) {
    float* dst = y + (m0 + i) * ystride + nt;
    __m512 v0 = _mm512_add_ps(accf[i][0], bias0), v1 = _mm512_add_ps(accf[i][1], bias1);
    if (add) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, dst));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, dst + 16));
    }
    _mm512_mask_storeu_ps(dst, k0, v0);
    _mm512_mask_storeu_ps(dst + 16, k1, v1);
  }
}

}  // namespace

void q4_rows_gemm(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ystride,
                  bool add, uint8_t* wbuf) {
  uint8_t* panel = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(wbuf) + 63) & ~uintptr_t(63));
  const int64_t rb = w.K / 2, U = w.K / 64;
  for (int64_t nt = n0; nt < n1; nt += 32) {
    const int64_t nr = std::min<int64_t>(32, n1 - nt);
    // the next panel's codes and scales into L2 while this one is packed and used: its rows are one contiguous
    // block, but packing reads it a unit of 32 rows at a time, 32 strided streams the hardware prefetcher may
    // not follow where the weights come from DRAM (a model larger than the cache)
    const int64_t nn = std::min<int64_t>(32, n1 - nt - nr);
    if (nn > 0) {
      const char* qp = (const char*)(w.q + (nt + 32) * rb);
      for (int64_t off = 0; off < nn * rb; off += 64) _mm_prefetch(qp + off, _MM_HINT_T1);
      const int64_t sbytes = nn * U * (w.s16 ? 2 : 4);
      const char* sp = w.s16 ? (const char*)(w.s16 + (nt + 32) * U) : (const char*)(w.s + (nt + 32) * U);
      const char* zp = w.zc16 ? (const char*)(w.zc16 + (nt + 32) * U) : (const char*)(w.zc + (nt + 32) * U);
      for (int64_t off = 0; off < sbytes; off += 64) {
        _mm_prefetch(sp + off, _MM_HINT_T1);
        _mm_prefetch(zp + off, _MM_HINT_T1);
      }
    }
    pack_panel(w, nt, nr, panel);
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) panel_rows<kRows>(w, panel, xs, m, nt, nr, y, ystride, add);
    switch (M - m) {
      case 5: panel_rows<5>(w, panel, xs, m, nt, nr, y, ystride, add); break;
      case 4: panel_rows<4>(w, panel, xs, m, nt, nr, y, ystride, add); break;
      case 3: panel_rows<3>(w, panel, xs, m, nt, nr, y, ystride, add); break;
      case 2: panel_rows<2>(w, panel, xs, m, nt, nr, y, ystride, add); break;
      case 1: panel_rows<1>(w, panel, xs, m, nt, nr, y, ystride, add); break;
      default: break;
    }
  }
}
#else
void q4_rows_gemm(const Q4Weight&, const XQ*, int64_t, int64_t, int64_t, float*, int64_t, bool, uint8_t*) {
  TORCH_CHECK(false, "optistack_cpu: the engine's chunk GEMM needs AVX512-VNNI");
}
#endif

}  // namespace optistack_cpu
