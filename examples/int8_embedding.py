"""The embedding as int8 rows (`embed-int8`), and what a saved model then costs a server to load.

    python examples/int8_embedding.py

SmolLM2-135M (bundled, no download) gets `rtn-int4{head=int8,zero_grid=float}`: an int4 body and an int8
head, the head quantized from the matrix the embedding shares (tied). `embed-int8` then replaces the float32
embedding (113 MB, read one row a token) by the head's own int8 rows: the same codes and scales, held once.
Printed: the bytes the model holds before and after, perplexity on two evaluation chunks both ways, and a
save / `optistack.load_model` round trip in which the sharing survives. See docs/passes.md (embed-int8) and
docs/saving-and-loading.md (memory while loading).
"""
import copy
import tempfile

import torch

import optistack as ost
from optistack.core.pass_protocol import PassContext
from optistack.core.pipeline import Pipeline


def held_mb(model) -> float:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values()) / 2**20


torch.set_num_threads(2)
wl = ost.workloads.load("smollm2", ppl_chunks=2)
quantized = Pipeline.parse("rtn-int4{head=int8,zero_grid=float}").apply(copy.deepcopy(wl.model), PassContext()).model
step = Pipeline.parse("embed-int8").apply(copy.deepcopy(quantized), PassContext())
small = step.model
print("embed-int8:", step.info)
print(f"model holds {held_mb(quantized):.1f} MB -> {held_mb(small):.1f} MB")
before, after = wl.evaluate(quantized)["perplexity"], wl.evaluate(small)["perplexity"]
print(f"perplexity (2 chunks) {before:.3f} -> {after:.3f} ({100 * (after / before - 1):+.2f}%)")
assert held_mb(small) < held_mb(quantized) - 100  # the 113 MB float table is gone
assert abs(after / before - 1) < 0.005


class Step:  # what a run records for the step, for saving a model made outside a run
    status, pass_name, text, config, info = "applied", "embed-int8", "embed-int8", {}, {}


with tempfile.TemporaryDirectory() as folder:
    from optistack.core.persist import save_model

    save_model(folder, small, wl.model, [Step()], {})
    loaded = ost.load_model(folder)
    shared = loaded.get_input_embeddings().qweight.data_ptr() == loaded.get_output_embeddings().qweight.data_ptr()
    print(f"loaded: {type(loaded.get_input_embeddings()).__name__}, rows shared with the head: {shared}, "
          f"{held_mb(loaded):.1f} MB")
    assert shared
