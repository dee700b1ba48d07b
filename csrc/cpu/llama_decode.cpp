// The serving engine: a Llama-family forward over any set of (token, cache slot, position) rows in one
// call (every layer, attention over each row's own slot and the head), inside one OpenMP parallel region
// whose threads meet at barriers (no fork/join per op, no Python, no guards).
//
// Why: the compiled PyTorch decode step of SmolLM2-135M (int4 body, int8 head) took ~12 ms a token on 2 cores while its
// ~85 MB of weights stream in ~2-3 ms: per-call guard checks (~1.4 ms), a fork/join per kernel (210 of them), attention
// over every slot of a static cache, and int4 dot products that split float32 activations into two bfloat16 halves.
// Rows are independent requests (continuous batching: each has its own slot and position), prompt chunks, or draft
// tokens to verify; every weight block is read once per call for all rows. Semantics are those of transformers'
// LlamaForCausalLM in float32 (RMSNorm, RoPE with the model's own cos/sin tables, grouped-query attention, SwiGLU), with
// int8 (or int16) activations for the int4 projections (int4_q8_gemv.cpp), int16 ones for the int8 head (int8_gemm.cpp).
#include "llama_decode.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>

#include "int4_panel.h"
#include "llama_attn_amx.h"
#include "llama_attn_chunk.h"
#include "llama_attn_rows.h"
#include "llama_profile.h"
#include "llama_ops.h"
#include "simd.h"

namespace optistack_cpu {

static at::Tensor long1d(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined() && t.dim() == 1, "optistack_cpu.LlamaEngine: ", what, " must be a 1-D integer tensor");
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()),
              "optistack_cpu.LlamaEngine: ", what, " must hold integers, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

