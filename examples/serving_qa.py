"""Compress long QA prompts with LLMLingua (offline, SmolLM2 as the scorer) and see what a user feels:
prompt tokens, time to first token, answer accuracy.

    python examples/serving_qa.py            # tens of minutes on 2 busy CPU cores (16 items, twice)
"""
import optistack as ost
from optistack.workloads.longqa import LongQAWorkload

wl = LongQAWorkload(n_items=16)  # 16 planted facts in ~900-token documents
result = ost.Pipeline.parse("prompt-compress{rate=0.5}").run(wl, max_accuracy_drop=5.0)  # 5 points
result.report.print()

step = result.report.steps[0]
before, after = result.report.baseline["extra"], step.extra
print(f"prompt tokens {before['prompt_tokens']:.0f} -> {after['prompt_tokens']:.0f}, "
      f"TTFT {before['ttft_ms']:.0f} -> {after['ttft_ms']:.0f} ms, "
      f"accuracy {step.accuracy.before:.1f} -> {step.accuracy.after:.1f} points, "
      f"ROUGE-L vs original {step.accuracy.extra['rouge_l']:.2f}")

item = wl.items[0]  # the compressed document a request would send
print(result.model.optistack_prepare_context(item.context, item.question)[:400], "...")
