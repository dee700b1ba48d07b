// The serving engine's construction (every size and pointer it trusts checked here), its scratch space and
// its per-slot lengths; the forward itself is in llama_decode.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>

#include "int4_panel.h"
#include "llama_decode.h"

namespace optistack_cpu {


static const float* f32(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.defined() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "optistack_cpu.LlamaEngine: ", what, " must be a contiguous float32 tensor of ", numel, " values");
  return t.data_ptr<float>();
}

Q4Weight q4_weight(const Q4Proj& p, int64_t N, int64_t K, const char* what, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(K % 64 == 0, "optistack_cpu.LlamaEngine: ", what, " needs K a multiple of 64, got ", K);
  TORCH_CHECK(p.q.defined() && p.q.scalar_type() == at::kByte && p.q.is_contiguous() && p.q.numel() == N * K / 2,
              "optistack_cpu.LlamaEngine: ", what, " codes must be contiguous uint8 [", N, ", ", K / 2, "]");
  Q4Weight w;
  w.q = p.q.data_ptr<uint8_t>();
  if (p.s.defined() && p.s.scalar_type() == at::kHalf) {
    TORCH_CHECK(p.zc.defined() && p.zc.scalar_type() == at::kHalf && p.s.is_contiguous() && p.zc.is_contiguous() &&
                    p.s.numel() == N * K / 64 && p.zc.numel() == N * K / 64,
                "optistack_cpu.LlamaEngine: ", what, " scales and zc must both be contiguous float16 (or both float32) "
                "tensors of ", N * K / 64, " values");
    w.s16 = reinterpret_cast<const uint16_t*>(p.s.data_ptr<at::Half>());
    w.zc16 = reinterpret_cast<const uint16_t*>(p.zc.data_ptr<at::Half>());
  } else {
    w.s = f32(p.s, N * K / 64, what);
    w.zc = f32(p.zc, N * K / 64, what);
  }
  w.bias = p.bias.defined() && p.bias.numel() ? f32(p.bias, N, (std::string(what) + " bias").c_str()) : nullptr;
  w.N = N;
  w.K = K;
  if (p.pq.defined() && p.pq.numel()) {
    TORCH_CHECK(N % 16 == 0 && p.pq.scalar_type() == at::kByte && p.pq.is_contiguous() && p.pq.numel() == N * K / 2 &&
                    p.pf.defined() && p.pf.scalar_type() == at::kFloat && p.pf.is_contiguous() &&
                    p.pf.numel() == 2 * N * K / 64,
                "optistack_cpu.LlamaEngine: ", what, " panels must be contiguous uint8 codes of ", N * K / 2,
                " bytes and float32 scales and zc of ", 2 * N * K / 64, " values, for N (", N, ") a multiple of 16 "
                "(optistack_cpu.q4_panels makes them)");
    w.pq = p.pq.data_ptr<uint8_t>();
    w.ps = p.pf.data_ptr<float>();
    w.pzc = w.ps + N * K / 64;
    keep.push_back(p.pq);
    keep.push_back(p.pf);
  }
  for (const at::Tensor* t : {&p.q, &p.s, &p.zc, &p.bias})
    if (t->defined()) keep.push_back(*t);
  return w;
}

