"""The ``likelihood`` reward (the model's own feedback) and ``teacher_logprob`` (a teacher's).

r(x, y) = (1/|y|) * sum_t log p(y_t | x, y_<t)   (``reduction="mean"``; ``"sum"`` drops the 1/|y|)

under a frozen model: the reference (the policy's base model with its LoRA adapter disabled, so no
second copy of the weights) or the current policy itself (``under="self"``). With ``per_token=True`` the
reward is dense: one log-probability per completion token.

The trainer binds the policy's scorer (``RewardSet.bind_scorer(policy.scorer)``). For standalone use,
``model="rlfb-tiny"`` (any causal LM name or path) loads a frozen model of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rlfb.errors import RewardError
from rlfb.rewards.registry import register


@register("likelihood")
class LikelihoodReward:
    """Mean (or summed) log-probability of the completion under the reference model or the policy."""

    needs_scorer = True

    def __init__(self, under: Literal["reference", "self"] = "reference", reduction: Literal["mean", "sum"] = "mean",
                 per_token: bool = False, model: str | None = None, device: str = "auto") -> None:
        if under not in ("reference", "self"):
            raise ValueError(f"likelihood 'under' must be 'reference' or 'self', got {under!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"likelihood reduction must be 'mean' or 'sum', got {reduction!r}")
        self.under = under
        self.reduction = reduction
        self.per_token = per_token
        self.scorer: Any = None
        if model is not None:
            self.scorer = _load_frozen_scorer(model, device)
            self.needs_scorer = False

    def bind_scorer(self, scorer: Any) -> None:
        """Use ``scorer`` (a :class:`rlfb.rewards.scoring.LogProbScorer`), unless a model was given."""
        if self.needs_scorer:
            self.scorer = scorer

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None,
                 prompt_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[Any]:
        if self.scorer is None:
            raise RewardError("likelihood needs a model: the trainer or environment must call "
                              "RewardSet.bind_scorer(policy.scorer), or give kwargs {model: NAME_OR_PATH}")
        if completion_ids is None:
            raise RewardError("likelihood needs completion_ids (the completions' token ids)")
        if prompt_ids is None:
            encode = getattr(self.scorer, "encode_prompts", None)
            if encode is None:
                raise RewardError("likelihood needs prompt_ids, or a scorer with encode_prompts()")
            prompt_ids = encode(prompts)
        logprobs = self.scorer.completion_logprobs([list(ids) for ids in prompt_ids],
                                                   [list(ids) for ids in completion_ids],
                                                   reference=self.under == "reference")
        if self.per_token:
            return [values.double().tolist() for values in logprobs]
        # An empty completion has no tokens to score: None leaves it out rather than inventing a value.
        reduce = (lambda values: values.mean()) if self.reduction == "mean" else (lambda values: values.sum())
        return [float(reduce(values.double())) if values.numel() else None for values in logprobs]


def _load_frozen_scorer(model_name: str, device: str) -> Any:
    from rlfb.models.loading import load_model
    from rlfb.rewards.scoring import ModelScorer

    model, tokenizer = load_model(model_name, device=device)
    model.requires_grad_(False)
    return ModelScorer(model, tokenizer)


@register("teacher_logprob")
class TeacherLogprobReward(LikelihoodReward):
    """Mean (or summed) log-probability of the completion under a teacher: a model or a finished rlfb run.

    r(x, y) = (1/|y|) sum_t log p_teacher(y_t | x, y_<t), the same score the ``likelihood`` reward computes
    (one scoring path, :class:`rlfb.rewards.scoring.ModelScorer`), under a frozen teacher opened as the
    distillation agent opens it (rlfb/models/teacher.py). The completion's token ids are the policy's, so
    the teacher must share the policy's tokenizer: the first call checks that the teacher decodes them to
    the completions' text.
    """

    def __init__(self, teacher: str, reduction: Literal["mean", "sum"] = "mean", per_token: bool = False,
                 device: str = "auto") -> None:
        from rlfb.models.teacher import load_teacher
        from rlfb.rewards.scoring import ModelScorer

        super().__init__(under="self", reduction=reduction, per_token=per_token)
        model, tokenizer = load_teacher(teacher, device)
        self.teacher = teacher
        self.scorer = ModelScorer(model, tokenizer)
        self.needs_scorer = False  # the policy's scorer is not the teacher
        self.tokenizer_checked = False

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None,
                 prompt_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[Any]:
        if completion_ids is not None and not self.tokenizer_checked:
            self._check_tokenizer(completions, completion_ids)
        return super().__call__(prompts, completions, completion_ids=completion_ids, prompt_ids=prompt_ids, **kwargs)

    def _check_tokenizer(self, completions: Sequence[str], completion_ids: Sequence[Sequence[int]]) -> None:
        tokenizer = self.scorer.tokenizer
        for text, ids in zip(completions, completion_ids, strict=True):
            decoded = tokenizer.decode(list(ids), skip_special_tokens=True)
            if decoded.strip() != text.strip():
                raise RewardError(f"teacher_logprob: the teacher {self.teacher!r} reads the policy's tokens "
                                  f"{list(ids)[:8]} as {decoded[:40]!r}, not {text[:40]!r}: it has another tokenizer; "
                                  "use a teacher trained from the policy's base model family")
        self.tokenizer_checked = True
