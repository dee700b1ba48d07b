"""`smollm2-qa`: long-context question answering on SmolLM2-135M-Instruct, measured as a user feels it.

Each item hides one planted fact ("The access code for the north warehouse is 4471.") among ~900
tokens of Python reference prose (`pydoc_data.topics`, always installed, no download) and asks about
it through the chat template. Scored by answer accuracy (the answer text appears in the reply, in
points 0-100: the gated metric) and by ROUGE-L against the unoptimized model's own replies.

How passes reach the prompt and the decode loop (the serving protocol):
- a model (or wrapper) with `optistack_prepare_context(context, question, rest) -> str` rewrites the
  document before the prompt is built (prompt compression); `rest` is the rest of the prompt (chat
  template, instruction, question), sent unchanged, so a compressor can size the whole prompt. The
  instruction and the question are added by the workload afterwards: they are never compressed.
- generation always goes through `optistack.generation.greedy_decode`, which lets a model supply its
  own decoding strategy (speculative decoding).

`run(model)` is one prefill of the first item's full prompt, without a KV cache. The benchmark times
`run(model, batch)` on `timing_batch(i)`: a document of about the same length (the same number of
prose tokens before the chat template) from a seeded shuffle of the prose paragraphs, with no planted
fact and item 0's question, so no timed prompt is one that is scored, and none repeats.
"""
from __future__ import annotations

import contextlib
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..core.errors import WorkloadError
from ..core.hooks import PREPARE_CONTEXT_ATTR, PREPARE_MS_ATTR
from ..core.modeling import Inputs, model_device, to_device
from ..core.workload import Metric
from ..generation import greedy_decode, percentile
from .loaders import SMOLLM2_ID, count_params, load_smollm2

FACTS_FILE = Path(__file__).parent / "data" / "longqa_facts.txt"
INSTRUCTION = "Read the document and answer the question with a few words taken from the document."
_SEED = 1234


@dataclass(frozen=True)
class QAItem:
    context: str  # paragraphs joined by blank lines, the fact among them
    question: str
    answer: str  # accepted when it appears (case-insensitive) in the reply


def read_facts(path: Path = FACTS_FILE) -> list[tuple[str, str, str]]:
    facts = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            parts = [p.strip() for p in line.split("|")]
            if len(parts) != 3 or parts[2].lower() not in parts[0].lower():
                raise WorkloadError(f"smollm2-qa: bad line in {path.name}: {line!r}")
            facts.append((parts[0], parts[1], parts[2]))
    return facts


