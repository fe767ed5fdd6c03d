"""Reference-based rewards: BLEU and chrF (sacrebleu), ROUGE (rouge-score), against a task's reference column.

Each scores a completion against the reference of its prompt's row, a task column that reaches the reward
by name as every column does (TRL's keyword arguments): ``reference`` unless ``reference_column`` names
another. A row's reference is a string, or a list of strings for several references (BLEU and chrF use
them all, as sacrebleu does; ROUGE takes the best, rouge-score's ``score_multi``). A row without one
(None, ``""`` or an empty list) gets None: no score, as the reward contract allows. The scales are the
libraries' own, BLEU and chrF in [0, 100], ROUGE in [0, 1] (a reward entry's ``weight: 0.01`` puts BLEU on
ROUGE's scale). Scores are sentence-level, one completion at a time, computed by the libraries themselves
(``pip install 'rlfb[reference]'``); a missing library is a one-line error naming that extra.

Example (with the extra installed):
    >>> ChrfReward()(["Review:"], [" a warm and funny film"], reference=["a warm and funny film"])
    [100.0]
    >>> RougeReward(rouge_type="rouge1")(["Q:", "Q:"], ["a b", "c d"], reference=["a b", ["x y", "c d"]])
    [1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlfb.integrations import import_optional
from rlfb.rewards.builtin import NOT_COLUMNS
from rlfb.rewards.registry import register

REFERENCE_EXTRA = "reference"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_MEASURES = ("fmeasure", "precision", "recall")


def row_references(kwargs: dict[str, Any], column: str, reward: str) -> list[list[str]]:
    """The references of each row from the task column ``column``: a list of strings per row ([] for none).

    Raises:
        ValueError: the column is missing, naming the columns the reward was given.
    """
    if column not in kwargs:
        columns = sorted(key for key in kwargs if key not in NOT_COLUMNS)
        raise ValueError(
            f"{reward} needs the task column {column!r} with each prompt's reference text; columns "
            f"given: {columns}. Add it to the dataset or set reference_column"
        )
    rows = []
    for value in kwargs[column]:
        references = [value] if isinstance(value, str) else list(value or [])
        rows.append([str(reference) for reference in references if reference])
    return rows


class _ReferenceReward:
    """A sentence-level score of each completion against its row's references (None without any)."""

    name = ""

    def __init__(self, reference_column: str) -> None:
        self.reference_column = reference_column

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any
    ) -> list[float | None]:
        references = row_references(kwargs, self.reference_column, self.name)
        return [
            self.score(completion.strip(), row) if row else None
            for completion, row in zip(completions, references, strict=True)
        ]

    def score(self, completion: str, references: list[str]) -> float:
        raise NotImplementedError


class _SacrebleuReward(_ReferenceReward):
    """A sacrebleu sentence metric (``sentence_bleu``, ``sentence_chrf``) with fixed options."""

    def __init__(self, reference_column: str, **options: Any) -> None:
        super().__init__(reference_column)
        self.sentence_score = getattr(
            import_optional("sacrebleu", REFERENCE_EXTRA, f"the {self.name} reward", package="sacrebleu"),
            f"sentence_{self.name}",
        )
        self.options = options

    def score(self, completion: str, references: list[str]) -> float:
        return float(self.sentence_score(completion, references, **self.options).score)


@register("bleu")
class BleuReward(_SacrebleuReward):
    """Sentence BLEU of the completion against the reference column, in [0, 100] (sacrebleu; Papineni et al. 2002)."""

    name = "bleu"

    def __init__(self, reference_column: str = "reference", smooth_method: str = "exp", lowercase: bool = False,
                 tokenize: str = "13a") -> None:
        super().__init__(reference_column, smooth_method=smooth_method, lowercase=lowercase, tokenize=tokenize)


@register("chrf")
class ChrfReward(_SacrebleuReward):
    """Sentence chrF of the completion against the reference column, in [0, 100] (sacrebleu; Popovic 2015)."""

    name = "chrf"

    def __init__(self, reference_column: str = "reference", char_order: int = 6, word_order: int = 0,
                 beta: int = 2) -> None:
        super().__init__(reference_column, char_order=char_order, word_order=word_order, beta=beta)


@register("rouge")
class RougeReward(_ReferenceReward):
    """ROUGE (rougeL F-measure by default) against the reference column, in [0, 1] (rouge-score; Lin 2004)."""

    name = "rouge"

    def __init__(
        self,
        reference_column: str = "reference",
        rouge_type: str = "rougeL",
        measure: str = "fmeasure",
        use_stemmer: bool = False,
    ) -> None:
        if rouge_type not in ROUGE_TYPES:
            raise ValueError(f"rouge_type must be one of {', '.join(ROUGE_TYPES)}, got {rouge_type!r}")
        if measure not in ROUGE_MEASURES:
            raise ValueError(f"rouge measure must be one of {', '.join(ROUGE_MEASURES)}, got {measure!r}")
        super().__init__(reference_column)
        module = import_optional(
            "rouge_score.rouge_scorer", REFERENCE_EXTRA, "the rouge reward", package="rouge-score"
        )
        self.scorer = module.RougeScorer([rouge_type], use_stemmer=use_stemmer)
        self.rouge_type, self.measure = rouge_type, measure

    def score(self, completion: str, references: list[str]) -> float:
        # score_multi(targets, prediction): the best of the references (one reference: score's value)
        return float(getattr(self.scorer.score_multi(references, completion)[self.rouge_type], self.measure))
