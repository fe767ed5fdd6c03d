"""What the text environments share: settings, choosing and encoding prompts, scoring finished episodes.

Layout of an observation (all environments): ``{"input_ids", "attention_mask"}``, each of fixed length
``max_prompt_tokens + max_new_tokens``. Columns ``[0, max_prompt_tokens)`` hold the prompt, **left-padded**
(so every prompt ends at column ``max_prompt_tokens - 1``); columns from ``max_prompt_tokens`` on hold the
completion so far, followed by padding. The real tokens of a row are therefore contiguous and
``attention_mask`` is 1 exactly on them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces

from rlfb.envs.tasks import SPLITS, Task, make_task
from rlfb.errors import ConfigError

if TYPE_CHECKING:
    from rlfb.rewards import RewardSet

__all__ = ["EpisodeScores", "EpisodeScorer", "PromptSource", "PromptTruncationWarning", "TextEnvSettings",
           "TextEnvProperties", "check_options", "choose_single_prompt", "encode_prompts", "observation_space",
           "prompt_width"]

# Tokenizers without a real limit report a huge model_max_length (1e30); only smaller values are checked.
_UNSET_MODEL_MAX_LENGTH = 1_000_000
# Default width of the prompt region: room for a few sentences; observations stay small.
DEFAULT_PROMPT_TOKENS = 64


class PromptTruncationWarning(UserWarning):
    """A prompt was longer than ``max_prompt_tokens`` and lost its first tokens."""


# What a truncation warning tells the user to change, in the env's and in a run config's words.
TRUNCATION_FIX = ("raise max_prompt_tokens (`sampling.max_prompt_tokens` in a run config; prompt plus "
                  "max_new_tokens must fit the model's context window) to keep whole prompts")


def resolve_tokenizer(model: str | None, tokenizer: Any | None) -> Any:
    """The tokenizer object given, else the one of ``model`` (a built-in name, a local dir or a hub id)."""
    if tokenizer is not None:
        return tokenizer
    if model is None:
        raise ConfigError("a text environment needs model= (a name such as 'rlfb-tiny') or tokenizer=")
    from rlfb.models.loading import load_tokenizer

    return load_tokenizer(model)


@dataclass
class TextEnvSettings:
    """Everything an environment derives from its keyword arguments, checked once.

    Built by :meth:`from_kwargs`; see the environments for the meaning of each argument.
    """

    task: Task
    tokenizer: Any
    rewards: RewardSet
    max_prompt_tokens: int
    max_new_tokens: int
    split: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    @classmethod
    def from_kwargs(cls, task: str | Mapping[str, Any] | Task, model: str | None, tokenizer: Any | None,
                    rewards: Any, max_prompt_tokens: int | None, max_new_tokens: int, split: str,
                    vocab_size: int | None) -> TextEnvSettings:
        if max_new_tokens < 2:
            # One token would make every episode end on its first step; Gymnasium's checker rejects that.
            raise ConfigError(f"max_new_tokens must be >= 2, got {max_new_tokens}")
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        task = make_task(task)
        tokenizer = resolve_tokenizer(model, tokenizer)
        max_prompt_tokens = prompt_width(max_prompt_tokens, max_new_tokens, tokenizer)
        eos_token_id = tokenizer.eos_token_id
        if eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before making the environment")
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
        return cls(task=task, tokenizer=tokenizer, rewards=build_rewards(rewards, task),
                   max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, split=split,
                   vocab_size=int(vocab_size) if vocab_size is not None else len(tokenizer),
                   eos_token_id=int(eos_token_id), pad_token_id=int(pad_token_id))

    @property
    def observation_length(self) -> int:
        """Columns of an observation: prompt region + completion region."""
        return self.max_prompt_tokens + self.max_new_tokens


class TextEnvProperties:
    """The read-only properties every text environment exposes from its settings and prompt source.

    A mixin placed before the Gymnasium base class; the environment sets :attr:`settings` and
    :attr:`_prompts` in its constructor.
    """

    metadata: dict[str, Any]
    settings: TextEnvSettings
    _prompts: PromptSource

    @property
    def task(self) -> Task:
        """The task prompts come from."""
        return self.settings.task

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (left padding)."""
        return self.settings.tokenizer

    @property
    def rewards(self) -> RewardSet:
        """The :class:`rlfb.rewards.RewardSet`; bind a scorer to it for model-based rewards."""
        return self.settings.rewards

    @property
    def max_prompt_tokens(self) -> int:
        """Width of the prompt region of an observation."""
        return self.settings.max_prompt_tokens

    @property
    def max_new_tokens(self) -> int:
        """Tokens per episode before truncation."""
        return self.settings.max_new_tokens

    @property
    def eos_token_id(self) -> int:
        """The token that terminates an episode."""
        return self.settings.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The token in unattended columns."""
        return self.settings.pad_token_id

    @property
    def num_truncated_prompts(self) -> int:
        """How many prompts lost their first tokens to ``max_prompt_tokens`` so far."""
        return self._prompts.num_truncated_prompts

    def _check_render_mode(self, render_mode: str | None) -> None:
        """Reject a render mode that ``metadata["render_modes"]`` does not list."""
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; supported: {self.metadata['render_modes']}")


def prompt_width(max_prompt_tokens: int | None, max_new_tokens: int, tokenizer: Any) -> int:
    """The width of the prompt region: as given, or by default what the context window leaves (at most 64).

    The context window is the tokenizer's ``model_max_length`` when it states a real one. Prompt plus
    completion must fit in it, so a prompt longer than ``context - max_new_tokens`` is left-truncated.

    Raises:
        ConfigError: The width is below 1, or does not fit in the context window with max_new_tokens.
    """
    context = getattr(tokenizer, "model_max_length", None)
    context = context if isinstance(context, int) and context < _UNSET_MODEL_MAX_LENGTH else None
    if max_prompt_tokens is None:
        max_prompt_tokens = DEFAULT_PROMPT_TOKENS if context is None else min(DEFAULT_PROMPT_TOKENS,
                                                                               context - max_new_tokens)
        if max_prompt_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                              f"window of {context} tokens; lower max_new_tokens")
    if max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if context is not None and max_prompt_tokens + max_new_tokens > context:
        raise ConfigError(f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens + max_new_tokens} exceeds "
                          f"the model's context window of {context} tokens; lower one of them "
                          "(`sampling.max_prompt_tokens`, `sampling.max_new_tokens` in a run config)")
    return max_prompt_tokens


def encode_prompts(tokenizer: Any, prompts: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Tokenize prompts into (R, width) left-padded ids and mask: the one prompt rule of training and evaluation.

    A prompt longer than ``width`` keeps its last ``width`` tokens (left truncation: the end of a prompt is
    what the completion continues). An empty prompt becomes the tokenizer's BOS (or EOS) token, so every row
    has a token to continue. Padding is the tokenizer's pad token (or EOS).

    Returns:
        The ids, the mask, and the original length of each prompt that was truncated.
    """
    eos_token_id = tokenizer.eos_token_id
    start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_token_id
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
    encoded = tokenizer(list(prompts))["input_ids"] if prompts else []
    input_ids = np.full((len(encoded), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(encoded), width), dtype=np.int64)
    truncated = []
    for row, ids in enumerate(encoded):
        ids = list(ids) or [start_token]
        if len(ids) > width:
            truncated.append(len(ids))
            ids = ids[-width:]
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask, truncated


