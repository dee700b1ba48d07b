"""Named pipelines: what `@llm-decode` and `@encoder-latency` expand to on this machine, and a run of
one on the bundled MiniLM (the report keeps the preset beside its expansion).

    python examples/presets.py            # list the presets, then run @encoder-latency on minilm
    python examples/presets.py --list     # only the list (no model is loaded)
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import optistack as ost  # noqa: E402
from optistack.presets import describe_presets, machine_features  # noqa: E402

print(f"this machine: {', '.join(sorted(machine_features()))}")
for row in describe_presets():
    print(f"{row['name']:<18} -> {row['expansion']}   ({row['chosen_for']}: {row['why']})")

# A preset composes with passes like any item; str() prints the expansion that will run.
pipe = ost.Pipeline.parse("@encoder-latency")
print(f"\nparsed: {pipe.preset!r} = {str(pipe)!r}")

if "--list" not in sys.argv:
    from optistack.bench.timer import TimingConfig

    result = pipe.run("minilm", max_accuracy_drop=0.01, timing=TimingConfig(min_rounds=6, max_rounds=20, max_seconds=8.0))
    report = result.report
    print(f"\nreport.preset = {report.preset!r}, report.pipeline = {report.pipeline!r}")
    print(f"final speedup {report.final_speedup:.2f}x")
