"""Multi-turn rollouts: the policy plays ``rlfb/MultiTurn-v0`` conversations, one whole turn per row per step.

:func:`collect_episodes` resets the vector env (groups of rows seeded alike for group baselines), then, until
every row has ended, samples each unfinished row's turn with the policy, steps the env with the turns and
reads the replies and turn rewards; rows that have ended leave the batch. It returns an
:class:`EpisodeBatch`: the :class:`~rlfb.agents.trajectory.Rollout` every agent learns from (prompt = the
opening; completion = model turns and environment replies; ``action_mask`` on the model's tokens; each
turn's reward at its last token; the final score of the env's ``rewards=`` at the last model token) and
what each episode did (return, success, truncation, tool use).

Sampling the turns: one :class:`~rlfb.models.turn_sampler.TurnSampler` per collection (temperature, top-k,
top-p) keeps each conversation's KV cache from turn to turn. The openings are encoded once (a group's rows
share theirs); each turn runs up to ``max_turn_tokens`` tokens, or fewer where the context window or the
episode's token cap leaves less room, a row leaving the sampling batch at its EOS; before the next turn only
the environment's reply (and the turn's last token) is prefilled, and rows whose episode ended leave with
their caches. Positions count real tokens from the opening's first, exactly as the training forward pass
counts them, so the sampled log-probs equal :func:`~rlfb.agents.rollout.evaluate_rollout`'s to float
rounding (a test checks it).

Example:
    >>> import gymnasium as gym, torch
    >>> from rlfb.models.policy import Policy
    >>> from rlfb.models.sampler import SamplingConfig
    >>> policy = Policy.from_pretrained("rlfb-tiny", value_head=False, device="cpu")
    >>> venv = gym.make_vec("rlfb/MultiTurn-v0", num_envs=4, vectorization_mode="vector_entry_point",
    ...                     protocol="guess_number", tokenizer=policy.tokenizer, max_turns=3, max_turn_tokens=6)
    >>> batch = collect_episodes(venv, policy, SamplingConfig(), torch.Generator().manual_seed(0),
    ...                          group_size=2, seed=0)
    >>> batch.rollout.batch_size, batch.rollout.group_size, int(batch.rollout.num_turns.max()) <= 3
    (4, 2, True)
    >>> batch.rollout.prompts[0] == batch.rollout.prompts[1] == "Guess 1-20:"
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from rlfb.agents.trajectory import Rollout, Segment, build_rollout
from rlfb.errors import ConfigError
from rlfb.models.policy import Policy
from rlfb.models.sampler import SamplingConfig
from rlfb.models.turn_sampler import TurnSampler

__all__ = ["PROTOCOL_COMPONENT", "EpisodeBatch", "collect_episodes", "episode_seeds", "model_context_window"]

# The reward component that holds each episode's sum of turn rewards (the protocol's own scoring), so that
# every multi-turn episode counts as scored (``Rollout.scored``) even without reward functions.
PROTOCOL_COMPONENT = "protocol"
# Seeds drawn for the groups of a rollout lie in [0, SEED_BOUND): any int NumPy's seeding accepts would do.
SEED_BOUND = 2**31 - 1


class EpisodeBatch(NamedTuple):
    """One multi-turn rollout and what each of its B episodes did.

    Attributes:
        rollout: What the agents learn from.
        returns: (B,) float64 the episode's return: its turn rewards plus its final score (what the env paid
            over the episode; the agents' KL terms aside).
        success: (B,) bool: the protocol ended the episode (terminated, not truncated) on a turn with a
            positive reward (the calculator's right answer, guess_number's correct guess).
        truncated: (B,) bool: a cap ended the episode (turns, model tokens, context window).
        used_tool: (B,) bool where the protocol reports ``used_tool`` at the episode's end (the calculator),
            else None.
    """

    rollout: Rollout
    returns: np.ndarray
    success: np.ndarray
    truncated: np.ndarray
    used_tool: np.ndarray | None

    def metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        """Means over the episodes (docs/metrics.md): ``success_rate``, ``episode_truncated``,
        ``reward/protocol`` (the turn rewards' sum) and, where the protocol reports it, ``tool_use`` (the share
        of episodes that called the tool). The mean return is the trainer's ``rollout/reward_mean``."""
        protocol = self.rollout.reward_components[PROTOCOL_COMPONENT]
        metrics = {f"{prefix}success_rate": float(self.success.mean()),
                   f"{prefix}episode_truncated": float(self.truncated.mean()),
                   f"{prefix}reward/{PROTOCOL_COMPONENT}": float(protocol.double().mean())}
        if self.used_tool is not None:
            metrics[f"{prefix}tool_use"] = float(self.used_tool.mean())
        return metrics


