// The serving engine (llama_decode.cpp) and its int4 x int8 GEMM (int4_q8_gemv.cpp).
#pragma once
#include <ATen/ATen.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#include "amx_tiles.h"
#include "llama_team.h"

namespace optistack_cpu {

// Scratch on 64-byte (cache-line) boundaries: an AMX tile row or a 64-byte vector that straddles two lines
// costs two loads (measured on this Xeon: the engine's prefill tile loop 1.36x slower from malloc's
// 16-byte alignment).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    void* p = ::operator new(n * sizeof(T), std::align_val_t(64));
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename T>
using AVec = std::vector<T, Aligned64<T>>;

// An int4 projection in the engine layout (see int4_q8_gemv.cpp): q [N, K/2] bytes, s and zc [N, K/64] float32
// (s, zc) or float16 (s16, zc16: 36 bytes a unit of 64 weights instead of 40, what a memory-bound decode
// step is paid in), optional float32 bias [N].
struct Q4Weight {
  const uint8_t* q = nullptr;
  const float* s = nullptr;
  const float* zc = nullptr;
  const uint16_t* s16 = nullptr;
  const uint16_t* zc16 = nullptr;
  const float* bias = nullptr;
  // the same weights as panels of 16 rows (int4_panel.h), where the engine made them: codes, s, zc
  const uint8_t* pq = nullptr;
  const float* ps = nullptr;
  const float* pzc = nullptr;
  int64_t N = 0, K = 0;
  float scale(int64_t i) const { return s16 ? half_to_float(s16[i]) : s[i]; }
  float zero(int64_t i) const { return zc16 ? half_to_float(zc16[i]) : zc[i]; }
  static float half_to_float(uint16_t h) {  // IEEE half to float: one F16C instruction where built with it
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    uint32_t bits;
    if (e == 0x1F) bits = sign | 0x7F800000 | (m << 13);
    else if (e) bits = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) bits = sign;
    else {  // subnormal: normalize
      int shift = 0;
      uint32_t mm = m;
      while (!(mm & 0x400)) { mm <<= 1; ++shift; }
      bits = sign | ((113 - shift) << 23) | ((mm & 0x3FF) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
  }
};

// One activation row quantized for q4_rows (buffers owned by the caller).
struct XQ {
  int8_t* q;    // [ceil(K/128) * 128] int8 codes in unit-pair order
  float* sxp;   // [(K/128) * 16]: each pair's two unit scales over the lower and upper 8 lanes
  float* sx;    // [K/64] scale per unit
  float* xsum;  // [K/64] sum of each unit's quantized activations (codes x scale)
  int16_t* q16;  // [K] int16 codes in natural order (act=int16 only)
};

// Byte offsets in an XQ row's int8 codes (prep_q8) of unit u's channels 0..31 and 32..63: units are paired, low
// halves side by side, then high halves; an odd last unit is stored whole.
inline void xq_unit_offsets(int64_t U, int64_t u, int64_t& lo, int64_t& hi) {
  const int64_t P = U / 2, p = u / 2;
  lo = p < P ? p * 128 + (u % 2) * 32 : P * 128;
  hi = p < P ? lo + 64 : lo + 32;
}

bool llama_engine_supported();  // built with AVX512-VNNI (the kernels below need vpdpbusd)
void prep_q8(const float* x, int64_t K, const XQ& out);
void prep_q16(const float* x, int64_t K, const XQ& out);  // fills q16, sx, xsum
// Rows [n0, n1) of y = x @ w.T (+ bias) for M activation rows (y row stride ystride); add: y += instead.
// act16: the activations were prepared by prep_q16 (else prep_q8). Each weight block is read once for all
// M rows, and every row's result is computed by the same instructions whatever M is (a row decodes the
// same alone or in a batch).
void q4_rows(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ystride, bool add,
             bool act16);

// The chunk GEMM for CPUs without AMX (int4_vnni_gemm.cpp): as q4_rows with int8 activations for many rows
// at once; each 32 weight rows are unpacked once per call into a panel (wbuf: this thread's
// vnni_gemm_wbuf_bytes(K)) that the rows meet six at a time. Rows [n0, n1) in multiples of 32 but the last.
constexpr int64_t kGemmPanelUnitBytes = 16 * 128 + 64 * 4;  // a unit of 32 rows: 16 quads of codes, scales, zc
constexpr int64_t kGemmRows = 12;  // the engine's default gemm_rows without AMX (and EngineInt4Linear's threshold)
int64_t vnni_gemm_wbuf_bytes(int64_t K);
void q4_rows_gemm(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ystride,
                  bool add, uint8_t* wbuf);

// The AMX path (int4_amx.cpp): bf16 tile products on int4 weights dequantized 16 rows at a time. Activation
// rows (float32, row stride xstride) are packed once per call into 1 KB tiles of 16 rows x 32 channels in
// bf16 pairs; tile t = (m-tile t / (K / 32), chunk t % (K / 32)).
bool amx_supported();  // the CPU has AMX-BF16, AMX-INT8 and AVX512-BF16 and the kernel granted this process the tiles
void amx_pack(const float* x, int64_t xstride, int64_t M, int64_t K, int64_t t0, int64_t t1, uint16_t* tiles);
// As q4_rows for the M rows packed in `tiles`; wbuf: this thread's K * 64 + 4096 bytes.
void q4_rows_amx(const Q4Weight& w, const uint16_t* tiles, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ystride, bool add, uint8_t* wbuf);
// The MLP's gate_up (gate's I rows, then up's) and SwiGLU fused, outputs [j0, j1) of I (multiples of 16 but
// the last) written transposed: act[m][j] at actT[j * tstride + m]; amx_pack_t packs such rows for down.
void q4_swiglu_amx(const Q4Weight& w, int64_t I, const uint16_t* tiles, int64_t M, int64_t j0, int64_t j1,
                   float* actT, int64_t tstride, uint8_t* wbuf);
void amx_pack_t(const float* xt, int64_t tstride, int64_t M, int64_t K, int64_t t0, int64_t t1, uint16_t* tiles);

// The AMX int8 path (int4_amx_int8.cpp) for batches of decode rows: rows prepared by prep_q8, packed per
// (m-tile, unit) into 1 KB int8 tiles in the VNNI tile layout with their unit scales and sums transposed.
void amx8_pack(const XQ* xs, int64_t M, int64_t K, int64_t t0, int64_t t1, int8_t* tiles, float* sxT, float* xsT);
// As q4_rows for the M rows packed by amx8_pack; wbuf: this thread's K / 64 * 2176 bytes.
void q4_rows_amx8(const Q4Weight& w, const int8_t* tiles, const float* sxT, const float* xsT, int64_t M, int64_t n0,
                  int64_t n1, float* y, int64_t ystride, bool add, uint8_t* wbuf);

// The int8 head on AMX int8 tiles for a batch of rows (K a multiple of 64, rows [n0, n1) in multiples of 16):
// each row quantized to int8 with one scale (-1 for inf/NaN), packed per (m-tile, 64 channels), then y.
float quantize_i8_row(const float* x, int64_t K, int8_t* out);
void amx8_pack_rows(const int8_t* x, int64_t xstride, int64_t M, int64_t K, int64_t t0, int64_t t1, int8_t* tiles);
void head_amx8(const int8_t* qw, const float* sc, int64_t K, const int8_t* tiles, const float* sx, int64_t M, int64_t n0,
               int64_t n1, float* y, int64_t N);

// The int8 head kernel on raw pointers (int8_gemm.cpp): quantize one float32 row to int16 (returns its
// scale, -1 for inf/NaN), then rows [n0, n1) of y (row stride N) for M activation rows.
float int8_quantize_f32(const float* x, int64_t K, int64_t Kp, int16_t* out);
void int8_rows_f32(const int8_t* qw, const float* sc, int64_t K, const int16_t* xq, int64_t Kp, const float* sx,
                   int64_t M, int64_t n0, int64_t n1, float* y, int64_t N);
// A float32 head (int8_gemm.cpp): rows [n0, n1) of y (row stride N) = x [M, K] @ w.T, float32 products and sums.
void float_rows_f32(const float* w, int64_t K, const float* x, int64_t M, int64_t n0, int64_t n1, float* y, int64_t N);

// y = x @ w.T (+ bias) for float32 x [M, K] on an engine-layout projection (q4_linear.cpp): path 0 the VNNI rows
// with int16 activations, 1 with int8 ones, 2 AMX-BF16 tiles. What the model's own projections run once they
// share the engine's weights.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& zc,
                     const at::Tensor& bias, int64_t path);

// ---------------------------------------------------------------- what an engine is built from, by name
// One int4 projection: codes uint8 [N, K/2], unit scale and zc [N, K/64] (both float32 or both float16), bias
// float32 [N] or empty.
struct Q4Proj {
  at::Tensor q, s, zc, bias;
  at::Tensor pq, pf;  // optional: the same weights as panels (int4_panel.h): codes, then s and zc in one float32 tensor
};

// The checked view of one projection's tensors (every size and dtype; `keep` holds them): what the engine and
// q4_linear read. `what` names the projection in errors.
Q4Weight q4_weight(const Q4Proj& p, int64_t N, int64_t K, const char* what, std::vector<at::Tensor>& keep);

// One decoder block: the two RMSNorm weights [H] and its four projections (q, k and v stacked; gate and up stacked);
// q_norm, k_norm [D] (optional, Qwen3): an RMSNorm of every query and key head before RoPE; rope false: a layer
// without position rotation (SmolLM3's NoPE layers).
struct EngineLayer {
  at::Tensor norm1, norm2, q_norm, k_norm;
  Q4Proj qkv, o, gate_up, down;
  bool rope = true;
};

// Attention for a prompt chunk (llama_attn_chunk.h): from this many rows of one slot in one call (int8
// activations), in items of up to kChunkQueries query vectors (rows x the query heads of one key/value head).
constexpr int64_t kChunkAttnRows = 32;
constexpr int64_t kChunkQueries = 32;
static_assert(kTileQueries <= kChunkQueries, "a chunk item's scores buffer holds kChunkQueries rows");

// The whole model: sizes, the token embedding [V, H] float32 (or int8 codes with one float32 scale per row in
// embed_s [V]: a row is code * scale), the final norm [H], the int8 head [V, H] with one float32 scale per row
// [V], and the blocks.
struct EngineSpec {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, vocab = 0;
  double eps = 1e-6;
  at::Tensor embed, embed_s, final_norm, head_q, head_s;
  Q4Proj head4;  // an int4 head in the engine layout (int16 activations); when set, head_q and head_s are unused
  at::Tensor head_f;  // the model's own float32 head [V, H] (the exact mode); when set, head_q and head_s are unused
  std::vector<EngineLayer> layers;
};

// A Llama-family model that runs any set of (token, cache slot, position) rows in one call: a decode step
// of many requests (one row each, each at its own position), a prompt chunk (consecutive positions of
// one slot), or k draft tokens to verify; rows of all three mix in one call. The KV cache holds S slots
// of Tmax positions; the engine tracks how many positions of each slot are filled and refuses rows that
// would leave a gap. Calls are serialized by a mutex (the scratch space is the engine's), and the scratch
// is sized for the threads and rows of each call.
class LlamaEngine {
 public:
  // cos, sin [Tmax, D/2] float32; k_cache, v_cache [L, S, Hkv, Tmax, D], both float32, float16 or int8;
  // int8 codes come with k_scale, v_scale [L, S, Hkv, Tmax] float32, one per position and head (its largest
  // magnitude / 127; ignored, may be empty, for the other types); act_bits 8 or 16 (the int4 projections'
  // activations); max_rows: the most rows one call may take.
  LlamaEngine(const EngineSpec& spec, at::Tensor cos, at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache,
              at::Tensor k_scale, at::Tensor v_scale, int64_t act_bits, int64_t max_rows);
  // tokens, slots, positions [N] int64: row i is token tokens[i] at position positions[i] of slot slots[i].
  // A slot's rows must be adjacent with consecutive positions, the first at most the slot's filled length
  // (less rewinds it: later positions are forgotten). Returns logits [R, V] for rows logit_rows [R].
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& slots, const at::Tensor& positions,
                     const at::Tensor& logit_rows);
  int64_t length(int64_t slot);  // positions of `slot` filled so far
  // Declare `slot` filled up to `n` positions (its cache was written from outside, e.g. copied from a
  // model's own prefill), or rewind it; 0 frees it for a new sequence.
  void set_length(int64_t slot, int64_t n);
  int64_t slots() const { return S; }
  int64_t capacity() const { return Tmax; }
  int64_t max_rows() const { return Nmax; }
  // Rows of one slot in one call from which its projections run on AMX tiles (0: never; the CPU must have AMX).
  int64_t amx_rows() const { return amx_min; }
  void set_amx_rows(int64_t n);
  // Rows of different slots in one call (decode rows of a batch) from which they too run on AMX tiles (0:
  // never, the default: a row then computes the same bits alone or batched; a server trades that for speed).
  int64_t amx_batch() const { return amx_batch_min; }
  void set_amx_batch(int64_t n);
  // Rows of one slot in one call from which its projections run on the int8 chunk GEMM (int4_vnni_gemm.cpp) where
  // they are not on AMX tiles (0: never; the default on a CPU without AMX, with int8 activations, kGemmRows).
  int64_t gemm_rows() const { return gemm_min; }
  void set_gemm_rows(int64_t n);
  // Whether its int8 VNNI rows (not those on AMX tiles or the chunk GEMM) read the projections' panels
  // (int4_panel.h), where the spec gave them: on by default then; off: the row layout, as without them.
  bool panels() const { return panels_on; }
  void set_panels(bool on);
  // Whether a call may run with fewer threads than torch allows when the last ones were held up by other
  // processes (llama_team.h; on by default), the threads it would use now, and the last call's work over its
  // wall time (how many threads it kept busy).
  bool adaptive_threads() const { return team.adaptive; }
  void set_adaptive_threads(bool on);
  int64_t team_threads();
  double last_work_ratio();

