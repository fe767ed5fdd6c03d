"""Log-probabilities of completions under a model: what the ``likelihood`` reward asks of the policy.

The trainer (or an environment) binds a :class:`LogProbScorer` to the rewards with
``RewardSet.bind_scorer(policy.scorer)``. :class:`ModelScorer` implements it for any Hugging Face causal
LM; with a peft model, ``reference=True`` scores under the base weights by disabling the adapter
(``model.disable_adapter()``), so no second copy of the weights is needed.

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    >>> scorer = ModelScorer(model)
    >>> logprobs = scorer.completion_logprobs([[1, 2], [3]], [[4, 5, 6], [7]], reference=True)
    >>> [tuple(values.shape) for values in logprobs]
    [(3,), (1,)]
    >>> bool((logprobs[0] < 0).all())
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class LogProbScorer(Protocol):
    """Anything that returns per-token log-probabilities of completions given their prompts."""

    def completion_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                            reference: bool) -> list[torch.Tensor]:
        """Return log p(c_t | prompt, c_<t) for every completion token, one 1-D float tensor per sample.

        Args:
            prompt_ids: Token ids of each prompt (no padding).
            completion_ids: Token ids of each completion (no padding).
            reference: Score under the frozen reference model (the base model with the adapter disabled)
                instead of the current policy.
        """
        ...


class ModelScorer:
    """A :class:`LogProbScorer` over a Hugging Face causal LM or a peft model wrapping one.

    Args:
        model: The causal LM (``PreTrainedModel``) or a ``PeftModel``.
        tokenizer: Its tokenizer; needed only by :meth:`encode_prompts` (rewards that see only text).
        batch_size: Sequences per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any = None, batch_size: int = 32) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Tokenize prompts the way the policy saw them (no special tokens added)."""
        if self.tokenizer is None:
            raise ValueError("this ModelScorer has no tokenizer; pass tokenizer= or give prompt_ids")
        return [list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in prompts]

    @torch.no_grad()
    def completion_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                            reference: bool) -> list[torch.Tensor]:
        """See :meth:`LogProbScorer.completion_logprobs`. Runs without gradients, in eval mode."""
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        results: list[torch.Tensor] = []
        with self._eval_mode(), self._adapter_disabled(reference):
            for start in range(0, len(prompt_ids), self.batch_size):
                results.extend(self._score_batch(prompt_ids[start:start + self.batch_size],
                                                 completion_ids[start:start + self.batch_size]))
        return results

    def _score_batch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        start_token = self._start_token()
        # A completion's first token needs a prefix to be predicted from; an empty prompt gets the BOS token.
        prefixes = [list(ids) if len(ids) else [start_token] for ids in prompt_ids]
        sequences = [prefix + list(ids) for prefix, ids in zip(prefixes, completion_ids, strict=True)]
        length = max(len(sequence) for sequence in sequences)
        input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
        attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
        for row, sequence in enumerate(sequences):  # right padding: positions stay 0..n-1 for every row
            input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, :len(sequence)] = 1
        device = self.device
        logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): position t predicts t+1
        token_logprobs = logprobs.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        results = []
        for row, (prefix, completion) in enumerate(zip(prefixes, completion_ids, strict=True)):
            first = len(prefix) - 1  # logits at position len(prefix)-1 predict the first completion token
            results.append(token_logprobs[row, first:first + len(completion)].cpu())
        return results

    def _start_token(self) -> int:
        config = getattr(self.model, "config", None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token = getattr(config, name, None)
            if isinstance(token, int):
                return token
        return 0

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()  # no dropout: the same completion always gets the same score
        try:
            yield
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def _adapter_disabled(self, reference: bool) -> Iterator[None]:
        disable_adapter = getattr(self.model, "disable_adapter", None)
        if reference and disable_adapter is not None and hasattr(self.model, "peft_config"):
            with disable_adapter():
                yield
        else:  # a plain model is its own reference
            yield
