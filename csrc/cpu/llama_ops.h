// The per-row operations of the serving engine (llama_decode.cpp): RMSNorm, RoPE, the cache's loads, stores and
// prefetch (a decode row's attention over it: llama_attn_rows.h), SwiGLU, and how rows of a matrix are shared among threads. AVX-512 only (the engine
// needs VNNI); included by llama_decode.cpp alone.
#pragma once
#include <ATen/ATen.h>

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#include "llama_team.h"
#include "simd.h"

namespace optistack_cpu {

// The threads of one engine call meet here between phases (about ten times a layer). Why not `omp barrier`:
// libgomp spins at a barrier only while the process has no more OpenMP threads than CPUs, and every thread
// that runs a parallel region keeps a team of its own, so a serving thread beside the main thread's idle
// team made every barrier a futex sleep and wake: 13.9 ms a SmolLM2 decode step instead of 4.1 (measured,
// 2 cores). This one spins with pause (a quiet machine's waits are microseconds), then yields, and only
// then sleeps on a futex: when other processes hold the cores, a thread waiting for a descheduled partner
// must give its core away, or each barrier costs scheduler quanta (measured under load 4 on 2 cores: about
// a second a SmolLM2 token with spinning and yielding alone).
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    const int phase = phase_.load();
    if (count_.fetch_add(1) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1);  // sequentially consistent with the sleepers' count: no wake is lost
      if (sleepers_.load() > 0) futex(FUTEX_WAKE_PRIVATE, INT_MAX);
      return;
    }
    // A wait past kTimed pauses counts, spinning and yielding, as time on the CPU that did no work (llama_team.h);
    // the short ones, most of a quiet machine's, are not timed (two TSC reads each, ~300 waits a token).
    constexpr int kTimed = 256;
    uint64_t t = 0;
    int spins = 0;
    for (; phase_.load(std::memory_order_acquire) == phase; ++spins) {
      if (spins < 20000) {
        if (spins == kTimed) t = __rdtsc();
        _mm_pause();
      } else if (spins < 20064) {
        sched_yield();
      } else {
        spin_ticks += __rdtsc() - t;
        sleepers_.fetch_add(1);
        while (phase_.load() == phase) futex(FUTEX_WAIT_PRIVATE, phase);  // returns at once if phase moved
        sleepers_.fetch_sub(1);
        return;
      }
    }
    if (spins > kTimed) spin_ticks += __rdtsc() - t;
  }

 private:
  void futex(int op, int val) {
    syscall(SYS_futex, reinterpret_cast<int*>(&phase_), op, val, nullptr, nullptr, 0);
  }
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> phase_{0};
  std::atomic<int> sleepers_{0};
};
static_assert(sizeof(std::atomic<int>) == sizeof(int), "the futex word is the atomic's int");

#if defined(OPTISTACK_AVX512) && defined(__AVX512VNNI__)
static void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load16(x + i, tail_mask(n - i));
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / float(n) + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store16(y + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i, m), r), load16(w + i, m)), m);
  }
}

static void rope(float* v, const float* c, const float* s, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; i += 16) {
    const __m512 a = _mm512_loadu_ps(v + i), b = _mm512_loadu_ps(v + h + i);
    const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
    _mm512_storeu_ps(v + i, _mm512_fmsub_ps(a, cv, _mm512_mul_ps(b, sv)));
    _mm512_storeu_ps(v + h + i, _mm512_fmadd_ps(b, cv, _mm512_mul_ps(a, sv)));
  }
}

// 16 cache values as float32: the cache is float32, float16 (the int8-activation engine's default), or int8
// codes whose scale per position the caller applies.
template <typename KV>
constexpr bool kv_int8 = std::is_same<KV, int8_t>::value;
static inline __m512 ld(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline __m512 ld(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline void st(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void st(at::Half* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// One key or value (D floats) into the cache at dst; an int8 cache also stores its scale (largest magnitude
// / 127; codes round half to even, as torch.round does, so a cache filled from Python holds the same bytes).
static inline void put(float* dst, float*, const float* x, int64_t D) {
  for (int64_t i = 0; i < D; i += 16) st(dst + i, _mm512_loadu_ps(x + i));
}
static inline void put(at::Half* dst, float*, const float* x, int64_t D) {
  for (int64_t i = 0; i < D; i += 16) st(dst + i, _mm512_loadu_ps(x + i));
}
static inline void put(int8_t* dst, float* scale, const float* x, int64_t D) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  const float s = _mm512_reduce_max_ps(mx) / 127.f;
  *scale = s;
  const __m512 sv = _mm512_set1_ps(s > 0.f ? s : 1.f);
  for (int64_t i = 0; i < D; i += 16) {
    const __m512i q = _mm512_cvt_roundps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + i), sv),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128((__m128i*)(dst + i), _mm512_cvtsepi32_epi8(q));
  }
}

// Asks for the keys and values [0, T) of one slot's head in L2 before attending to them (up to 256 KB each;
// past that the hardware prefetcher has its streams going). Why: a decode row's keys are a few short streams,
// read once a step from a cache that by then sits in L3 or memory, and the prefetcher restarts at every 4 KB
// page: measured on SmolLM2 (Xeon with AMX, 2 threads, 8 rows), the attention of a step took 2.9 -> 2.3 ms at
// 160 positions and 6.9 -> 5.8 ms at 420 with it.
template <typename KV>
static inline void prefetch_kv(const KV* k, const KV* v, int64_t T, int64_t D) {
  const char* kp = reinterpret_cast<const char*>(k);
  const char* vp = reinterpret_cast<const char*>(v);
  const int64_t bytes = std::min<int64_t>(T * D * int64_t(sizeof(KV)), 256 * 1024);
  for (int64_t o = 0; o < bytes; o += 64) {
    _mm_prefetch(kp + o, _MM_HINT_T1);
    _mm_prefetch(vp + o, _MM_HINT_T1);
  }
}

static void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 g = load16(gate + i, m);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    store16(out + i, _mm512_mul_ps(_mm512_mul_ps(g, recip16(_mm512_add_ps(one, e))), load16(up + i, m)), m);
  }
}

// Token `tok`'s embedding row into x [H]: a float32 table's row as it is, an int8 one's codes times the row's
// scale (float32 products, as the model's Int8Embedding computes them).
static inline void embed_row(const float* embed, const int8_t* embed_q, const float* embed_s, int64_t tok, int64_t H,
                             float* x) {
  if (embed_q) {
    const int8_t* e = embed_q + tok * H;
    const float s = embed_s[tok];
    for (int64_t k = 0; k < H; ++k) x[k] = float(e[k]) * s;
  } else {
    std::copy(embed + tok * H, embed + (tok + 1) * H, x);
  }
}

// [n0, n1) of N rows for thread tid of nt, in multiples of `align`.
static inline void share(int64_t N, int tid, int nt, int64_t align, int64_t& n0, int64_t& n1) {
  const int64_t per = ((N + nt - 1) / nt + align - 1) / align * align;
  n0 = std::min(N, tid * per);
  n1 = std::min(N, n0 + per);
}
#endif

}  // namespace optistack_cpu
