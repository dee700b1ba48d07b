// The decode engine (llama_decode.cpp) and its int4 x int8 GEMV (int4_q8_gemv.cpp).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace optistack_cpu {

// An int4 projection in the engine layout (see int4_q8_gemv.cpp): q [N, K/2] bytes, s and zc float32
// [N, K/64], optional float32 bias [N].
struct Q4Weight {
  const uint8_t* q = nullptr;
  const float* s = nullptr;
  const float* zc = nullptr;
  const float* bias = nullptr;
  int64_t N = 0, K = 0;
};

// One activation row quantized for q4_rows (buffers owned by the caller).
struct XQ {
  int8_t* q;    // [ceil(K/128) * 128] int8 codes in unit-pair order
  float* sxp;   // [(K/128) * 16]: each pair's two unit scales over the lower and upper 8 lanes
  float* sx;    // [K/64] scale per unit
  float* xsum;  // [K/64] sum of each unit's quantized activations (codes x scale)
  int16_t* q16;  // [K] int16 codes in natural order (act=int16 only)
};

bool llama_engine_supported();  // built with AVX512-VNNI (the kernels below need vpdpbusd)
void prep_q8(const float* x, int64_t K, const XQ& out);
void prep_q16(const float* x, int64_t K, const XQ& out);  // fills q16, sx, xsum
// Rows [n0, n1) of y = x @ w.T (+ bias) for M activation rows (y row stride ystride); add: y += instead.
// act16: the activations were prepared by prep_q16 (else prep_q8).
void q4_rows(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ystride, bool add,
             bool act16);

// The int8 head kernel on raw pointers (int8_gemm.cpp): quantize one float32 row to int16 (returns its
// scale, -1 for inf/NaN), then rows [n0, n1) of y (row stride N) for M activation rows.
float int8_quantize_f32(const float* x, int64_t K, int64_t Kp, int16_t* out);
void int8_rows_f32(const int8_t* qw, const float* sc, int64_t K, const int16_t* xq, int64_t Kp, const float* sx,
                   int64_t M, int64_t n0, int64_t n1, float* y, int64_t N);

// dims: L, H, Hq, Hkv, D, I, V, Bmax, Tmax, act_bits (8 or 16: the int4 projections' activations). tensors: embed [V, H], final_norm [H], head_q int8 [V, H],
// head_s [V], cos [Tmax, D/2], sin [Tmax, D/2], k_cache, v_cache [L, Bmax, Hkv, Tmax, D] (float32 or float16),
// then per layer
// norm1, norm2, and (q, s, zc, bias) for qkv, o, gate_up, down (bias: an empty tensor when absent).
class LlamaEngine {
 public:
  LlamaEngine(std::vector<int64_t> dims, double eps, std::vector<at::Tensor> tensors);
  // Logits [B, V] for tokens [B] at position pos (its key and value are written to the cache there;
  // attention covers positions 0..pos).
  at::Tensor step(const at::Tensor& tokens, int64_t pos);

 private:
  template <typename KV>
  void run(const int64_t* tok, int64_t B, int64_t pos, float* logits);
  struct Layer {
    const float *norm1, *norm2;
    Q4Weight qkv, o, gate_up, down;
  };
  int64_t L, H, Hq, Hkv, D, I, V, Bmax, Tmax, Kh;
  float eps;
  bool act16;
  std::vector<at::Tensor> keep;  // holds every tensor the pointers below point into
  const float *embed, *final_norm, *head_s, *cos, *sin;
  const int8_t* head_q;
  void *kc, *vc;  // float32, or float16 (kv16) for the int8-activation engine: half the bytes attention reads
  bool kv16;
  std::vector<Layer> layers;
  std::vector<float> x, xn, qkv, attn, gu, act, scores;
  std::vector<int8_t> q8;
  std::vector<float> sxp, sx, xsum, sx16;
  std::vector<int16_t> q16, x16;
  std::vector<XQ> xq;
};

}  // namespace optistack_cpu
