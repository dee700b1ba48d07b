// y = x @ W.T (+ bias) for an int4 matrix in the decode engine's unit layout (int4_q8_gemv.cpp), for eager
// model code. After `decode-engine` the model's own projections read the engine's weights, so the process
// holds one copy of them (kernels/engine_linear.py). Paths: the engine's VNNI rows with int16 activations
// (15 significant bits, the exact mode's numerics) or int8 ones, or, for many rows on a CPU with AMX, the
// engine's AMX-BF16 tiles (activations rounded to bf16, as the model's own prefill kernels do), or its
// AMX-INT8 tiles for a batch of decode rows (int8 codes as the VNNI int8 path), or the int8 chunk GEMM for many
// rows on a CPU without AMX (int4_vnni_gemm.cpp: the same codes, a panel of weights met by six rows at a time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "llama_decode.h"

namespace optistack_cpu {

namespace {

constexpr int64_t PATH_INT16 = 0, PATH_INT8 = 1, PATH_AMX_BF16 = 2, PATH_AMX_INT8 = 3, PATH_INT8_GEMM = 4;

// Rows [n0, n1) of N for worker `tid` of `nt`, in multiples of `align` (the kernels' row blocks).
void rows_of(int64_t N, int64_t tid, int64_t nt, int64_t align, int64_t& n0, int64_t& n1) {
  const int64_t per = ((N + nt - 1) / nt + align - 1) / align * align;
  n0 = std::min(N, tid * per);
  n1 = std::min(N, n0 + per);
}

// fn(tid, n0, n1) for each of nt workers with a non-empty share of N rows (in multiples of `align`).
template <typename Fn>
void per_worker(int64_t N, int64_t nt, int64_t align, const Fn& fn) {
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t tid = b; tid < e; ++tid) {
      int64_t n0, n1;
      rows_of(N, tid, nt, align, n0, n1);
      if (n0 < n1) fn(tid, n0, n1);
    }
  });
}

}  // namespace

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& zc,
                     const at::Tensor& bias, int64_t path) {
  TORCH_CHECK(llama_engine_supported(), "optistack_cpu.q4_linear: this build has no AVX512-VNNI");
  TORCH_CHECK(path >= PATH_INT16 && path <= PATH_INT8_GEMM, "optistack_cpu.q4_linear: path must be 0 (int16), 1 (int8), ",
              "2 (AMX bf16), 3 (AMX int8) or 4 (the int8 chunk GEMM), got ", path);
  TORCH_CHECK((path != PATH_AMX_BF16 && path != PATH_AMX_INT8) || amx_supported(),
              "optistack_cpu.q4_linear: this CPU has no AMX for path ", path);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "optistack_cpu.q4_linear: x must be a contiguous float32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K > 0 && K % 64 == 0, "optistack_cpu.q4_linear: K must be a positive multiple of 64, got ", K);
  TORCH_CHECK(q.dim() == 2, "optistack_cpu.q4_linear: codes must be uint8 [N, K/2]");
  std::vector<at::Tensor> keep;
  const Q4Weight w = q4_weight(Q4Proj{q, s, zc, bias}, q.size(0), K, "q4_linear's weight", keep);
  const int64_t N = w.N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 31) / 32));
  if (path == PATH_AMX_BF16) {
    const int64_t chunks = K / 32, tiles = (M + 15) / 16 * chunks, wbytes = K * 64 + 4096 + 64;
    AVec<uint16_t> packed(size_t(tiles) * 512);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { amx_pack(xp, K, M, K, t0, t1, packed.data()); });
    AVec<uint8_t> wbuf(size_t(nt) * wbytes);
    per_worker(N, nt, 32, [&](int64_t tid, int64_t n0, int64_t n1) {
      q4_rows_amx(w, packed.data(), M, n0, n1, yp, N, false, wbuf.data() + tid * wbytes);
    });
    return y;
  }
  const bool act16 = path == PATH_INT16;
  const int64_t U = K / 64 + 1;  // a spare unit, as the engine's scratch has (unit pairs read past an odd count)
  AVec<int8_t> q8(size_t(M) * U * 64 + 64);
  AVec<float> sxp(size_t(M) * U * 8 + 16), sx(size_t(M) * U), xsum(size_t(M) * U);
  AVec<int16_t> q16(act16 ? size_t(M) * U * 64 : 0);
  std::vector<XQ> xs;
  xs.reserve(M);
  for (int64_t m = 0; m < M; ++m)
    xs.push_back(XQ{q8.data() + m * U * 64, sxp.data() + m * U * 8, sx.data() + m * U, xsum.data() + m * U,
                    act16 ? q16.data() + m * U * 64 : nullptr});
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) act16 ? prep_q16(xp + m * K, K, xs[m]) : prep_q8(xp + m * K, K, xs[m]);
  });
  if (path == PATH_AMX_INT8) {  // the engine's batched decode rows: int8 codes packed into tiles
    const int64_t units = K / 64, tiles = (M + 15) / 16 * units, wbytes = units * 2176 + 64;
    AVec<int8_t> packed(size_t(tiles) * 1024);
    AVec<float> sxT(size_t(tiles) * 16), xsT(size_t(tiles) * 16);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      amx8_pack(xs.data(), M, K, t0, t1, packed.data(), sxT.data(), xsT.data());
    });
    AVec<uint8_t> wbuf(size_t(nt) * wbytes);
    per_worker(N, nt, 16, [&](int64_t tid, int64_t n0, int64_t n1) {
      q4_rows_amx8(w, packed.data(), sxT.data(), xsT.data(), M, n0, n1, yp, N, false, wbuf.data() + tid * wbytes);
    });
    return y;
  }
  if (path == PATH_INT8_GEMM) {  // a prompt chunk's rows on a CPU without AMX
    const int64_t wbytes = vnni_gemm_wbuf_bytes(K);
    AVec<uint8_t> wbuf(size_t(nt) * wbytes);
    per_worker(N, nt, 32, [&](int64_t tid, int64_t n0, int64_t n1) {
      q4_rows_gemm(w, xs.data(), M, n0, n1, yp, N, false, wbuf.data() + tid * wbytes);
    });
    return y;
  }
  per_worker(N, nt, 4, [&](int64_t, int64_t n0, int64_t n1) { q4_rows(w, xs.data(), M, n0, n1, yp, N, false, act16); });
  return y;
}

}  // namespace optistack_cpu
