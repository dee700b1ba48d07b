// A whole Llama-family decode step in one call: every layer, attention over the filled cache slots
// and the head, inside one OpenMP parallel region whose threads meet at barriers (no fork/join per op,
// no Python, no guards).
//
// Why: the compiled PyTorch decode step of SmolLM2-135M (int4 body, int8 head) took ~12 ms a token on
// 2 cores while its ~85 MB of weights stream in ~2-3 ms: per-call guard checks (~1.4 ms), a fork/join
// per kernel (210 of them), attention over every slot of a static cache, and int4 dot products that
// split float32 activations into two bfloat16 halves. Semantics are those of transformers'
// LlamaForCausalLM in float32 (RMSNorm, RoPE with the model's own cos/sin tables, grouped-query
// attention, SwiGLU), with int8 activations for the int4 projections (int4_q8_gemv.cpp) and int16
// ones for the int8 head (int8_gemm.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "llama_decode.h"
#include "simd.h"

namespace optistack_cpu {

static const float* f32(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "optistack_cpu.LlamaEngine: ", what, " must be a contiguous float32 tensor of ", numel, " values");
  return t.data_ptr<float>();
}

static Q4Weight q4(const std::vector<at::Tensor>& t, size_t i, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(K % 64 == 0, "optistack_cpu.LlamaEngine: ", what, " needs K a multiple of 64, got ", K);
  const at::Tensor& q = t[i];
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.numel() == N * K / 2,
              "optistack_cpu.LlamaEngine: ", what, " codes must be contiguous uint8 [", N, ", ", K / 2, "]");
  Q4Weight w;
  w.q = q.data_ptr<uint8_t>();
  w.s = f32(t[i + 1], N * K / 64, what);
  w.zc = f32(t[i + 2], N * K / 64, what);
  w.bias = t[i + 3].numel() ? f32(t[i + 3], N, what) : nullptr;
  w.N = N;
  w.K = K;
  return w;
}

LlamaEngine::LlamaEngine(std::vector<int64_t> dims, double eps_, std::vector<at::Tensor> t) : keep(t) {
  TORCH_CHECK(llama_engine_supported(), "optistack_cpu.LlamaEngine: this build has no AVX512-VNNI");
  TORCH_CHECK(dims.size() == 10, "optistack_cpu.LlamaEngine: dims are L, H, Hq, Hkv, D, I, V, Bmax, Tmax, act_bits");
  L = dims[0]; H = dims[1]; Hq = dims[2]; Hkv = dims[3]; D = dims[4]; I = dims[5]; V = dims[6];
  Bmax = dims[7]; Tmax = dims[8];
  TORCH_CHECK(dims[9] == 8 || dims[9] == 16, "optistack_cpu.LlamaEngine: act_bits must be 8 or 16, got ", dims[9]);
  act16 = dims[9] == 16;
  eps = float(eps_);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && D % 32 == 0 && D <= 256,
              "optistack_cpu.LlamaEngine: needs Hq a multiple of Hkv and a head size that is a multiple of 32 up to 256");
  TORCH_CHECK(t.size() == size_t(8 + 18 * L), "optistack_cpu.LlamaEngine: expected ", 8 + 18 * L, " tensors");
  embed = f32(t[0], V * H, "embed");
  final_norm = f32(t[1], H, "final_norm");
  TORCH_CHECK(t[2].scalar_type() == at::kChar && t[2].is_contiguous() && t[2].numel() == V * H,
              "optistack_cpu.LlamaEngine: head_q must be contiguous int8 [V, H]");
  head_q = t[2].data_ptr<int8_t>();
  head_s = f32(t[3], V, "head_s");
  cos = f32(t[4], Tmax * D / 2, "cos");
  sin = f32(t[5], Tmax * D / 2, "sin");
  const int64_t cache_numel = L * Bmax * Hkv * Tmax * D;
  kv16 = t[6].scalar_type() == at::kHalf;
  for (int i : {6, 7})
    TORCH_CHECK((t[i].scalar_type() == at::kFloat || t[i].scalar_type() == at::kHalf) &&
                    t[i].scalar_type() == t[6].scalar_type() && t[i].is_contiguous() && t[i].numel() == cache_numel,
                "optistack_cpu.LlamaEngine: k_cache and v_cache must be contiguous float32 or float16 tensors of ",
                cache_numel, " values, both of one dtype");
  kc = t[6].data_ptr();
  vc = t[7].data_ptr();
  const int64_t Nqkv = (Hq + 2 * Hkv) * D;
  for (int64_t l = 0; l < L; ++l) {
    const size_t b = 8 + 18 * l;
    Layer y;
    y.norm1 = f32(t[b], H, "norm1");
    y.norm2 = f32(t[b + 1], H, "norm2");
    y.qkv = q4(t, b + 2, Nqkv, H, "qkv");
    y.o = q4(t, b + 6, H, Hq * D, "o_proj");
    y.gate_up = q4(t, b + 10, 2 * I, H, "gate_up");
    y.down = q4(t, b + 14, H, I, "down_proj");
    layers.push_back(y);
  }
  Kh = (H + 31) / 32 * 32;
  const int64_t Kmax = std::max({H, Hq * D, I});
  const int64_t U = Kmax / 64 + 1;
  x.resize(Bmax * H); xn.resize(Bmax * H); qkv.resize(Bmax * Nqkv); attn.resize(Bmax * Hq * D);
  gu.resize(Bmax * 2 * I); act.resize(Bmax * I);
  scores.resize(size_t(at::get_num_threads() + 1) * Tmax);
  q8.resize(Bmax * U * 64 + 64); sxp.resize(Bmax * U * 8 + 16); sx.resize(Bmax * U); xsum.resize(Bmax * U);
  q16.resize(Bmax * Kh); sx16.resize(Bmax);
  if (act16) x16.resize(Bmax * U * 64);
  for (int64_t b = 0; b < Bmax; ++b)
    xq.push_back(XQ{q8.data() + b * U * 64, sxp.data() + b * U * 8, sx.data() + b * U, xsum.data() + b * U,
                    act16 ? x16.data() + b * U * 64 : nullptr});
}

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

