// A build for tuning the engine (OPTISTACK_ENGINE_PROFILE=1, kernels/cpu.py): llama_decode.cpp's run() marks the
// end of each phase of a layer (PHASE(i), thread 0's clock) and prints ms a call per phase every 20 calls. In any
// other build the marks are empty. Included by llama_decode.cpp alone.
#pragma once
#ifdef OPTISTACK_ENGINE_PROFILE
#include <omp.h>

#include <algorithm>
#include <cstdio>

namespace optistack_cpu {
static double prof_ms[16];
static int prof_calls;

inline void profile_call_done(double start, long long rows) {
  prof_ms[15] += (omp_get_wtime() - start) * 1e3;
  if (++prof_calls % 20 == 0) {
    static const char* names[] = {"norm1", "qkv", "rope+kv", "attention", "o", "norm2", "gate_up", "swiglu", "down",
                                  "head"};
    fprintf(stderr, "engine profile, ms a call over the last %d calls:", prof_calls);
    for (int i = 0; i < 10; ++i) fprintf(stderr, " %s %.2f", names[i], prof_ms[i] / prof_calls);
    fprintf(stderr, " | total %.2f (%lld rows)\n", prof_ms[15] / prof_calls, rows);
    std::fill(prof_ms, prof_ms + 16, 0.0);  // each line is its own 20 calls
    prof_calls = 0;
  }
}
}  // namespace optistack_cpu

#define PROFILE_START() double prof_last = omp_get_wtime(), prof_start = prof_last
#define PHASE(i)                            \
  if (tid == 0) {                           \
    const double now = omp_get_wtime();     \
    prof_ms[i] += (now - prof_last) * 1e3;  \
    prof_last = now;                        \
  }
#define PROFILE_CALL(rows) profile_call_done(prof_start, (long long)(rows))
#else
#define PROFILE_START()
#define PHASE(i)
#define PROFILE_CALL(rows)
#endif
