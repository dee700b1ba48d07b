"""Timing batches: distinct, same shapes and dtypes, valid for the model, never the data that is scored."""
from __future__ import annotations

import torch
from torch import nn

from optistack.core.workload import batch_digest, run_on, timing_batch
from optistack.workloads import GenericWorkload
from optistack.workloads.base import vary_inputs


class Embedder(nn.Module):
    """Token ids + a 0/1 mask + a float feature: what a small encoder takes."""

    def __init__(self, vocab=50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask, scale):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return self.lin(h).sum(1) * scale


class Offsets(nn.Module):
    """Bag offsets must be sorted: resampling them breaks the model."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 4, mode="sum")

    def forward(self, ids, offsets, weights):
        return self.bag(ids, offsets, per_sample_weights=weights)


def example(batch=4, seq=12, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, seq // 2:] = 0
    ids[:, seq // 2:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "scale": torch.rand(batch, 1, generator=g)}


def test_vary_inputs_keeps_shapes_dtypes_and_the_values_the_model_accepted():
    x = example()
    seen = {batch_digest(((), x))}
    for i in range(6):
        _, v = vary_inputs(((), x), i)
        assert batch_digest(((), v)) not in seen
        seen.add(batch_digest(((), v)))
        for k in x:
            assert v[k].shape == x[k].shape and v[k].dtype == x[k].dtype
        assert set(v["input_ids"].unique().tolist()) <= set(x["input_ids"].unique().tolist())
        # the mask is only permuted, with the same rows as the ids: padding still lines up with mask 0
        assert torch.equal(v["attention_mask"].sort(0).values, x["attention_mask"].sort(0).values)
        assert not torch.equal(v["scale"], x["scale"])
    assert batch_digest(vary_inputs(((), x), 3)) == batch_digest(vary_inputs(((), x), 3))  # deterministic


def test_float_masks_and_single_rows_and_non_tensors():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    args, kwargs = vary_inputs(((torch.tensor([[0.5, -2.0, 3.0]]), mask), {"use_cache": False}), 1)
    assert torch.equal(args[1], mask) and kwargs == {"use_cache": False}
    assert not torch.equal(args[0], torch.tensor([[0.5, -2.0, 3.0]])) and args[0].shape == (1, 3)


def test_generic_workload_times_derived_batches_and_scores_the_user_inputs():
    torch.manual_seed(0)
    model = Embedder().eval()
    eval_inputs = [example(seq=12) for _ in range(2)]
    wl = GenericWorkload(model, example(), eval_inputs=eval_inputs)
    assert wl.timing_rule == "resample" and "ints resampled" in wl.describe()["timing"]
    scored = {batch_digest(inp) for inp in wl._all_inputs()}
    digests = set()
    for i in range(20):
        batch = timing_batch(wl, i)
        assert batch_digest(batch) not in scored
        digests.add(batch_digest(batch))
        assert run_on(wl, model, batch).shape == (4, 8)
    assert len(digests) == 20
    assert torch.equal(wl.run(model), model(**example()))  # no batch: the example inputs, as before


def test_ints_that_break_when_resampled_are_kept():
    model = Offsets().eval()
    ids = torch.tensor([1, 5, 7, 2, 9, 11, 3, 4])
    offsets = torch.tensor([0, 2, 5, 6])
    weights = torch.rand(8)
    wl = GenericWorkload(model, (ids, offsets, weights))
    assert wl.timing_rule == "keep-ints"
    for i in range(4):
        args, _ = timing_batch(wl, i)
        assert torch.equal(args[0], ids) and torch.equal(args[1], offsets)  # integers untouched
        assert not torch.equal(args[2], weights)
        model(*args)


def test_nothing_to_vary_falls_back_to_the_example():
    class Flag(nn.Module):
        def forward(self, b):
            return b.float() * 2

    wl = GenericWorkload(Flag(), torch.tensor([[True, False]]))
    assert wl.timing_rule == "example" and timing_batch(wl, 0) is None
    assert "example inputs only" in wl.describe()["timing"]