def prose_paragraphs() -> list[str]:
    """Paragraphs of plain prose from Python's reference topics: no code, grammar or headings."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            lines = para.split("\n")
            if any(line.startswith(" ") or "::=" in line or set(line) <= set("*=-~^") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if 40 <= len(text.split()) <= 160:
                out.append(text)
    return out


def build_items(n_items: int, context_tokens: int, count_tokens: Any) -> list[QAItem]:
    """Deterministic items: each takes paragraphs from a seeded shuffle until it has `context_tokens`,
    and the fact goes in at a position that varies from item to item (beginning, middle, end)."""
    facts = read_facts()
    if n_items > len(facts):
        raise WorkloadError(f"smollm2-qa: n_items must be <= {len(facts)} (one per planted fact), got {n_items}")
    paras = prose_paragraphs()
    random.Random(_SEED).shuffle(paras)
    items, cursor = [], 0
    for i, (fact, question, answer) in enumerate(facts[:n_items]):
        chosen, have = [], 0
        while have < context_tokens:
            para = paras[cursor % len(paras)]
            cursor += 1
            chosen.append(para)
            have += count_tokens(para) + 2
        chosen.insert(round((0.15 + 0.7 * (i % 5) / 4) * len(chosen)), fact)
        items.append(QAItem("\n\n".join(chosen), question, answer))
    return items


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens: longest common subsequence by dynamic programming."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


_RAPL = Path("/sys/class/powercap")


class EnergyMeter:
    """Energy over a block of work from a hardware counter: NVML (NVIDIA GPUs, via pynvml) or RAPL
    (Intel/AMD CPUs, /sys/class/powercap). `describe()` says which one, or why there is none."""

    def __init__(self) -> None:
        self._read, self.source = self._find()

    def _find(self) -> tuple[Any, str]:
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # mJ; raises on GPUs without it
                return (lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0), "NVML (GPU 0 board energy)"
            except Exception as exc:  # pynvml missing or counter unsupported: fall through to RAPL
                nvml_why = f"NVML unavailable ({type(exc).__name__}: {exc})"
        else:
            nvml_why = "no NVIDIA GPU for NVML"
        zones = sorted(_RAPL.glob("intel-rapl:[0-9]*/energy_uj")) if _RAPL.is_dir() else []
        zones = [z for z in zones if z.parent.name.count(":") == 1]  # packages, not their sub-zones
        try:
            for z in zones:
                int(z.read_text())
        except OSError as exc:
            return None, f"unavailable: {nvml_why}; RAPL counters are not readable ({exc.strerror})"
        if zones:
            return (lambda: sum(int(z.read_text()) for z in zones) / 1e6), f"RAPL ({len(zones)} CPU package(s))"
        return None, f"unavailable: {nvml_why}; no RAPL counter under {_RAPL}"

    @contextlib.contextmanager
    def measure(self):
        box = _Joules()
        start = self._read() if self._read else None
        yield box
        if start is not None:
            end = self._read()
            box.joules = end - start if end >= start else None  # a wrapped counter: no reading

    def describe(self) -> str:
        return self.source


@dataclass
class _Joules:
    joules: float | None = None


class LongQAWorkload:
    """Long-context QA; the gated metric is answer accuracy in points (higher is better)."""

    name = "smollm2-qa"
    kind = "causal-lm"
    metric = Metric("accuracy", higher_is_better=True, scale="absolute")
    rewrites_prompts = True  # core.hooks.REWRITES_PROMPTS_ATTR: asks the model's optistack_prepare_context (see above)

    def __init__(self, n_items: int = 16, context_tokens: int = 900, gen_tokens: int = 20,
                 cache_dir: str | None = None, model: Any = None) -> None:
        for label, value in {"n_items": n_items, "context_tokens": context_tokens, "gen_tokens": gen_tokens}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise WorkloadError(f"smollm2-qa: {label} must be a positive integer, got {value!r}")
        if gen_tokens < 2:
            raise WorkloadError(f"smollm2-qa: gen_tokens must be >= 2 (tokens/s needs a decode step), got {gen_tokens}")
        base, self.tokenizer = load_smollm2(cache_dir)
        # `model`: the user's variant of SmolLM2 (e.g. a PeftModel with a LoRA adapter), same tokenizer.
        self.model = base if model is None else model.eval()
        limit = getattr(getattr(base, "config", None), "max_position_embeddings", None)
        if limit is not None and context_tokens + 200 + gen_tokens > limit:
            raise WorkloadError(f"smollm2-qa: context_tokens={context_tokens} leaves no room in the model's {limit} positions")
        self.gen_tokens, self.context_tokens = gen_tokens, context_tokens
        self.items = build_items(n_items, context_tokens, self._count)
        self._prose: list[str] | None = None
        self._stop_ids = {i for i in (self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
                          if isinstance(i, int) and i >= 0}
        self._references: list[str] | None = None  # the original model's replies, for ROUGE-L
        self._runs: dict[int, dict[str, float]] = {}  # id(model) -> measurements of its last evaluate
        self._energy = EnergyMeter()

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, model: Any, item: QAItem) -> torch.Tensor:
        """The chat prompt for `item` as 1 x n ids; the model may rewrite the document first."""
        text = self._chat(item.context, item.question)
        prepare = getattr(model, PREPARE_CONTEXT_ATTR, None)
        if callable(prepare):
            text = self._chat(prepare(item.context, item.question, text.replace(item.context, "")), item.question)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return to_device(ids, model_device(model))

    def _chat(self, context: str, question: str) -> str:
        content = f"{INSTRUCTION}\n\nDocument:\n{context}\n\nQuestion: {question}"
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def timing_batch(self, index: int) -> QAItem:
        """The index-th timing prompt (see the module docstring); never an evaluated item."""
        if self._prose is None:
            self._prose = prose_paragraphs()
        rng = random.Random(_SEED + 1 + 7919 * int(index))
        chosen, have = [], 0
        while have < self.context_tokens:
            para = self._prose[rng.randrange(len(self._prose))]
            chosen.append(para)
            have += self._count(para) + 2
        ids = self.tokenizer("\n\n".join(chosen), add_special_tokens=False)["input_ids"][: self.context_tokens]
        return QAItem(self.tokenizer.decode(ids), self.items[0].question, self.items[0].answer)

    def run(self, model: Any, batch: QAItem | None = None) -> Any:
        """One prefill, no KV cache, of `batch` (a timing prompt) or of the first item's full prompt."""
        ids = self.prompt_ids(model, self.items[0] if batch is None else batch)
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False)

    def _reply(self, tokens: torch.Tensor) -> str:
        ids = tokens[0].tolist()
        for k, tok in enumerate(ids):
            if tok in self._stop_ids:
                ids = ids[:k]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def answer_all(self, model: Any) -> tuple[list[str], dict[str, float]]:
        """Greedy replies to every item, and what it took: prompt tokens, TTFT, tokens/s, latency, energy."""
        prompts = [self.prompt_ids(model, item) for item in self.items]  # prompt preparation is not timed here
        greedy_decode(model, prompts[0][:, :16], 2)  # warm-up: first-call allocations, lazy init
        replies, ttft, tpot, e2e = [], [], [], []
        with self._energy.measure() as energy:
            for ids in prompts:
                started = time.perf_counter()
                gen = greedy_decode(model, ids, self.gen_tokens)
                e2e.append((time.perf_counter() - started) * 1000.0)
                ttft.append(gen.step_ms[0])
                tpot.append(gen.metrics()["tpot_ms"])
                replies.append(self._reply(gen.tokens))
        generated = len(prompts) * self.gen_tokens
        stats = {
            "prompt_tokens": statistics.mean(p.shape[-1] for p in prompts),
            "ttft_ms": statistics.median(ttft),
            "ttft_p99_ms": percentile(ttft, 99.0),
            "tpot_ms": statistics.median(tpot),
            "tokens_per_s": 1000.0 / statistics.median(tpot),
            "e2e_latency_ms": statistics.median(e2e),
            "e2e_p99_ms": percentile(e2e, 99.0),
        }
        if energy.joules is not None:
            stats["energy_j_per_1k_tokens"] = energy.joules * 1000.0 / generated
        prep = getattr(model, PREPARE_MS_ATTR, None)
        if callable(prep) and prep() is not None:
            stats["prompt_prepare_ms"] = float(prep())
        return replies, stats

    def references(self) -> list[str]:
        """The unoptimized model's replies (computed once), the reference for ROUGE-L."""
        if self._references is None:
            self._references = self.answer_all(self.model)[0]
        return self._references

    def evaluate(self, model: Any) -> dict[str, float]:
        """Accuracy (points), ROUGE-L vs the original's replies, mean prompt tokens."""
        replies, stats = self.answer_all(model)
        if model is self.model and self._references is None:
            self._references = replies
        refs = self.references()
        hits = [item.answer.lower() in reply.lower() for item, reply in zip(self.items, replies)]
        self._runs[id(model)] = stats
        return {
            "accuracy": 100.0 * sum(hits) / len(hits),
            "rouge_l": statistics.mean(rouge_l(r, ref) for r, ref in zip(replies, refs)),
            "prompt_tokens": stats["prompt_tokens"],
        }

    def calibration_inputs(self, n: int) -> Iterable[Inputs]:
        """Up to `n` 1 x 128 windows of the item documents *without* their planted facts."""
        facts = {f for f, _, _ in read_facts()}
        text = "\n\n".join(p for item in self.items for p in item.context.split("\n\n") if p not in facts)
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        count = min(max(n, 0), ids.numel() // 128)
        return [((), {"input_ids": ids[i * 128:(i + 1) * 128].view(1, -1)}) for i in range(count)]

    def extra_measurements(self, model: Any) -> dict[str, float]:
        """Serving numbers from the last `evaluate` of this model (measured again if there was none)."""
        stats = self._runs.get(id(model))
        if stats is None:
            stats = self.answer_all(model)[1]
        return dict(stats)

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": f"{SMOLLM2_ID} (Q4_1 GGUF, dequantized to fp32)",
            "params": count_params(self.model),
            "items": len(self.items),
            "context_tokens_mean": statistics.mean(self._count(i.context) for i in self.items),
            "gen_tokens": self.gen_tokens,
            "timed_call": "one prefill, no KV cache, of a fresh prompt per round "
                          "(prose without a planted fact, item 0's question)",
            "accuracy": "points: share of replies containing the planted answer",
            "energy": self._energy.describe(),
        }
