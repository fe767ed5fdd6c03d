"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny random GPT-2, saved in a temporary directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

EOS = "<|endoftext|>"

TRAINING_TEXT = [
    "The acting was great and I loved the cast.",
    "The plot was boring, and I hated the ending.",
    "I thought the soundtrack was really wonderful.",
    "In my opinion the script was quite dull.",
    "17+25=42", "3+4=7", "58+31=89", "99+99=198",
    "Hello world, this is a tiny tokenizer for tests.",
]


def build_tiny_model_dir(directory: Path) -> Path:
    """Train a ~300-token byte-level BPE on a few sentences and save it with a random 2-layer GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS, bos_token=EOS,
                                        padding_side="left", model_max_length=256)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def env_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with a tiny tokenizer and random GPT-2 (loadable by path like any local model)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("env-model"))


@pytest.fixture(scope="session")
def env_model_path(env_model_dir: Path) -> str:
    """The same directory as a string, as the environments' ``model=`` argument takes it."""
    return str(env_model_dir)


@pytest.fixture(scope="session")
def env_tokenizer(env_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(env_model_dir)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def env_model(env_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(env_model_dir).eval()


def length_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                  **kwargs: Any) -> list[float]:
    """Number of tokens taken (EOS included), so tests can predict the reward exactly."""
    return [float(len(ids)) for ids in completion_ids]


@pytest.fixture
def token_count_reward() -> Any:
    """:func:`length_reward`, labelled ``length_reward`` in info."""
    return length_reward