at::Tensor LlamaEngine::forward(const at::Tensor& tokens_in, const at::Tensor& slots_in, const at::Tensor& pos_in,
                                const at::Tensor& lrows_in) {
  at::Tensor tokens = long1d(tokens_in, "tokens"), slots_t = long1d(slots_in, "slots");
  at::Tensor pos_t = long1d(pos_in, "positions"), lrows_t = long1d(lrows_in, "logit_rows");
  const int64_t N = tokens.numel(), R = lrows_t.numel();
  TORCH_CHECK(N >= 1 && N <= Nmax, "optistack_cpu.LlamaEngine: ", N, " rows outside 1..", Nmax);
  TORCH_CHECK(slots_t.numel() == N && pos_t.numel() == N, "optistack_cpu.LlamaEngine: tokens, slots and positions "
              "must have one value per row (", N, "), got ", slots_t.numel(), " slots and ", pos_t.numel(), " positions");
  const int64_t *tok = tokens.data_ptr<int64_t>(), *slot = slots_t.data_ptr<int64_t>(), *pos = pos_t.data_ptr<int64_t>();
  const int64_t* lrows = lrows_t.data_ptr<int64_t>();
  TORCH_CHECK(R <= N, "optistack_cpu.LlamaEngine: ", R, " logit rows for ", N, " rows");
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(lrows[i] >= 0 && lrows[i] < N, "optistack_cpu.LlamaEngine: logit row ", lrows[i], " outside 0..", N - 1);
  at::Tensor logits = at::empty({R, V}, at::kFloat);
  std::lock_guard<std::mutex> g(mu);
  std::vector<char> seen(S, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(tok[i] >= 0 && tok[i] < V, "optistack_cpu.LlamaEngine: token id ", tok[i], " outside 0..", V - 1);
    TORCH_CHECK(slot[i] >= 0 && slot[i] < S, "optistack_cpu.LlamaEngine: slot ", slot[i], " outside 0..", S - 1);
    TORCH_CHECK(pos[i] >= 0 && pos[i] < Tmax, "optistack_cpu.LlamaEngine: position ", pos[i], " outside 0..", Tmax - 1);
    if (i > 0 && slot[i] == slot[i - 1]) {
      TORCH_CHECK(pos[i] == pos[i - 1] + 1, "optistack_cpu.LlamaEngine: row ", i, " of slot ", slot[i], " is at position ",
                  pos[i], "; a slot's rows need consecutive positions (", pos[i - 1] + 1, " expected)");
      continue;
    }
    TORCH_CHECK(!seen[slot[i]], "optistack_cpu.LlamaEngine: slot ", slot[i], "'s rows are not adjacent (row ", i, ")");
    seen[slot[i]] = 1;
    TORCH_CHECK(pos[i] <= filled[slot[i]], "optistack_cpu.LlamaEngine: row ", i, " starts slot ", slot[i], " at position ",
                pos[i], " but only ", filled[slot[i]], " positions are filled (no gaps)");
  }
  // Runs of rows by GEMM path: a slot's rows go to AMX bf16 tiles when there are at least amx_min of them, else
  // to the int8 chunk GEMM from gemm_min; with amx_batch, a run of other rows (a batch of decode rows) at least
  // that long goes to AMX int8 tiles.
  std::vector<Run> runs;
  for (int64_t i = 0; i < N;) {
    int64_t j = i + 1;
    while (j < N && slot[j] == slot[i]) ++j;
    const int path = amx_min > 0 && j - i >= amx_min ? AMX_BF16 : gemm_min > 0 && j - i >= gemm_min ? VNNI_GEMM : VNNI;
    if (!runs.empty() && runs.back().path == path) runs.back().len += j - i;  // a row's result never depends on its run
    else runs.push_back(Run{i, j - i, 0, path});
    i = j;
  }
  // With amx_batch on (a server's batches, where a row's numbers may depend on what shares its call), the other
  // rows of a call that has a chunk on bf16 tiles join it: the chunk's weight tiles are dequantized anyway, so a
  // few more rows cost a fraction of the pass over the weights they would make on their own (SmolLM2, 2 cores,
  // LoadGen Offline at max_batch 8: its 44 calls with prompt rows 1.60 -> 1.23-1.32 s).
  if (amx_batch_min > 0 && runs.size() > 1 &&
      std::any_of(runs.begin(), runs.end(), [](const Run& r) { return r.path == AMX_BF16; }))
    runs.assign(1, Run{0, N, 0, AMX_BF16});
  int64_t amx_tiles = 0, amx8_tiles = 0;
  bool gemm = false;
  row_path.assign(N, VNNI);
  for (Run& r : runs) {
    // a batch's decode rows on int8 tiles unless they read panels (faster: docs/decoding.md); the head takes tiles
    if (r.path == VNNI && amx_batch_min > 0 && r.len >= amx_batch_min && !panels_on) r.path = AMX_INT8;
    gemm |= r.path == VNNI_GEMM;
    int64_t& count = r.path == AMX_BF16 ? amx_tiles : amx8_tiles;
    if (r.path == AMX_BF16 || r.path == AMX_INT8) {
      r.tile0 = count;
      count += (r.len + 15) / 16;
    }
    std::fill(row_path.begin() + r.start, row_path.begin() + r.start + r.len, char(r.path));
  }
  // a slot's run of at least kChunkAttnRows rows (int8 activations) attends as a chunk, in items of rows that
  // share each key block (llama_attn_chunk.h); other rows one by one. A run on AMX bf16 tiles attends on the
  // tiles (llama_attn_amx.h), whose items convert their keys and values once: fewer, longer items, cut where
  // they hold equal shares of the causal scores (rows late in the prompt read more keys).
  const int nthreads = team.begin(at::get_num_threads());  // fewer where other processes held the last calls up
  row_chunk.assign(N, 0);
  chunk_items.clear();
  const int64_t item_rows = std::max<int64_t>(1, std::min<int64_t>(8, kChunkQueries / (Hq / Hkv)));
  for (int64_t i = 0; i < N && !act16;) {
    int64_t j = i + 1;
    while (j < N && slot[j] == slot[i]) ++j;
    if (j - i >= kChunkAttnRows) {
      std::fill(row_chunk.begin() + i, row_chunk.begin() + j, char(1));
      if (row_path[i] == AMX_BF16 && attn_on_tiles()) {
        const int64_t group = std::max<int64_t>(1, kTileQueries / (Hq / Hkv));
        const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((2 * nthreads + Hkv - 1) / Hkv, (j - i) / group));
        const double a = double(pos[i]), b = double(pos[i] + (j - i));
        int64_t start = i;
        for (int64_t k = 1; k <= parts; ++k) {
          int64_t end = j;
          if (k < parts) {  // rows [i, end) hold k / parts of sum(position + 1), in whole groups of rows
            const double cut = std::sqrt(a * a + (b * b - a * a) * double(k) / double(parts)) - a;
            end = std::min(j, i + std::max<int64_t>(1, int64_t(std::lround(cut / double(group)))) * group);
          }
          if (end <= start) continue;
          for (int64_t h = 0; h < Hkv; ++h) chunk_items.push_back(ChunkItem{start, end - start, h});
          start = end;
        }
      } else {
        for (int64_t b = i; b < j; b += item_rows)
          for (int64_t h = 0; h < Hkv; ++h) chunk_items.push_back(ChunkItem{b, std::min(item_rows, j - b), h});
      }
    }
    i = j;
  }
  ensure_scratch(N, R, nthreads, amx_tiles, amx8_tiles, gemm);
  float* lg = logits.data_ptr<float>();
  if (kv_type == KV_I8) run<int8_t>(tok, slot, pos, N, lrows, R, lg, nthreads, runs, amx_tiles, amx8_tiles, gemm);
  else if (kv_type == KV_F16) run<at::Half>(tok, slot, pos, N, lrows, R, lg, nthreads, runs, amx_tiles, amx8_tiles, gemm);
  else run<float>(tok, slot, pos, N, lrows, R, lg, nthreads, runs, amx_tiles, amx8_tiles, gemm);
  team.finish();
  for (int64_t i = 0; i < N; ++i)
    if (i + 1 == N || slot[i + 1] != slot[i]) filled[slot[i]] = pos[i] + 1;
  for (int64_t r = 0; r < R; ++r)  // a non-finite hidden state gives NaN logits, as the float model would
    if (sx16[r] < 0.f) logits[r].fill_(NAN);
  return logits;
}

