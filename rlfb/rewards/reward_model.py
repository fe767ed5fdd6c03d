"""The ``reward_model`` reward: a learned scorer of prompt + completion.

Loads any ``AutoModelForSequenceClassification`` directory or hub id (a scalar head, ``num_labels=1``,
as ``rlfb reward-model train`` writes and TRL's ``RewardTrainer`` saves) and scores ``prompt + completion``
in batches, without gradients. A directory holding a token-classification model (``rlfb reward-model
train`` with ``kind: token``) scores each completion token; its sequence score is the mean token logit,
or with ``dense: true`` the per-token logits are returned as a dense reward (this needs the reward model
to share the policy's tokenizer, since the policy's token ids are scored directly).

Example config entry::

    rewards:
      - name: reward_model
        kwargs: {path: runs/rm_sentiment, batch_size: 64}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlfb.errors import ModelNotFoundError
from rlfb.rewards.registry import register


def load_reward_model(path: str, device: str = "auto") -> tuple[Any, Any, bool]:
    """Load a reward model and its tokenizer for scoring.

    Returns:
        ``(model, tokenizer, is_token_level)``; the model is in eval mode with gradients off, the
        tokenizer pads on the right with a pad token set.
    """
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as error:
        raise ModelNotFoundError(f"reward model {path!r} is not a model directory or a reachable hub id "
                                 f"({error}); train one with `rlfb reward-model train CONFIG`") from error
    from rlfb.models.loading import resolve_device

    is_token_level = any(name.endswith("ForTokenClassification") for name in (config.architectures or []))
    model_class = AutoModelForTokenClassification if is_token_level else AutoModelForSequenceClassification
    model = model_class.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # keep the completion's end when prompt + completion is too long
    model.to(resolve_device(device)).eval().requires_grad_(False)
    return model, tokenizer, is_token_level


@register("reward_model")
class RewardModelReward:
    """A learned reward model (AutoModelForSequenceClassification dir or hub id) scoring prompt + completion."""

    def __init__(self, path: str, batch_size: int = 64, max_length: int = 256, device: str = "auto",
                 sigmoid: bool = False, dense: bool = False) -> None:
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.sigmoid = sigmoid
        self.dense = dense
        self.model, self.tokenizer, self.is_token_level = load_reward_model(path, device)
        if dense and not self.is_token_level:
            raise ValueError(f"reward model {path!r} has a sequence head; dense=true needs one trained with "
                             "kind: token")

    def bind_scorer(self, scorer: Any) -> None:
        """Move the reward model to the policy's device."""
        device = getattr(scorer, "device", None)
        if device is not None:
            self.model.to(device)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[Any]:
        import torch

        scores: list[Any] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                batch = slice(start, start + self.batch_size)
                if self.is_token_level:
                    ids = completion_ids[batch] if self.dense and completion_ids is not None else None
                    scores.extend(self._score_tokens(prompts[batch], completions[batch], ids))
                else:
                    scores.extend(self._score_sequences(prompts[batch], completions[batch]))
        return scores

    def _score_sequences(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
        inputs = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                add_special_tokens=False, return_tensors="pt").to(self.model.device)
        logits = self.model(**inputs).logits[:, 0].float()  # (B,)
        return (logits.sigmoid() if self.sigmoid else logits).tolist()

    def _score_tokens(self, prompts: Sequence[str], completions: Sequence[str],
                      completion_ids: Sequence[Sequence[int]] | None) -> list[Any]:
        import torch

        prompt_ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
        if completion_ids is None:
            completion_ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in completions]
        # Truncate from the left to max_length: the prompt first, then (rarely) the completion's start,
        # whose cut-off tokens get no score (0.0 in a dense reward, left out of the mean).
        sequences, cut_tokens = [], []
        for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
            sequence = list(prompt) + list(completion)
            sequences.append(sequence[-self.max_length:])
            cut_tokens.append(len(sequence) - len(sequences[-1]))
        length = max(1, max(len(sequence) for sequence in sequences))
        input_ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(sequences):
            input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, :len(sequence)] = 1
        logits = self.model(input_ids=input_ids.to(self.model.device),
                            attention_mask=attention_mask.to(self.model.device)).logits[..., 0].float().cpu()
        if self.sigmoid:
            logits = logits.sigmoid()
        results: list[Any] = []
        for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            start = len(prompt) - cut_tokens[row]  # where the completion starts in the truncated row
            token_scores = logits[row, max(start, 0):start + len(completion)]
            if self.dense:
                results.append([0.0] * max(-start, 0) + token_scores.double().tolist())
            else:
                results.append(float(token_scores.mean()) if token_scores.numel() else None)
        return results
