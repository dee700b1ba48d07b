"""Prompt-lookup speculative decoding on the bundled SmolLM2-135M: same greedy tokens, fewer forwards.

    HF_HUB_OFFLINE=1 python examples/speculative_decoding.py            # ~1 minute on 2 CPU cores
    HF_HUB_OFFLINE=1 python examples/speculative_decoding.py --method draft --draft-layers 10

The prompt asks the model to repeat a passage, so much of the answer is copied from the context: the
case prompt lookup is made for (long-context QA, summaries, code edits). The pass checks at apply
time that its output is token-identical to plain greedy decoding and refuses otherwise; here we check
again on the example prompt and time both side by side, interleaved.
"""
import argparse
import copy
import statistics

import torch

import optistack as ost
from optistack.core.pass_protocol import PassContext
from optistack.generation import greedy_decode
from optistack.passes.decoding.speculative import SpeculativePass

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--method", default="prompt-lookup", choices=("prompt-lookup", "draft"))
parser.add_argument("--draft-layers", type=int, default=0, help="layer-skipping draft size (method=draft)")
parser.add_argument("--num-draft-tokens", type=int, default=8)
parser.add_argument("--new-tokens", type=int, default=48)
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()

wl = ost.workloads.load("smollm2", ppl_chunks=1, ppl_chunk=256)
passage = ("The with statement is used to wrap the execution of a block with methods defined by a context "
           "manager. This allows common try, except, finally usage patterns to be encapsulated for reuse.")
text = f"Passage: {passage}\nRepeat the passage word for word.\nAnswer: {passage[:40]}"
prompt = wl.tokenizer(text, return_tensors="pt")["input_ids"]

options = {"method": args.method, "num_draft_tokens": args.num_draft_tokens}
if args.method == "draft" and args.draft_layers:
    options["draft_layers"] = args.draft_layers
# The pipeline runner would hand the pass a private copy; called directly, we copy ourselves.
result = SpeculativePass(**options).apply(copy.deepcopy(wl.model), PassContext(workload=wl))
print("pass info:", result.info)

plain_rates, spec_rates = [], []
for _ in range(args.rounds):  # interleaved, so machine drift hits both alike
    plain = greedy_decode(wl.model, prompt, args.new_tokens)
    spec = greedy_decode(result.model, prompt, args.new_tokens)
    assert torch.equal(plain.tokens, spec.tokens), "speculative output differs from greedy"
    plain_rates.append(plain.metrics()["tokens_per_s"])
    spec_rates.append(spec.metrics()["tokens_per_s"])
m = spec.metrics()
print(f"tokens/s plain {statistics.median(plain_rates):.1f} -> speculative {statistics.median(spec_rates):.1f} "
      f"({statistics.median(spec_rates) / statistics.median(plain_rates):.2f}x), "
      f"{m['tokens_per_step']:.2f} tokens per target forward, TTFT {m['ttft_ms']:.0f} ms")
print(wl.tokenizer.decode(spec.tokens[0]))