 private:
  enum Path { VNNI = 0, AMX_BF16 = 1, AMX_INT8 = 2, VNNI_GEMM = 3 };
  struct Run {  // consecutive rows that take the same GEMM path
    int64_t start, len, tile0;  // tile0: first m-tile of an AMX run in its packed buffer
    int path;
  };
  template <typename KV>
  void run(const int64_t* tok, const int64_t* slot, const int64_t* pos, int64_t N, const int64_t* lrows, int64_t R,
           float* logits, int nthreads, const std::vector<Run>& runs, int64_t amx_tiles, int64_t amx8_tiles, bool gemm);
  void ensure_scratch(int64_t N, int64_t R, int nthreads, int64_t amx_tiles, int64_t amx8_tiles, bool gemm);
  // a chunk on AMX bf16 tiles attends on the tiles too (llama_attn_amx.h: head sizes that are whole 32-channel chunks)
  bool attn_on_tiles() const {
#ifdef OPTISTACK_AMX_BUILD
    return D % 32 == 0 && D <= 256;
#else
    return false;
#endif
  }
  int64_t scores_per_thread() const { return std::max(Hq / Hkv * Tmax, kChunkQueries * ((Tmax + 15) / 16 * 16)); }
  struct Layer {
    const float *norm1, *norm2, *q_norm = nullptr, *k_norm = nullptr;
    Q4Weight qkv, o, gate_up, down;
    bool rope = true;
  };
  int64_t L, H, Hq, Hkv, D, I, V, S, Tmax, Kh, Nmax, amx_min = 0, amx_batch_min = 0, gemm_min = 0;
  float eps;
  bool act16, has_panels = false, panels_on = false;
  enum KvType { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2 } kv_type;
  std::vector<at::Tensor> keep;  // holds every tensor the pointers below point into
  const float *embed = nullptr, *embed_s = nullptr, *final_norm, *head_s = nullptr, *cos, *sin;
  const int8_t *head_q = nullptr, *embed_q = nullptr;  // embed_q: an int8 embedding (rows scaled by embed_s)
  bool head_int4 = false;
  const float* head_f = nullptr;  // a float32 head (the model's own, in the exact mode)
  Q4Weight head4w;
  void *kc, *vc;  // float32, float16 (half the bytes attention reads) or int8 codes (a quarter, plus scales)
  float *ks = nullptr, *vs = nullptr;  // int8 codes' scale per (layer, slot, head, position)
  std::vector<Layer> layers;
  std::vector<int64_t> filled;  // per slot
  std::mutex mu;
  TeamPolicy team;  // under `mu`
  // scratch, grown on demand under `mu`
  int64_t rows_cap = 0, lrows_cap = 0, threads_cap = 0, amx_cap = 0, amx8_cap = 0, wbuf_cap = 0, act_t_cap = 0,
          kv_tiles_cap = 0;
  AVec<uint16_t> amx_tiles_buf;  // bf16 activation tiles
  AVec<int8_t> amx8_tiles_buf;   // int8 activation tiles, with their scales and sums
  AVec<float> amx8_sx, amx8_xs;
  AVec<int8_t> head8, head8_tiles;  // the head's rows as int8 (AMX head), and as tiles
  AVec<float> sx8;                  // their scales
  AVec<uint8_t> amx_wbuf;  // per thread
  AVec<uint16_t> kv_tiles_buf;  // per thread: a chunk item's keys and values as bf16 tiles (kv_tile_elems)
  std::vector<char> row_path;     // per row of the current call: its GEMM path
  struct ChunkItem {              // attention for rows [b0, b0 + n) of one slot, key/value head h
    int64_t b0, n, h;
  };
  std::vector<char> row_chunk;          // per row of the current call: its attention runs in a ChunkItem
  std::vector<ChunkItem> chunk_items;
  AVec<float> x, xn, qkv, attn, gu, act, actT, scores;
  AVec<int8_t> q8;
  AVec<float> sxp, sx, xsum, sx16;
  AVec<int16_t> q16, x16;
  std::vector<XQ> xq;
};

}  // namespace optistack_cpu