def build_rewards(rewards: Any, task: Task) -> RewardSet:
    """A RewardSet from anything RewardSet accepts (or one), falling back on the task's default rewards."""
    from rlfb.rewards import RewardSet

    if rewards is None:
        if not task.default_rewards:
            raise ConfigError(f"task {task.name!r} has no default reward; pass rewards=[...] "
                              "(see `rlfb rewards` for the registered ones)")
        rewards = list(task.default_rewards)
    return RewardSet.coerce(rewards)


def observation_space(settings: TextEnvSettings, length: int | None = None) -> spaces.Dict:
    """The fixed-shape token observation: ``input_ids`` and ``attention_mask`` of ``length`` columns."""
    length = settings.observation_length if length is None else length
    return spaces.Dict({
        "input_ids": spaces.Box(0, settings.vocab_size - 1, shape=(length,), dtype=np.int64),
        "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
    })


def check_options(options: Mapping[str, Any] | None, known: Sequence[str]) -> dict[str, Any]:
    """The reset options as a dict; an unknown key is a clear error rather than silently ignored."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown reset option(s) {unknown}; known: {', '.join(known)}")
    return options


def choose_single_prompt(prompts: PromptSource, rng: np.random.Generator,
                         options: Mapping[str, Any]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The one row of a single-episode reset, honouring the options ``split``, ``prompt`` and ``index``."""
    prompt, index = options.get("prompt"), options.get("index")
    return prompts.choose(rng, 1, split=options.get("split"), indices=None if index is None else [index],
                          prompts=None if prompt is None else [prompt])


