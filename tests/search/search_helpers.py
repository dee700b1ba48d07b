"""Tiny workloads for the search tests: seconds, not minutes."""
from __future__ import annotations

import torch

from optistack.bench.timer import TimingConfig

FAST = TimingConfig(warmup=1, min_rounds=3, max_rounds=4, max_seconds=1.0)
# Five cheap passes on a small MLP: lossless, half precision, int8, pruning, int4.
CANDIDATES = ["identity", "cast{dtype=bf16|fp16}", "int8-dynamic", "prune-magnitude{sparsity=0.3}", "rtn-int4"]


def tiny_mlp_workload():
    """Picklable factory: Ray workers and subprocesses build the same workload from it."""
    from optistack.testing import tiny_mlp
    from optistack.workloads.generic import GenericWorkload

    model = tiny_mlp(64, 128, 64)
    g = torch.Generator().manual_seed(1)
    return GenericWorkload(model, torch.randn(16, 64, generator=g), eval_inputs=[torch.randn(16, 64, generator=g)],
                           name="tiny-mlp")