LlamaEngine::LlamaEngine(const EngineSpec& spec, at::Tensor cos_t, at::Tensor sin_t, at::Tensor k_cache,
                         at::Tensor v_cache, at::Tensor k_scale, at::Tensor v_scale, int64_t act_bits,
                         int64_t max_rows) {
  TORCH_CHECK(llama_engine_supported(), "optistack_cpu.LlamaEngine: this build has no AVX512-VNNI");
  L = int64_t(spec.layers.size()); H = spec.hidden; Hq = spec.heads; Hkv = spec.kv_heads; D = spec.head_dim;
  I = spec.intermediate; V = spec.vocab;
  TORCH_CHECK(L >= 1 && H > 0 && I > 0 && V > 0, "optistack_cpu.LlamaEngine: needs >= 1 layer and positive sizes");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "optistack_cpu.LlamaEngine: act_bits must be 8 or 16, got ", act_bits);
  TORCH_CHECK(max_rows >= 1 && max_rows <= 65536, "optistack_cpu.LlamaEngine: max_rows must be 1..65536, got ", max_rows);
  act16 = act_bits == 16;
  Nmax = max_rows;
  eps = float(spec.eps);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= 32 && D % 32 == 0 && D <= 256,
              "optistack_cpu.LlamaEngine: needs Hq a multiple of Hkv (at most 32 query heads a key/value head) and a "
              "head size that is a multiple of 32 up to 256");
  if (spec.embed.defined() && spec.embed.scalar_type() == at::kChar) {  // int8 rows, one float32 scale each
    TORCH_CHECK(spec.embed.is_contiguous() && spec.embed.numel() == V * H,
                "optistack_cpu.LlamaEngine: an int8 embed must be contiguous [V, H] (", V, " x ", H, ")");
    embed_q = spec.embed.data_ptr<int8_t>();
    embed_s = f32(spec.embed_s, V, "embed_s (float32 [V], the int8 embedding's row scales)");
    keep.push_back(spec.embed_s);
  } else {
    embed = f32(spec.embed, V * H, "embed");
  }
  final_norm = f32(spec.final_norm, H, "final_norm");
  head_int4 = spec.head4.q.defined() && spec.head4.q.numel() > 0;
  if (head_int4) {  // an int4 head in the engine layout: head_q and head_s are not read (may be empty)
    head4w = q4_weight(spec.head4, V, H, "head4", keep);
    TORCH_CHECK(!head4w.bias, "optistack_cpu.LlamaEngine: the head has no bias");
  } else if (spec.head_f.defined() && spec.head_f.numel() > 0) {  // the model's own float32 head, read as it is
    head_f = f32(spec.head_f, V * H, "head_f (float32 [V, H], the model's own head)");
    keep.push_back(spec.head_f);
  } else {
    TORCH_CHECK(spec.head_q.defined() && spec.head_q.scalar_type() == at::kChar && spec.head_q.is_contiguous() &&
                    spec.head_q.numel() == V * H,
                "optistack_cpu.LlamaEngine: head_q must be contiguous int8 [V, H] (or head4 an int4 head, or head_f a float32 one)");
    head_q = spec.head_q.data_ptr<int8_t>();
    head_s = f32(spec.head_s, V, "head_s");
  }
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == L && k_cache.size(2) == Hkv && k_cache.size(4) == D &&
                  k_cache.size(1) >= 1 && k_cache.size(3) >= 1,
              "optistack_cpu.LlamaEngine: k_cache must be [L=", L, ", slots, Hkv=", Hkv, ", positions, D=", D, "]");
  S = k_cache.size(1);
  Tmax = k_cache.size(3);
  cos = f32(cos_t, Tmax * D / 2, "cos");
  sin = f32(sin_t, Tmax * D / 2, "sin");
  const at::ScalarType kt = k_cache.scalar_type();
  kv_type = kt == at::kChar ? KV_I8 : kt == at::kHalf ? KV_F16 : KV_F32;
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK((kt == at::kFloat || kt == at::kHalf || kt == at::kChar) && t->scalar_type() == kt &&
                    t->is_contiguous() && t->sizes() == k_cache.sizes(),
                "optistack_cpu.LlamaEngine: k_cache and v_cache must be contiguous float32, float16 or int8 tensors of "
                "one shape and dtype");
  kc = k_cache.data_ptr();
  vc = v_cache.data_ptr();
  if (kv_type == KV_I8) {
    TORCH_CHECK(D % 16 == 0, "optistack_cpu.LlamaEngine: an int8 cache needs a head size that is a multiple of 16");
    ks = const_cast<float*>(f32(k_scale, L * S * Hkv * Tmax, "k_scale (float32 [L, slots, Hkv, positions])"));
    vs = const_cast<float*>(f32(v_scale, L * S * Hkv * Tmax, "v_scale (float32 [L, slots, Hkv, positions])"));
    for (const at::Tensor* t : {&k_scale, &v_scale})
      TORCH_CHECK(t->dim() == 4 && t->size(0) == L && t->size(1) == S && t->size(2) == Hkv && t->size(3) == Tmax,
                  "optistack_cpu.LlamaEngine: k_scale and v_scale must be [L, slots, Hkv, positions] like the cache");
    keep.push_back(k_scale);
    keep.push_back(v_scale);
  }
  for (const at::Tensor& t : {spec.embed, spec.final_norm, spec.head_q, spec.head_s, cos_t, sin_t, k_cache, v_cache})
    if (t.defined()) keep.push_back(t);
  const int64_t Nqkv = (Hq + 2 * Hkv) * D;
  for (int64_t l = 0; l < L; ++l) {
    const EngineLayer& e = spec.layers[l];
    Layer y;
    y.norm1 = f32(e.norm1, H, "norm1");
    y.norm2 = f32(e.norm2, H, "norm2");
    y.rope = e.rope;
    keep.push_back(e.norm1);
    keep.push_back(e.norm2);
    if (e.q_norm.defined() && e.q_norm.numel()) {
      y.q_norm = f32(e.q_norm, D, "q_norm [head_dim]");
      keep.push_back(e.q_norm);
    }
    if (e.k_norm.defined() && e.k_norm.numel()) {
      y.k_norm = f32(e.k_norm, D, "k_norm [head_dim]");
      keep.push_back(e.k_norm);
    }
    y.qkv = q4_weight(e.qkv, Nqkv, H, "qkv", keep);
    y.o = q4_weight(e.o, H, Hq * D, "o_proj", keep);
    y.gate_up = q4_weight(e.gate_up, 2 * I, H, "gate_up", keep);
    y.down = q4_weight(e.down, H, I, "down_proj", keep);
    layers.push_back(y);
  }
  Kh = (H + 31) / 32 * 32;
  filled.assign(S, 0);
  amx_min = amx_supported() && !act16 ? 32 : 0;  // int16 activations (the exact mode) have no AMX product
  gemm_min = !amx_min && !act16 ? kGemmRows : 0;  // nor an int8 chunk GEMM
  for (const Layer& ly : layers)
    for (const Q4Weight* w : {&ly.qkv, &ly.o, &ly.gate_up, &ly.down}) has_panels |= w->pq != nullptr;
  TORCH_CHECK(!has_panels || !act16, "optistack_cpu.LlamaEngine: int16 activations (act_bits=16) do not read panels");
  panels_on = has_panels;
}

