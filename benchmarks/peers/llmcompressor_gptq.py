"""Run llm-compressor's GPTQ in its own virtualenv (it pins transformers and compressed-tensors versions
optistack's venv does not have), as a subprocess of `test_gptq_llmcompressor.py`:

    .venv-llmcompressor/bin/python llmcompressor_gptq.py MODEL_DIR CALIB_JSON OUT_DIR GROUP_SIZE [CHUNKS_JSON]

CALIB_JSON holds the token-id windows optistack's GPTQ calibrates on (a list of lists), so both see the
same 32 x 128 tokens. The scheme is llm-compressor's `W4A16_ASYM` preset (int4 weights, asymmetric:
integer zero points, strategy `group`, float activations) with its group size set to GROUP_SIZE, on
every Linear but `lm_head`; `GPTQModifier`'s other settings are its defaults (block_size 128,
dampening_frac 0.01, actorder "static"), printed with the result. Saved compressed (compressed-tensors,
`pack-quantized`) to OUT_DIR; one JSON line with the quantize wall time (and, with CHUNKS_JSON, the
perplexity) is printed last, as `llmcompressor_awq.py` does.
"""
from __future__ import annotations

import json
import sys
import time


def main(model_dir: str, calib_json: str, out_dir: str, group_size: int, chunks_json: str | None = None) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor_awq import _without_gguf_marker, perplexity  # beside this file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = json.loads(open(calib_json).read())
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model_dir = _without_gguf_marker(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    recipe = GPTQModifier(
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
    import llmcompressor

    weights = recipe.resolve_quantization_config().config_groups["group_0"].weights
    print(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__, "perplexity": ppl,
                      "gptq": {"block_size": recipe.block_size, "dampening_frac": recipe.dampening_frac,
                               "actorder": str(weights.actorder), "observer": str(weights.observer)}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])
