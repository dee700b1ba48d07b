// The engine's int4 GEMM on AMX tiles, for prompt chunks (many rows of one sequence) and, when asked,
// batches of decode rows.
//
// Why: a decode row reads every weight once and is bound by memory, but a 128-token prompt is bound by
// multiply-adds: a VNNI dot product does 64 of them per instruction where one AMX-BF16 tile product
// (tdpbf16ps, 16 x 16 x 32) does 8,192. Why bf16 and not int8 tiles: the int4 weights carry a scale per
// 64 channels, so an int8 tile product must leave the tile after every 64 channels to be scaled (measured
// on this Xeon: a 1 KB tile store per product halves the tile unit's rate, and the float scaling on top
// brought it to a fifth), while a bf16 product takes the scale in the dequantized weights and accumulates
// in float32 across the whole row inside the tile. Measured alone: 840-880 GMAC/s per core for the tile
// products; unpacking 16 weight rows x 64 channels to bf16 costs ~60 ns and is shared by every 16
// activation rows.
//
// Layout: A = 16 weight rows of a 32-channel chunk, dequantized (q * s + zc, per 64 channels) to bf16;
// B = 16 activation rows of that chunk in bf16 pairs, the VNNI tile layout (row r holds channels 2r, 2r+1
// of each activation row), built once per call by amx_pack so every thread and every weight tile share
// it; C[n][m] accumulates over all chunks in float32. Four C tiles hold two weight tiles times two
// activation tiles.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "amx_tiles.h"
#include "llama_decode.h"

#ifdef OPTISTACK_AMX_BUILD
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace optistack_cpu {

#ifdef OPTISTACK_AMX_BUILD
static bool amx_probe() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool bf16 = d & (1u << 22), tile = d & (1u << 24), int8 = d & (1u << 25);
  const bool avx512_bf16 = __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  if (!bf16 || !tile || !int8 || !avx512_bf16) return false;
  // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

bool amx_supported() {
  static const bool ok = amx_probe();
  return ok;
}

__attribute__((target("avx512bf16")))
void amx_pack(const float* x, int64_t xstride, int64_t M, int64_t K, int64_t t0, int64_t t1, uint16_t* tiles) {
  const int64_t C = K / 32;
  for (int64_t t = t0; t < t1; ++t) {  // tile t = (m-tile t / C, 32-channel chunk t % C)
    const int64_t m0 = (t / C) * 16, k0 = (t % C) * 32;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      if (m0 + i >= M) {
        r[i] = _mm512_setzero_si512();
        continue;
      }
      const float* row = x + (m0 + i) * xstride + k0;
      r[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row));
    }
    transpose16(r);  // r[p] = channels 2p, 2p + 1 of each of the 16 rows
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tiles + t * 512 + i * 32, r[i]);
  }
}

// As amx_pack, from activations stored transposed (element (m, k) at xt[k * tstride + m], as q4_swiglu_amx
// writes them): two channel rows of 16 activation rows convert and interleave into a tile row, no transpose.
__attribute__((target("avx512bf16")))
void amx_pack_t(const float* xt, int64_t tstride, int64_t M, int64_t K, int64_t t0, int64_t t1, uint16_t* tiles) {
  const int64_t C = K / 32;
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m0 = (t / C) * 16, k0 = (t % C) * 32;
    const __mmask16 mm = tail_mask(M - m0);
    for (int64_t p = 0; p < 16; ++p) {  // row p: channels k0 + 2p (low half of each pair) and k0 + 2p + 1
      const float* lo = xt + (k0 + 2 * p) * tstride + m0;
      const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mm, lo + tstride), _mm512_maskz_loadu_ps(mm, lo));
      _mm512_storeu_si512(tiles + t * 512 + p * 32, _mm512_permutexvar_epi16(pairs, bf));
    }
  }
}