void LlamaEngine::set_gemm_rows(int64_t n) {
  std::lock_guard<std::mutex> g(mu);
  TORCH_CHECK(n >= 0, "optistack_cpu.LlamaEngine: gemm_rows must be >= 0 (0: never), got ", n);
  TORCH_CHECK(n == 0 || !act16, "optistack_cpu.LlamaEngine: int16 activations (act_bits=16) have no int8 chunk GEMM");
  gemm_min = n;
}

void LlamaEngine::set_panels(bool on) {
  std::lock_guard<std::mutex> g(mu);
  TORCH_CHECK(!on || has_panels, "optistack_cpu.LlamaEngine: this engine was built without panels (give each ",
              "projection's pq and pf: optistack_cpu.q4_panels)");
  panels_on = on;
}

void LlamaEngine::set_adaptive_threads(bool on) {
  std::lock_guard<std::mutex> g(mu);
  team.adaptive = on;
  team.cap = 0;
}

int64_t LlamaEngine::team_threads() {  // what the next call would run with, were it not a probe
  std::lock_guard<std::mutex> g(mu);
  return team.held(std::max(1, at::get_num_threads()));
}

double LlamaEngine::last_work_ratio() {
  std::lock_guard<std::mutex> g(mu);
  return team.last_work_ratio;
}

std::tuple<at::Tensor, at::Tensor> q4_panels(const at::Tensor& q, const at::Tensor& s, const at::Tensor& zc) {
  TORCH_CHECK(q.dim() == 2 && q.size(0) % 16 == 0 && q.size(0) > 0,
              "optistack_cpu.q4_panels: codes must be uint8 [N, K/2] with N a positive multiple of 16");
  std::vector<at::Tensor> keep;
  const int64_t N = q.size(0), K = q.size(1) * 2;
  const Q4Weight w = q4_weight(Q4Proj{q, s, zc, at::Tensor()}, N, K, "q4_panels' weight", keep);
  at::Tensor pq = at::empty({N * K / 2}, q.options()), pf = at::empty({2 * N * K / 64}, q.options().dtype(at::kFloat));
  q4_panel_pack(w, pq.data_ptr<uint8_t>(), pf.data_ptr<float>(), pf.data_ptr<float>() + N * K / 64);
  return {pq, pf};
}

void LlamaEngine::set_amx_rows(int64_t n) {
  std::lock_guard<std::mutex> g(mu);
  TORCH_CHECK(n >= 0, "optistack_cpu.LlamaEngine: amx_rows must be >= 0 (0: never), got ", n);
  TORCH_CHECK(n == 0 || amx_supported(), "optistack_cpu.LlamaEngine: this CPU (or this process) has no AMX tiles");
  TORCH_CHECK(n == 0 || !act16, "optistack_cpu.LlamaEngine: int16 activations (act_bits=16) have no AMX path");
  amx_min = n;
}

void LlamaEngine::set_amx_batch(int64_t n) {
  std::lock_guard<std::mutex> g(mu);
  TORCH_CHECK(n >= 0, "optistack_cpu.LlamaEngine: amx_batch must be >= 0 (0: never), got ", n);
  TORCH_CHECK(n == 0 || amx_supported(), "optistack_cpu.LlamaEngine: this CPU (or this process) has no AMX tiles");
  TORCH_CHECK(n == 0 || !act16, "optistack_cpu.LlamaEngine: int16 activations (act_bits=16) have no AMX path");
  amx_batch_min = n;
}

