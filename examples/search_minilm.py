"""Search pass combinations for MiniLM: fastest pipeline within a 1% accuracy budget.

    python examples/search_minilm.py            # 12 trials, stored in search_minilm.db
    python examples/search_minilm.py 20         # more trials; rerunning resumes from the store

Prints the Pareto front and the best pipeline, and writes search_minilm.png.
"""
import sys
import time

import optistack

if __name__ == "__main__":
    budget = sys.argv[1] if len(sys.argv) > 1 else 12  # trials, or a wall time such as "10m"
    started = time.monotonic()
    result = optistack.search(
        "minilm",
        candidates=["int8-dynamic", "compile", "onnx-export", "ort-optimize", "ort-quantize{per_channel=true|false}",
                    "prune-magnitude{sparsity=0.3}"],
        max_accuracy_drop=0.01,
        objective="latency",
        budget=int(budget) if str(budget).isdigit() else budget,
        store="search_minilm.db",
    )
    result.print()
    print(f"plot: {result.plot('search_minilm.png')}")
    print(f"best pipeline: {result.best_pipeline}")
    single = result.best_single
    print(f"best single pass: {single.pipeline if single else None}")
    print(f"wall time: {time.monotonic() - started:.0f} s, trials run now: {result.ran}")
