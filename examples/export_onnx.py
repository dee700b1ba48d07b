"""Export the bundled MiniLM to ONNX, fuse and quantize it with ONNX Runtime, save it, load it back.

    python examples/export_onnx.py            # ~3 minutes on 2 CPU cores

Every step is measured (speedup with a 95% CI, cosine to the original embeddings) and gated at 1%.
"""
import tempfile

import torch

import optistack as ost

wl = ost.workloads.load("minilm")  # all-MiniLM-L6-v2, batch 8 x 128
pipeline = "onnx-export,ort-optimize,ort-quantize{keep_fp32=2}"
result = ost.Pipeline.parse(pipeline).run(wl, max_accuracy_drop=0.01)
result.report.print()

with tempfile.TemporaryDirectory() as folder:
    result.save(folder)  # the .onnx graph + a manifest with the session options; no pickle
    loaded = ost.load_model(folder)
    same = torch.equal(wl.run(loaded)[0], wl.run(result.model)[0])
    print(f"reloaded {loaded!r}: identical outputs: {same}")
