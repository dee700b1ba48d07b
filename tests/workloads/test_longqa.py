"""smollm2-qa: items, ROUGE-L and the energy counter (fast); the real model answers (slow)."""
from __future__ import annotations

import pytest

from optistack.workloads.longqa import EnergyMeter, build_items, read_facts, rouge_l


def test_rouge_l():
    assert rouge_l("the code is 4471", "the code is 4471") == 1.0
    assert rouge_l("4471", "The access code is 4471.") == pytest.approx(1 / 3)  # P=1, R=1/5
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS "a c"
    assert rouge_l("nothing shared", "at all") == 0.0
    assert rouge_l("", "") == 1.0


def test_items_hide_each_fact_in_a_long_context():
    count = lambda text: len(text.split())  # noqa: E731  a word counter stands in for the tokenizer
    items = build_items(8, 300, count)
    facts = read_facts()
    assert len(items) == 8 and len({i.context for i in items}) == 8
    for item, (fact, question, answer) in zip(items, facts):
        paras = item.context.split("\n\n")
        assert fact in paras
        assert count(item.context) >= 300 and item.question == question and item.answer == answer
    assert build_items(8, 300, count) == items  # deterministic
    with pytest.raises(Exception, match="n_items must be <="):
        build_items(len(facts) + 1, 300, count)


def test_energy_meter_reads_a_counter_or_says_why_not():
    meter = EnergyMeter()
    with meter.measure() as reading:
        sum(range(10000))
    if meter.describe().startswith("unavailable"):
        assert reading.joules is None and ("RAPL" in meter.describe())
    else:
        assert reading.joules is None or reading.joules >= 0


@pytest.mark.slow
def test_original_model_answers_from_the_context():
    from optistack.workloads.longqa import LongQAWorkload

    wl = LongQAWorkload(n_items=3)
    scores = wl.evaluate(wl.model)
    assert scores["accuracy"] >= 66.0  # measured: 3/3
    assert scores["rouge_l"] == 1.0  # the original is its own reference
    extras = wl.extra_measurements(wl.model)
    assert extras["prompt_tokens"] > 800 and extras["ttft_ms"] > 0 and extras["e2e_p99_ms"] >= extras["e2e_latency_ms"]
    assert all(isinstance(v, float) for v in extras.values())


@pytest.mark.slow
def test_timing_prompts_are_fresh_about_one_length_and_never_an_evaluated_item():
    from optistack.workloads.longqa import LongQAWorkload

    wl = LongQAWorkload(n_items=2, context_tokens=300)
    items = [wl.timing_batch(i) for i in range(4)]
    facts = {f for f, _, _ in read_facts()}
    assert len({i.context for i in items}) == 4
    assert all(not any(f in i.context for f in facts) for i in items)
    lengths = [wl.prompt_ids(wl.model, i).shape[-1] for i in items]
    assert max(lengths) - min(lengths) <= 8, lengths
    assert wl.run(wl.model, items[0]).logits.shape[1] == lengths[0]
