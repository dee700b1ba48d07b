// The CPU kernels' entry points, shared by ops.cpp (torch.library) and bindings.cpp (pybind11).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace optistack_cpu {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w,
                                                 double eps);
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const at::Tensor& zero, int64_t group);
// Raises (naming `op`) unless qweight/scale/zero are an int4_prepack result for this group size.
void check_int4_packed(const char* op, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group);
at::Tensor int4_dequant(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero, int64_t group);
// Weight-only int8 (per-output-channel float32 scale), see int8_gemm.cpp.
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale);
}  // namespace optistack_cpu