class PromptSource:
    """Chooses the rows of a reset and encodes their prompts into the left-padded prompt region.

    Args:
        settings: The environment's settings.
    """

    def __init__(self, settings: TextEnvSettings) -> None:
        self.settings = settings
        self.num_truncated_prompts = 0
        self._warned = False

    def choose(self, rng: np.random.Generator, count: int, split: str | None = None,
               indices: Sequence[int] | None = None,
               prompts: Sequence[str | Mapping[str, Any]] | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
        """Pick ``count`` rows: pinned ``prompts``, rows at ``indices`` of the split, or a random draw.

        A random draw takes distinct rows while the split has enough (with replacement otherwise), using
        only ``rng``, so a seeded reset is reproducible.

        Returns:
            The rows and their indices in the split (-1 for pinned prompts).
        """
        split = split or self.settings.split
        if split not in SPLITS:
            self._bad_split(split)
        if prompts is not None and indices is not None:
            raise ValueError("pin prompts either by text or by index in one reset, not both")
        if prompts is not None:
            pinned = [self._pinned_row(prompt) for prompt in prompts]
            self._check_count(len(pinned), count, "prompts")
            return pinned, np.full(count, -1, dtype=np.int64)
        table = getattr(self.settings.task, split)
        if indices is not None:
            chosen = np.asarray(indices, dtype=np.int64).reshape(-1)
            self._check_count(len(chosen), count, "indices")
            if chosen.size and (chosen.min() < 0 or chosen.max() >= len(table)):
                raise ValueError(f"reset option 'indices' {chosen.tolist()} out of range for the {split} split "
                                 f"of task {self.settings.task.name!r} ({len(table)} rows)")
        else:
            chosen = rng.choice(len(table), size=count, replace=count > len(table)).astype(np.int64)
        return [dict(table[index]) for index in chosen], chosen

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize the prompts of ``rows`` into (R, max_prompt_tokens) left-padded ids and mask.

        See :func:`encode_prompts`. A truncated prompt is counted in :attr:`num_truncated_prompts`; the
        first one triggers a :class:`PromptTruncationWarning`.
        """
        input_ids, attention_mask, truncated = encode_prompts(
            self.settings.tokenizer, [row["prompt"] for row in rows], self.settings.max_prompt_tokens)
        if truncated:
            self._note_truncation(max(truncated), len(truncated))
        return input_ids, attention_mask

    def _note_truncation(self, length: int, count: int) -> None:
        self.num_truncated_prompts += count
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"a prompt of {length} tokens is longer than max_prompt_tokens={self.settings.max_prompt_tokens}; "
                "keeping its last tokens (left truncation). Later truncations are only counted, in "
                f"env.num_truncated_prompts; {TRUNCATION_FIX}", PromptTruncationWarning, stacklevel=4)

    @staticmethod
    def _pinned_row(prompt: str | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(prompt, str):
            return {"prompt": prompt}
        if isinstance(prompt, Mapping) and isinstance(prompt.get("prompt"), str):
            return dict(prompt)
        raise ValueError(f"a pinned prompt must be a string or a mapping with a 'prompt' string, got {prompt!r}")

    @staticmethod
    def _check_count(given: int, expected: int, option: str) -> None:
        if given != expected:
            raise ValueError(f"reset option {option!r} has {given} entries; this reset needs {expected} "
                             "(one per prompt group being reset)")

    @staticmethod
    def _bad_split(split: str) -> None:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


@dataclass
class EpisodeScores:
    """Rewards of a batch of finished episodes (numpy, one entry per episode).

    Attributes:
        prompts, completions: The texts given to the reward functions.
        score: (E,) the RewardSet's total (weighted sequence rewards); NaN where no reward scored.
        components: label -> (E,) unweighted component scores, NaN where a reward returned None.
        token_rewards: Per-token (dense) rewards, one array per episode aligned with its tokens, or None.
        returns: (E,) what the episode's terminal step pays: score (NaN -> 0) + sum of its token_rewards.
    """

    prompts: list[str]
    completions: list[str]
    score: np.ndarray
    components: dict[str, np.ndarray]
    token_rewards: list[np.ndarray] | None
    returns: np.ndarray


class EpisodeScorer:
    """Decodes finished completions once and calls the reward functions once per batch."""

    def __init__(self, settings: TextEnvSettings) -> None:
        self.settings = settings

    def score(self, rows: Sequence[Mapping[str, Any]], completion_ids: Sequence[Sequence[int]],
              texts: Sequence[str] | None = None) -> EpisodeScores:
        """Score finished episodes.

        Args:
            rows: The task rows of the episodes (prompt + extra columns).
            completion_ids: The tokens each episode took, EOS included when it terminated.
            texts: The completions as text when the agent gave text; default: decoded from the ids
                (special tokens, EOS included, skipped, as TRL does).
        """
        settings = self.settings
        if texts is None:
            texts = settings.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        texts = list(texts)
        prompts = [row["prompt"] for row in rows]
        column_names = dict.fromkeys(settings.task.columns)
        for row in rows:
            column_names.update(dict.fromkeys(key for key in row if key != "prompt"))
        columns = {name: [row.get(name) for row in rows] for name in column_names}
        result = settings.rewards(prompts, texts, completion_ids=[list(ids) for ids in completion_ids], **columns)
        returns = np.nan_to_num(np.asarray(result.total, dtype=np.float64), nan=0.0)
        if result.per_token is not None:
            returns = returns + np.array([float(np.sum(tokens)) for tokens in result.per_token])
        return EpisodeScores(prompts=prompts, completions=texts, score=np.asarray(result.total, dtype=np.float64),
                             components={name: np.asarray(values, dtype=np.float64)
                                         for name, values in result.components.items()},
                             token_rewards=result.per_token, returns=returns)

    def info(self, scores: EpisodeScores, index: int) -> dict[str, Any]:
        """The episode-end info entries of one episode (see docs/envs.md for the keys)."""
        info: dict[str, Any] = {"prompt": scores.prompts[index], "completion": scores.completions[index],
                                "score": float(scores.score[index])}
        for name, values in scores.components.items():
            info[f"reward/{name}"] = float(values[index])
        if scores.token_rewards is not None:
            info["token_rewards"] = np.array(scores.token_rewards[index], dtype=np.float64)
        return info
