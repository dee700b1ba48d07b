// Direct Python bindings of the same kernels, for eager calls: a pybind11 call costs ~1 us where the
// boxed torch.ops dispatch costs ~4 us, which is most of a decode-sized RMSNorm or SwiGLU. The
// torch.library ops (ops.cpp) stay the path under torch.compile.
#include <torch/extension.h>

#include "int4_panel.h"
#include "kernels.h"
#include "llama_decode.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &optistack_cpu::rms_norm);
  m.def("add_rms_norm", &optistack_cpu::add_rms_norm);
  m.def("swiglu", &optistack_cpu::swiglu);
  m.def("int4_matmul", &optistack_cpu::int4_matmul);
  m.def("int4_dequant", &optistack_cpu::int4_dequant);
  m.def("int8_matmul", &optistack_cpu::int8_matmul);
  // The serving engine (llama_decode.cpp): built once from a model's tensors, given by name.
  namespace py = pybind11;
  using namespace optistack_cpu;
  m.def("llama_engine_supported", &llama_engine_supported);
  py::class_<Q4Proj>(m, "Q4Proj")
      .def(py::init<>())
      .def_readwrite("q", &Q4Proj::q)
      .def_readwrite("s", &Q4Proj::s)
      .def_readwrite("zc", &Q4Proj::zc)
      .def_readwrite("bias", &Q4Proj::bias)
      .def_readwrite("pq", &Q4Proj::pq)
      .def_readwrite("pf", &Q4Proj::pf);
  py::class_<EngineLayer>(m, "EngineLayer")
      .def(py::init<>())
      .def_readwrite("norm1", &EngineLayer::norm1)
      .def_readwrite("norm2", &EngineLayer::norm2)
      .def_readwrite("q_norm", &EngineLayer::q_norm)
      .def_readwrite("k_norm", &EngineLayer::k_norm)
      .def_readwrite("rope", &EngineLayer::rope)
      .def_readwrite("qkv", &EngineLayer::qkv)
      .def_readwrite("o", &EngineLayer::o)
      .def_readwrite("gate_up", &EngineLayer::gate_up)
      .def_readwrite("down", &EngineLayer::down);
  py::class_<EngineSpec>(m, "EngineSpec")
      .def(py::init<>())
      .def_readwrite("hidden", &EngineSpec::hidden)
      .def_readwrite("heads", &EngineSpec::heads)
      .def_readwrite("kv_heads", &EngineSpec::kv_heads)
      .def_readwrite("head_dim", &EngineSpec::head_dim)
      .def_readwrite("intermediate", &EngineSpec::intermediate)
      .def_readwrite("vocab", &EngineSpec::vocab)
      .def_readwrite("eps", &EngineSpec::eps)
      .def_readwrite("embed", &EngineSpec::embed)
      .def_readwrite("embed_s", &EngineSpec::embed_s)
      .def_readwrite("final_norm", &EngineSpec::final_norm)
      .def_readwrite("head_q", &EngineSpec::head_q)
      .def_readwrite("head_s", &EngineSpec::head_s)
      .def_readwrite("head4", &EngineSpec::head4)
      .def_readwrite("head_f", &EngineSpec::head_f)
      .def_readwrite("layers", &EngineSpec::layers);
  py::class_<LlamaEngine>(m, "LlamaEngine")
      .def(py::init<const EngineSpec&, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t,
                    int64_t>(),
           py::arg("spec"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"),
           py::arg("v_scale"), py::arg("act_bits"), py::arg("max_rows"))
      .def("forward", &LlamaEngine::forward, py::arg("tokens"), py::arg("slots"), py::arg("positions"),
           py::arg("logit_rows"), py::call_guard<py::gil_scoped_release>())
      .def("length", &LlamaEngine::length, py::call_guard<py::gil_scoped_release>())
      .def("set_length", &LlamaEngine::set_length, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("slots", &LlamaEngine::slots)
      .def_property_readonly("capacity", &LlamaEngine::capacity)
      .def_property_readonly("max_rows", &LlamaEngine::max_rows)
      .def_property("amx_rows", &LlamaEngine::amx_rows, &LlamaEngine::set_amx_rows)
      .def_property("amx_batch", &LlamaEngine::amx_batch, &LlamaEngine::set_amx_batch)
      .def_property("gemm_rows", &LlamaEngine::gemm_rows, &LlamaEngine::set_gemm_rows)
      .def_property("panels", &LlamaEngine::panels, &LlamaEngine::set_panels)
      .def_property("adaptive_threads", &LlamaEngine::adaptive_threads, &LlamaEngine::set_adaptive_threads)
      .def_property_readonly("team_threads", &LlamaEngine::team_threads)
      .def_property_readonly("last_work_ratio", &LlamaEngine::last_work_ratio);
  m.def("amx_supported", &amx_supported);
  m.def("prefetch_far", &prefetch_far);  // simd.h: how the decode GEMVs prefetch on this CPU (read once)
  m.attr("gemm_rows_default") = kGemmRows;
  m.def("q4_panels", &q4_panels, py::arg("q"), py::arg("s"), py::arg("zc"));
  m.def("q4_linear", &q4_linear, py::arg("x"), py::arg("q"), py::arg("s"), py::arg("zc"), py::arg("bias"),
        py::arg("path"), py::call_guard<py::gil_scoped_release>());
}
