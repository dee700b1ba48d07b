"""Tiny Hugging Face model folders on disk (config.json + safetensors + a tokenizer), built offline in
seconds: a byte-level BPE trained on Python's reference prose, and the random-weight tiny models."""
from __future__ import annotations

import functools
from pathlib import Path

from optistack.testing import tiny_bert, tiny_llama

VOCAB = 256


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:12]], trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def llama_folder(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny LlamaForCausalLM folder (hidden 64, 2 layers, 256-token vocab) with its tokenizer."""
    cfg = dict(max_position_embeddings=256, tie_word_embeddings=False)
    tiny_llama(vocab_size=VOCAB, seed=seed, **(cfg | overrides)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return Path(path)


def bert_folder(path: Path, head: str = "", seed: int = 0, **overrides) -> Path:
    """A tiny BERT folder: `head` "" -> BertModel (an encoder), "cls" -> BertForSequenceClassification."""
    cfg: dict = dict(max_position_embeddings=128)
    if head == "cls":
        cfg |= {"num_labels": 2, "id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    tiny_bert(vocab_size=VOCAB, seed=seed, **(cfg | overrides)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return Path(path)
