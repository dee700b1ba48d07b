// Direct Python bindings of the same kernels, for eager calls: a pybind11 call costs ~1 us where the
// boxed torch.ops dispatch costs ~4 us, which is most of a decode-sized RMSNorm or SwiGLU. The
// torch.library ops (ops.cpp) stay the path under torch.compile.
#include <torch/extension.h>

#include "kernels.h"
#include "llama_decode.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &optistack_cpu::rms_norm);
  m.def("add_rms_norm", &optistack_cpu::add_rms_norm);
  m.def("swiglu", &optistack_cpu::swiglu);
  m.def("int4_matmul", &optistack_cpu::int4_matmul);
  m.def("int4_dequant", &optistack_cpu::int4_dequant);
  m.def("int8_matmul", &optistack_cpu::int8_matmul);
  // The decode engine (llama_decode.cpp): built once from a model's tensors, one call per token.
  m.def("llama_engine_supported", &optistack_cpu::llama_engine_supported);
  pybind11::class_<optistack_cpu::LlamaEngine>(m, "LlamaEngine")
      .def(pybind11::init<std::vector<int64_t>, double, std::vector<at::Tensor>>())
      .def("step", &optistack_cpu::LlamaEngine::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
