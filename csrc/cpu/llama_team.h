// How many threads the serving engine's next call runs with (llama_decode.cpp), from how the last calls went.
//
// Why: a call is about ten barrier phases a layer, the work of each cut in equal shares, one per thread. When
// another process holds one of the cores, the thread that shares it is descheduled for whole scheduler slices
// and its partner waits for it at every barrier. Measured (AMD EPYC Zen 4, 2 cores, SmolLM2 through
// `generate()`, a CPU-bound process beside it): 30-56 tokens/s with 2 threads against 102-122 with 1 (on a quiet
// machine 2 threads are the faster; with this policy, 117-135: docs/decoding.md). So each call measures the
// work its threads did (their CPU time, less what they spent spinning at barriers), summed over a window of
// calls (kWindowNs: a decode call of a small model takes a fraction of a millisecond, a scheduler slice
// several, so most calls are untouched and a few stall); where one thread fewer would have done the work
// clearly sooner than it took, in two windows in a row (a quiet machine has single stalls of ~15 ms: a 1.1B
// model's 30 ms calls were judged held up by them when windows were 32 ms and one was enough), the next calls
// run one thread smaller. After a hold (kHoldNs of calls), a window of calls tries a thread more: kept if it
// runs unhindered, else the hold doubles (up to kMaxHoldNs), so a team under lasting contention spends one
// window in 160 on a probe. A row's result does not depend on the team's size (tested in tests/kernels), so
// this moves speed only. The state belongs to one engine and changes under its mutex; `adaptive` off gives
// every call the threads torch allows.
#pragma once
#include <time.h>
#include <x86intrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace optistack_cpu {

inline thread_local uint64_t spin_ticks = 0;  // TSC ticks this thread spent spinning at barriers

inline int64_t thread_cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

struct TeamPolicy {
  static constexpr double kWindowNs = 100e6;  // calls are judged together over at least this much wall time
  static constexpr double kHoldNs = 0.25e9, kMaxHoldNs = 16e9;  // at a smaller team before a probe (doubling)
  static constexpr double kMargin = 1.1;  // a smaller team must be this much faster by the estimate
  // Calls shorter than this on average keep the full team: a model so small that a call takes a fraction of a
  // millisecond (tests' tiny ones) ran 1.2-3.6x slower on one thread beside a busy process than on two, while
  // SmolLM2's 3-4 ms calls ran 2-5x faster (Zen 4, 2026-12-07)
  static constexpr double kMinCallNs = 1e6;
  std::atomic<int64_t> cpu_ns{0}, spun{0}, members{0};  // the call's threads: CPU time, spin ticks, count
  bool adaptive = true, probing = false;
  int cap = 0;  // 0: every thread torch allows
  int max_threads = 1, window_n = 0, strikes = 0;  // strikes: hindered windows in a row at full strength
  double hold = 0, backoff = kHoldNs, window_work = 0, window_wall = 0;  // ns
  int64_t window_calls = 0;
  uint64_t t0 = 0;
  std::chrono::steady_clock::time_point w0;
  double last_work_ratio = 0.0;  // the last call's work over its wall time: the threads it kept busy

  int held(int allowed) const {  // the team while not probing
    return adaptive && cap > 0 && cap < allowed ? cap : allowed;
  }
  int begin(int allowed) {  // the team for this call; starts its clocks
    max_threads = std::max(1, allowed);
    int n = held(max_threads);
    if (n < max_threads && probing) n += 1;
    else if (n == max_threads) cap = 0, probing = false;
    if (n != window_n) window_n = n, window_work = window_wall = 0, window_calls = 0;  // one team size a window
    cpu_ns = spun = members = 0;
    w0 = std::chrono::steady_clock::now();
    t0 = __rdtsc();
    return n;
  }
  void finish() {
    const double ticks = double(std::max<uint64_t>(1, __rdtsc() - t0));
    const double wall = double(std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                        std::chrono::steady_clock::now() - w0).count()));
    const double work = std::max(0.0, double(cpu_ns.load()) - double(spun.load()) * wall / ticks);
    const int n = int(members.load());
    last_work_ratio = work / wall;
    if (!adaptive || n < 1) return;
    if (cap > 0 && !probing && (hold -= wall) <= 0) {  // held long enough: the next calls try a thread more
      probing = true;
      return;
    }
    if (n == 1) return;  // a team of one has nothing to measure
    window_work += work;
    window_wall += wall;
    window_calls += 1;
    if (window_wall < kWindowNs) return;
    const bool hindered = window_work / (n - 1) * kMargin < window_wall &&  // n - 1 threads: done clearly sooner
                          window_wall >= kMinCallNs * double(window_calls);
    window_work = window_wall = 0;
    window_calls = 0;
    strikes = hindered && cap == 0 && !probing ? strikes + 1 : 0;
    if (hindered && (cap > 0 || probing || strikes >= 2)) {  // one thread fewer for a while
      strikes = 0;
      cap = n - 1;
      probing = false;
      hold = backoff;
      backoff = std::min(2 * backoff, kMaxHoldNs);
    } else if (probing) {  // a probe that ran unhindered: keep the larger team
      cap = n >= max_threads ? 0 : n;
      probing = false;
      hold = backoff = kHoldNs;
    } else if (cap == 0) {
      backoff = kHoldNs;
    }
  }
};

// One per thread of a call (constructed first in the parallel region): adds its CPU time and spin to the policy.
struct TeamMember {
  TeamPolicy& team;
  const int64_t cpu0 = thread_cpu_ns();
  explicit TeamMember(TeamPolicy& t) : team(t) { spin_ticks = 0; }
  ~TeamMember() {
    team.cpu_ns += thread_cpu_ns() - cpu0;
    team.spun += int64_t(spin_ticks);
    team.members += 1;
  }
};

}  // namespace optistack_cpu
