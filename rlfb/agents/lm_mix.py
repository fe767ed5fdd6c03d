"""Real text for a language-modelling term in an agent's loss: a seeded stream of batches and the masked LM loss.

RL on a reward drifts the policy away from the text it was pretrained on; mixing in the pretraining
objective on real text holds it there. InstructGPT's PPO-ptx (Ouyang et al. 2022, eq. 2) maximises

    objective = E_RL[ r - beta * KL ] + gamma * E_{x ~ D_pretrain}[ log pi(x) ]

so an agent with ``ptx_coef`` gamma > 0 adds gamma * L_LM to each gradient step's loss, and self-training
weighs L_LM against its pseudo-sample loss with lambda (rlfb/agents/self_training.py). The loss is the token
mean of the negative log-likelihood over real tokens, the first of each document excepted (it has no context):

    L_LM = -(1 / N) * sum_{b, t >= 1} m_bt * log pi(x_bt | x_b,<t),    N = sum_{b, t >= 1} m_bt

The real text is the built-in corpus (the pretraining documents of ``rlfb-tiny``, drawn by the recipe's own
grammar and seed, so it is the very text the model learnt from) or one kind of its documents, or a file.
Each document is encoded as in pretraining: its tokens, truncated to the context window, then end-of-text.

Example:
    >>> documents = real_text_documents("corpus:arithmetic")
    >>> documents[0], len(documents) == len(real_text_documents("corpus:arithmetic"))
    ('75+57=122', True)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from rlfb.errors import ConfigError, DatasetError
from rlfb.models import corpus
from rlfb.models.builtin import BUILTIN_RECIPES
from rlfb.models.policy import Policy

# A batch narrower than the model's context gains nothing from a longer cap; the built-in model's is 64.
DEFAULT_MAX_TOKENS = 64


@cache
def _builtin_corpus() -> tuple[str, ...]:
    """The pretraining documents of ``rlfb-tiny``: its recipe's grammar seed, size and mix (no copy of the data)."""
    recipe = BUILTIN_RECIPES["rlfb-tiny"]
    return tuple(corpus.pretraining_corpus(recipe.n_documents, recipe.grammar_seed, recipe.arithmetic_share,
                                           recipe.forgotten_carry_share))


def real_text_documents(source: str) -> tuple[str, ...]:
    """The documents of a real-text source.

    Args:
        source: ``"corpus"`` (the built-in pretraining corpus, reviews and sums), ``"corpus:reviews"``,
            ``"corpus:arithmetic"``, or a path: ``.txt`` (one document per non-blank line) or ``.jsonl`` (one
            object with a ``text`` string per line).

    Returns:
        The documents, in a fixed order.

    Raises:
        ConfigError: An unknown source.
        DatasetError: A file without documents, or a JSON line that is not an object with a ``text`` string.
    """
    if source.startswith("corpus"):
        kinds = {"corpus": None, "corpus:reviews": False, "corpus:arithmetic": True}
        if source not in kinds:
            raise ConfigError(f"unknown built-in real text {source!r}; known: {', '.join(kinds)}")
        wanted = kinds[source]
        return tuple(text for text in _builtin_corpus() if wanted is None or corpus.is_arithmetic(text) == wanted)
    path = Path(source).expanduser()
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    documents = lines if path.suffix.lower() == ".txt" else [_jsonl_text(line, path, n) for n, line in enumerate(lines, 1)]
    if not documents:
        raise DatasetError(f"real-text file {source!r} holds no document; it needs at least one non-blank line")
    return tuple(documents)


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"real-text file {str(path)!r}, line {number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DatasetError(f"real-text file {str(path)!r}, line {number}: each line must be an object with a "
                           'string field "text", such as {"text": "..."}')
    return record["text"]


class RealTextBatches:
    """An endless, seeded stream of right-padded batches of real-text documents, resumable.

    Each batch draws ``batch_size`` documents uniformly with replacement from the generator, so the stream is
    a function of the seed and the number of batches drawn, and :meth:`state_dict` is the generator's state.

    Args:
        documents: The texts.
        tokenizer: Encodes a list of texts (``tokenizer(texts)["input_ids"]``) and has ``eos_token_id``.
        batch_size: Documents per batch.
        seed: Seeds the draw.
        max_tokens: Longest row, end-of-text included (the model's context window).
        device: Where the batches go.
    """

    def __init__(self, documents: Sequence[str], tokenizer: Any, batch_size: int, seed: int,
                 max_tokens: int = DEFAULT_MAX_TOKENS, device: torch.device | str = "cpu") -> None:
        if not documents:
            raise DatasetError("no real-text documents to draw batches from")
        if max_tokens < 2:
            raise ConfigError(f"real-text rows need at least 2 tokens, got max_tokens={max_tokens}")
        self.documents = list(documents)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (batch_size, L): documents + end-of-text, right-padded."""
        rows = torch.randint(len(self.documents), (self.batch_size,), generator=self.generator).tolist()
        eos = self.tokenizer.eos_token_id
        encoded = self.tokenizer([self.documents[row] for row in rows])["input_ids"]
        sequences = [torch.tensor(list(ids)[: self.max_tokens - 1] + [eos]) for ids in encoded]
        input_ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=eos)
        lengths = torch.tensor([len(sequence) for sequence in sequences])
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths.unsqueeze(1)).long()
        return input_ids.to(self.device), attention_mask.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def real_text_batches(source: str, policy: Policy, batch_size: int, seed: int) -> RealTextBatches:
    """The real-text stream of ``source`` for ``policy``: its tokenizer, its context window, its device.

    Raises:
        ConfigError: The policy has no tokenizer to encode the text with.
    """
    if policy.tokenizer is None:
        raise ConfigError("a real-text LM term needs the policy's tokenizer; build the Policy with one")
    model_config = getattr(policy.model, "config", None)
    context = getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)
    return RealTextBatches(real_text_documents(source), policy.tokenizer, batch_size, seed,
                           max_tokens=int(context or DEFAULT_MAX_TOKENS), device=policy.device)


def language_model_loss(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L_LM = -(1/N) sum_{b, t>=1} m_bt log pi(x_bt | x_b,<t) under the current policy (adapter on), with grad.

    Args:
        policy: The policy.
        input_ids: (B, L) right-padded documents.
        attention_mask: (B, L) 1 for real tokens.

    Returns:
        The scalar loss: mean negative log-likelihood per predicted real token, in nats.
    """
    with policy.autocast():
        logits = policy.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    log_distribution = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V): predicts tokens 1..L-1
    targets = input_ids[:, 1:]  # (B, L-1)
    token_logprobs = log_distribution.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    mask = attention_mask[:, 1:].to(token_logprobs.dtype)
    return -(token_logprobs * mask).sum() / mask.sum().clamp(min=1)


def real_text_loss(batches: RealTextBatches, policy: Policy) -> torch.Tensor:
    """L_LM on the next batch of the stream."""
    return language_model_loss(policy, *batches.next_batch())


__all__ = ["RealTextBatches", "language_model_loss", "real_text_batches", "real_text_documents", "real_text_loss"]
