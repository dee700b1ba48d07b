// The engine's int4 x int8 GEMM on AMX tiles, for prompt chunks (many rows of one sequence).
//
// Why: a decode row reads every weight once and is bound by memory, but a 128-token prompt is bound by
// multiply-adds, and a VNNI dot product does 64 of them per instruction where one AMX tile product
// (tdpbusd, 16 x 16 x 64) does 16,384. Same numbers as the VNNI path: the same int8 activation codes with
// one scale per 64 channels (prep_q8), the same int4 codes, so every unit's integer dot product is exact
// and equal; only the float sums of those products are rounded in another order.
//
// Layout: A = 16 weight rows of one 64-channel unit, unpacked to bytes 0..15 (unsigned) in natural channel
// order; B = 16 activation rows of that unit in the VNNI tile layout (row r holds channels 4r..4r+3 of
// each of the 16 activation rows), built once per call by amx_pack (so every thread and every weight
// tile share it); C[n][m] = the unit's exact dot product, then scaled in float by s[n, u] * sx[m, u]
// into 16 accumulators, one per weight row. The zero-point term adds zc[n, u] * xsum[m, u] per unit.
#include <ATen/ATen.h>

#include <cstring>

#include "llama_decode.h"
#include "simd.h"

#if defined(__x86_64__) && defined(OPTISTACK_AVX512)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define OPTISTACK_AMX_BUILD 1
#endif

namespace optistack_cpu {

#ifdef OPTISTACK_AMX_BUILD
static bool amx_probe() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), int8 = d & (1u << 25);
  if (!tile || !int8) return false;
  // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

bool amx_supported() {
  static const bool ok = amx_probe();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile")))
static void tile_config() {  // C: tile 0, A: tile 1, B: tile 2, each 16 rows of 64 bytes
  TileConfig cfg;
  for (int t = 0; t < 3; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// 16 x 16 transpose of 32-bit elements: r[i] becomes column i.
static inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xDD);
  }
}

// One activation row's unit u in natural channel order (prep_q8 pairs units: low halves, then high halves).
static inline __m512i unit_codes(const XQ& x, int64_t U, int64_t u) {
  const int64_t P = U / 2, p = u / 2;
  if (p >= P) return _mm512_loadu_si512(x.q + P * 128);  // the odd last unit is stored whole
  const int8_t* base = x.q + p * 128 + (u % 2) * 32;
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)base)),
                            _mm256_loadu_si256((const __m256i*)(base + 64)), 1);
}

void amx_pack(const XQ* xs, int64_t M, int64_t K, int64_t t0, int64_t t1, const AmxActs& a) {
  const int64_t U = K / 64;
  for (int64_t t = t0; t < t1; ++t) {  // tile t = (m-tile t / U, unit t % U)
    const int64_t mt = t / U, u = t % U, m0 = mt * 16;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = m0 + i < M ? unit_codes(xs[m0 + i], U, u) : _mm512_setzero_si512();
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(a.tiles + t * 1024 + i * 64, r[i]);
    for (int i = 0; i < 16; ++i) {
      a.sxT[t * 16 + i] = m0 + i < M ? xs[m0 + i].sx[u] : 0.f;
      a.xsT[t * 16 + i] = m0 + i < M ? xs[m0 + i].xsum[u] : 0.f;
    }
  }
}

__attribute__((target("amx-tile,amx-int8")))
void q4_rows_amx(const Q4Weight& w, const AmxActs& a, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ystride,
                 bool add, uint8_t* wbuf) {
  const int64_t U = w.K / 64, rb = w.K / 2, mtiles = (M + 15) / 16;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  alignas(64) int32_t cb[256];
  alignas(64) float out[256];
  tile_config();
  for (int64_t nt = n0; nt < n1; nt += 16) {
    const int64_t nr = std::min<int64_t>(16, n1 - nt);
    for (int64_t u = 0; u < U; ++u)  // this weight tile's A tiles, every unit: 16 rows x 64 codes
      for (int i = 0; i < 16; ++i) {
        __m512i v = _mm512_setzero_si512();
        if (i < nr) {
          const __m256i b = _mm256_loadu_si256((const __m256i*)(w.q + (nt + i) * rb + u * 32));
          const __m512i bb = _mm512_inserti64x4(_mm512_castsi256_si512(b), b, 1);
          v = _mm512_mask_blend_epi64(0xF0, _mm512_and_si512(bb, nib), _mm512_and_si512(_mm512_srli_epi16(bb, 4), nib));
        }
        _mm512_storeu_si512(wbuf + u * 1024 + i * 64, v);
      }
    for (int64_t mt = 0; mt < mtiles; ++mt) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t u = 0; u < U; ++u) {
        const int64_t t = mt * U + u;
        _tile_zero(0);
        _tile_loadd(1, wbuf + u * 1024, 64);
        _tile_loadd(2, a.tiles + t * 1024, 64);
        _tile_dpbusd(0, 1, 2);
        _tile_stored(0, cb, 64);
        const __m512 sx = _mm512_loadu_ps(a.sxT + t * 16), xsum = _mm512_loadu_ps(a.xsT + t * 16);
        for (int i = 0; i < nr; ++i) {
          const __m512 c = _mm512_cvtepi32_ps(_mm512_load_si512(cb + i * 16));
          acc[i] = _mm512_fmadd_ps(c, _mm512_mul_ps(sx, _mm512_set1_ps(w.s[(nt + i) * U + u])), acc[i]);
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(w.zc[(nt + i) * U + u]), xsum, acc[i]);
        }
      }
      for (int i = 0; i < 16; ++i) _mm512_store_ps(out + i * 16, acc[i]);  // out[n][m]
      const int64_t mr = std::min<int64_t>(16, M - mt * 16);
      for (int64_t j = 0; j < mr; ++j) {
        float* dst = y + (mt * 16 + j) * ystride + nt;
        for (int64_t i = 0; i < nr; ++i) {
          float v = out[i * 16 + j] + (w.bias ? w.bias[nt + i] : 0.f);
          dst[i] = add ? dst[i] + v : v;
        }
      }
    }
  }
  _tile_release();
}
#else
bool amx_supported() { return false; }
void amx_pack(const XQ*, int64_t, int64_t, int64_t, int64_t, const AmxActs&) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
void q4_rows_amx(const Q4Weight&, const AmxActs&, int64_t, int64_t, int64_t, float*, int64_t, bool, uint8_t*) {
  TORCH_CHECK(false, "optistack_cpu: this build has no AMX path");
}
#endif

}  // namespace optistack_cpu
