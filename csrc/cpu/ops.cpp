// torch.library registration of the optistack CPU kernels (namespace optistack_cpu).
// Fake (meta) implementations live in Python (optistack/passes/kernels/cpu.py) so torch.compile
// can trace through the ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"
#include "simd.h"

namespace optistack_cpu {

// Which code paths this build took, for reports: "avx512-bf16" (all intrinsics paths), "avx512"
// (RMSNorm/SwiGLU intrinsics, int4 in portable loops), "avx2" / "portable" (compiler-vectorized loops).
static std::string isa() {
#if defined(OPTISTACK_AVX512) && defined(OPTISTACK_AVX512BF16)
  return "avx512-bf16";
#elif defined(OPTISTACK_AVX512)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "portable";
#endif
}
}  // namespace optistack_cpu

TORCH_LIBRARY(optistack_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("int4_matmul(Tensor x, Tensor qweight, Tensor scale, Tensor zero, int group_size) -> Tensor");
  m.def("int4_dequant(Tensor qweight, Tensor scale, Tensor zero, int group_size) -> Tensor");
  m.def("int8_matmul(Tensor x, Tensor qweight, Tensor scale) -> Tensor");
  m.def("isa() -> str", &optistack_cpu::isa);
}

TORCH_LIBRARY_IMPL(optistack_cpu, CPU, m) {
  m.impl("rms_norm", &optistack_cpu::rms_norm);
  m.impl("add_rms_norm", &optistack_cpu::add_rms_norm);
  m.impl("swiglu", &optistack_cpu::swiglu);
  m.impl("int4_matmul", &optistack_cpu::int4_matmul);
  m.impl("int4_dequant", &optistack_cpu::int4_dequant);
  m.impl("int8_matmul", &optistack_cpu::int8_matmul);
}
