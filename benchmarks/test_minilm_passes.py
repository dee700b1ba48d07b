"""pytest-benchmark suite: eager MiniLM (batch 8 x 128) against each CPU pass, one forward per round.

Run: `make bench` (or `pytest benchmarks --benchmark-only`). pytest-benchmark groups the rows so the
ratios to `eager` read directly; optistack's own reports add accuracy and CIs on top of this.
"""
import pytest

import optistack as ost
from optistack.core.pass_protocol import PassContext

PIPELINES = {
    "eager": "identity",
    "cast-bf16": "cast{dtype=bf16}",
    "compile": "compile",
    "int8-weight": "int8-weight",
    "int8-dynamic": "int8-dynamic",
    "int8-dynamic+compile": "int8-dynamic,compile",
    "bf16+compile": "cast{dtype=bf16},compile",
    "prune-structured-25%": "prune-structured{sparsity=0.25}",
}


@pytest.fixture(scope="module")
def minilm():
    return ost.workloads.load("minilm")


@pytest.mark.parametrize("label", list(PIPELINES))
def test_minilm_forward(benchmark, minilm, label):
    import copy

    pipeline = ost.Pipeline.parse(PIPELINES[label])
    model = pipeline.apply(copy.deepcopy(minilm.model), PassContext(workload=minilm)).model
    for _ in range(2):  # warm-up (and compilation) outside the measurement
        minilm.run(model)
    benchmark.group = "minilm 8x128 forward"
    benchmark.extra_info["pipeline"] = PIPELINES[label]
    benchmark.pedantic(minilm.run, args=(model,), rounds=15, iterations=1, warmup_rounds=1)