#if defined(OPTISTACK_AVX512) && defined(__AVX512VNNI__)
template <typename KV>
void LlamaEngine::run(const int64_t* tok, const int64_t* slot, const int64_t* pos, int64_t N, const int64_t* lrows,
                      int64_t R, float* lg, int nthreads, const std::vector<Run>& runs, int64_t amx_tiles,
                      int64_t amx8_tiles, bool gemm) {
  const int64_t Nqkv = (Hq + 2 * Hkv) * D, grp = Hq / Hkv, half = D / 2;
  const int64_t Kmax = std::max({H, Hq * D, I});
  const int64_t parts = std::min<int64_t>(grp, std::max<int64_t>(1, (2 * nthreads + N * Hkv - 1) / (N * Hkv)));
  auto kv = [&](void* base, int64_t l, int64_t b, int64_t h) {
    return static_cast<KV*>(base) + (((l * S + b) * Hkv + h) * Tmax) * D;
  };
  auto scale = [&](float* base, int64_t l, int64_t b, int64_t h) {  // an int8 cache's scales (else null)
    return base ? base + ((l * S + b) * Hkv + h) * Tmax : nullptr;
  };
  // rows on AMX bf16 tiles take float activations; the others are quantized (VNNI and AMX int8 paths)
  auto prep = [&](int64_t b, const float* v, int64_t K) {
    if (row_path[b] != AMX_BF16) act16 ? prep_q16(v, K, xq[b]) : prep_q8(v, K, xq[b]);
  };
  PROFILE_START();
  // the team may be smaller than asked (OMP_THREAD_LIMIT, nesting): the barrier learns its size from the team
  std::atomic<SpinBarrier*> barrier{nullptr};
  alignas(64) unsigned char barrier_store[sizeof(SpinBarrier)];
#pragma omp parallel num_threads(nthreads)
  {
    TeamMember member(team);  // this thread's CPU time and spin, for the next call's team (llama_team.h)
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
    barrier.store(new (barrier_store) SpinBarrier(nt), std::memory_order_release);
    SpinBarrier& bar = *barrier.load(std::memory_order_acquire);
    float* sc = scores.data() + size_t(tid) * scores_per_thread();
    uint8_t* wbuf = amx_tiles + amx8_tiles || gemm ? amx_wbuf.data() + size_t(tid) * (Kmax * 64 + 4096 + 64) : nullptr;
    int64_t n0, n1;
    // y = rows @ w.T (+= with add) for every run of rows, after the rows were prepared (and a barrier):
    // AMX runs are packed into tiles first (all threads, from the float rows src), then each thread takes
    // its share of w's rows.
    // gate_up: AMX bf16 runs write silu(gate) * up transposed into actT (q4_swiglu_amx), the others gu;
    // down: AMX bf16 runs pack from actT (src_t).
    auto project = [&](const Q4Weight& w, const float* src, int64_t sstride, float* y, int64_t ystride, bool add,
                       bool gate_up = false, const float* src_t = nullptr) {
      const int64_t chunks = w.K / 32, U = w.K / 64;
      if (amx_tiles + amx8_tiles) {
        for (const Run& r : runs) {
          int64_t t0, t1;
          if (r.path == AMX_BF16) {
            share((r.len + 15) / 16 * chunks, tid, nt, 1, t0, t1);
            uint16_t* tiles = amx_tiles_buf.data() + r.tile0 * chunks * 512;
            if (src_t) amx_pack_t(src_t + r.start, N, r.len, w.K, t0, t1, tiles);
            else amx_pack(src + r.start * sstride, sstride, r.len, w.K, t0, t1, tiles);
          } else if (r.path == AMX_INT8) {
            share((r.len + 15) / 16 * U, tid, nt, 1, t0, t1);
            const int64_t t = r.tile0 * U;
            amx8_pack(xq.data() + r.start, r.len, w.K, t0, t1, amx8_tiles_buf.data() + t * 1024, amx8_sx.data() + t * 16,
                      amx8_xs.data() + t * 16);
          }
        }
        bar.wait();
      }
      for (const Run& r : runs) {
        if (gate_up && r.path == AMX_BF16) {
          share(I, tid, nt, 16, n0, n1);
          if (n0 < n1)
            q4_swiglu_amx(w, I, amx_tiles_buf.data() + r.tile0 * chunks * 512, r.len, n0, n1, actT.data() + r.start, N, wbuf);
          continue;
        }
        const bool panel = r.path == VNNI && panels_on && w.pq;  // int8 rows (no engine of int16 ones has panels)
        share(w.N, tid, nt, r.path == AMX_BF16 || r.path == VNNI_GEMM ? 32 : r.path == AMX_INT8 || panel ? 16 : 4, n0,
              n1);
        if (n0 >= n1) continue;
        float* yr = y + r.start * ystride;
        if (r.path == AMX_BF16) {
          q4_rows_amx(w, amx_tiles_buf.data() + r.tile0 * chunks * 512, r.len, n0, n1, yr, ystride, add, wbuf);
        } else if (r.path == AMX_INT8) {
          const int64_t t = r.tile0 * U;
          q4_rows_amx8(w, amx8_tiles_buf.data() + t * 1024, amx8_sx.data() + t * 16, amx8_xs.data() + t * 16, r.len,
                       n0, n1, yr, ystride, add, wbuf);
        } else if (r.path == VNNI_GEMM) {
          q4_rows_gemm(w, xq.data() + r.start, r.len, n0, n1, yr, ystride, add, wbuf);
        } else if (panel) {
          q4_rows_panel(w, xq.data() + r.start, r.len, n0, n1, yr, ystride, add);
        } else {
          q4_rows(w, xq.data() + r.start, r.len, n0, n1, yr, ystride, add, act16);
        }
      }
    };
    for (int64_t b = tid; b < N; b += nt) embed_row(embed, embed_q, embed_s, tok[b], H, x.data() + b * H);
    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers[l];
      for (int64_t b = tid; b < N; b += nt) {  // each row's owner: norm and quantize
        rms_norm(x.data() + b * H, ly.norm1, xn.data() + b * H, H, eps);
        prep(b, xn.data() + b * H, H);
      }
      bar.wait();
      PHASE(0);
      project(ly.qkv, xn.data(), H, qkv.data(), Nqkv, false);
      bar.wait();
      PHASE(1);
      for (int64_t j = tid; j < N * Hkv; j += nt) {  // RoPE on each new key at its row's position, both into its slot
        const int64_t b = j / Hkv, h = j % Hkv, p = pos[b];
        float* k = qkv.data() + b * Nqkv + (Hq + h) * D;
        if (ly.k_norm) rms_norm(k, ly.k_norm, k, D, eps);
        if (ly.rope) rope(k, cos + p * half, sin + p * half, D);
        float *ksp = scale(ks, l, slot[b], h), *vsp = scale(vs, l, slot[b], h);
        put(kv(kc, l, slot[b], h) + p * D, ksp ? ksp + p : nullptr, k, D);
        put(kv(vc, l, slot[b], h) + p * D, vsp ? vsp + p : nullptr, k + Hkv * D, D);
      }
      bar.wait();
      PHASE(2);
      // each row attends to its slot's positions 0..its own: one item is a row's query heads of one key/value
      // head (split in parts when there are fewer items than twice the threads, so none waits idle)
      bool fetched = false;  // this item's keys and values asked for by the one before (not after a chunk's row)
      for (int64_t j = tid; j < N * Hkv * parts; j += nt) {
        const int64_t b = j / (Hkv * parts), h = (j / parts) % Hkv, part = j % parts, p = pos[b];
        if (row_chunk[b]) continue;
        const int64_t jn = j + nt, bn = jn / (Hkv * parts), hn = (jn / parts) % Hkv;
        const bool next = jn < N * Hkv * parts && !row_chunk[bn];
        const int64_t g0 = part * grp / parts, g1 = (part + 1) * grp / parts;
        float* q = qkv.data() + b * Nqkv + (h * grp + g0) * D;
        for (int64_t g = 0; g < g1 - g0; ++g) {
          if (ly.q_norm) rms_norm(q + g * D, ly.q_norm, q + g * D, D, eps);
          if (ly.rope) rope(q + g * D, cos + p * half, sin + p * half, D);
        }
        fetched = attend(q, kv(kc, l, slot[b], h), kv(vc, l, slot[b], h), scale(ks, l, slot[b], h),
                         scale(vs, l, slot[b], h), p + 1, D, g1 - g0, sc, attn.data() + (b * Hq + h * grp + g0) * D,
                         fetched, next ? kv(kc, l, slot[bn], hn) : nullptr, next ? kv(vc, l, slot[bn], hn) : nullptr,
                         next ? pos[bn] + 1 : 0);
      }
      for (int64_t j = tid; j < int64_t(chunk_items.size()); j += nt) {  // prompt chunks: rows sharing each key block
        const ChunkItem& it = chunk_items[size_t(j)];
        float* q = qkv.data() + it.b0 * Nqkv + it.h * grp * D;
        for (int64_t i = 0; i < it.n; ++i)
          for (int64_t g = 0; g < grp; ++g) {
            const int64_t p = pos[it.b0 + i];
            if (ly.q_norm) rms_norm(q + i * Nqkv + g * D, ly.q_norm, q + i * Nqkv + g * D, D, eps);
            if (ly.rope) rope(q + i * Nqkv + g * D, cos + p * half, sin + p * half, D);
          }
        const int64_t b = it.b0, h = it.h;
#ifdef OPTISTACK_AMX_BUILD
        if (row_path[b] == AMX_BF16 && attn_on_tiles()) {  // rows on bf16 tiles: their attention too
          attend_chunk_amx(q, Nqkv, it.n, grp, pos[b], kv(kc, l, slot[b], h), kv(vc, l, slot[b], h),
                           scale(ks, l, slot[b], h), scale(vs, l, slot[b], h), D, sc, attn.data() + (b * Hq + h * grp) * D,
                           Hq * D, kv_tiles_buf.data() + size_t(tid) * kv_tile_elems(Tmax, D));
          continue;
        }
#endif
        attend_chunk(q, Nqkv, it.n, grp, pos[b], kv(kc, l, slot[b], h), kv(vc, l, slot[b], h), scale(ks, l, slot[b], h),
                     scale(vs, l, slot[b], h), D, sc, attn.data() + (b * Hq + h * grp) * D, Hq * D);
      }
      bar.wait();
      PHASE(3);
      for (int64_t b = tid; b < N; b += nt) prep(b, attn.data() + b * Hq * D, Hq * D);
      bar.wait();
      project(ly.o, attn.data(), Hq * D, x.data(), H, true);  // the residual add, in place
      bar.wait();
      PHASE(4);
      for (int64_t b = tid; b < N; b += nt) {
        rms_norm(x.data() + b * H, ly.norm2, xn.data() + b * H, H, eps);
        prep(b, xn.data() + b * H, H);
      }
      bar.wait();
      PHASE(5);
      project(ly.gate_up, xn.data(), H, gu.data(), 2 * I, false, true);
      bar.wait();
      PHASE(6);
      for (int64_t b = tid; b < N; b += nt) {
        if (row_path[b] == AMX_BF16) continue;  // already in actT
        swiglu(gu.data() + b * 2 * I, gu.data() + b * 2 * I + I, act.data() + b * I, I);
        prep(b, act.data() + b * I, I);
      }
      bar.wait();
      PHASE(7);
      project(ly.down, act.data(), I, x.data(), H, true, false, amx_tiles ? actT.data() : nullptr);
      bar.wait();
      PHASE(8);
    }
    // the head, for the rows whose logits were asked for: int16 activations on VNNI, or, for a batch of at
    // least amx_batch rows, int8 ones on AMX tiles (the 16 x ... weight rows past the last multiple of 16 on VNNI)
    // (an int4 head: the projections' VNNI rows with int16 activations; a float32 head: float32 products)
    const bool head_amx = !head_int4 && !head_f && amx_batch_min > 0 && R >= amx_batch_min && H % 64 == 0 && V >= 16;
    for (int64_t r = tid; r < R; r += nt) {  // sx16[r] < 0 marks a row with inf/NaN (its logits become NaN)
      rms_norm(x.data() + lrows[r] * H, final_norm, xn.data() + r * H, H, eps);
      if (head_f || head_int4) {  // a float32 head reads xn as it is
        const float* v = xn.data() + r * H;
        bool finite = true;
        for (int64_t k = 0; k < H; ++k) finite &= std::isfinite(v[k]);
        sx16[r] = finite ? 0.f : -1.f;
        if (finite && head_int4) prep_q16(v, H, xq[r]);  // a non-finite row's logits become NaN below, whatever its codes
      } else if (head_amx) {
        sx8[r] = quantize_i8_row(xn.data() + r * H, H, head8.data() + r * H);
        sx16[r] = sx8[r] < 0.f ? -1.f : 0.f;
      } else {
        sx16[r] = int8_quantize_f32(xn.data() + r * H, H, Kh, q16.data() + r * Kh);
      }
    }
    bar.wait();
    if (head_f) {
      share(V, tid, nt, 16, n0, n1);
      if (n0 < n1 && R > 0) float_rows_f32(head_f, H, xn.data(), R, n0, n1, lg, V);
    } else if (head_int4) {
      share(V, tid, nt, 4, n0, n1);
      if (n0 < n1 && R > 0) q4_rows(head4w, xq.data(), R, n0, n1, lg, V, false, true);
    } else if (head_amx) {
      int64_t t0, t1;
      share((R + 15) / 16 * (H / 64), tid, nt, 1, t0, t1);
      amx8_pack_rows(head8.data(), H, R, H, t0, t1, head8_tiles.data());
      bar.wait();
      share(V / 16 * 16, tid, nt, 16, n0, n1);
      if (n0 < n1) head_amx8(head_q, head_s, H, head8_tiles.data(), sx8.data(), R, n0, n1, lg, V);
      for (int64_t n = V / 16 * 16 + tid; n < V; n += nt)  // the last V % 16 rows: the same int8 products
        for (int64_t m = 0; m < R; ++m) {
          int32_t d = 0;
          for (int64_t k = 0; k < H; ++k) d += int32_t(head_q[n * H + k]) * int32_t(head8[m * H + k]);
          lg[m * V + n] = float(d) * (head_s[n] * sx8[m]);
        }
    } else {
      share(V, tid, nt, 64, n0, n1);
      if (n0 < n1 && R > 0) int8_rows_f32(head_q, head_s, H, q16.data(), Kh, sx16.data(), R, n0, n1, lg, V);
    }
    bar.wait();
    PHASE(9);
  }
  PROFILE_CALL(N);
}
#else
template <typename KV>
void LlamaEngine::run(const int64_t*, const int64_t*, const int64_t*, int64_t, const int64_t*, int64_t, float*, int,
                      const std::vector<Run>&, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "optistack_cpu.LlamaEngine: this build has no AVX512-VNNI");
}
#endif

}  // namespace optistack_cpu
