"""The causal-LM headline: decode tokens/s and TTFT ratios (with CIs from the workload's samples) lead
the final line and the JSON, beside the prefill latency speedup; the plot takes either axis."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from optistack.bench.headline import default_axis, generation_ratio, headline
from optistack.bench.report import Accuracy, Report, Step

pytest.importorskip("rich")
pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _extra(token_ms: float, ttft_ms: float, seed: int) -> dict:
    rng = random.Random(seed)
    tokens = [token_ms * (1 + 0.05 * rng.random()) for _ in range(60)]
    ttfts = [ttft_ms * (1 + 0.05 * rng.random()) for _ in range(5)]
    tpot = sorted(tokens)[len(tokens) // 2]
    return {"ttft_ms": sorted(ttfts)[2], "tpot_ms": tpot, "tokens_per_s": 1000.0 / tpot, "p99_token_ms": max(tokens),
            "gen_tokens": 61.0, "samples": {"decode_token_ms": tokens, "ttft_ms": ttfts}}


def _lat(median: float) -> dict:
    return {"median": median, "p90": median * 1.1, "p99": median * 1.2, "mean": median, "std": 0.01 * median,
            "cv": 0.01, "n": 20, "noisy": False}


def causal_report(kind: str = "causal-lm") -> Report:
    acc = Accuracy(metric="perplexity", before=14.70, after=15.87, higher_is_better=False, drop=0.08,
                   drop_from_original=0.08)
    steps = [
        Step(pass_name="awq", config={}, text="awq", status="applied", speedup={"median": 0.71, "ci95": [0.69, 0.73]},
             cumulative_speedup=0.71, cumulative_ci95=[0.69, 0.73], latency_ms=_lat(246.0), accuracy=acc,
             extra=_extra(35.0 / 1.6, 175.0 / 0.71, seed=2)),
        Step(pass_name="prune-magnitude", config={}, text="prune-magnitude{sparsity=0.9}", status="rejected",
             reason="perplexity drop too large", speedup={"median": 1.0, "ci95": [0.98, 1.02]},
             cumulative_speedup=None, latency_ms=_lat(246.0), extra=_extra(22.0, 250.0, seed=3),
             accuracy=Accuracy(metric="perplexity", before=15.87, after=900.0, higher_is_better=False,
                               drop=55.0, drop_from_original=60.0)),
    ]
    return Report(workload={"name": "smollm2", "kind": kind, "model_id": "SmolLM2"}, pipeline="awq,prune-magnitude",
                  machine={"cpu_count": 2}, versions={"torch": "2.x"},
                  baseline={"latency_ms": _lat(175.0), "extra": _extra(35.0, 175.0, seed=1),
                            "accuracy": {"perplexity": 14.70, "metric": "perplexity", "higher_is_better": False}},
                  steps=steps, max_accuracy_drop=0.1)


def test_headline_carries_decode_and_ttft_ratios_with_cis():
    report = causal_report()
    head = report.headline
    assert head["latency"]["speedup"] == 0.71 and "prefill" in head["latency"]["what"]
    decode, ttft = head["decode"], head["ttft"]
    assert decode["speedup"] == pytest.approx(decode["after"] / decode["before"])
    assert 1.45 < decode["speedup"] < 1.75 and decode["step"] == 1
    lo, hi = decode["ci95"]
    assert lo < decode["speedup"] < hi and hi - lo < 0.3
    assert ttft["speedup"] == pytest.approx(ttft["before"] / ttft["after"]) and ttft["speedup"] < 1
    assert ttft["ci95"][0] < ttft["speedup"] < ttft["ci95"][1]
    data = json.loads(report.to_json())
    assert data["headline"]["decode"]["ci95"] == pytest.approx([lo, hi])
    again = Report.from_dict(data)  # the derived headline is ignored on load and recomputed the same
    assert again.headline["decode"]["speedup"] == pytest.approx(decode["speedup"])


def test_final_line_leads_with_decode_then_ttft_then_prefill():
    report = causal_report()
    text = str(report)
    final = " ".join(text[text.index("final:"):].split())  # the line may wrap at the console width
    assert final.startswith("final: decode 1.") and "tokens/s)" in final
    assert final.index("decode") < final.index("TTFT") < final.index("prefill latency 0.71x [0.69, 0.73]")
    for text in (report.to_markdown(), report._repr_html_()):
        assert "decode vs original" in text and "TTFT vs original" in text and "prefill latency 0.71x" in text
        assert "samples" not in text  # raw samples stay in the JSON


def test_other_workloads_keep_the_latency_headline():
    report = causal_report(kind="encoder")
    assert set(report.headline) == {"latency"}
    assert str(report).rstrip().splitlines()[-1].startswith("final: 0.71x [0.69, 0.73] vs the original")
    assert default_axis(report) == "latency"


def test_without_samples_the_ratio_has_no_ci():
    base = {"tokens_per_s": 30.0, "ttft_ms": 100.0}
    ratio = generation_ratio(base, {"tokens_per_s": 45.0, "ttft_ms": 50.0}, "decode")
    assert ratio == {"before": 30.0, "after": 45.0, "speedup": 1.5, "ci95": None}
    assert generation_ratio(base, {"ttft_ms": 50.0}, "ttft")["speedup"] == 2.0
    assert generation_ratio(base, {}, "decode") is None
    assert generation_ratio(base, {"tokens_per_s": math.nan}, "decode") is None


@pytest.mark.parametrize("axis", [None, "latency", "decode", "ttft"])
def test_plot_takes_either_axis(tmp_path, axis):
    report = causal_report()
    path = report.plot(tmp_path / f"{axis}.png", axis=axis)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert default_axis(report) == "decode"


def test_plot_refuses_an_unknown_axis(tmp_path):
    with pytest.raises(ValueError, match="unknown plot axis 'speed'.*latency, decode, ttft"):
        causal_report().plot(tmp_path / "x.png", axis="speed")


class TinyCausalLM:
    """A causal-LM workload around a tiny random llama: prefill timed, perplexity on random ids."""

    name, kind = "tiny-llama", "causal-lm"

    def __init__(self) -> None:
        from tiny_models import tiny_llama

        from optistack.core.workload import Metric

        self.metric = Metric("perplexity", higher_is_better=False)
        self.model = tiny_llama(vocab_size=128)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (1, 32), generator=g)

    def run(self, model):
        with torch.inference_mode():
            return model(input_ids=self.ids, use_cache=False)

    def evaluate(self, model):
        with torch.inference_mode():
            logits = model(input_ids=self.ids, use_cache=False).logits[0, :-1].float()
        return {"perplexity": math.exp(torch.nn.functional.cross_entropy(logits, self.ids[0, 1:]).item())}

    def calibration_inputs(self, n):
        return [((), {"input_ids": self.ids})][:n]

    def extra_measurements(self, model):
        from optistack.workloads.generation import generation_measurements

        return generation_measurements(model, self.ids[:, :16], 12, ttft_repeats=4)

    def describe(self):
        return {"model": "tiny llama"}


def test_a_tiny_llama_run_reports_the_decode_headline():
    from optistack.bench.timer import TimingConfig
    from optistack.core.pipeline import Pipeline

    result = Pipeline.parse("identity").run(TinyCausalLM(), timing=TimingConfig(min_rounds=3, max_rounds=3, warmup=1),
                                            verbose=False)
    report = result.report
    samples = report.baseline["extra"]["samples"]
    assert len(samples["decode_token_ms"]) == 11 and len(samples["ttft_ms"]) == 4
    head = report.headline
    assert {"latency", "decode", "ttft"} <= set(head)
    assert head["decode"]["ci95"] is not None and head["decode"]["ci95"][0] <= head["decode"]["ci95"][1]
    assert " ".join(str(report).split()).split("final: ")[1].startswith("decode ")
    assert json.loads(report.to_json())["headline"]["ttft"]["before"] > 0
    assert headline(report) == head
