// What the AMX kernels share (int4_amx.cpp: bf16 tiles for prompt chunks; int4_amx_int8.cpp: int8 tiles for
// batches of decode rows): the tile configuration and a 16 x 16 transpose of 32-bit elements.
#pragma once
#include "simd.h"

namespace optistack_cpu {

constexpr int64_t kTileQueries = 32;  // query vectors per pass of llama_attn_amx.h's tile products: two row tiles

// bf16 uint16s of the key tiles of T keys (llama_attn_amx.h: kv_tiles; the value tiles follow them), and of
// the key and value tiles of up to Tmax keys (a thread's buffer).
inline int64_t k_tile_elems(int64_t T, int64_t D) { return (T + 15) / 16 * (D / 32) * 512; }
inline int64_t kv_tile_elems(int64_t Tmax, int64_t D) { return k_tile_elems(Tmax, D) + (Tmax + 31) / 32 * (D / 16) * 512; }

}  // namespace optistack_cpu

#if defined(__x86_64__) && defined(OPTISTACK_AVX512)
#include <immintrin.h>
#define OPTISTACK_AMX_BUILD 1

namespace optistack_cpu {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight tiles of 16 rows x 64 bytes (both kernels use tiles 0..3 as C and 4..7 for their inputs).
__attribute__((target("amx-tile"))) inline void tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// One row's unit of 64 int4 codes in the engine layout (32 bytes: byte j holds channel j in its low nibble and
// j + 32 in its high one) as 64 bytes 0..15 in channel order.
inline __m512i unpack_unit(const uint8_t* p) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m256i b = _mm256_loadu_si256((const __m256i*)p);
  const __m512i bb = _mm512_inserti64x4(_mm512_castsi256_si512(b), b, 1);
  return _mm512_mask_blend_epi64(0xF0, _mm512_and_si512(bb, nib), _mm512_and_si512(_mm512_srli_epi16(bb, 4), nib));
}

// 16 x 16 transpose of 32-bit elements: r[i] becomes column i.
inline void transpose16(__m512i* r) {
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

}  // namespace optistack_cpu
#endif
