"""The batch of episodes every agent learns from: tokens, action mask, turns, rewards.

An episode is one token sequence: the prompt, then model turns and, between them, environment replies (a
tool's output, a game's next observation, a user's answer). :class:`Rollout` holds a batch of them with an
action mask (which tokens the model produced), the end of each turn and each turn's reward; a single-turn
episode (one prompt, one completion) is the one-turn case of the same structure, not a second one. Agents
compute log-probs, KL, values and losses over model tokens only (docs/algorithms.md, "Multi-turn
episodes"). :func:`build_rollout` assembles a rollout from per-episode Python lists of segments, for a
multi-turn collector and for tests; rlfb/agents/rollout.py collects single-turn ones from the token env.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class _RolloutFields(NamedTuple):
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampled_logprobs: torch.Tensor
    scores: torch.Tensor
    reward_components: dict[str, torch.Tensor]
    per_token_rewards: torch.Tensor | None
    prompts: list[str]
    completions: list[str]
    group_size: int
    action_mask: torch.Tensor
    turn_ends: torch.Tensor
    turn_rewards: torch.Tensor


class Rollout(_RolloutFields):
    """A batch of B episodes. Token tensors are on the policy's device.

    Each row is ``prompt | completion``; the completion is the episode after the prompt, model turns and
    environment replies in the order they happened, right-padded::

        completion:       [ turn 1 (model) | reply 1 (env) | turn 2 (model) | pad ]
        completion_mask:  [ 1 1 1          | 1 1           | 1 1            | 0   ]
        action_mask:      [ 1 1 1          | 0 0           | 1 1            | 0   ]
        turn_ends:        [ 2, 6 ]      (completion index of each turn's last model token)

    Model tokens are the actions; environment tokens are part of the state the next action sees. Rewards
    sit at model tokens: turn k's reward at ``turn_ends[:, k]``, the final score at the episode's last
    model token. A single-turn rollout is the one-turn case: ``action_mask`` is ``completion_mask``, one
    turn ends at the last real token, its turn reward is 0 (what the constructor fills in when
    ``action_mask``, ``turn_ends`` and ``turn_rewards`` are left out).

    Attributes:
        prompt_ids: (B, P) prompt token ids, left-padded.
        prompt_mask: (B, P) 1 for real prompt tokens.
        completion_ids: (B, T) the episode after the prompt (model and environment tokens), right-padded.
        completion_mask: (B, T) 1 for real tokens after the prompt, model's and environment's (EOS
            included); real tokens come first, padding only at the end.
        sampled_logprobs: (B, T) log-probs of the sampled tokens under the sampling distribution (0 at
            environment tokens, which were not sampled).
        scores: (B,) float32 final episode reward (weighted sum of the reward components), at the last model
            token; 0 where no reward scored the row (see :attr:`scored`).
        reward_components: name -> (B,) float32 unweighted component, NaN where a reward returned None.
        per_token_rewards: (B, T) float32 weighted sum of dense (per-token) rewards, or None. Only model
            tokens are actions: a value at an environment token is ignored.
        prompts: Decoded prompts.
        completions: Decoded completions (whole episodes after the prompt).
        group_size: k when consecutive groups of k rows share one prompt (group baselines), else 1.
        action_mask: (B, T) 1 for tokens the model produced: the only tokens that carry log-probs, KL,
            values and losses. A subset of ``completion_mask``.
        turn_ends: (B, K) int64 completion index of the last model token of each of the row's turns, in
            order; -1 past the row's last turn (K is the batch's largest number of turns).
        turn_rewards: (B, K) float32 reward of each turn, paid at its ``turn_ends`` token (0 past the row's
            last turn). The final ``scores`` come on top of the last turn's.

    Build a rollout with all its fields (``_replace`` does not recompute the defaults: replacing
    ``completion_mask`` of a rollout leaves its ``action_mask`` as it was).
    """

    __slots__ = ()

    def __new__(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        sampled_logprobs: torch.Tensor,
        scores: torch.Tensor,
        reward_components: dict[str, torch.Tensor],
        per_token_rewards: torch.Tensor | None,
        prompts: list[str],
        completions: list[str],
        group_size: int = 1,
        action_mask: torch.Tensor | None = None,
        turn_ends: torch.Tensor | None = None,
        turn_rewards: torch.Tensor | None = None,
    ) -> Rollout:
        # The one-turn defaults: a few tensor operations, no host synchronisation (the collector's hot path).
        if action_mask is None:
            action_mask = completion_mask
        if turn_ends is None:
            turn_ends = last_action_index(action_mask).unsqueeze(1)  # (B, 1)
        if turn_rewards is None:
            turn_rewards = torch.zeros(turn_ends.shape, dtype=torch.float32, device=turn_ends.device)
        return super().__new__(
            cls, prompt_ids, prompt_mask, completion_ids, completion_mask, sampled_logprobs, scores,
            reward_components, per_token_rewards, prompts, completions, group_size, action_mask, turn_ends,
            turn_rewards,
        )  # fmt: skip

    @property
    def batch_size(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def scored(self) -> torch.Tensor:
        """(B,) bool: some reward scored the row (at least one component is not NaN).

        A row no reward scored carries a score of 0 to the agents, as TRL's ``nansum`` gives it, but it is
        no evidence about the policy: metrics leave it out.
        """
        scored = torch.zeros(self.batch_size, dtype=torch.bool, device=self.scores.device)
        for values in self.reward_components.values():
            scored |= ~torch.isnan(values)
        return scored

    @property
    def num_turns(self) -> torch.Tensor:
        """(B,) int64 number of model turns of each episode."""
        return (self.turn_ends >= 0).sum(1)

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + T) prompt followed by completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T) 1 for real tokens of prompt and completion."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_start(self) -> int:
        """Index of the first completion token in :attr:`input_ids` (the padded prompt length P)."""
        return int(self.prompt_ids.shape[1])

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (a 1-D index tensor), e.g. a minibatch."""
        index = rows.tolist()
        return self._replace(
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            sampled_logprobs=self.sampled_logprobs[rows],
            scores=self.scores[rows],
            reward_components={name: values[rows] for name, values in self.reward_components.items()},
            per_token_rewards=None if self.per_token_rewards is None else self.per_token_rewards[rows],
            prompts=[self.prompts[i] for i in index],
            completions=[self.completions[i] for i in index],
            group_size=1,
            action_mask=self.action_mask[rows],
            turn_ends=self.turn_ends[rows],
            turn_rewards=self.turn_rewards[rows],
        )


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 completion index of each row's last model token (0 for a row without one).

    Example:
        >>> last_action_index(torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])).tolist()
        [1, 2]
    """
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)
    return (positions * action_mask.bool()).amax(1)


class Segment(NamedTuple):
    """A stretch of an episode after its prompt: one model turn, or one environment reply.

    Attributes:
        token_ids: Its tokens.
        by_model: True for a model turn (sampled tokens: the actions), False for an environment reply.
        reward: The turn's reward, paid at its last token. Only a model turn has one: the reward the
            environment gives for a reply belongs to the model turn it answers, so it must be 0 here.
        sampled_logprobs: The sampler's log-probs of a model turn's tokens, or None (then 0).
    """

    token_ids: Sequence[int]
    by_model: bool
    reward: float = 0.0
    sampled_logprobs: Sequence[float] | None = None


def build_rollout(
    prompt_ids: Sequence[Sequence[int]],
    segments: Sequence[Sequence[Segment | tuple[Any, ...]]],
    scores: Sequence[float | None],
    *,
    pad_token_id: int,
    reward_components: Mapping[str, Sequence[float | None]] | None = None,
    prompts: Sequence[str] | None = None,
    completions: Sequence[str] | None = None,
    group_size: int = 1,
    device: torch.device | str = "cpu",
) -> Rollout:
    """A :class:`Rollout` from per-episode Python lists: prompt ids, segments, final score.

    Each episode's segments follow its prompt in the order they happened; a model turn's reward goes to
    its last token, the final score to the episode's last model token. Prompts are left-padded and
    completions right-padded with ``pad_token_id``.

    Args:
        prompt_ids: Per episode, its prompt's token ids (at least one).
        segments: Per episode, its :class:`Segment` s (or ``(token_ids, by_model, reward[, logprobs])``
            tuples); at least one model turn, none of them empty.
        scores: Per episode, its final score; None where no reward scored it (counted 0, the component NaN).
        pad_token_id: Token id of the padding.
        reward_components: Name -> per-episode unweighted values (None = not scored); default
            ``{"score": scores}``.
        prompts: Decoded prompts (default: empty strings).
        completions: Decoded episodes after the prompt (default: empty strings).
        group_size: k when consecutive groups of k episodes share one prompt.
        device: Where the tensors go.

    Returns:
        The rollout: ``action_mask`` 1 on model tokens, ``turn_ends`` / ``turn_rewards`` one column per turn
        of the longest episode.

    Raises:
        ValueError: On lists of different lengths, an episode without a model turn, an empty model turn, a
            reward on an environment reply, or log-probs that do not match their turn's tokens.

    Example:
        >>> rollout = build_rollout(
        ...     prompt_ids=[[5, 6], [7]],
        ...     segments=[[([1, 2], True, 0.5), ([8, 9], False), ([3], True)], [([4, 0], True)]],
        ...     scores=[1.0, None], pad_token_id=0)
        >>> rollout.completion_ids.tolist(), rollout.action_mask.tolist()
        ([[1, 2, 8, 9, 3], [4, 0, 0, 0, 0]], [[1, 1, 0, 0, 1], [1, 1, 0, 0, 0]])
        >>> rollout.turn_ends.tolist(), rollout.turn_rewards.tolist(), rollout.scores.tolist()
        ([[1, 4], [1, -1]], [[0.5, 0.0], [0.0, 0.0]], [1.0, 0.0])
    """
    batch = len(prompt_ids)
    if len(segments) != batch or len(scores) != batch:
        raise ValueError(
            f"build_rollout needs one prompt, one list of segments and one score per episode; got "
            f"{batch} prompts, {len(segments)} segment lists, {len(scores)} scores"
        )
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every episode needs a prompt of at least one token")
    rows_ids, rows_actions, rows_logprobs, rows_turn_ends, rows_turn_rewards = [], [], [], [], []
    for row, row_segments in enumerate(segments):
        ids: list[int] = []
        actions: list[int] = []
        logprobs: list[float] = []
        turn_ends: list[int] = []
        turn_rewards: list[float] = []
        for segment in (Segment(*parts) for parts in row_segments):
            tokens = list(segment.token_ids)
            if segment.by_model:
                if not tokens:
                    raise ValueError(f"episode {row} has an empty model turn; a turn has at least one token")
                sampled = [0.0] * len(tokens) if segment.sampled_logprobs is None else list(segment.sampled_logprobs)
                if len(sampled) != len(tokens):
                    raise ValueError(
                        f"episode {row}: a model turn of {len(tokens)} tokens came with {len(sampled)} log-probs"
                    )
                logprobs += sampled
                turn_ends.append(len(ids) + len(tokens) - 1)
                turn_rewards.append(float(segment.reward))
            else:
                if segment.reward != 0:
                    raise ValueError(
                        f"episode {row}: an environment reply carries reward {segment.reward}; credit it to the "
                        "model turn the reply answers (that turn's reward), environment tokens are no action"
                    )
                logprobs += [0.0] * len(tokens)
            ids += tokens
            actions += [int(segment.by_model)] * len(tokens)
        if not turn_ends:
            raise ValueError(f"episode {row} has no model turn; every episode needs at least one")
        rows_ids.append(ids)
        rows_actions.append(actions)
        rows_logprobs.append(logprobs)
        rows_turn_ends.append(turn_ends)
        rows_turn_rewards.append(turn_rewards)

    def right_padded(rows: list[list[Any]], fill: Any, dtype: torch.dtype) -> torch.Tensor:
        width = max(len(values) for values in rows)
        return torch.tensor([values + [fill] * (width - len(values)) for values in rows], dtype=dtype, device=device)

    prompt_width = max(len(ids) for ids in prompt_ids)
    padding = [prompt_width - len(ids) for ids in prompt_ids]
    # As the collector does: an episode no reward scored reaches the agents as 0 (its components stay NaN).
    scores_or_zero = [0.0 if score is None or math.isnan(score) else float(score) for score in scores]
    components = reward_components if reward_components is not None else {"score": scores}
    return Rollout(
        prompt_ids=torch.tensor([[pad_token_id] * n + list(ids) for n, ids in zip(padding, prompt_ids, strict=True)],
                                device=device),
        prompt_mask=torch.tensor([[0] * n + [1] * len(ids) for n, ids in zip(padding, prompt_ids, strict=True)],
                                 device=device),
        completion_ids=right_padded(rows_ids, pad_token_id, torch.long),
        completion_mask=right_padded([[1] * len(ids) for ids in rows_ids], 0, torch.long),
        sampled_logprobs=right_padded(rows_logprobs, 0.0, torch.float32),
        scores=torch.tensor(scores_or_zero, dtype=torch.float32, device=device),
        reward_components={
            name: torch.tensor([math.nan if value is None else float(value) for value in values],
                               dtype=torch.float32, device=device)
            for name, values in components.items()
        },
        per_token_rewards=None,
        prompts=list(prompts) if prompts is not None else [""] * batch,
        completions=list(completions) if completions is not None else [""] * batch,
        group_size=group_size,
        action_mask=right_padded(rows_actions, 0, torch.long),
        turn_ends=right_padded(rows_turn_ends, -1, torch.long),
        turn_rewards=right_padded(rows_turn_rewards, 0.0, torch.float32),
    )  # fmt: skip


def concatenate_rollouts(rollouts: Sequence[Rollout], pad_token_id: int = 0) -> Rollout:
    """The rows of several rollouts in one, in order: prompts left-padded and episodes right-padded to the widest.

    Padding is masked (``pad_token_id`` where ids are padded, 0 in the masks and rewards, -1 in
    ``turn_ends``); a component missing from a rollout is NaN on its rows, dense rewards missing from one
    are 0 there (None when no rollout has any). The group size is the first rollout's.

    Example:
        >>> one = Rollout(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
        ...               torch.tensor([[5]]), torch.tensor([[1]]), torch.zeros(1, 1), torch.tensor([1.0]),
        ...               {}, None, ["p"], ["a"])
        >>> two = one._replace(completion_ids=torch.tensor([[5, 6]]), completion_mask=torch.tensor([[1, 1]]),
        ...                    action_mask=torch.tensor([[1, 1]]), sampled_logprobs=torch.zeros(1, 2))
        >>> concatenate_rollouts([one, two]).completion_mask.tolist()
        [[1, 0], [1, 1]]
    """
    prompt_width = max(rollout.prompt_ids.shape[1] for rollout in rollouts)
    width = max(rollout.completion_ids.shape[1] for rollout in rollouts)
    turns = max(rollout.turn_ends.shape[1] for rollout in rollouts)

    def cat(field: str, target: int, fill: float, left: bool = False) -> torch.Tensor:
        parts = [getattr(rollout, field) for rollout in rollouts]
        padded = [F.pad(part, (target - part.shape[1], 0) if left else (0, target - part.shape[1]), value=fill)
                  for part in parts]
        return torch.cat(padded)

    names = list(dict.fromkeys(name for rollout in rollouts for name in rollout.reward_components))
    components = {name: torch.cat([rollout.reward_components.get(name, torch.full_like(rollout.scores, math.nan))
                                   for rollout in rollouts]) for name in names}
    dense = None
    if any(rollout.per_token_rewards is not None for rollout in rollouts):
        dense = torch.cat([F.pad(rollout.per_token_rewards, (0, width - rollout.completion_ids.shape[1]))
                           if rollout.per_token_rewards is not None
                           else torch.zeros(rollout.batch_size, width, device=rollout.scores.device)
                           for rollout in rollouts])
    return Rollout(
        prompt_ids=cat("prompt_ids", prompt_width, pad_token_id, left=True),
        prompt_mask=cat("prompt_mask", prompt_width, 0, left=True),
        completion_ids=cat("completion_ids", width, pad_token_id),
        completion_mask=cat("completion_mask", width, 0),
        sampled_logprobs=cat("sampled_logprobs", width, 0.0),
        scores=torch.cat([rollout.scores for rollout in rollouts]),
        reward_components=components,
        per_token_rewards=dense,
        prompts=[prompt for rollout in rollouts for prompt in rollout.prompts],
        completions=[completion for rollout in rollouts for completion in rollout.completions],
        group_size=rollouts[0].group_size,
        action_mask=cat("action_mask", width, 0),
        turn_ends=cat("turn_ends", turns, -1),
        turn_rewards=cat("turn_rewards", turns, 0.0),
    )
