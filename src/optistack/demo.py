"""`optistack demo`: what a newcomer came for, in a few minutes on a laptop-class CPU.

1. The presets this machine gets (`@llm-decode`, `@encoder-latency`) and why.
2. MiniLM through `@encoder-latency`: the measured report (speedup with its confidence interval, accuracy).
3. SmolLM2 answering a prompt through `model.generate()` with its tokens streamed as they come, first
   the original model, then the optimized one, and tokens/s of both side by side. The optimized chain is
   `@llm-decode` with round-to-nearest int4 in place of AWQ (the same layers and kernels; AWQ's
   calibration search alone takes minutes): `--llm-pipeline @llm-decode` runs the preset itself.

`optistack demo --pipeline TEXT [--model NAME]` still runs one pipeline and prints its report.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

DEMO_LLM_PIPELINE = "rtn-int4{head=int8,zero_grid=float},embed-int8,fuse-kernels,decode-engine"
DEMO_PROMPT = "Explain in two sentences why the sky is blue."


class TimedStreamer:
    """A transformers streamer that prints the answer as it comes and records when each token arrived."""

    def __init__(self, tokenizer: Any, out: TextIO, skip_prompt: bool = True) -> None:
        from transformers import TextStreamer

        self.times: list[float] = []
        self._prompt_seen = not skip_prompt
        self._text = TextStreamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
        self._text.on_finalized_text = lambda text, stream_end=False: (out.write(text + ("\n" if stream_end else "")),
                                                                       out.flush())

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.times.extend([time.perf_counter()] * int(value.numel()))
        self._prompt_seen = True
        self._text.put(value)

    def end(self) -> None:
        self._text.end()


def answer(model: Any, tokenizer: Any, prompt: str, tokens: int, out: TextIO, label: str) -> dict[str, float]:
    """Stream `model.generate()`'s greedy answer to `prompt` (chat template when the tokenizer has one);
    returns TTFT and decode tokens/s (the tokens after the first over the time after it)."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt")
    out.write(f"\n[{label}] ")
    out.flush()
    streamer = TimedStreamer(tokenizer, out)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=tokens, do_sample=False, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    times = streamer.times
    if len(times) < 2:
        return {"ttft_ms": (times[0] - start) * 1000.0 if times else float("nan"), "tokens_per_s": float("nan"),
                "tokens": float(len(times))}
    return {"ttft_ms": (times[0] - start) * 1000.0, "tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "tokens": float(len(times))}


def llm_demo(model: Any, optimized: Any, tokenizer: Any, prompt: str = DEMO_PROMPT, tokens: int = 64,
             out: TextIO = sys.stdout) -> dict[str, dict[str, float]]:
    """The original and the optimized model answer the same prompt through generate(); prints both
    answers as they stream and a two-line comparison. Returns both measurements."""
    original = answer(model, tokenizer, prompt, tokens, out, "original")
    fast = answer(optimized, tokenizer, prompt, tokens, out, "optimized")
    ratio = fast["tokens_per_s"] / original["tokens_per_s"] if original["tokens_per_s"] > 0 else float("nan")
    out.write(f"\ngenerate() decode: original {original['tokens_per_s']:.1f} tokens/s, optimized "
              f"{fast['tokens_per_s']:.1f} tokens/s ({ratio:.2f}x); time to first token {original['ttft_ms']:.0f} ms "
              f"-> {fast['ttft_ms']:.0f} ms\n")
    return {"original": original, "optimized": fast}


def print_presets(out: TextIO) -> None:
    from .presets import PRESETS, machine_features

    have = machine_features()
    out.write(f"Presets on this machine ({', '.join(sorted(have)) or 'no special features'}):\n")
    for preset in PRESETS.values():
        v = preset.choose(have)
        out.write(f"  @{preset.name:<16} {v.pipeline}\n  {'':<17} why: {v.why}\n")


def run_tour(args: Any, out: TextIO = sys.stdout) -> int:
    """The three parts of the module docstring, in order."""
    import copy

    import torch

    from .core.pass_protocol import PassContext
    from .core.pipeline import Pipeline
    from .workloads import load

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print_presets(out)
    if not getattr(args, "skip_encoder", False):
        out.write("\n== MiniLM through @encoder-latency ==\n")
        out.flush()
        result = Pipeline.parse("@encoder-latency").run(load("minilm"), max_accuracy_drop=args.max_accuracy_drop,
                                                         timing=args.timing)
        result.report.print()
    out.write(f"\n== SmolLM2-135M answering through generate(): original vs {args.llm_pipeline} ==\n")
    out.flush()
    workload = load("smollm2", ppl_chunks=1, ppl_chunk=256)
    start = time.perf_counter()
    applied = Pipeline.parse(args.llm_pipeline).apply(copy.deepcopy(workload.model), PassContext(workload=workload))
    out.write(f"optimized in {time.perf_counter() - start:.1f} s: "
              f"{', '.join(k for k, v in applied.info.items() if k.endswith('.reason')) or 'every step applied'}\n")
    llm_demo(workload.model, applied.model, workload.tokenizer, args.prompt, args.tokens, out)
    return 0
