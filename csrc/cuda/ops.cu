// The optistack_cuda operator library: one translation unit, built by torch.utils.cpp_extension.load
// (optistack/passes/kernels/cuda.py) and compiled as is by tests/passes/kernels/test_cuda_kernels.py.
// Fake (meta) implementations for torch.compile are registered from Python in cuda.py.
#include <torch/library.h>

#include "int4_matmul.cuh"
#include "rms_norm.cuh"
#include "swiglu.cuh"

TORCH_LIBRARY(optistack_cuda, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_residual(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("int4_matmul(Tensor x, Tensor qweight, Tensor scale, Tensor zero, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(optistack_cuda, CUDA, m) {
  m.impl("rms_norm", &optistack_cuda::rms_norm);
  m.impl("rms_norm_residual", &optistack_cuda::rms_norm_residual);
  m.impl("swiglu", &optistack_cuda::swiglu);
  m.impl("int4_matmul", &optistack_cuda::int4_matmul);
}
