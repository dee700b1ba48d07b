// A decode row's attention over its slot's cache (llama_decode.cpp): one item is a row's query heads of one
// key/value head; the scores and the values read each key and value once for the heads of a run (scores64,
// weigh_values), and an item asks for the next one's keys and values while it computes (KvAhead). A prompt chunk's
// rows attend as a chunk instead (llama_attn_chunk.h, llama_attn_amx.h). AVX-512 only; included by
// llama_decode.cpp alone.
#pragma once
#include <algorithm>
#include <cmath>

#include "llama_ops.h"

namespace optistack_cpu {

#if defined(OPTISTACK_AVX512) && defined(__AVX512VNNI__)
// The next attention item's keys and values (up to 256 KB each), asked for in L2 `per` lines at a time while this
// item computes (`step` once per 4 positions of the scores, once per position of the values). Why: asked for all
// at once (prefetch_kv) the lines fill the core's miss buffers and it waits for them before computing; measured
// on SmolLM2 (Xeon with AMX, 2 threads, 8 decode rows after ~200 positions) that wait was over half of attend's
// time.
struct KvAhead {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t bytes = 0, at = 0, per = 0;

  template <typename KV>
  void aim(const KV* kn, const KV* vn, int64_t Tn, int64_t D, int64_t calls) {
    k = reinterpret_cast<const char*>(kn), v = reinterpret_cast<const char*>(vn), at = 0;
    bytes = kn ? std::min<int64_t>(Tn * D * int64_t(sizeof(KV)), 256 * 1024) : 0;
    per = calls > 0 ? (2 * bytes / 64 + calls) / calls : 0;
  }
  inline void step() {
    for (int64_t i = 0; i < per && at < 2 * bytes; ++i, at += 64)
      _mm_prefetch(at < bytes ? k + at : v + (at - bytes), _MM_HINT_T1);
  }
};

template <typename KV>
static inline float dot(const float* a, const KV* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), ld(b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

// sc[t] = q . k[t] * scale (times ks[t], an int8 cache's scale) for t in [t0, t1) (t0 and t1 - t0 multiples of
// 4 except at the end); returns their maximum. A position's score is the same whatever the range around it.
template <typename KV>
static inline float scores(const float* q, const KV* k, const float* ks, int64_t t0, int64_t t1, int64_t D, float scale,
                           float* sc) {
  float mx = -INFINITY;
  int64_t t = t0;
  if (D == 64) {  // four positions at a time, their four horizontal sums in one reduce4
    const __m512 q0 = _mm512_loadu_ps(q), q1 = _mm512_loadu_ps(q + 16), q2 = _mm512_loadu_ps(q + 32),
                 q3 = _mm512_loadu_ps(q + 48);
    auto part = [&](const KV* kt) {
      __m512 a = _mm512_mul_ps(q0, ld(kt));
      a = _mm512_fmadd_ps(q1, ld(kt + 16), a);
      a = _mm512_fmadd_ps(q2, ld(kt + 32), a);
      return _mm512_fmadd_ps(q3, ld(kt + 48), a);
    };
    const __m128 s4 = _mm_set1_ps(scale);
    __m128 m4 = _mm_set1_ps(-INFINITY);  // the running maximum stays in a register (no store-to-load chain)
    for (; t + 4 <= t1; t += 4) {
      const KV* kt = k + t * D;
      __m128 r = _mm_mul_ps(reduce4(part(kt), part(kt + 64), part(kt + 128), part(kt + 192)), s4);
      if constexpr (kv_int8<KV>) r = _mm_mul_ps(r, _mm_loadu_ps(ks + t));
      _mm_storeu_ps(sc + t, r);
      m4 = _mm_max_ps(r, m4);
    }
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  }
  for (; t < t1; ++t) {
    sc[t] = dot(q, k + t * D, D) * scale;
    if constexpr (kv_int8<KV>) sc[t] *= ks[t];
    mx = std::max(mx, sc[t]);
  }
  return mx;
}

// scores() for GB query heads at once (D = 64): each key is loaded (for a float16 or int8 cache: converted) once
// for all of them, where one head at a time converted it GB times; every head's sums in scores()' order, so the
// numbers are the same bits. mx[g] = max(mx[g], the block's maximum).
template <typename KV, int GB>
static inline void scores64(const float* q, const KV* k, const float* ks, int64_t t0, int64_t t1, float scale,
                            float* sc, int64_t T, float* mx, KvAhead& ahead) {
  __m512 qv[GB][4];
  __m128 m4[GB];
  for (int g = 0; g < GB; ++g) {
    for (int j = 0; j < 4; ++j) qv[g][j] = _mm512_loadu_ps(q + g * 64 + 16 * j);
    m4[g] = _mm_set1_ps(-INFINITY);
  }
  const __m128 s4 = _mm_set1_ps(scale);
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    ahead.step();
    __m512 a[GB][4];
    for (int p = 0; p < 4; ++p) {
      const KV* kt = k + (t + p) * 64;
      const __m512 k0 = ld(kt), k1 = ld(kt + 16), k2 = ld(kt + 32), k3 = ld(kt + 48);
      for (int g = 0; g < GB; ++g)
        a[g][p] = _mm512_fmadd_ps(qv[g][3], k3, _mm512_fmadd_ps(qv[g][2], k2,
                                  _mm512_fmadd_ps(qv[g][1], k1, _mm512_mul_ps(qv[g][0], k0))));
    }
    for (int g = 0; g < GB; ++g) {
      __m128 r = _mm_mul_ps(reduce4(a[g][0], a[g][1], a[g][2], a[g][3]), s4);
      if constexpr (kv_int8<KV>) r = _mm_mul_ps(r, _mm_loadu_ps(ks + t));
      _mm_storeu_ps(sc + g * T + t, r);
      m4[g] = _mm_max_ps(r, m4[g]);
    }
  }
  for (int g = 0; g < GB; ++g) {
    __m128 m = _mm_max_ps(m4[g], _mm_movehl_ps(m4[g], m4[g]));
    float bm = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    for (int64_t u = t; u < t1; ++u) {
      float& su = sc[g * T + u];
      su = dot(q + g * 64, k + u * 64, 64) * scale;
      if constexpr (kv_int8<KV>) su *= ks[u];
      bm = std::max(bm, su);
    }
    mx[g] = std::max(mx[g], bm);
  }
}

// out[g] += p[g][t] v[t] over t in [t0, t1) for GB heads (D = 16 NV), p = score * inv[g] (times vs[t]); each value
// row converted once for all of them, each head's sums in the one-head order (the same bits).
template <typename KV, int NV, int GB>
static inline void weigh_values(const float* sc, int64_t T, const float* inv, const KV* v, const float* vs, int64_t t0,
                                int64_t t1, float* out, KvAhead& ahead) {
  __m512 acc[GB][NV];
  for (int g = 0; g < GB; ++g)
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_loadu_ps(out + g * NV * 16 + 16 * i);
  for (int64_t t = t0; t < t1; ++t) {
    ahead.step();
    __m512 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = ld(v + t * NV * 16 + 16 * i);
    for (int g = 0; g < GB; ++g) {
      float pt = sc[g * T + t] * inv[g];
      if constexpr (kv_int8<KV>) pt *= vs[t];
      const __m512 p = _mm512_set1_ps(pt);
      for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_fmadd_ps(p, vv[i], acc[g][i]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + g * NV * 16 + 16 * i, acc[g][i]);
}

// A group's G heads in runs of at most `most` heads (as even as can be): how many runs, and f(g0, g1) per run.
constexpr int64_t kScoreRun = 3, kValueRun64 = 3, kValueRun128 = 2;  // heads a run (the registers they take)
static inline int64_t head_run_count(int64_t G, int64_t most) { return (G + most - 1) / most; }
template <typename F>
static inline void head_runs(int64_t G, int64_t most, F&& f) {
  const int64_t runs = head_run_count(G, most);
  for (int64_t r = 0; r < runs; ++r) f(r * G / runs, (r + 1) * G / runs);
}

// out[g] = softmax(q[g] . k[t] / sqrt(D), t = 0..T-1) @ v for G query heads (q and out: G rows of D) sharing
// one key/value head. The keys and values are read in blocks that stay in L1 while every head uses them,
// so a grouped-query head's cache is read from memory once, not once per query head; and (D = 64 for the
// scores, 64 or 128 for the values) loaded once for up to 3 (2) heads at a time (scores64, weigh_values). What
// bounds a batch's attention is reading the caches, not converting them: SmolLM2 (3 query heads a key head), 8
// decode rows after 200 positions, Xeon with AMX: a step 6.5 ms with or without the shared loads; with the next
// item asked for while this one computes (KvAhead) the profile's attention phase 2.5 -> 1.9 ms and the step
// 6.1-6.7 -> 5.5-5.8 ms (docs/decoding.md). Each head's numbers are the same as attending alone (the same bits).
// sc: G rows of T scores. ks, vs: an int8 cache's scales per position. `fetched`: this item's keys and values were
// asked for by the item before; kn, vn, Tn: the next item's (null: none), asked for while this one computes (D =
// 64 or 128); returns whether they were.
template <typename KV>
static bool attend(const float* q, const KV* k, const KV* v, const float* ks, const float* vs, int64_t T, int64_t D,
                   int64_t G, float* sc, float* out, bool fetched = false, const KV* kn = nullptr,
                   const KV* vn = nullptr, int64_t Tn = 0) {
  const float scale = 1.f / std::sqrt(float(D));
  const int64_t block = std::max<int64_t>(16, 16384 / D);  // positions per block: 32 KB of float16 keys
  float mx[32], inv[32];  // G <= 32 (the engine refuses larger groups)
  if (!fetched) prefetch_kv(k, v, T, D);
  KvAhead ahead;
  const bool grouped = D == 64 || D == 128;
  if (grouped && kn) {  // the steps to come: a quad of positions per run of scores64, a position per run of values
    const int64_t score_steps = D == 64 ? head_run_count(G, kScoreRun) * (T / 4) : 0;
    const int64_t value_steps = head_run_count(G, D == 64 ? kValueRun64 : kValueRun128) * T;
    ahead.aim(kn, vn, Tn, D, score_steps + value_steps);
  }
  for (int64_t g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t t1 = std::min(T, t0 + block);
    if (D == 64) {
      head_runs(G, kScoreRun, [&](int64_t g0, int64_t g1) {
        const float* qg = q + g0 * D;
        float* s = sc + g0 * T;
        if (g1 - g0 == 3) scores64<KV, 3>(qg, k, ks, t0, t1, scale, s, T, mx + g0, ahead);
        else if (g1 - g0 == 2) scores64<KV, 2>(qg, k, ks, t0, t1, scale, s, T, mx + g0, ahead);
        else scores64<KV, 1>(qg, k, ks, t0, t1, scale, s, T, mx + g0, ahead);
      });
    } else {
      for (int64_t g = 0; g < G; ++g)
        mx[g] = std::max(mx[g], scores(q + g * D, k, ks, t0, t1, D, scale, sc + g * T));
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * T;
    __m512 sum = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(mx[g]);
    for (int64_t t = 0; t < T; t += 16) {
      const __mmask16 mk = tail_mask(T - t);
      const __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), m)));
      _mm512_mask_storeu_ps(s + t, mk, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  const int64_t nv = D / 16;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(out + g * D + 16 * i, _mm512_setzero_ps());
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t t1 = std::min(T, t0 + block);
    if (D == 64 || D == 128) {
      head_runs(G, D == 64 ? kValueRun64 : kValueRun128, [&](int64_t g0, int64_t g1) {
        const float* s = sc + g0 * T;
        float* o = out + g0 * D;
        const int64_t n = g1 - g0;
        if (D == 64 && n == 3) weigh_values<KV, 4, 3>(s, T, inv + g0, v, vs, t0, t1, o, ahead);
        else if (D == 64 && n == 2) weigh_values<KV, 4, 2>(s, T, inv + g0, v, vs, t0, t1, o, ahead);
        else if (D == 64) weigh_values<KV, 4, 1>(s, T, inv + g0, v, vs, t0, t1, o, ahead);
        else if (n == 2) weigh_values<KV, 8, 2>(s, T, inv + g0, v, vs, t0, t1, o, ahead);
        else weigh_values<KV, 8, 1>(s, T, inv + g0, v, vs, t0, t1, o, ahead);
      });
      continue;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* s = sc + g * T;
      __m512 acc[16];
      for (int64_t i = 0; i < nv; ++i) acc[i] = _mm512_loadu_ps(out + g * D + 16 * i);
      for (int64_t t = t0; t < t1; ++t) {
        float pt = s[t] * inv[g];
        if constexpr (kv_int8<KV>) pt *= vs[t];
        const __m512 p = _mm512_set1_ps(pt);
        for (int64_t i = 0; i < nv; ++i) acc[i] = _mm512_fmadd_ps(p, ld(v + t * D + 16 * i), acc[i]);
      }
      for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(out + g * D + 16 * i, acc[i]);
    }
  }
  ahead.per = 2 * ahead.bytes;  // whatever the steps left (integer rounding) goes now
  ahead.step();
  return grouped && kn;
}
#endif

}  // namespace optistack_cpu
