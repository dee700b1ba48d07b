"""examples/instruments_and_outcomes.py runs and ends every step the way its comments say."""
import runpy
from pathlib import Path

from optistack.core.registry import unregister_pass

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "instruments_and_outcomes.py"


def test_the_outcomes_example_runs(capsys):
    try:
        scope = runpy.run_path(str(EXAMPLE), run_name="__main__")  # it asserts its statuses itself
    finally:
        for name in ("example-halve-convs", "example-llm-only", "example-poison", "example-crash", "example-widen"):
            unregister_pass(name)
    steps = scope["result"].report.steps
    assert steps[0].reason == "no Conv2d layer in the model"
    assert "KeyError" in steps[3].traceback and "parameters > limit" in steps[4].reason
