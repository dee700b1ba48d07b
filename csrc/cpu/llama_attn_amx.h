// Causal attention for a prompt chunk on AMX-BF16 tiles: the chunk kernel's work (llama_attn_chunk.h) as
// two tile products, scores = Q K^T and out = P V.
//
// Why: a chunk's attention is a small matrix product per key/value head (<= 32 query vectors x the slot's
// positions x the head size), and in float32 it took ~5 ms of a ~31 ms SmolLM2 128-token prefill
// (30 layers x 3 key/value heads) at ~25 multiply-adds a cycle; one tdpbf16ps does 8,192. It serves the rows
// whose projections already run on AMX bf16 tiles (the engine's `amx_rows`), with the same rounding: the
// queries, keys, values and softmax weights enter the products as bf16 and accumulate in float32 (the
// softmax itself is float32). Rows on the VNNI path keep the float32 chunk kernel.
//
// Layout: Q tiles are query rows (16 per tile) x 32 channels; K^T tiles are 16 channel pairs x 16 keys (the
// VNNI pairing, built by a 16 x 16 transpose of a key block); P is written as bf16 in place over each score
// row; V tiles are 16 key pairs x 16 channels.
//
// An item (many rows of one key/value head) converts its keys and values to those tiles once, then runs its
// rows 32 query vectors at a time over them: items of 8 rows converted the same keys again for every 8 rows
// (a 128-row SmolLM2 chunk: 16 items a head, ~4.5 key blocks each). Single thread, one head's 128 rows,
// cache warm: 36.6 us in items of 8 rows, 29.2 us as one item. The engine cuts a chunk into a few items per
// head (enough to keep every thread busy) at equal shares of the causal scores.
#pragma once
#include "amx_tiles.h"
#include "llama_attn_chunk.h"
#include "llama_ops.h"

namespace optistack_cpu {

#if defined(OPTISTACK_AMX_BUILD) && defined(__AVX512VNNI__)
// Keys and values [0, T) of one slot's key/value head as bf16 tiles, converted once for every query of an item:
// kt, block b of 16 keys, chunk c of 32 channels: tile b * C + c holds channel pairs x keys (the VNNI pairing,
// by a 16 x 16 transpose); vt, block b of 32 keys, channels 16 j..: tile b * (D / 16) + j holds key pairs x
// channels. Keys past T are zeros.
template <typename KV>
__attribute__((target("avx512bf16")))
static void kv_tiles(const KV* k, const KV* v, int64_t T, int64_t D, uint16_t* kt, uint16_t* vt) {
  const int64_t C = D / 32, J = D / 16;
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    const int64_t nk = std::min<int64_t>(16, T - t0);
    for (int64_t c = 0; c < C; ++c) {
      __m512i r[16];
      for (int64_t l = 0; l < 16; ++l) {
        const KV* kr = k + (t0 + l) * D + 32 * c;
        r[l] = l < nk ? (__m512i)_mm512_cvtne2ps_pbh(ld(kr + 16), ld(kr)) : _mm512_setzero_si512();
      }
      transpose16(r);  // r[p] = channels 2p, 2p + 1 of the 16 keys
      uint16_t* dst = kt + ((t0 / 16) * C + c) * 512;
      for (int64_t p = 0; p < 16; ++p) _mm512_store_si512(dst + p * 32, r[p]);
    }
  }
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t t0 = 0; t0 < T; t0 += 32)
    for (int64_t j = 0; j < J; ++j) {
      uint16_t* dst = vt + ((t0 / 32) * J + j) * 512;
      for (int64_t p = 0; p < 16; ++p) {  // row p: keys t0 + 2p (low half of each pair) and t0 + 2p + 1
        const int64_t a = t0 + 2 * p;
        const __m512 lo = a < T ? ld(v + a * D + 16 * j) : _mm512_setzero_ps();
        const __m512 hi = a + 1 < T ? ld(v + (a + 1) * D + 16 * j) : _mm512_setzero_ps();
        _mm512_store_si512(dst + p * 32, _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
      }
    }
}

