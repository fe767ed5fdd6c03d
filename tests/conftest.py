"""Shared fixtures: one torch thread for every test, and a tiny random causal LM saved to disk, usable
wherever a model name or path is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread in every test, restored after it (a test may set its own, as `rlfb train` does).

    The test models are tiny: a second thread does not pay, and on a shared 2-core machine torch's thread
    pool stalls (a 0.2 s update once took 18 s). torch is imported here, not at module level, so that a
    test can still check what the CLI imports in a fresh interpreter.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random GPT-2 with a byte-level BPE tokenizer of the built-in corpus, saved
    with ``save_pretrained`` (so ``model: PATH`` in a run config loads it)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlfb.models.builtin import train_tokenizer
    from rlfb.models.corpus import pretraining_corpus

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = train_tokenizer(list(pretraining_corpus(600, seed=0)), vocab_size=300)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
