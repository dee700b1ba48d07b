"""Mixed precision under a bit budget on the bundled SmolLM2-135M: a precision per layer, then the report.

    HF_HUB_OFFLINE=1 python examples/mixed_precision_smollm2.py                 # GPTQ rounding: several minutes
    HF_HUB_OFFLINE=1 python examples/mixed_precision_smollm2.py --method rtn --quick --max-drop 0.4  # RTN: +33%
    HF_HUB_OFFLINE=1 python examples/mixed_precision_smollm2.py --bits 4.45 --choices int4-g256+int4-g128+int4-g64

`mixed-precision{bits=4.5}` measures every linear layer's predicted loss rise at each choice (int4 at
groups 128/64/32, int8) on the workload's calibration text, spends the budget (average stored bits per
weight, scales and zero points included) where it lowers that most, and rounds the int4 layers with
GPTQ. The runner scores the result on evaluation text the calibration never saw; the step's info
lists every layer's choice with the sensitivity of each choice.
"""
import argparse

import optistack as ost

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--bits", type=float, default=4.5, help="average stored bits per weight")
parser.add_argument("--choices", default="int4-g128+int4-g64+int4-g32+int8")
parser.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
parser.add_argument("--max-drop", type=float, default=0.25, help="largest accepted relative perplexity rise")
parser.add_argument("--quick", action="store_true", help="score on 2 chunks of 512 tokens instead of 8")
args = parser.parse_args()

text = f"mixed-precision{{bits={args.bits},choices={args.choices},method={args.method}}}"
wl = ost.workloads.load("smollm2", ppl_chunks=2 if args.quick else 8)
result = ost.Pipeline.parse(text).run(wl, max_accuracy_drop=args.max_drop)
result.report.print()

info = result.report.steps[-1].info
print(f"{text}: {info.get('bits_per_weight')} bits per weight (budget {info.get('bits_budget')}); "
      + ", ".join(f"{k.removeprefix('layers_')} {v}" for k, v in info.items() if k.startswith("layers_int") and v))
print(f"predicted loss rise {info.get('predicted_loss_increase')} nats/token "
      f"(all int4-g64: {info.get('predicted_loss_increase_all_int4-g64')})")
for key, value in info.items():
    if key.startswith("choice ") and (".layers.0." in key or "down_proj" in key):
        print(f"  {key.removeprefix('choice ')}: {value}")  # layer 0 and every down_proj; all are in the info

# int4 layers at several group sizes and int8 layers save and load as they are (safetensors, no pickle).
import tempfile  # noqa: E402

import torch  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    loaded = ost.load_model(result.save(f"{tmp}/mixed"))
    ids = wl.tokenizer("The with statement is used to", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        same = torch.equal(loaded(ids).logits, result.model(ids).logits)
    print(f"saved and loaded: logits identical = {same}")
