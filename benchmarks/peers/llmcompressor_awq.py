"""Run llm-compressor's AWQ in its own virtualenv (it pins transformers<=5.17 and compressed-tensors 0.19,
which optistack's venv does not have), as a subprocess of `test_awq_llmcompressor.py`:

    .venv-llmcompressor/bin/python llmcompressor_awq.py MODEL_DIR CALIB_JSON OUT_DIR GROUP_SIZE [CHUNKS_JSON]

CALIB_JSON holds the token-id windows optistack's AWQ calibrates on (a list of lists), so both methods
see the same 32 x 128 tokens. The result is saved compressed (compressed-tensors) to OUT_DIR, and one
JSON line with the wall time is printed last; with CHUNKS_JSON (evaluation token-id chunks) it also
holds the quantized model's perplexity on them, scored here before saving (`perplexity`: each chunk
one forward, the mean NLL of tokens 1.., as optistack's smollm2 workload scores it; also used by
`llmcompressor_gptq.py`). On a CPU-only machine llm-compressor's AWQ pins its activation cache
(`Tensor.pin_memory`), which needs an accelerator: that one call is patched to a
no-op here, at run time, in this process only (nothing in site-packages changes).
"""
from __future__ import annotations

import json
import sys
import time


def _without_gguf_marker(model_dir: str) -> str:
    """A folder converted from GGUF may still say `quant_method: gguf` though its weights are fp32, and
    oneshot refuses such a config: link the files into a temp folder with that key removed."""
    import os
    import tempfile

    config = json.loads(open(os.path.join(model_dir, "config.json")).read())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return model_dir
    del config["quantization_config"]
    clean = tempfile.mkdtemp(prefix="llmc-model-")
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.join(model_dir, name), os.path.join(clean, name))
    with open(os.path.join(clean, "config.json"), "w") as f:
        json.dump(config, f)
    return clean


def perplexity(model, chunks_json: str | None) -> float | None:
    """exp(mean NLL of tokens 1.. of each chunk given its prefix); None without chunks."""
    import math

    import torch

    if not chunks_json:
        return None
    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in json.loads(open(chunks_json).read()):
            t = torch.tensor([ids])
            logits = model(input_ids=t, use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def quantize(modifier: type, model_dir: str, calib_json: str, out_dir: str, group_size: int,
             chunks_json: str | None) -> tuple[object, float, float | None]:
    """llm-compressor's oneshot with `modifier` (AWQModifier or GPTQModifier): W4A16_ASYM at `group_size` on every
    Linear but lm_head, calibrated on CALIB_JSON's windows; saved compressed to out_dir. Returns the recipe, the
    quantize wall time and the perplexity on CHUNKS_JSON (None without it)."""
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # CPU-only: pinning needs an accelerator
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = json.loads(open(calib_json).read())
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model_dir = _without_gguf_marker(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    recipe = modifier(
        ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size}}},
    )
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=len(windows[0]))
    seconds = time.perf_counter() - start
    ppl = perplexity(model, chunks_json)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    return recipe, seconds, ppl


def main(model_dir: str, calib_json: str, out_dir: str, group_size: int, chunks_json: str | None = None) -> None:
    import llmcompressor
    from llmcompressor.modifiers.awq import AWQModifier

    _, seconds, ppl = quantize(AWQModifier, model_dir, calib_json, out_dir, group_size, chunks_json)
    print(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__, "perplexity": ppl}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])
