"""Fine-tune with the transformers Trainer and let optistack optimize the trained model at the end.

    python examples/train_callback_transformers.py     # under a minute on 2 CPU cores, nothing downloaded

The model is a tiny BERT classifier built from a config on toy data; swap in your own model, dataset
and a real batch from your tokenizer as `example_inputs`.
"""
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import optistack as ost
from optistack.integrations.transformers import OptistackCallback

torch.manual_seed(0)
VOCAB, SEQ = 1000, 32
ids = torch.randint(1, VOCAB, (256, SEQ))
labels = (ids[:, 0] > VOCAB // 2).long()  # a toy task: is the first token in the top half?
mask = torch.ones(SEQ, dtype=torch.long)
train = [{"input_ids": i, "attention_mask": mask, "labels": y} for i, y in zip(ids, labels)]
model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=512, num_labels=2))

callback = OptistackCallback(
    "int8-dynamic",                                   # any pipeline text, e.g. "prune-magnitude{sparsity=0.3},compile"
    example_inputs={"input_ids": ids[:16], "attention_mask": torch.ones(16, SEQ, dtype=torch.long)},
    max_accuracy_drop=0.05,                           # relative output error vs the trained model (lower is better)
    timing=ost.TimingConfig(warmup=2, min_rounds=5, max_rounds=20, max_seconds=5.0),
    save_report="out/callback-report.json",           # when="evaluate" runs it at each evaluation instead
)
args = TrainingArguments(output_dir="out/trainer", max_steps=30, per_device_train_batch_size=16, learning_rate=5e-4,
                         logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
callback.trainer = trainer  # optional: log through Trainer.log, so TensorBoard/W&B/... reporters get the figures
trainer.train()

callback.report.print()  # the usual optistack report: speedup [95% CI], accuracy before -> after, size
logged = next(entry for entry in trainer.state.log_history if "optistack/speedup" in entry)
print({k: round(v, 4) for k, v in logged.items() if not k.startswith("optistack/1-")})
optimized = callback.result.model  # the optimized copy; `trainer.model` is left as trained
