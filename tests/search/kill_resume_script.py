"""Run by test_resume.py in a subprocess: a tiny search on the store given, printing what it ran."""
import sys

from search_helpers import CANDIDATES, FAST, tiny_mlp_workload

import optistack

if __name__ == "__main__":
    store, budget = sys.argv[1], int(sys.argv[2])
    result = optistack.search(tiny_mlp_workload(), candidates=CANDIDATES, max_accuracy_drop=0.05, budget=budget,
                              store=store, timing=FAST, verbose=False)
    print(f"ran={result.ran} reused={result.reused} total={len(result.records)}")
