"""A tiny fine-tuning run with the transformers callback: the report exists at train end (or after each
evaluation) and its figures reach the trainer's log history and reporters."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from optistack.bench.timer import TimingConfig  # noqa: E402
from optistack.integrations.transformers import OptistackCallback  # noqa: E402
from optistack.testing import tiny_bert  # noqa: E402

FAST = TimingConfig(warmup=1, min_rounds=3, max_rounds=3, max_seconds=1.0)
VOCAB, SEQ = 64, 12


def tiny_classifier() -> BertForSequenceClassification:
    return tiny_bert(vocab_size=VOCAB, num_labels=2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64).train()


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids[i, 0] % 2}
            for i in range(n)]


def example_batch():
    """As a tokenizer returns it: a BatchEncoding, which is a Mapping but not a dict."""
    from transformers import BatchEncoding

    rows = dataset(4)
    return BatchEncoding({"input_ids": torch.stack([r["input_ids"] for r in rows]),
                          "attention_mask": torch.stack([r["attention_mask"] for r in rows])})


def trainer_for(tmp_path, callback, max_steps: int = 4, **args) -> Trainer:
    targs = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4,
                              learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                              use_cpu=True, disable_tqdm=True, **args)
    return Trainer(model=tiny_classifier(), args=targs, train_dataset=dataset(), eval_dataset=dataset(8),
                   callbacks=[callback])


def optistack_entries(trainer: Trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "optistack/speedup" in e]


def test_train_end_report_lands_in_the_log_history(tmp_path):
    cb = OptistackCallback("int8-dynamic", example_inputs=example_batch(), timing=FAST, verbose=False,
                           save_report=tmp_path / "optistack.json")
    trainer = trainer_for(tmp_path, cb)
    trainer.train()

    assert cb.report is not None and [s.status for s in cb.report.steps] == ["applied"]
    assert cb.result.model is not trainer.model and trainer.model.training  # the trained model is untouched
    (entry,) = optistack_entries(trainer)
    assert entry["step"] == 4
    assert entry["optistack/speedup"] == cb.report.final_speedup
    assert entry["optistack/model_bytes"] < entry["optistack/baseline_model_bytes"]
    for key in ("accuracy_delta", "latency_ms", "1-int8-dynamic/speedup", "1-int8-dynamic/applied"):
        assert f"optistack/{key}" in entry
    assert (tmp_path / "optistack.json").is_file()


class Recorder(TrainerCallback):
    """Stands in for a reporter (TensorBoard, W&B): it sees what Trainer.log sends to on_log."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_with_the_trainer_bound_each_evaluation_reaches_the_reporters(tmp_path):
    cb = OptistackCallback("int8-dynamic", example_inputs=example_batch(), when="evaluate", timing=FAST,
                           verbose=False)
    trainer = trainer_for(tmp_path, cb, eval_strategy="steps", eval_steps=2)
    cb.trainer = trainer
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()

    assert [step for step, _ in cb.history] == [2, 4]
    assert [e["step"] for e in optistack_entries(trainer)] == [2, 4]
    seen = [logs for logs in recorder.logs if "optistack/speedup" in logs]
    assert len(seen) == 2 and seen[-1]["optistack/speedup"] == cb.report.final_speedup
