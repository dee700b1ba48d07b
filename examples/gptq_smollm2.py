"""GPTQ int4 on the bundled SmolLM2-135M: quantize, then compare perplexity, size and decode speed.

    HF_HUB_OFFLINE=1 python examples/gptq_smollm2.py                        # a few minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python examples/gptq_smollm2.py --group-size 128 --quick
    HF_HUB_OFFLINE=1 python examples/gptq_smollm2.py --with-awq    # AWQ's scales, GPTQ's rounding, kept only if
                                                                   # the whole model is closer to fp32 with them
    HF_HUB_OFFLINE=1 python examples/gptq_smollm2.py --with-awq --awq-check block  # ... judged block by block

The pipeline runner measures the baseline and the quantized model side by side (interleaved timing,
perplexity on text the calibration never saw, decode tokens/s from our own KV-cache loop) and keeps
the quantized model only if perplexity rises by less than --max-drop. The layers are the same
`Int4Linear` that `rtn-int4` and `awq` make, so `fuse-kernels`, `decode-engine` and saving apply as
they are. SmolLM2's fp32 is the dequantized Q4_1 (group 32) of its GGUF: compare at groups 64 and 128.
"""
import argparse

import optistack as ost

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128, 256))
parser.add_argument("--zero-grid", default="integer", choices=("integer", "float"))
parser.add_argument("--act-order", action="store_true", help="round columns in order of input energy")
parser.add_argument("--with-awq", action="store_true", help="fold AWQ's scales first: awq{quantize=false},gptq")
parser.add_argument("--awq-check", default="model", choices=("model", "block", "off"),
                    help="with --with-awq: where GPTQ keeps AWQ's scales (judged on held-out calibration text): "
                         "the whole model's (model), each block's (block), or always (off)")
parser.add_argument("--max-drop", type=float, default=0.25, help="largest accepted relative perplexity rise")
parser.add_argument("--quick", action="store_true", help="score on 2 chunks of 512 tokens instead of 8")
args = parser.parse_args()

grid = f"group_size={args.group_size},zero_grid={args.zero_grid}"
check = f",awq_check={args.awq_check}" if args.with_awq else ""
gptq = f"gptq{{{grid}{',act_order=true' if args.act_order else ''}{check}}}"
text = f"awq{{{grid},quantize=false}},{gptq}" if args.with_awq else gptq
wl = ost.workloads.load("smollm2", ppl_chunks=2 if args.quick else 8)
result = ost.Pipeline.parse(text).run(wl, max_accuracy_drop=args.max_drop)
result.report.print()

step = result.report.steps[-1]
base = result.report.baseline
print(f"{text}: quantized {step.info.get('layers_quantized')} Linear layers in {step.info.get('quantize_seconds')} s "
      f"(the GPTQ math {step.info.get('solve_seconds')} s), {step.info.get('bits_per_weight')} bits per weight; "
      f"output error {step.info.get('output_error_ratio')} x round-to-nearest's on the calibration inputs")
if "awq_scales_kept" in step.info:
    print(f"AWQ's scales {'kept' if step.info['awq_scales_kept'] else 'undone'}: on held-out calibration text, KL "
          f"to fp32 {step.info['awq_check_kl_with']} with them, {step.info['awq_check_kl_without']} without; the "
          f"text's cross-entropy {step.info['awq_check_ce_with']} / {step.info['awq_check_ce_without']}")
if "awq_blocks_kept" in step.info:
    print(f"AWQ's scales kept in {step.info['awq_blocks_kept']} blocks, undone in {step.info['awq_blocks_undone']}")
print(f"perplexity {base['accuracy']['perplexity']:.2f} -> {step.accuracy.after:.2f}")
print(f"model bytes {base['model_bytes'] / 1e6:.0f} MB -> {step.model_bytes / 1e6:.0f} MB")
print(f"decode {base['extra']['tokens_per_s']:.1f} -> {step.extra['tokens_per_s']:.1f} tokens/s")

# The quantized model is called like the original: here, a short greedy continuation.
import torch  # noqa: E402

from optistack.generation import greedy_decode  # noqa: E402

prompt = wl.tokenizer("The with statement is used to", return_tensors="pt")["input_ids"]
tokens = greedy_decode(result.model, prompt, 20).tokens
print(wl.tokenizer.decode(torch.cat([prompt, tokens], dim=-1)[0]))
