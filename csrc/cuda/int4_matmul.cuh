// Int4 weight-only matmul: y = x @ w.T, w = (code - 8) * scale + zero per group of `group_size`
// consecutive input channels (optistack.passes.quant.int4's convention).
//
// Layout (cuda.int4_prepack): qweight int32 [N, K/8], nibble j of word i = code of channel 8*i + j;
// scale/zero float32 [N, K/g]. group_size must be a multiple of 32, so the 32 channels one lane reads
// per step (a 16-byte load) share one scale and zero.
//
// - GEMV (M <= 8, decode): one warp per output channel, each lane streams 16-byte chunks of the row,
//   sum_k x_k * w_k = scale * sum_k x_k * (code_k - 8) + zero * sum_k x_k per chunk, up to 8 rows of x
//   per pass over the weights, warp-shuffle reduction.
// - M > 8 (prefill): dequantize to x's dtype once and run cuBLAS through at::mm: compute-bound there,
//   and a tensor-core GEMM beats anything hand-rolled without one.
#pragma once

#include <ATen/ops/mm.h>

#include "common.cuh"

namespace optistack_cuda {

constexpr int kGemvMaxRows = 8;
constexpr int kGemvWarps = 4;

template <typename T, int MR>
__global__ void int4_gemv_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight,
                                 const float* __restrict__ scale, const float* __restrict__ zero, T* __restrict__ y,
                                 int m, int n, int k, int group_size) {
  const int lane = threadIdx.x & 31;
  const int col = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int row0 = blockIdx.y * MR;
  if (col >= n) return;
  const int chunks = k / 32;  // 16-byte chunks of 32 codes per row
  const int groups = k / group_size;
  const uint4* q = qweight + static_cast<int64_t>(col) * chunks;
  const float* s = scale + static_cast<int64_t>(col) * groups;
  const float* z = zero + static_cast<int64_t>(col) * groups;
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;
  for (int c = lane; c < chunks; c += 32) {
    const uint4 packed = q[c];
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    float w[32];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) w[i * 8 + j] = static_cast<float>((words[i] >> (4 * j)) & 0xFu) - 8.f;
    }
    const int g = (c * 32) / group_size;
    const float sc = s[g], ze = z[g];
#pragma unroll
    for (int r = 0; r < MR; ++r) {
      if (row0 + r < m) {
        // 32 activations in 16-byte loads (x rows are 16-byte aligned: k % 32 == 0, base checked on the host)
        const uint4* xr = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(row0 + r) * k + c * 32);
        constexpr int PV = Pack16<T>::kSize;
        float dot = 0.f, xsum = 0.f;
#pragma unroll
        for (int p = 0; p < 32 / PV; ++p) {
          Pack16<T> xp;
          xp.raw = xr[p];
#pragma unroll
          for (int j = 0; j < PV; ++j) {
            const float xv = static_cast<float>(xp.v[j]);
            dot = fmaf(xv, w[p * PV + j], dot);
            xsum += xv;
          }
        }
        acc[r] = fmaf(sc, dot, fmaf(ze, xsum, acc[r]));
      }
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && row0 + r < m) y[static_cast<int64_t>(row0 + r) * n + col] = static_cast<T>(v);
  }
}

template <typename T>
__global__ void int4_dequant_kernel(const uint32_t* __restrict__ qweight, const float* __restrict__ scale,
                                    const float* __restrict__ zero, T* __restrict__ w, int64_t n, int k,
                                    int group_size) {
  const int64_t words = n * (k / 8);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < words; i += stride) {
    const int64_t col = i / (k / 8);
    const int kk = static_cast<int>(i % (k / 8)) * 8;
    const int64_t gi = col * (k / group_size) + kk / group_size;
    const float sc = scale[gi], ze = zero[gi];
    const uint32_t word = qweight[i];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      w[col * k + kk + j] = static_cast<T>((static_cast<float>((word >> (4 * j)) & 0xFu) - 8.f) * sc + ze);
    }
  }
}

template <typename T, int MR>
void launch_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                 at::Tensor& y, int m, int n, int k, int group_size, cudaStream_t stream) {
  const dim3 grid((n + kGemvWarps - 1) / kGemvWarps, (m + MR - 1) / MR);
  int4_gemv_kernel<T, MR><<<grid, kGemvWarps * 32, 0, stream>>>(
      x.data_ptr<T>(), reinterpret_cast<const uint4*>(qweight.data_ptr<int32_t>()), scale.data_ptr<float>(),
      zero.data_ptr<float>(), y.data_ptr<T>(), m, n, k, group_size);
}

inline at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                              const at::Tensor& zero, int64_t group_size) {
  const char* op = "int4_matmul";
  check_cuda(x, op, "x");
  check_same_device(qweight, x, op, "qweight");
  check_same_device(scale, x, op, "scale");
  check_same_device(zero, x, op, "zero");
  check_float(x, op, "x");
  TORCH_CHECK(group_size >= 32 && group_size % 32 == 0, "optistack_cuda::int4_matmul: group_size must be a ",
              "multiple of 32, got ", group_size);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt && qweight.is_contiguous(),
              "optistack_cuda::int4_matmul: qweight must be contiguous int32 [N, K/8] (see cuda.int4_prepack)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
              "optistack_cuda::int4_matmul: qweight must be 16-byte aligned (pack a fresh tensor with int4_prepack)");
  const int64_t n = qweight.size(0), k = qweight.size(1) * 8;
  TORCH_CHECK(k % group_size == 0, "optistack_cuda::int4_matmul: K=", k, " is not a multiple of group_size=", group_size);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "optistack_cuda::int4_matmul: x must be [..., ", k, "], got ", x.sizes());
  for (const auto* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                    t->size(1) == k / group_size,
                "optistack_cuda::int4_matmul: scale and zero must be contiguous float32 [", n, ", ", k / group_size,
                "], got ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(n < 2147483647LL && k < 2147483647LL, "optistack_cuda::int4_matmul: weight too large");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x2 = x.contiguous().view({-1, k});
  if (!aligned16(x2.data_ptr())) x2 = x2.clone();  // the GEMV reads x in 16-byte vectors
  const int64_t m = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y.view(out_shape);
  auto stream = c10::cuda::getCurrentCUDAStream();
  OPTISTACK_DISPATCH_FLOAT(x.scalar_type(), "optistack_int4_matmul", [&] {
    using T = scalar_t;
    if (m <= kGemvMaxRows) {
      const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k), g = static_cast<int>(group_size);
      switch (mi) {
        case 1: launch_gemv<T, 1>(x2, qweight, scale, zero, y, mi, ni, ki, g, stream); break;
        case 2: launch_gemv<T, 2>(x2, qweight, scale, zero, y, mi, ni, ki, g, stream); break;
        case 3: case 4: launch_gemv<T, 4>(x2, qweight, scale, zero, y, mi, ni, ki, g, stream); break;
        default: launch_gemv<T, 8>(x2, qweight, scale, zero, y, mi, ni, ki, g, stream); break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor w = at::empty({n, k}, x.options());
      const int threads = 256;
      int4_dequant_kernel<T><<<blocks_for(n * (k / 8), threads), threads, 0, stream>>>(
          reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()), scale.data_ptr<float>(),
          zero.data_ptr<float>(), w.data_ptr<T>(), n, static_cast<int>(k), static_cast<int>(group_size));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mm_out(y, x2, w.t());
    }
  });
  return y.view(out_shape);
}

}  // namespace optistack_cuda
