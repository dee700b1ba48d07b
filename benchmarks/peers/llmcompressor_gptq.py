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


def main(model_dir: str, calib_json: str, out_dir: str, group_size: int, chunks_json: str | None = None) -> None:
    import llmcompressor
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor_awq import quantize  # beside this file

    recipe, seconds, ppl = quantize(GPTQModifier, model_dir, calib_json, out_dir, group_size, chunks_json)
    weights = recipe.resolve_quantization_config().config_groups["group_0"].weights
    print(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__, "perplexity": ppl,
                      "gptq": {"block_size": recipe.block_size, "dampening_frac": recipe.dampening_frac,
                               "actorder": str(weights.actorder), "observer": str(weights.observer)}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])