void LlamaEngine::ensure_scratch(int64_t N, int64_t R, int nthreads, int64_t amx_tiles, int64_t amx8_tiles, bool gemm) {
  const int64_t Kmax = std::max({H, Hq * D, I});
  if (nthreads > threads_cap) {  // attention scores per thread used: a row of Tmax per query head of a group,
    // or kChunkQueries rows of Tmax rounded up to 16 (a prompt chunk's item)
    scores.assign(size_t(nthreads) * scores_per_thread(), 0.f);
    threads_cap = nthreads;
  }
  // a slice of Kmax * 64 + 4096 + 64 bytes per thread: one weight tile dequantized and its products, or the chunk
  // GEMM's panel (Kmax / 64 units of kGemmPanelUnitBytes, and 64 bytes to align it)
  static_assert(64 * 64 >= kGemmPanelUnitBytes, "a unit of the chunk GEMM's panel outgrew its slice of amx_wbuf");
  if ((amx_tiles + amx8_tiles > 0 || gemm) && nthreads > wbuf_cap) {
    amx_wbuf.assign(size_t(nthreads) * (Kmax * 64 + 4096 + 64), 0);
    wbuf_cap = nthreads;
  }
  if (amx_tiles > 0 && attn_on_tiles() && nthreads > kv_tiles_cap) {
    kv_tiles_buf.assign(size_t(nthreads) * kv_tile_elems(Tmax, D), 0);
    kv_tiles_cap = nthreads;
  }
  if (amx_tiles > amx_cap) {  // the activation rows of the AMX runs as bf16 tiles
    amx_tiles_buf.assign(amx_tiles * (Kmax / 32) * 512, 0);
    amx_cap = amx_tiles;
  }
  if (amx_tiles > 0 && N > act_t_cap) {  // their MLP activations, transposed ([I][N] for a call of N rows)
    actT.assign(size_t(N) * I, 0.f);
    act_t_cap = N;
  }
  if (amx8_tiles > amx8_cap) {  // and as int8 tiles
    amx8_tiles_buf.assign(amx8_tiles * (Kmax / 64) * 1024, 0);
    amx8_sx.assign(amx8_tiles * (Kmax / 64) * 16, 0.f);
    amx8_xs.assign(amx8_tiles * (Kmax / 64) * 16, 0.f);
    amx8_cap = amx8_tiles;
  }
  if (R > lrows_cap) {
    q16.assign(R * Kh, 0);
    sx16.assign(R, 0.f);
    head8.assign(R * H + 64, 0);
    sx8.assign(R, 0.f);
    head8_tiles.assign((R + 15) / 16 * (H / 64 + 1) * 1024, 0);
    lrows_cap = R;
  }
  if (N <= rows_cap) return;
  const int64_t Nqkv = (Hq + 2 * Hkv) * D, U = Kmax / 64 + 1;
  x.assign(N * H, 0.f); xn.assign(N * H, 0.f); qkv.assign(N * Nqkv, 0.f); attn.assign(N * Hq * D, 0.f);
  gu.assign(N * 2 * I, 0.f); act.assign(N * I, 0.f);
  q8.assign(N * U * 64 + 64, 0); sxp.assign(N * U * 8 + 16, 0.f); sx.assign(N * U, 0.f); xsum.assign(N * U, 0.f);
  const bool q16_rows = act16 || head_int4;  // an int4 head takes int16 activations whatever act_bits is
  if (q16_rows) x16.assign(N * U * 64, 0);
  xq.clear();
  for (int64_t b = 0; b < N; ++b)
    xq.push_back(XQ{q8.data() + b * U * 64, sxp.data() + b * U * 8, sx.data() + b * U, xsum.data() + b * U,
                    q16_rows ? x16.data() + b * U * 64 : nullptr});
  rows_cap = N;
}

int64_t LlamaEngine::length(int64_t slot) {
  std::lock_guard<std::mutex> g(mu);
  TORCH_CHECK(slot >= 0 && slot < S, "optistack_cpu.LlamaEngine: slot ", slot, " outside 0..", S - 1);
  return filled[slot];
}

void LlamaEngine::set_length(int64_t slot, int64_t n) {
  std::lock_guard<std::mutex> g(mu);
  TORCH_CHECK(slot >= 0 && slot < S, "optistack_cpu.LlamaEngine: slot ", slot, " outside 0..", S - 1);
  TORCH_CHECK(n >= 0 && n <= Tmax, "optistack_cpu.LlamaEngine: length ", n, " outside 0..", Tmax);
  filled[slot] = n;
}

}  // namespace optistack_cpu
