"""From your own Hugging Face folder to a checkpoint vLLM serves: AWQ int4, measured on your data, saved
in compressed-tensors' format, loaded back with transformers to check it scores the same.

    python examples/own_model_to_vllm.py --model path/to/your-model --data your-text.txt --out your-model-awq
    python examples/own_model_to_vllm.py          # the bundled SmolLM2, its offline text, ./smollm2-awq

Then serve it (on a machine with vLLM and a GPU):  vllm serve your-model-awq
The same from the shell:  optistack run --model FOLDER --data FILE --pipeline awq --save OUT
"""
from __future__ import annotations

import argparse
import math

import optistack as ost


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face folder (config.json + safetensors) or a .gguf file; "
                                        "default: the bundled SmolLM2")
    parser.add_argument("--data", help=".txt/.jsonl/.csv/.parquet or a datasets folder (default: bundled text)")
    parser.add_argument("--pipeline", default="awq", help="e.g. awq, rtn-int4, fp8, int8-weight")
    parser.add_argument("--out", default="smollm2-awq", help="where the checkpoint goes")
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    args = parser.parse_args(argv)

    if args.model is None:
        from optistack.bundled_models import smollm2_dir

        args.model = str(smollm2_dir())  # the bundled model as a plain folder, like yours would be
    workload = ost.workloads.load(args.model, data=args.data)  # the task comes from config.json
    print("data split:", workload.describe()["data_split"])

    timing = ost.TimingConfig(min_rounds=4, max_rounds=10, max_seconds=5.0) if args.quick else None
    result = ost.Pipeline.parse(args.pipeline).run(workload, max_accuracy_drop=0.10, timing=timing)
    result.report.print()

    out = result.save_pretrained(args.out)  # compressed-tensors for int4/int8/fp8, tokenizer beside it
    print(f"saved to {out}: {sorted(p.name for p in out.iterdir())}")

    # Load it back the way a user of transformers would (compressed-tensors installed), and score it
    # on the same evaluation text: it should match optistack's in-memory model.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    ours = workload.evaluate(result.model)["perplexity"]
    theirs = workload.evaluate(reloaded)["perplexity"]
    print(f"perplexity: original {workload.evaluate(workload.model)['perplexity']:.3f}, optistack {ours:.3f}, "
          f"reloaded with transformers {theirs:.3f} ({100 * (theirs / ours - 1):+.2f}%)")
    print(f"serve it: vllm serve {out}   (or: from vllm import LLM; LLM(model='{out}'))")
    if not math.isclose(ours, theirs, rel_tol=0.005):
        raise SystemExit("the reloaded checkpoint does not score like the in-memory model")
    return {"out": str(out), "perplexity": ours, "reloaded_perplexity": theirs}


if __name__ == "__main__":
    main()
