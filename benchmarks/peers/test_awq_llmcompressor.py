"""optistack's AWQ beside llm-compressor's (AutoAWQ's maintained successor) on SmolLM2, same setting:
the same 32 x 128-token calibration windows, int4 groups of 64 with integer zero points (asymmetric),
`lm_head` left in float. Both results are scored by the smollm2 workload's perplexity: ours in memory,
llm-compressor's after loading its compressed-tensors checkpoint with transformers (as a user would).

llm-compressor 0.14 pins transformers<=5.17 and compressed-tensors 0.19, so it lives in its own
virtualenv, run as a subprocess (`llmcompressor_awq.py`); skipped with the reason when absent:

    python -m venv .venv-llmcompressor
    .venv-llmcompressor/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

(or point `OPTISTACK_LLMCOMPRESSOR_PYTHON` at another interpreter that has it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("llmcompressor_awq.py")
GROUP_SIZE, SAMPLES, SEQ_LEN = 64, 32, 128


def _peer_python() -> str:
    python = os.environ.get("OPTISTACK_LLMCOMPRESSOR_PYTHON") or str(ROOT / ".venv-llmcompressor" / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip(f"llm-compressor is not installed: no {python} (see this file's docstring for its own venv; it "
                    "pins transformers<=5.17, so it cannot share optistack's)")
    probe = subprocess.run([python, "-c", "import llmcompressor"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"{python} cannot import llmcompressor: {probe.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.mark.slow
def test_awq_perplexity_beside_llmcompressor(tmp_path, results_table):
    pytest.importorskip("compressed_tensors")
    python = _peer_python()
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from optistack.bundled_models import smollm2_dir
    from optistack.core.pass_protocol import PassContext
    from optistack.core.pipeline import Pipeline
    from optistack.passes.quant.awq import calibration_ids
    from optistack.workloads import load

    wl = load("smollm2")
    table = results_table("awq-llmcompressor", {"model": "SmolLM2-135M-Instruct (fp32)", "bits": 4,
                                                "group_size": GROUP_SIZE, "zero_point": "integer (asymmetric)",
                                                "calibration": f"{SAMPLES} x {SEQ_LEN} tokens", "ignore": "lm_head"},
                          columns=("perplexity", "vs_fp32_pct", "seconds"))
    fp32 = wl.evaluate(wl.model)["perplexity"]
    table.add("fp32", "original", perplexity=fp32, vs_fp32_pct=0.0)

    ids = calibration_ids(PassContext(workload=wl), SAMPLES, SEQ_LEN, "awq")  # what our AWQ calibrates on
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(ids.tolist()))
    out = tmp_path / "llmc"
    started = time.perf_counter()
    run = subprocess.run([python, str(SCRIPT), str(smollm2_dir()), str(calib), str(out), str(GROUP_SIZE)],
                         capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - started
    if run.returncode:
        table.add("llm-compressor", "AWQModifier", status=f"failed (exit {run.returncode})")
        pytest.fail(f"llm-compressor's AWQ failed:\n{run.stderr[-3000:]}")
    peer_seconds = json.loads(run.stdout.strip().splitlines()[-1])["seconds"]
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype="float32",
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    peer_ppl = wl.evaluate(theirs)["perplexity"]
    table.add("llm-compressor 0.14", "AWQModifier (oneshot, CPU)", perplexity=peer_ppl,
              vs_fp32_pct=100 * (peer_ppl / fp32 - 1), seconds=peer_seconds)

    awq = Pipeline.parse(f"awq{{group_size={GROUP_SIZE},calib_samples={SAMPLES},calib_seq_len={SEQ_LEN}}}").passes[0]
    started = time.perf_counter()
    ours = awq.apply(wl.model.__class__.from_pretrained(smollm2_dir(), dtype="float32").eval(),
                     PassContext(workload=wl)).model
    our_seconds = time.perf_counter() - started
    our_ppl = wl.evaluate(ours)["perplexity"]
    table.add("optistack", str(awq), perplexity=our_ppl, vs_fp32_pct=100 * (our_ppl / fp32 - 1), seconds=our_seconds)
    table.ratios["perplexity optistack / llm-compressor"] = our_ppl / peer_ppl
    table.notes.append(f"llm-compressor subprocess wall time {wall:.0f} s (incl. start-up and saving); "
                       "2 CPU cores, possibly shared: times are indicative")
    print(table.markdown(), file=sys.stderr)
    assert our_ppl < peer_ppl, f"optistack AWQ perplexity {our_ppl:.3f} is not below llm-compressor's {peer_ppl:.3f}"
