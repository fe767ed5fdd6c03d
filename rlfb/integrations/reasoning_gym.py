"""reasoning-gym's procedural datasets as rlfb tasks, scored by reasoning-gym's own ``score_answer``.

reasoning-gym (Stojanovski et al. 2025, https://github.com/open-thought/reasoning-gym) generates
verifiable problems (arithmetic, algebra, logic, games, ...) from a seed and scores an answer with each
dataset's ``score_answer``. This module makes any of its datasets an rlfb task and scores completions
with that function, unchanged: install the extra with ``pip install 'rlfb[reasoning-gym]'``.

* Task ``reasoning_gym``: ``{name: reasoning_gym, dataset: basic_arithmetic, config: {...}}`` draws
  ``num_train`` train and ``num_eval`` held-out problems (eval problems are generated first; a train
  problem whose question is also an eval question is skipped, so the held-out split stays held out). The
  prompt is ``prompt_template`` filled with the ``question``; the row carries ``answer`` and
  ``rg_entry`` (the whole entry as JSON, which the reward needs). Default reward: ``reasoning_gym``.
* Reward ``reasoning_gym``: ``score_answer(answer, entry)`` of the entry's dataset, where ``answer`` is
  the completion's first line, stripped (``answer_format: line``), or the text inside ``<answer>`` tags
  (``answer_format: tag``, reasoning-gym's own extraction).

Example (with reasoning-gym installed):
    >>> task = reasoning_gym_task("basic_arithmetic", num_train=4, num_eval=2, config={"max_terms": 2})
    >>> row = task.eval_rows()[0]
    >>> ReasoningGymReward()([row["prompt"]], [row["answer"] + "\\nmore text"], rg_entry=[row["rg_entry"]])
    [1.0]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rlfb.errors import ConfigError
from rlfb.integrations import import_optional
from rlfb.rewards.registry import register

__all__ = ["ANSWER_FORMATS", "ENTRY_COLUMN", "ReasoningGymReward", "reasoning_gym_task"]

ENTRY_COLUMN = "rg_entry"
ANSWER_FORMATS = ("line", "tag")


def reasoning_gym_task(dataset: str, num_train: int = 1000, num_eval: int = 200, seed: int = 0,
                       config: Mapping[str, Any] | None = None, prompt_template: str = "{question}") -> Any:
    """A task of reasoning-gym problems.

    Args:
        dataset: A reasoning-gym dataset name (``basic_arithmetic``, ``chain_sum``, ...).
        num_train, num_eval: Problems per split.
        seed: The eval split is generated with ``seed``, the train split with ``seed + 1``.
        config: Options of the dataset's config class (``min_terms``, ``operators``, ...).
        prompt_template: The prompt, with ``{question}`` where the problem goes.
    """
    if "{question}" not in prompt_template:
        raise ConfigError(f"reasoning_gym: prompt_template {prompt_template!r} must contain '{{question}}'")
    if num_train < 1 or num_eval < 1:
        raise ConfigError(f"reasoning_gym: num_train and num_eval must be >= 1, got {num_train}, {num_eval}")
    from rlfb.envs.tasks import Task

    rg = import_optional("reasoning_gym", "reasoning-gym", "the reasoning_gym task")
    options = dict(config or {})
    for reserved in ("seed", "size"):
        if reserved in options:
            raise ConfigError(f"reasoning_gym: set the task's seed / num_train / num_eval, not config.{reserved}")

    def draw(size: int, draw_seed: int) -> list[dict[str, Any]]:
        try:
            problems = rg.create_dataset(dataset, size=size, seed=draw_seed, **options)
        except (KeyError, ValueError, TypeError, AssertionError) as error:
            raise ConfigError(f"reasoning_gym: cannot make dataset {dataset!r} with config {options}: "
                              f"{error or type(error).__name__}") from None
        return [dict(problem) for problem in problems]

    def row(entry: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": prompt_template.format(question=entry["question"]), "answer": str(entry["answer"]),
                ENTRY_COLUMN: json.dumps(entry, default=str)}

    eval_entries = draw(num_eval, seed)
    held_out = {entry["question"] for entry in eval_entries}
    train_entries = [entry for entry in draw(num_train, seed + 1) if entry["question"] not in held_out]
    if not train_entries:
        raise ConfigError(f"reasoning_gym: every train problem of {dataset!r} is also an eval problem; the "
                          "dataset's config allows too few distinct problems for these split sizes")
    return Task("reasoning_gym", train=tuple(map(row, train_entries)), eval=tuple(map(row, eval_entries)),
                default_rewards=("reasoning_gym",), description=f"reasoning-gym's {dataset}, scored by its score_answer")


@register("reasoning_gym")
class ReasoningGymReward:
    """reasoning-gym's ``score_answer`` of each row's dataset (the row's ``rg_entry`` column).

    Args:
        answer_format: ``"line"``: the completion's first line, stripped; ``"tag"``: the text inside
            ``<answer>...</answer>`` (reasoning-gym's ``extract_answer``), None when there is none.
    """

    def __init__(self, answer_format: str = "line") -> None:
        if answer_format not in ANSWER_FORMATS:
            raise ConfigError(f"reasoning_gym reward: answer_format {answer_format!r} is not one of {ANSWER_FORMATS}")
        self.answer_format = answer_format
        self._scorers: dict[str, Any] = {}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
        entries = kwargs.get(ENTRY_COLUMN)
        if entries is None:
            raise ConfigError(f"the reasoning_gym reward needs the {ENTRY_COLUMN!r} column of the reasoning_gym task; "
                              f"got columns {sorted(kwargs)}")
        return [self._score(completion, json.loads(entry)) for completion, entry in zip(completions, entries, strict=True)]

    def _score(self, completion: str, entry: dict[str, Any]) -> float:
        name = entry["metadata"]["source_dataset"]
        if name not in self._scorers:
            reasoning_gym = import_optional("reasoning_gym", "reasoning-gym", "the reasoning_gym reward")
            self._scorers[name] = reasoning_gym.get_score_answer_fn(name)
        return float(self._scorers[name](answer=self._answer(completion), entry=entry))

    def _answer(self, completion: str) -> str | None:
        if self.answer_format == "tag":
            from reasoning_gym.utils import extract_answer

            return extract_answer(completion)
        lines = completion.strip().splitlines()
        return lines[0].strip() if lines else ""
