// Fused SwiGLU: silu(gate) * up, float32 math, gate's dtype out; one read of each input, one write.
#pragma once

#include "common.cuh"

namespace optistack_cuda {

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

// Vector body (16-byte loads) over the first n - n % V elements when the pointers allow it, then a
// scalar tail; `vec` is false for misaligned views and everything goes through the scalar loop.
template <typename T>
__global__ void swiglu_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y, int64_t n,
                              bool vec) {
  using P = Pack16<T>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t n_vec = vec ? n / P::kSize : 0;
  for (int64_t i = tid; i < n_vec; i += stride) {
    P g, u, out;
    g.raw = reinterpret_cast<const uint4*>(gate)[i];
    u.raw = reinterpret_cast<const uint4*>(up)[i];
#pragma unroll
    for (int j = 0; j < P::kSize; ++j) {
      out.v[j] = static_cast<T>(silu_mul(static_cast<float>(g.v[j]), static_cast<float>(u.v[j])));
    }
    reinterpret_cast<uint4*>(y)[i] = out.raw;
  }
  for (int64_t i = n_vec * P::kSize + tid; i < n; i += stride) {
    y[i] = static_cast<T>(silu_mul(static_cast<float>(gate[i]), static_cast<float>(up[i])));
  }
}

inline at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_cuda(gate, "swiglu", "gate");
  check_same_device(up, gate, "swiglu", "up");
  check_float(gate, "swiglu", "gate");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "optistack_cuda::swiglu: gate and up must match in shape and dtype, got ", gate.sizes(), " ",
              gate.scalar_type(), " vs ", up.sizes(), " ", up.scalar_type());
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor y = at::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return y;
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  OPTISTACK_DISPATCH_FLOAT(g.scalar_type(), "optistack_swiglu", [&] {
    const bool vec = aligned16(g.data_ptr()) && aligned16(u.data_ptr()) && aligned16(y.data_ptr());
    const int64_t per_thread = vec ? 16 / static_cast<int64_t>(sizeof(scalar_t)) : 1;
    swiglu_kernel<scalar_t><<<blocks_for((n + per_thread - 1) / per_thread, threads), threads, 0, stream>>>(
        g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace optistack_cuda