// 16 weight rows from nt (rows past n1 are zeros), every 32-channel chunk, as bf16 A tiles [K/32][16][32].
// A unit's 16 possible values (q * s + zc for q = 0..15, rounded to bf16 as a whole-row conversion would)
// are a lookup table: its 64 codes widen to 16 bits and index it (vpermw), 8 instructions for 64 weights
// where converting each code to float took 20 (measured: the K = 576 tile loop 7-10% faster, same bits).
__attribute__((target("avx512bf16")))
static void dequant_rows(const Q4Weight& w, int64_t nt, int64_t n1, uint16_t* a) {
  const int64_t U = w.K / 64, rb = w.K / 2;
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m4 = _mm512_set1_epi16(0xF);
  alignas(64) float sv[16], zv[16];
  for (int i = 0; i < 16; ++i) {
    if (nt + i >= n1) {
      for (int64_t c = 0; c < 2 * U; ++c) std::memset(a + c * 512 + i * 32, 0, 64);
      continue;
    }
    const uint8_t* q = w.q + (nt + i) * rb;
    const int64_t row = (nt + i) * U;
    for (int64_t u0 = 0; u0 < U; u0 += 16) {  // 16 units' scales and zero terms converted at once
      const __mmask16 m = tail_mask(U - u0);
      _mm512_store_ps(sv, w.s16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.s16 + row + u0))
                                : _mm512_maskz_loadu_ps(m, w.s + row + u0));
      _mm512_store_ps(zv, w.zc16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.zc16 + row + u0))
                                 : _mm512_maskz_loadu_ps(m, w.zc + row + u0));
      for (int64_t j = 0, n = std::min<int64_t>(16, U - u0); j < n; ++j) {
        const int64_t u = u0 + j;  // byte b of a unit: channel b (low nibble) and b + 32 (high nibble)
        const __m512i lut = _mm512_castsi256_si512(
            (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(codes, _mm512_set1_ps(sv[j]), _mm512_set1_ps(zv[j]))));
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(q + u * 32)));
        _mm512_storeu_si512(a + (2 * u) * 512 + i * 32, _mm512_permutexvar_epi16(_mm512_and_si512(b, m4), lut));
        _mm512_storeu_si512(a + (2 * u + 1) * 512 + i * 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), lut));
      }
    }
  }
}