def model_context_window(model: Any) -> int | None:
    """The positions the model can attend over (``n_positions`` / ``max_position_embeddings``), or None."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(context) if isinstance(context, int) else None


def make_multi_turn_venv(config: Any, policy: Policy, task: Any, rewards: Any, num_envs: int, split: str) -> Any:
    """The ``rlfb/MultiTurn-v0`` vector env a run config's ``env`` section describes, in the model's window.

    Args:
        config: The run config (its ``env`` and ``model`` sections).
        policy: Whose tokenizer renders the conversations and whose model bounds the context window.
        task: The run's task.
        rewards: A reward set scoring each finished episode, or None for the protocol's rewards only.
        num_envs: Conversations in the batch.
        split: "train" or "eval".
    """
    import gymnasium

    env = config.env
    tokenizer = policy.tokenizer
    context = env.max_context_tokens
    if context is None:
        stated = getattr(tokenizer, "model_max_length", None)
        windows = [window for window in (model_context_window(policy.model), stated)
                   if isinstance(window, int) and window < 1_000_000]  # transformers' "unset" is huge
        context = min(windows) if windows else None
    return gymnasium.make_vec(
        "rlfb/MultiTurn-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", protocol=env.protocol,
        protocol_options=env.protocol_options, task=task, model=config.model.name, tokenizer=tokenizer,
        rewards=rewards, max_turns=env.max_turns, max_turn_tokens=env.max_turn_tokens,
        max_model_tokens=env.max_model_tokens, max_context_tokens=context, split=split,
        use_chat_template=env.use_chat_template, reply_template=env.reply_template)


def episode_seeds(num_envs: int, group_size: int, seed: int | None,
                  rng: np.random.Generator | None = None) -> list[int]:
    """One reset seed per row: the rows of a group (``group_size`` consecutive rows) share theirs.

    Group g gets ``seed + g``, or, with ``seed=None``, a seed drawn from ``rng`` (the vector env's own
    generator, so a checkpoint of it replays the rollouts). Rows of one group then play the same start.

    Example:
        >>> episode_seeds(6, 2, seed=10)
        [10, 10, 11, 11, 12, 12]
    """
    if group_size < 1 or num_envs % group_size:
        raise ConfigError(f"num_envs={num_envs} must be a positive multiple of group_size={group_size}")
    groups = num_envs // group_size
    if seed is not None:
        group_seeds = [seed + group for group in range(groups)]
    else:
        if rng is None:
            raise ValueError("episode_seeds needs seed= or rng=")
        group_seeds = rng.integers(0, SEED_BOUND, size=groups).tolist()
    return [int(value) for value in group_seeds for _ in range(group_size)]


def collect_episodes(
    venv: Any,
    policy: Policy,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    *,
    group_size: int = 1,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
) -> EpisodeBatch:
    """Reset the multi-turn vector env and play every row's episode to its end with the policy.

    Args:
        venv: A ``rlfb/MultiTurn-v0`` vector env with token actions (``gymnasium.make_vec(...,
            vectorization_mode="vector_entry_point")``); its context window must fit the model's.
        policy: Samples the turns (adapter enabled).
        sampling: Temperature, top-k, top-p; a turn's length is the env's ``max_turn_tokens``
            (``sampling.max_new_tokens`` is not used).
        generator: Randomness of the sampler (on the policy's device).
        group_size: Consecutive rows per group; a group's rows are reset with one seed (same task row, same
            protocol draws), for group baselines (RLOO, GRPO).
        seed: Group g is reset with ``seed + g``; None draws the groups' seeds from ``venv``'s own
            ``np_random`` (seed it once with ``venv.reset(seed=...)``).
        options: Passed to ``venv.reset`` (``split``, ``indices`` or ``prompts`` per row).

    Returns:
        An :class:`EpisodeBatch`. The rollout's ``scores`` are what the env's ``rewards=`` paid at the end
        (0 without them), its ``reward_components`` each ``score/<label>`` (NaN where a reward gave None) and
        ``"protocol"``, the sum of the episode's turn rewards.

    Raises:
        ConfigError: Text actions, a context window larger than the model's, or rows not a multiple of
            ``group_size``.
    """
    env = venv.unwrapped
    settings = env.settings
    _check_env(settings, policy)
    seeds = episode_seeds(env.num_envs, group_size, seed, None if seed is not None else env.np_random)
    venv.reset(seed=seeds, options=options)
    num_rows = env.num_envs
    conversations = env.conversations
    turn_logprobs: list[list[list[float]]] = [[] for _ in range(num_rows)]
    turn_rewards: list[list[float]] = [[] for _ in range(num_rows)]
    final_paid = np.zeros(num_rows)  # what the env's reward functions paid on the last step
    ended: dict[int, dict[str, Any]] = {}  # row -> its last step's info entries
    terminated_rows = np.zeros(num_rows, dtype=bool)
    truncated_rows = np.zeros(num_rows, dtype=bool)
    sampler = TurnSampler(policy.model, sampling, generator, eos_token_id=settings.eos_token_id,
                          pad_token_id=settings.pad_token_id)
    while not env.all_finished:
        active = np.flatnonzero(~env.finished).tolist()
        with policy.autocast():
            turns = sampler.sample_turns(active, [conversations[row].tokens for row in active],
                                         [_turn_room(conversations[row], settings) for row in active])
        actions: list[Any] = [None] * num_rows
        for row, (ids, _) in zip(active, turns, strict=True):
            actions[row] = np.asarray(ids, dtype=np.int64)
        _, rewards, terminated, truncated, info = venv.step(actions)
        for row, (_, logprobs) in zip(active, turns, strict=True):
            # The env would cut a turn longer than the room left; the sampler stops there, so the env keeps
            # every sampled token (build_rollout checks that each turn has as many log-probs as tokens).
            turn_logprobs[row].append(logprobs)
            turn_reward = float(info["turn_reward"][row])
            turn_rewards[row].append(turn_reward)
            if terminated[row] or truncated[row]:
                final_paid[row] = float(rewards[row]) - turn_reward
                terminated_rows[row], truncated_rows[row] = bool(terminated[row]), bool(truncated[row])
                ended[row] = {key: info[key][row] for key in info
                              if not key.startswith("_") and bool(info[f"_{key}"][row])}
    rollout = _episodes_rollout(policy, settings, conversations, turn_logprobs, turn_rewards, final_paid, ended,
                                group_size)
    returns = np.array([sum(rewards) for rewards in turn_rewards]) + final_paid
    last_turn_paid = np.array([rewards[-1] > 0 for rewards in turn_rewards])
    used_tool = None
    if all("used_tool" in ended[row] for row in range(num_rows)):
        used_tool = np.array([bool(ended[row]["used_tool"]) for row in range(num_rows)])
    return EpisodeBatch(rollout, returns, terminated_rows & last_turn_paid, truncated_rows, used_tool)


def _check_env(settings: Any, policy: Policy) -> None:
    if settings.action_type != "tokens":
        raise ConfigError("collect_episodes samples token turns; make the env with action_type='tokens'")
    context = model_context_window(policy.model)
    if context is not None and settings.max_context_tokens > context:
        raise ConfigError(f"the env's context window ({settings.max_context_tokens} tokens) exceeds the model's "
                          f"{context} positions; make the env with max_context_tokens={context} or less")


def _turn_room(conversation: Any, settings: Any) -> int:
    """The most tokens the conversation's next turn may take: ``max_turn_tokens``, or less where the context
    window or the episode's token cap leaves less (the env would cut the turn there)."""
    room = min(settings.max_turn_tokens, settings.max_context_tokens - len(conversation.tokens))
    if settings.max_model_tokens is not None:
        room = min(room, settings.max_model_tokens - conversation.num_model_tokens)
    return int(room)


