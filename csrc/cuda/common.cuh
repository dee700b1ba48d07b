// Shared helpers for the optistack_cuda kernels: input checks and warp/block float reductions.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

// float32, float16 and bfloat16 only (check_float rejects the rest), so no double instantiations.
#define OPTISTACK_DISPATCH_FLOAT(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace optistack_cuda {

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "optistack_cuda::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device() == like.device(), "optistack_cuda::", op, ": ", name, " is on ", t.device(),
              " but x is on ", like.device());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, "optistack_cuda::", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", d);
}

inline int64_t rows_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.numel() / std::max<int64_t>(t.size(-1), 1); }

inline unsigned int blocks_for(int64_t work, int threads, int64_t cap = 65535) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, cap)));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16 bytes of T moved with one vector load/store (8 bf16/fp16 or 4 fp32 values).
template <typename T>
struct Pack16 {
  static constexpr int kSize = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[kSize];
  };
  __device__ __forceinline__ Pack16() {}
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. `shared` holds one float per warp (32 floats).
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

}  // namespace optistack_cuda