// 16 cache values as float32 (the cache is float32, or float16 for the int8-activation engine).
static inline __m512 ld(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline void st(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void st(at::Half* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename KV>
static inline float dot(const float* a, const KV* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), ld(b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

// out = softmax(q . k[t] / sqrt(D), t = 0..T-1) @ v, for one query head over its key/value head.
template <typename KV>
static void attend(const float* q, const KV* k, const KV* v, int64_t T, int64_t D, float* sc, float* out) {
  const float scale = 1.f / std::sqrt(float(D));
  float mx = -INFINITY;
  int64_t t = 0;
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
    for (; t + 4 <= T; t += 4) {
      const KV* kt = k + t * D;
      _mm_storeu_ps(sc + t, _mm_mul_ps(reduce4(part(kt), part(kt + 64), part(kt + 128), part(kt + 192)), s4));
      mx = std::max(mx, std::max(std::max(sc[t], sc[t + 1]), std::max(sc[t + 2], sc[t + 3])));
    }
  }
  for (; t < T; ++t) {
    sc[t] = dot(q, k + t * D, D) * scale;
    mx = std::max(mx, sc[t]);
  }
  __m512 sum = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(mx);
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 mk = tail_mask(T - t);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sc + t), m)));
    _mm512_mask_storeu_ps(sc + t, mk, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(sum);
  __m512 acc[16];
  const int64_t nv = D / 16;
  for (int64_t i = 0; i < nv; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const __m512 p = _mm512_set1_ps(sc[t] * inv);
    for (int64_t i = 0; i < nv; ++i) acc[i] = _mm512_fmadd_ps(p, ld(v + t * D + 16 * i), acc[i]);
  }
  for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(out + 16 * i, acc[i]);
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

// [n0, n1) of N rows for thread tid of nt, in multiples of `align`.
static inline void share(int64_t N, int tid, int nt, int64_t align, int64_t& n0, int64_t& n1) {
  const int64_t per = ((N + nt - 1) / nt + align - 1) / align * align;
  n0 = std::min(N, tid * per);
  n1 = std::min(N, n0 + per);
}

at::Tensor LlamaEngine::step(const at::Tensor& tokens_in, int64_t pos) {
  at::Tensor tokens = tokens_in.to(at::kLong).contiguous();
  const int64_t B = tokens.numel();
  TORCH_CHECK(B >= 1 && B <= Bmax, "optistack_cpu.LlamaEngine: batch ", B, " outside 1..", Bmax);
  TORCH_CHECK(pos >= 0 && pos < Tmax, "optistack_cpu.LlamaEngine: position ", pos, " outside 0..", Tmax - 1);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(tok[b] >= 0 && tok[b] < V, "optistack_cpu.LlamaEngine: token id ", tok[b], " outside 0..", V - 1);
  at::Tensor logits = at::empty({B, V}, at::kFloat);
  float* lg = logits.data_ptr<float>();
  if (kv16) run<at::Half>(tok, B, pos, lg);
  else run<float>(tok, B, pos, lg);
  for (int64_t b = 0; b < B; ++b)  // a non-finite hidden state gives NaN logits, as the float model would
    if (sx16[b] < 0.f) logits[b].fill_(NAN);
  return logits;
}

template <typename KV>
void LlamaEngine::run(const int64_t* tok, int64_t B, int64_t pos, float* lg) {
  const int64_t Nqkv = (Hq + 2 * Hkv) * D, T = pos + 1, grp = Hq / Hkv, half = D / 2;
  const int nthreads = std::max(1, at::get_num_threads());
  auto kv = [&](void* base, int64_t l, int64_t b, int64_t h) {
    return static_cast<KV*>(base) + (((l * Bmax + b) * Hkv + h) * Tmax) * D;
  };
  auto prep = [&](const float* v, int64_t K, const XQ& o) { act16 ? prep_q16(v, K, o) : prep_q8(v, K, o); };
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    float* sc = scores.data() + size_t(tid) * Tmax;
    int64_t n0, n1;
    for (int64_t b = tid; b < B; b += nt) std::copy(embed + tok[b] * H, embed + (tok[b] + 1) * H, x.data() + b * H);
    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers[l];
      for (int64_t b = tid; b < B; b += nt) {  // each row's owner: norm and quantize
        rms_norm(x.data() + b * H, ly.norm1, xn.data() + b * H, H, eps);
        prep(xn.data() + b * H, H, xq[b]);
      }
#pragma omp barrier
      share(Nqkv, tid, nt, 4, n0, n1);
      q4_rows(ly.qkv, xq.data(), B, n0, n1, qkv.data(), Nqkv, false, act16);
#pragma omp barrier
      for (int64_t j = tid; j < B * Hkv; j += nt) {  // RoPE on the new key, then both into the cache
        const int64_t b = j / Hkv, h = j % Hkv;
        float* k = qkv.data() + b * Nqkv + (Hq + h) * D;
        rope(k, cos + pos * half, sin + pos * half, D);
        KV *kd = kv(kc, l, b, h) + pos * D, *vd = kv(vc, l, b, h) + pos * D;
        for (int64_t i = 0; i < D; i += 16) {
          st(kd + i, _mm512_loadu_ps(k + i));
          st(vd + i, _mm512_loadu_ps(k + Hkv * D + i));
        }
      }
#pragma omp barrier
      for (int64_t j = tid; j < B * Hq; j += nt) {
        const int64_t b = j / Hq, h = j % Hq;
        float* q = qkv.data() + b * Nqkv + h * D;
        rope(q, cos + pos * half, sin + pos * half, D);
        attend(q, kv(kc, l, b, h / grp), kv(vc, l, b, h / grp), T, D, sc, attn.data() + (b * Hq + h) * D);
      }
#pragma omp barrier
      for (int64_t b = tid; b < B; b += nt) prep(attn.data() + b * Hq * D, Hq * D, xq[b]);
#pragma omp barrier
      share(H, tid, nt, 4, n0, n1);
      q4_rows(ly.o, xq.data(), B, n0, n1, x.data(), H, true, act16);  // the residual add, in place
#pragma omp barrier
      for (int64_t b = tid; b < B; b += nt) {
        rms_norm(x.data() + b * H, ly.norm2, xn.data() + b * H, H, eps);
        prep(xn.data() + b * H, H, xq[b]);
      }
#pragma omp barrier
      share(2 * I, tid, nt, 4, n0, n1);
      q4_rows(ly.gate_up, xq.data(), B, n0, n1, gu.data(), 2 * I, false, act16);
#pragma omp barrier
      for (int64_t b = tid; b < B; b += nt) {
        swiglu(gu.data() + b * 2 * I, gu.data() + b * 2 * I + I, act.data() + b * I, I);
        prep(act.data() + b * I, I, xq[b]);
      }
#pragma omp barrier
      share(H, tid, nt, 4, n0, n1);
      q4_rows(ly.down, xq.data(), B, n0, n1, x.data(), H, true, act16);
#pragma omp barrier
    }
    for (int64_t b = tid; b < B; b += nt) {
      rms_norm(x.data() + b * H, final_norm, xn.data() + b * H, H, eps);
      sx16[b] = int8_quantize_f32(xn.data() + b * H, H, Kh, q16.data() + b * Kh);
    }
#pragma omp barrier
    share(V, tid, nt, 64, n0, n1);
    if (n0 < n1) int8_rows_f32(head_q, head_s, H, q16.data(), Kh, sx16.data(), B, n0, n1, lg, V);
  }
}
#else
at::Tensor LlamaEngine::step(const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "optistack_cpu.LlamaEngine: this build has no AVX512-VNNI");
}
#endif

}  // namespace optistack_cpu
