"""`prompt-compress`: offline llmlingua set-up is scoped, options are checked, and (slow) a real
SmolLM2-scored compression halves a QA prompt while keeping the question and the planted answer."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_llama_workload

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.passes.serving.offline import offline_available, offline_llmlingua, sent_tokenize
from optistack.passes.serving.prompt_compress import PromptCompressPass

needs_offline = pytest.mark.skipif(not offline_available(), reason=str(offline_available().reason))


@needs_offline
def test_offline_tokenizer_and_splitter_are_scoped_to_llmlingua():
    import nltk
    import tiktoken
    from llmlingua import prompt_compressor as pc

    real_encoding_for_model, real_sent_tokenize = tiktoken.encoding_for_model, nltk.sent_tokenize
    with offline_llmlingua() as module:
        enc = module.tiktoken.encoding_for_model("gpt-3.5-turbo")
        assert enc.encode("hello world") == [15339, 1917]  # cl100k ids
        assert module.nltk.sent_tokenize("One here. Two there.") == ["One here.", "Two there."]
        assert tiktoken.encoding_for_model is real_encoding_for_model  # the real modules are untouched
    assert pc.tiktoken is tiktoken and pc.nltk is nltk
    assert nltk.sent_tokenize is real_sent_tokenize


def test_sentences_never_cross_a_paragraph_break():
    text = "The program prints this:\n\nThe code is 4471. It was 3.5 m long."
    assert sent_tokenize(text) == ["The program prints this:", "The code is 4471.", "It was 3.5 m long."]


def test_bad_options_and_unavailable_llmlingua2(tmp_path):
    with pytest.raises(PassConfigError, match="'rate' must be in"):
        PromptCompressPass(rate=0)
    with pytest.raises(PassConfigError, match="level=token only"):
        PromptCompressPass(method="llmlingua2", level="sentence")
    assert "local token-classification checkpoint" in PromptCompressPass(method="llmlingua2", level="token").requirements().reason
    assert "not a local model folder" in PromptCompressPass(model=str(tmp_path / "nowhere")).requirements().reason
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    why = PromptCompressPass(method="llmlingua2", level="token", model=str(tmp_path)).requirements().reason
    assert "not a token-classification checkpoint" in why


def test_refuses_a_workload_that_is_not_a_causal_lm():
    model = tiny_llama(vocab_size=128)
    ctx = PassContext(workload=tiny_llama_workload(model))
    with pytest.raises(PassApplyError, match="prompt-compress: .*workload is generic"):
        PromptCompressPass().apply(model, ctx)


@pytest.mark.slow
@needs_offline
def test_real_compression_halves_the_prompt_and_keeps_question_and_answer():
    from optistack.workloads.longqa import LongQAWorkload

    wl = LongQAWorkload(n_items=2, gen_tokens=2)
    wrapped = PromptCompressPass(rate=0.5).apply(wl.model, PassContext(workload=wl)).model
    item = wl.items[0]
    before, after = wl.prompt_ids(wl.model, item), wl.prompt_ids(wrapped, item)
    assert after.shape[-1] <= 0.6 * before.shape[-1]
    text = wl.tokenizer.decode(after[0])
    assert item.question in text and item.answer in text
    assert wrapped.optistack_prepare_ms() > 0
    with torch.inference_mode():  # still called like the model
        assert torch.equal(wrapped(input_ids=before[:, :8]).logits, wl.model(input_ids=before[:, :8]).logits)
