"""Fixtures: a tiny random causal LM with a byte-level BPE tokenizer, saved to disk (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlfb.models import corpus

END_OF_TEXT = "<|endoftext|>"


def _documents() -> list[str]:
    documents = [sentence for _, sentence in corpus.labelled_reviews(300, seed=0)]
    documents += [f"{prompt}{answer}" for prompt, answer in corpus.arithmetic_problems("train")[:300]]
    return documents


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a 2-layer GPT-2 (random weights) and its tokenizer: a stand-in for rlfb-tiny."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_documents(), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                        pad_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128,
                                       vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                                       pad_token_id=eos))
    path: Path = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
