"""optistack.testing: check a lossy pass on a tiny random model in seconds, and skip what this machine lacks.

    python examples/testing_helpers.py

The same helpers serve a pytest suite: `@requires("amx")` skips a test with the reason printed, and
`sqnr(reference, output) >= floor` is the accuracy floor a lossy pass's test asserts.
"""
import copy

import torch

import optistack as ost
from optistack.testing import FEATURES, missing, sqnr, tiny_llama, tiny_mlp, token_inputs

# What this machine has, and why not where it lacks something (the reason a skip marker prints).
for feature in FEATURES:
    print(f"{feature:12s} {missing(feature) or 'yes'}")

# A tiny random Llama (hidden 64, 2 layers, seeded: the same weights every run) through two lossy passes.
model = tiny_llama(vocab_size=128)
ids = token_inputs(vocab_size=128, seq=32, n=1)[0]["input_ids"]
with torch.no_grad():
    reference = model(ids).logits
    for text in ("int8-dynamic", "rtn-int4{group_size=32}"):
        pipeline = ost.Pipeline.parse(text)
        if not pipeline.requirements():  # e.g. torchao missing: say why instead of failing
            print(f"{text}: skipped, {pipeline.requirements().reason}")
            continue
        quantized = pipeline.apply(copy.deepcopy(model), ost.PassContext()).model
        print(f"{text:24s} logits SQNR {sqnr(reference, quantized(ids).logits):5.1f} dB")

# SQNR reads in dB: noise at 1% of the signal is ~40 dB; identical outputs are inf.
x = torch.randn(4096)
print(f"1% noise: {sqnr(x, x + 0.01 * torch.randn(4096)):.1f} dB, identical: {sqnr(x, x)}")
print("tiny_mlp(16, 64, 8):", tiny_mlp(16, 64, 8)(torch.randn(2, 16)).shape)