def _episodes_rollout(policy: Policy, settings: Any, conversations: Sequence[Any],
                      turn_logprobs: Sequence[Sequence[Sequence[float]]], turn_rewards: Sequence[Sequence[float]],
                      final_paid: np.ndarray, ended: Mapping[int, Mapping[str, Any]], group_size: int) -> Rollout:
    """The finished conversations as a :class:`Rollout`: opening | model turns and replies, in order."""
    prompt_ids, segments, completions = [], [], []
    for row, conversation in enumerate(conversations):
        (_, opening_start, opening_end), *rest = conversation.segments
        prompt_ids.append(conversation.tokens[opening_start:opening_end])
        row_segments, turn = [], 0
        for role, start, end in rest:
            tokens = conversation.tokens[start:end]
            if role == "model":
                row_segments.append(Segment(tokens, True, turn_rewards[row][turn], turn_logprobs[row][turn]))
                turn += 1
            else:
                row_segments.append(Segment(tokens, False))
        segments.append(row_segments)
        completions.append(settings.tokenizer.decode(conversation.tokens[opening_end:], skip_special_tokens=True))
    components: dict[str, list[float | None]] = {PROTOCOL_COMPONENT: [float(sum(rewards)) for rewards in turn_rewards]}
    labels = sorted({key for row in ended.values() for key in row if key.startswith("score/")})
    for key in labels:
        if key == f"score/{PROTOCOL_COMPONENT}":
            raise ConfigError(f"a reward is labelled {PROTOCOL_COMPONENT!r}, the name of the protocol's reward "
                              "component in a multi-turn rollout; give it another label")
        components[key.removeprefix("score/")] = [float(ended[row].get(key, np.nan)) for row in range(len(ended))]
    return build_rollout(prompt_ids, segments, final_paid.tolist(), pad_token_id=settings.pad_token_id,
                         reward_components=components, prompts=[conversation.opening for conversation in conversations],
                         completions=completions, group_size=group_size, device=policy.device)
