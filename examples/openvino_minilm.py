"""MiniLM through OpenVINO (the `openvino` pass) and through PT2E int8 + Inductor (`pt2e-int8`),
each measured against eager fp32 by the same instrument, then the `@encoder-latency` preset.

    pip install 'optistack[openvino]'          # openvino + nncf
    python examples/openvino_minilm.py         # several minutes on 2 CPU cores (three compiles)

The `openvino` step reports what the CPU plugin chose (inference precision, threads, pinning); the
`pt2e-int8` step reports which kernels Inductor generated (oneDNN `qlinear_pointwise` calls, fused
C++ kernels). For OpenVINO and ONNX Runtime side by side with our chains in one process, run
`python benchmarks/peers/test_encoder_peers.py`.
"""
import importlib.util

import torch

import optistack as ost

if __name__ == "__main__":
    torch.set_num_threads(2)
    wl = ost.workloads.load("minilm")  # all-MiniLM-L6-v2, batch 8 x 128
    chains = ["pt2e-int8{mixed=bf16}", "@encoder-latency"]
    if importlib.util.find_spec("openvino") is not None:
        chains.insert(0, "openvino{precision=bf16,threads=2}")
    else:
        print("openvino not installed: pip install 'optistack[openvino]' (skipping the openvino pass)")
    for text in chains:
        result = ost.Pipeline.parse(text).run(wl, max_accuracy_drop=0.01, verbose=False)
        step = result.report.steps[-1]
        facts = {k: v for k, v in step.info.items() if k in ("inference_precision", "threads_used", "kernels",
                                                              "int8_kernel_calls", "pinning_used")}
        print(f"{text:40s} -> {result.report.pipeline}")
        print(f"    {step.status}: speedup {step.speedup['median']:.2f}x, cosine {step.accuracy.after:.4f}, {facts}")