// M * G <= kTileQueries query vectors (M rows from position p0, G query heads each) against the tiles of kv_tiles (made
// for at least p0 + M keys); the tile configuration is loaded. sc: kChunkQueries rows of round-up-16(p0 + M).
template <typename KV>
__attribute__((target("amx-tile,amx-bf16,avx512bf16")))
static void attend_tiles_amx(const float* q, int64_t qstride, int64_t M, int64_t G, int64_t p0, const uint16_t* kt,
                             const uint16_t* vt, const float* ks, const float* vs, int64_t D, float* sc, float* out,
                             int64_t ostride) {
  const int64_t R = M * G, RT = (R + 15) / 16, T = p0 + M, Ts = (T + 15) / 16 * 16, C = D / 32, J = D / 16;
  const float scale = 1.f / std::sqrt(float(D));
  alignas(64) uint16_t qa[2][8][512];  // Q tiles: [row tile][32-channel chunk]
  alignas(64) float cb[2][256];
  auto qrow = [&](int64_t r) { return q + (r / G) * qstride + (r % G) * D; };
  for (int64_t rt = 0; rt < RT; ++rt)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t r = rt * 16 + i;
        __m512i row = _mm512_setzero_si512();
        if (r < R) {
          const float* src = qrow(r) + 32 * c;
          row = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
        }
        _mm512_store_si512(qa[rt][c] + i * 32, row);
      }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t t0 = 0; t0 < T; t0 += 16) {  // scores, one block of 16 keys at a time
    const int64_t nk = std::min<int64_t>(16, T - t0);
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t c = 0; c < C; ++c) {
      _tile_loadd(6, kt + ((t0 / 16) * C + c) * 512, 64);
      _tile_loadd(4, qa[0][c], 64);
      _tile_dpbf16ps(0, 4, 6);
      if (RT > 1) {
        _tile_loadd(5, qa[1][c], 64);
        _tile_dpbf16ps(1, 5, 6);
      }
    }
    _tile_stored(0, cb[0], 64);
    if (RT > 1) _tile_stored(1, cb[1], 64);
    __m512 kscale = _mm512_set1_ps(scale);
    if constexpr (kv_int8<KV>) kscale = _mm512_mul_ps(kscale, _mm512_maskz_loadu_ps(tail_mask(nk), ks + t0));
    const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32(int(t0)), lane);
    for (int64_t r = 0; r < R; ++r) {  // positions past the row's own are -inf
      const __mmask16 ok = _mm512_cmple_epi32_mask(pos, _mm512_set1_epi32(int(p0 + r / G)));
      _mm512_storeu_ps(sc + r * Ts + t0,
                       _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), ok, _mm512_load_ps(cb[r / 16] + (r % 16) * 16), kscale));
    }
  }
  const int64_t T32 = (T + 31) / 32 * 32;
  for (int64_t r = 0; r < R; ++r) {  // softmax in float32, then P as bf16 over the row's own floats
    float* s = sc + r * Ts;
    uint16_t* pb = reinterpret_cast<uint16_t*>(s);
    const int64_t Tr = p0 + r / G + 1;
    const __m512 inv = _mm512_set1_ps(softmax_exp(s, Tr));
    // ascending: the 32 bytes written at t hold floats t/2 .. t/2 + 7, read at an earlier (or this) step
    for (int64_t t = 0; t < T32; t += 16) {
      const __mmask16 mk = t < Tr ? tail_mask(Tr - t) : __mmask16(0);
      __m512 p = _mm512_maskz_mul_ps(mk, _mm512_maskz_loadu_ps(mk, s + t), inv);
      if constexpr (kv_int8<KV>) p = _mm512_mul_ps(p, _mm512_maskz_loadu_ps(mk, vs + t));
      _mm256_storeu_si256((__m256i*)(pb + t), (__m256i)_mm512_cvtneps_pbh(p));
    }
  }
  const uint16_t* p0b = reinterpret_cast<const uint16_t*>(sc);
  const uint16_t* p1b = reinterpret_cast<const uint16_t*>(sc + 16 * Ts);
  for (int64_t j = 0; j < J; ++j) {  // out = P V, 16 channels at a time, over blocks of 32 keys
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t t0 = 0; t0 < T; t0 += 32) {
      _tile_loadd(6, vt + ((t0 / 32) * J + j) * 512, 64);
      _tile_loadd(4, p0b + t0, Ts * 4);
      _tile_dpbf16ps(0, 4, 6);
      if (RT > 1) {
        _tile_loadd(5, p1b + t0, Ts * 4);
        _tile_dpbf16ps(1, 5, 6);
      }
    }
    _tile_stored(0, cb[0], 64);
    if (RT > 1) _tile_stored(1, cb[1], 64);
    for (int64_t r = 0; r < R; ++r)
      _mm512_storeu_ps(out + (r / G) * ostride + (r % G) * D + 16 * j, _mm512_load_ps(cb[r / 16] + (r % 16) * 16));
  }
}

// As attend_chunk (same arguments, same sc buffer: kChunkQueries rows of round-up-16(p0 + M) floats), for any
// M rows, G <= 32 and D a multiple of 32 up to 256: the keys and values are converted to bf16 tiles once
// (kvt: kv_tile_elems(p0 + M, D) uint16s), then taken by groups of rows of up to kTileQueries query vectors.
template <typename KV>
__attribute__((target("amx-tile,amx-bf16,avx512bf16")))
static void attend_chunk_amx(const float* q, int64_t qstride, int64_t M, int64_t G, int64_t p0, const KV* k,
                             const KV* v, const float* ks, const float* vs, int64_t D, float* sc, float* out,
                             int64_t ostride, uint16_t* kvt) {
  const int64_t T = p0 + M, rows = std::max<int64_t>(1, kTileQueries / G);
  uint16_t* vt = kvt + k_tile_elems(T, D);
  prefetch_kv(k, v, T, D);
  kv_tiles(k, v, T, D, kvt, vt);
  tile_config();
  for (int64_t g0 = 0; g0 < M; g0 += rows)
    attend_tiles_amx<KV>(q + g0 * qstride, qstride, std::min(rows, M - g0), G, p0 + g0, kvt, vt, ks, vs, D, sc,
                         out + g0 * ostride, ostride);
  _tile_release();
}
#endif

}  // namespace optistack_cpu
