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
static void tile_config() {  // C: tiles 0..3 (four units in flight), A and B: 4, 5 and 6, 7; 16 rows x 64 bytes
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
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

// Unit u's exact products C = A_u . B_u into C tile u % 4 (A and B in tiles 4, 5 or 6, 7 by u % 2), stored
// to `out`: four products in flight, and the next unit's loads never wait for this one's product to read
// its inputs (tiles are not renamed; one set made every product wait for the previous one).
__attribute__((target("amx-tile,amx-int8")))
static inline void unit_product(int c, const uint8_t* a_tile, const int8_t* b_tile, int32_t* out) {
#define OPTISTACK_UNIT(C, A, B)  \
  _tile_loadd(A, a_tile, 64);    \
  _tile_loadd(B, b_tile, 64);    \
  _tile_zero(C);                 \
  _tile_dpbusd(C, A, B);         \
  _tile_stored(C, out, 64);      \
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
void q4_rows_amx(const Q4Weight& w, const AmxActs& a, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ystride,
                 bool add, uint8_t* wbuf) {
  const int64_t U = w.K / 64, rb = w.K / 2, mtiles = (M + 15) / 16;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  float* st = reinterpret_cast<float*>(wbuf + U * 1024);  // [U][16] scales of this weight tile's rows
  float* zt = st + U * 16;                                // [U][16] their zc (0 beyond the last row)
  int32_t* cbuf = reinterpret_cast<int32_t*>(zt + U * 16);  // [U][16 x 16] one m-tile's unit products
  tile_config();
  for (int64_t nt = n0; nt < n1; nt += 16) {
    const int64_t nr = std::min<int64_t>(16, n1 - nt);
    for (int64_t u = 0; u < U; ++u)
      for (int i = 0; i < 16; ++i) {
        st[u * 16 + i] = i < nr ? w.s[(nt + i) * U + u] : 0.f;
        zt[u * 16 + i] = i < nr ? w.zc[(nt + i) * U + u] : 0.f;
      }
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
    __m512 bias = _mm512_setzero_ps();
    const __mmask16 nmask = __mmask16((1u << nr) - 1);
    if (w.bias) bias = _mm512_maskz_loadu_ps(nmask, w.bias + nt);
    for (int64_t mt = 0; mt < mtiles; ++mt) {
      for (int64_t u = 0; u < U; ++u) unit_product(int(u & 3), wbuf + u * 1024, a.tiles + (mt * U + u) * 1024, cbuf + u * 256);
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t u = 0; u < U; ++u) {  // acc[n][m] += C[n][m] * s[n] * sx[m] + zc[n] * xsum[m]
        const int64_t t = mt * U + u;
        const int32_t* c = cbuf + u * 256;
        const __m512 sx = _mm512_loadu_ps(a.sxT + t * 16), xsum = _mm512_loadu_ps(a.xsT + t * 16);
        const float *s = st + u * 16, *zc = zt + u * 16;
        for (int i = 0; i < 16; ++i) {  // all 16 (rows past the weight's end are zeros): acc stays in registers
          const __m512 cv = _mm512_cvtepi32_ps(_mm512_load_si512(c + i * 16));
          acc[i] = _mm512_fmadd_ps(cv, _mm512_mul_ps(sx, _mm512_set1_ps(s[i])), acc[i]);
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(zc[i]), xsum, acc[i]);
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
