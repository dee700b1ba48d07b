// Fused RMSNorm (+ residual add): one block per row, float32 sum of squares, output in x's dtype.
// With a residual, h = x + residual is rounded to x's dtype (as the eager Llama layer adds), stored,
// and normalized from that rounded value, matching optistack.kernels.reference.rms_norm.
#pragma once

#include "common.cuh"

namespace optistack_cuda {

// kVec: rows are read and written 16 bytes at a time (the host checks n % (16 / sizeof(T)) == 0 and
// 16-byte aligned pointers); else one element at a time.
template <typename T, typename W, bool kResidual, bool kVec>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual, const W* __restrict__ weight,
                                T* __restrict__ y, T* __restrict__ h, int64_t n, float eps) {
  using P = Pack16<T>;
  constexpr int V = kVec ? P::kSize : 1;
  __shared__ float shared[32];
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * n;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < n / V; i += blockDim.x) {
    if constexpr (kVec) {
      P a;
      a.raw = reinterpret_cast<const uint4*>(x + offset)[i];
      if constexpr (kResidual) {
        P b;
        b.raw = reinterpret_cast<const uint4*>(residual + offset)[i];
#pragma unroll
        for (int j = 0; j < V; ++j) a.v[j] = static_cast<T>(static_cast<float>(a.v[j]) + static_cast<float>(b.v[j]));
        reinterpret_cast<uint4*>(h + offset)[i] = a.raw;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float f = static_cast<float>(a.v[j]);
        sum_sq += f * f;
      }
    } else {
      T v = x[offset + i];
      if constexpr (kResidual) {
        v = static_cast<T>(static_cast<float>(v) + static_cast<float>(residual[offset + i]));
        h[offset + i] = v;
      }
      const float f = static_cast<float>(v);
      sum_sq += f * f;
    }
  }
  const float inv = 1.f / sqrtf(block_sum(sum_sq, shared) / static_cast<float>(n) + eps);
  const T* src = kResidual ? h : x;  // h was written by this same thread: no barrier needed
  for (int64_t i = threadIdx.x; i < n / V; i += blockDim.x) {
    if constexpr (kVec) {
      P a, out;
      a.raw = reinterpret_cast<const uint4*>(src + offset)[i];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        out.v[j] = static_cast<T>(static_cast<float>(a.v[j]) * inv * static_cast<float>(weight[i * V + j]));
      }
      reinterpret_cast<uint4*>(y + offset)[i] = out.raw;
    } else {
      y[offset + i] = static_cast<T>(static_cast<float>(src[offset + i]) * inv * static_cast<float>(weight[i]));
    }
  }
}

inline int rms_norm_threads(int64_t items) {  // one or a few vectors (or 4 elements) per thread
  const int64_t t = (items + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, t)));
}

template <typename T, typename W, bool kResidual>
void launch_rms_norm_typed(const T* x, const T* r, const W* w, T* y, T* h, int64_t rows, int64_t n, float eps,
                           cudaStream_t stream) {
  constexpr int64_t V = 16 / sizeof(T);
  const bool vec = n % V == 0 && aligned16(x) && aligned16(y) && (!kResidual || (aligned16(r) && aligned16(h)));
  const dim3 grid(static_cast<unsigned int>(rows));
  if (vec) {
    rms_norm_kernel<T, W, kResidual, true><<<grid, rms_norm_threads(n / V), 0, stream>>>(x, r, w, y, h, n, eps);
  } else {
    rms_norm_kernel<T, W, kResidual, false><<<grid, rms_norm_threads((n + 3) / 4), 0, stream>>>(x, r, w, y, h, n, eps);
  }
}

template <bool kResidual>
void launch_rms_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, at::Tensor& y,
                     at::Tensor* h, double eps) {
  const int64_t n = x.size(-1), rows = rows_of(x);
  if (rows == 0 || n == 0) return;
  TORCH_CHECK(rows <= 2147483647LL, "optistack_cuda::rms_norm: too many rows");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float e = static_cast<float>(eps);
  OPTISTACK_DISPATCH_FLOAT(x.scalar_type(), "optistack_rms_norm", [&] {
    using T = scalar_t;
    const T* r = kResidual ? residual->data_ptr<T>() : nullptr;
    T* hp = kResidual ? h->data_ptr<T>() : nullptr;
    if (weight.scalar_type() == x.scalar_type()) {
      launch_rms_norm_typed<T, T, kResidual>(x.data_ptr<T>(), r, weight.data_ptr<T>(), y.data_ptr<T>(), hp, rows, n, e, stream);
    } else {
      launch_rms_norm_typed<T, float, kResidual>(x.data_ptr<T>(), r, weight.data_ptr<float>(), y.data_ptr<T>(), hp, rows,
                                                 n, e, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline at::Tensor weight_for(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "optistack_cuda::rms_norm: weight must have shape (",
              x.size(-1), ",), got ", weight.sizes());
  if (weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat) return weight.contiguous();
  return weight.to(at::kFloat).contiguous();
}

inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cuda(x, "rms_norm", "x");
  check_same_device(weight, x, "rms_norm", "weight");
  check_float(x, "rms_norm", "x");
  TORCH_CHECK(x.dim() >= 1, "optistack_cuda::rms_norm: x must have at least one dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), w = weight_for(x, weight);
  at::Tensor y = at::empty_like(xc);
  launch_rms_norm<false>(xc, nullptr, w, y, nullptr, eps);
  return y;
}

inline std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const at::Tensor& residual,
                                                            const at::Tensor& weight, double eps) {
  check_cuda(x, "rms_norm_residual", "x");
  check_same_device(residual, x, "rms_norm_residual", "residual");
  check_same_device(weight, x, "rms_norm_residual", "weight");
  check_float(x, "rms_norm_residual", "x");
  TORCH_CHECK(x.dim() >= 1, "optistack_cuda::rms_norm_residual: x must have at least one dimension");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "optistack_cuda::rms_norm_residual: residual must match x in shape and dtype, got ", residual.sizes(),
              " ", residual.scalar_type(), " vs ", x.sizes(), " ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), w = weight_for(x, weight);
  at::Tensor y = at::empty_like(xc), h = at::empty_like(xc);
  launch_rms_norm<true>(xc, &rc, w, y, &h, eps);
  return {y, h};
}

}  // namespace optistack_cuda