// C tile 2i + j accumulates weight tile i (A: tiles 4, 5) times activation tile j (B: tiles 6, 7) over every
// 32-channel chunk; no tile is loaded twice per chunk, so the four products of a chunk run back to back
// (measured alone: 1.05-1.15 TMAC/s a core, against 0.83-0.90 with one weight tile and four activation tiles).
template <int NA, int NB>
__attribute__((target("amx-tile,amx-bf16")))
static inline void tile_products(const uint16_t* a, int64_t astride, const uint16_t* b, int64_t bstride, int64_t chunks,
                                 float* out) {
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (NA > 1) _tile_zero(2);
  if (NA > 1 && NB > 1) _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, a + c * 512, 64);
    if (NA > 1) _tile_loadd(5, a + astride + c * 512, 64);
    _tile_loadd(6, b + c * 512, 64);
    if (NB > 1) _tile_loadd(7, b + bstride + c * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if (NA > 1) _tile_dpbf16ps(2, 5, 6);
    if (NA > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  if (NB > 1) _tile_stored(1, out + 256, 64);
  if (NA > 1) _tile_stored(2, out + 512, 64);
  if (NA > 1 && NB > 1) _tile_stored(3, out + 768, 64);
}

__attribute__((target("amx-tile,amx-bf16")))
void q4_rows_amx(const Q4Weight& w, const uint16_t* tiles, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ystride, bool add, uint8_t* wbuf) {
  const int64_t chunks = w.K / 32, mtiles = (M + 15) / 16, astride = chunks * 512;
  uint16_t* a = reinterpret_cast<uint16_t*>(wbuf);  // [2 weight tiles][chunks][16 rows][32], bf16
  float* cbuf = reinterpret_cast<float*>(wbuf + 2 * chunks * 1024);  // [2 n][2 m][16 n][16 m]
  tile_config();
  for (int64_t nt = n0; nt < n1; nt += 32) {
    const int64_t na = std::min<int64_t>(2, (n1 - nt + 15) / 16);
    for (int64_t i = 0; i < na; ++i) dequant_rows(w, nt + 16 * i, n1, a + i * astride);
    for (int64_t mt = 0; mt < mtiles; mt += 2) {
      const int64_t nb = std::min<int64_t>(2, mtiles - mt);
      const uint16_t* b = tiles + mt * chunks * 512;
      if (na == 2 && nb == 2) tile_products<2, 2>(a, astride, b, astride, chunks, cbuf);
      else if (na == 2) tile_products<2, 1>(a, astride, b, astride, chunks, cbuf);
      else if (nb == 2) tile_products<1, 2>(a, astride, b, astride, chunks, cbuf);
      else tile_products<1, 1>(a, astride, b, astride, chunks, cbuf);
      for (int64_t i = 0; i < na; ++i) {
        const int64_t n = nt + 16 * i, nr = std::min<int64_t>(16, n1 - n);
        const __mmask16 nmask = __mmask16((1u << nr) - 1);
        const __m512 bias = w.bias ? _mm512_maskz_loadu_ps(nmask, w.bias + n) : _mm512_setzero_ps();
        for (int64_t j = 0; j < nb; ++j) {  // C[n][m]: transpose so r[m] holds 16 n values, a slice of y's row m
          __m512i r[16];
          for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_si512(cbuf + (2 * i + j) * 256 + k * 16);
          transpose16(r);
          const int64_t mr = std::min<int64_t>(16, M - (mt + j) * 16);
          for (int64_t k = 0; k < mr; ++k) {
            float* dst = y + ((mt + j) * 16 + k) * ystride + n;
            __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[k]), bias);
            if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(nmask, dst));
            _mm512_mask_storeu_ps(dst, nmask, v);
          }
        }
      }
    }
  }
  _tile_release();
}
// The MLP's first half for the rows packed in `tiles`: gate_up rows j and I + j (w holds gate's I rows, then
// up's) are one weight-tile pair, so a 2 x 2 block holds gate and up for the same outputs and the epilogue
// writes silu(gate) * up straight from the tile products, transposed (act[m][j] at actT[j * tstride + m]):
// C comes out of the tiles as [j][m], so no transpose and no pass over a [M][2I] intermediate. Outputs
// [j0, j1) of I; the values equal q4_rows_amx's followed by swiglu's (same products, bias and formula).
__attribute__((target("amx-tile,amx-bf16")))
void q4_swiglu_amx(const Q4Weight& w, int64_t I, const uint16_t* tiles, int64_t M, int64_t j0, int64_t j1,
                   float* actT, int64_t tstride, uint8_t* wbuf) {
  const int64_t chunks = w.K / 32, mtiles = (M + 15) / 16, astride = chunks * 512;
  uint16_t* a = reinterpret_cast<uint16_t*>(wbuf);
  float* cbuf = reinterpret_cast<float*>(wbuf + 2 * chunks * 1024);
  const __m512 one = _mm512_set1_ps(1.f);
  tile_config();
  for (int64_t jt = j0; jt < j1; jt += 16) {
    dequant_rows(w, jt, I, a);                  // gate rows (zeros past I)
    dequant_rows(w, I + jt, 2 * I, a + astride);  // up rows
    const int64_t jr = std::min<int64_t>(16, j1 - jt);
    for (int64_t mt = 0; mt < mtiles; mt += 2) {
      const int64_t nb = std::min<int64_t>(2, mtiles - mt);
      const uint16_t* b = tiles + mt * chunks * 512;
      if (nb == 2) tile_products<2, 2>(a, astride, b, astride, chunks, cbuf);
      else tile_products<2, 1>(a, astride, b, astride, chunks, cbuf);
      for (int64_t j = 0; j < nb; ++j) {  // C tile 2i + j: i = 0 gate, 1 up; row r = output jt + r, 16 m values
        const __mmask16 mm = tail_mask(M - (mt + j) * 16);
        for (int64_t r = 0; r < jr; ++r) {
          __m512 g = _mm512_loadu_ps(cbuf + j * 256 + r * 16), u = _mm512_loadu_ps(cbuf + (2 + j) * 256 + r * 16);
          if (w.bias) {
            g = _mm512_add_ps(g, _mm512_set1_ps(w.bias[jt + r]));
            u = _mm512_add_ps(u, _mm512_set1_ps(w.bias[I + jt + r]));
          }
          const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
          _mm512_mask_storeu_ps(actT + (jt + r) * tstride + (mt + j) * 16, mm,
                                _mm512_mul_ps(_mm512_mul_ps(g, recip16(_mm512_add_ps(one, e))), u));
        }
      }
    }
  }
  _tile_release();
}
#else
bool amx_supported() { return false; }
void amx_pack(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
void q4_rows_amx(const Q4Weight&, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t, bool, uint8_t*) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
void amx_pack_t(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
void q4_swiglu_amx(const Q4Weight&, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t, uint8_t*) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
#endif

}  // namespace optistack_cpu
