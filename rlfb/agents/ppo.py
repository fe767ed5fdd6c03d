"""Token-level PPO with a KL penalty to the reference model, as in RLHF.

Each token the model produced is an action; the state is the prompt plus every token so far, environment
replies of a multi-turn episode included. Environment tokens, the prompt and padding are not actions: they
carry no log-prob, KL, value or loss, and GAE steps over them from one model token to the next
(``rollout.action_mask``; docs/algorithms.md, "Multi-turn episodes"). The update, top to bottom
(docs/algorithms.md gives the source of every step):

1. Reference log-probs in a no-grad pass over the full sequences; old log-probs and values likewise, or,
   with one minibatch, from the first gradient step's own forward pass (the same numbers, one pass fewer).
2. Per-token rewards: r_t = -beta * (log pi_old - log pi_ref)_t  (+ dense rewards)  (+ each turn's reward
   at its last token)  (+ score at the last model token) -- Ziegler et al. 2019, spread over tokens as in
   their code and Stiennon et al. 2020.
3. GAE(gamma, lambda) advantages and returns over each row's model tokens (Schulman et al. 2016);
   advantages whitened over the batch's model tokens.
4. ``epochs`` passes over shuffled minibatches: clipped surrogate + clipped value loss - entropy bonus
   (Schulman et al. 2017), gradient clipping; optional early stop when the approximate KL between the
   new and the old policy passes ``early_stop_kl``.
5. The KL coefficient is updated (fixed, or adaptive per Ziegler et al. 2019).

With ``ptx_coef`` gamma > 0 each minibatch's loss also gets gamma * L_LM on a batch of real text, InstructGPT's
PPO-ptx (Ouyang et al. 2022, eq. 2; rlfb/agents/lm_mix.py); at 0 nothing of it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from rlfb.agents.base import Agent, GradientStepper, masked_mean, masked_whiten
from rlfb.agents.configs import PPOConfig
from rlfb.agents.kl import make_kl_controller
from rlfb.agents.lm_mix import real_text_batches, real_text_loss
from rlfb.agents.rollout import Rollout, evaluate_rollout, forward_rollout, rollout_reference_logprobs
from rlfb.agents.trajectory import last_action_index
from rlfb.distributed import global_masked_moments, token_shares, world_size
from rlfb.errors import ConfigError
from rlfb.models.policy import Policy, PolicyForward


# ------------------------------------------------------------------------------- the math, one function each
def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    per_token_rewards: torch.Tensor | None = None,
    turn_ends: torch.Tensor | None = None,
    turn_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with the KL penalty at the model tokens (``mask``); returns (rewards, kl), (B, T).

    r_t = -beta * kl_t + dense_t  at every model token t, plus turn k's reward at its last token
    ``turn_ends[:, k]`` and the episode's score at its last model token, where
    kl_t = log pi_old(a_t|s_t) - log pi_ref(a_t|s_t) (k1 estimator; its sum over the model tokens is the
    episode's KL estimate). Both are 0 wherever ``mask`` is 0 (prompt, environment tokens, padding).
    """
    kl = (logprobs - reference_logprobs) * mask  # (B, T)
    rewards = -kl_coef * kl
    if per_token_rewards is not None:
        rewards = rewards + per_token_rewards * mask
    last_index = last_action_index(mask)  # (B,) position of each row's last model token
    rewards = rewards.scatter_add(1, last_index.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    if turn_ends is not None and turn_rewards is not None:
        # (B, K) turns; a row with fewer than K turns has turn_ends -1 (and reward 0) in the rest.
        present = turn_ends >= 0
        paid = torch.where(present, turn_rewards.to(rewards.dtype), 0.0)
        rewards = rewards.scatter_add(1, turn_ends.clamp(min=0), paid)
    return rewards * mask, kl


def generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016, eq. 16) over each row's model tokens; returns (advantages, returns), (B, T).

    With t, t+1 consecutive *model* tokens of a row (``mask`` 1):

    delta_t = r_t + gamma * V_{t+1} - V_t        (V past the last model token is 0: the episode ended)
    A_t     = delta_t + gamma * lambda * A_{t+1}
    R_t     = A_t + V_t                          (the value target, a lambda-return)

    Environment tokens (``mask`` 0 between model tokens) are not time steps of the policy: the last model
    token of turn k is followed by the first of turn k+1, as in verl's ``compute_gae_advantage_return``
    ("skip values and TD-error on observation tokens"). So each row's model tokens are packed to the
    front, in order, GAE runs over them, and the results go back to their positions; A and R are 0 at
    every other position. A single-turn row is already packed (its model tokens come first).
    """
    # Pack: a stable sort of "not a model token" moves each row's model tokens to the front in order; for a
    # single-turn rollout ``order`` is the identity.
    order = torch.argsort((mask == 0).to(torch.uint8), dim=1, stable=True)  # (B, T)
    packed_mask = mask.gather(1, order).to(values.dtype)
    packed_rewards = rewards.gather(1, order)
    packed_values = values.gather(1, order) * packed_mask
    advantages = _packed_generalized_advantages(packed_rewards, packed_values, packed_mask, gamma, gae_lambda)
    advantages = torch.zeros_like(advantages).scatter(1, order, advantages)  # back to the token positions
    return advantages, advantages + values * mask.to(values.dtype)


def _packed_generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> torch.Tensor:
    """GAE's backward recursion over rows whose steps are consecutive and padded at the end (``mask``)."""
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * gae_lambda * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages


def clipped_surrogate_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective (Schulman et al. 2017, eq. 7) as a loss; returns (loss, clip_fraction, approx_kl).

    rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)
    loss  = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))
    approx_kl = mean_t (rho_t - 1) - log rho_t   (k3 estimator of KL(pi_old || pi); Schulman 2020)

    The means run over the ``mask`` tokens; elsewhere the log ratio is zeroed before exp, so nothing found
    there (an environment token's log-prob) can overflow into inf * 0 = NaN.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (Huang et al. 2022 detail 9; lm-human-preferences); returns (loss, clip_fraction).

    V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
    loss   = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_fraction


def explained_variance(residual_variance: torch.Tensor, target_variance: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target) (1 is perfect, <= 0 is useless), from the two variances
    (over every rank's entries when several ranks train together: :func:`global_masked_moments`)."""
    return float(1.0 - residual_variance / target_variance.clamp(min=1e-8))


# ------------------------------------------------------------------------------- the agent
class PPOAgent(Agent):
    """PPO with a value head on the policy's trunk and a per-token KL penalty to the reference.

    Args:
        policy: A :class:`~rlfb.models.policy.Policy` with a value head.
        config: Hyper-parameters.
    """

    name = "ppo"

    def __init__(self, policy: Policy, config: PPOConfig | None = None) -> None:
        self.config = config or PPOConfig()
        if policy.value_head is None:
            raise ConfigError("PPO needs a policy with a value head; build the Policy with value_head=True")
        self.policy = policy
        c = self.config
        self.stepper = GradientStepper(
            policy.trainable_parameters(),
            learning_rate=c.learning_rate,
            lr_schedule=c.lr_schedule,
            total_updates=c.total_updates,
            max_grad_norm=c.max_grad_norm,
            weight_decay=c.weight_decay,
            max_consecutive_skips=c.max_consecutive_skips,
        )
        self.kl_controller = make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)
        self.generator = torch.Generator().manual_seed(c.seed)
        self.real_text = real_text_batches(c.ptx_data, policy, c.ptx_batch_size, c.seed) if c.ptx_coef > 0 else None

    @property
    def updates(self) -> int:
        """Updates done so far (the stepper counts them; resumed with its state)."""
        return self.stepper.updates_done

    def update(self, rollout: Rollout) -> dict[str, float]:
        c = self.config
        mask = rollout.action_mask.float()  # (B, T) the model's tokens: the only ones with a loss, KL or value
        batch_size = rollout.batch_size

        # 1. pi_ref in a no-grad pass. pi_old and V_old: with one minibatch, the first gradient step's own
        #    forward pass, detached (same weights, same inputs: the same numbers, one pass fewer); with
        #    several, no-grad passes (every row's advantage is needed before the first step).
        minibatch_size = max(1, batch_size // c.num_minibatches)
        first_forward: PolicyForward | None = None
        if minibatch_size >= batch_size:
            reference_logprobs = rollout_reference_logprobs(self.policy, rollout, c.temperature)
            first_forward = self._forward(rollout)
            assert first_forward.values is not None
            old_logprobs, old_values = first_forward.logprobs.detach() * mask, first_forward.values.detach() * mask
        else:
            old = evaluate_rollout(self.policy, rollout, c.temperature, chunk_size=minibatch_size)
            assert old.values is not None
            old_logprobs, old_values, reference_logprobs = old.logprobs, old.values, old.reference_logprobs

        # 2. Per-token rewards with the KL penalty, at the coefficient beta of this update.
        kl_coef = self.kl_controller.value
        rewards, kl = token_rewards(
            rollout.scores, old_logprobs, reference_logprobs, mask, kl_coef, rollout.per_token_rewards,
            rollout.turn_ends, rollout.turn_rewards,
        )  # fmt: skip

        # 3. GAE over the model tokens, then whitening of the advantages over the whole batch's model tokens.
        #    The batch's moments (over every rank's tokens and episodes) come together: two all-reduces in all.
        advantages, returns = generalized_advantages(rewards, old_values, mask, c.gamma, c.gae_lambda)
        sequence_kls = kl.sum(1)  # sum_t kl_t over each episode's model tokens
        moments = global_masked_moments([(advantages, mask), (returns, mask), (returns - old_values, mask),
                                         (old_values, mask), (sequence_kls, torch.ones_like(sequence_kls))])
        advantage_moments, (return_mean, return_variance), (_, residual_variance), (value_mean, _), \
            (sequence_kl_tensor, _) = moments
        raw_advantage_mean = float(advantage_moments[0])  # before whitening, which zeroes it
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask, moments=advantage_moments)

        # 4. Epochs x minibatches of clipped-surrogate steps.
        sums: dict[str, float] = {}
        steps = 0
        epochs_done = 0
        stop = False
        for _ in range(c.epochs):
            order = torch.randperm(batch_size, generator=self.generator).to(mask.device)
            minibatches = [order[first : first + minibatch_size] for first in range(0, batch_size, minibatch_size)]
            # Several ranks: each minibatch's share of the tokens over the ranks, one all-reduce per epoch.
            shares = token_shares([mask[rows] for rows in minibatches])
            for index, rows in enumerate(minibatches):
                forward = None
                if first_forward is not None:  # the pass that gave pi_old, over the batch in its own order
                    rows, forward, first_forward = torch.arange(batch_size, device=mask.device), first_forward, None
                stats = self._minibatch_step(
                    rollout.select(rows), old_logprobs[rows], old_values[rows], advantages[rows], returns[rows],
                    forward, None if shares is None else shares[index],
                )  # fmt: skip
                if stats is None:  # degenerate: abandon this update
                    stop = True
                    break
                steps += 1
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                if c.early_stop_kl is not None and stats["train/approx_kl"] > c.early_stop_kl:
                    stop = True
                    break
            epochs_done += 1
            if stop:
                break

        # 5. The KL coefficient follows the observed KL (mean over episodes of sum_t kl_t, t model tokens;
        #    over every rank's episodes, from step 3).
        sequence_kl = float(sequence_kl_tensor)
        self.kl_controller.update(sequence_kl, batch_size * world_size())
        learning_rate = self.stepper.learning_rate
        self.stepper.finish_update()

        metrics = {key: value / max(steps, 1) for key, value in sums.items()}
        metrics.update(
            {
                "train/kl": sequence_kl,
                "train/kl_coef": kl_coef,
                "train/kl_penalty": float(-kl_coef * sequence_kl_tensor),
                "train/advantage_mean": raw_advantage_mean,
                "train/return_mean": float(return_mean),
                "train/value_mean": float(value_mean),
                "train/explained_variance": explained_variance(residual_variance, return_variance),
                "train/learning_rate": learning_rate,
                "train/epochs": float(epochs_done),
                "train/skipped_updates": float(self.stepper.skipped_updates),
            }
        )
        return metrics

    def _minibatch_step(
        self,
        batch: Rollout,
        old_logprobs: torch.Tensor,
        old_values: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        forward: PolicyForward | None = None,
        share: torch.Tensor | None = None,
    ) -> dict[str, float] | None:
        """One gradient step on a minibatch (``forward``: its forward pass, if already run; ``share``: its
        token share over the ranks, :func:`rlfb.distributed.token_shares`); None when it was degenerate and
        skipped."""
        c = self.config
        mask = batch.action_mask.float()
        forward = forward if forward is not None else self._forward(batch)
        assert forward.values is not None and forward.entropy is not None
        policy_loss, clip_fraction, approx_kl = clipped_surrogate_loss(
            forward.logprobs, old_logprobs, advantages, mask, c.clip_range
        )
        value_loss, value_clip_fraction = clipped_value_loss(
            forward.values, old_values, returns, mask, c.value_clip_range
        )
        entropy = masked_mean(forward.entropy, mask)
        # L = L_clip + c_v * L_V - c_H * H   (Schulman et al. 2017, eq. 9, as a loss to minimise)
        loss = policy_loss + c.vf_coef * value_loss - c.entropy_coef * entropy
        ptx_loss = None
        if self.real_text is not None:  # PPO-ptx: + gamma * L_LM(real text)  (Ouyang et al. 2022, eq. 2)
            ptx_loss = real_text_loss(self.real_text, self.policy)
        # Several ranks: every term is a mean over this rank's tokens; scaled by N_r * W / N, the ranks'
        # averaged gradient (and the ranks' mean of each statistic) is that of the mean over all N tokens.
        if share is not None:
            loss, policy_loss, value_loss, entropy = (term * share for term in (loss, policy_loss, value_loss, entropy))
            clip_fraction, value_clip_fraction, approx_kl = (
                term * share for term in (clip_fraction, value_clip_fraction, approx_kl))
        if ptx_loss is not None:
            loss = loss + c.ptx_coef * ptx_loss
        # One device-to-host copy for all the statistics instead of one sync per scalar; averaged over the
        # ranks in the gradients' all-reduce: the batch's statistics, the same on every rank (so is the early
        # stop on approx_kl, a decision every rank must take together; and so is the skip of a step whose
        # loss was not finite on some rank, agreed in the same all-reduce).
        names = ("train/loss", "train/policy_loss", "train/value_loss", "train/entropy",
                 "train/clip_fraction", "train/value_clip_fraction", "train/approx_kl")  # fmt: skip
        statistics = torch.stack([loss, policy_loss, value_loss, entropy, clip_fraction, value_clip_fraction,
                                  approx_kl]).detach()
        self.stepper.backward(loss)
        if not self.stepper.step(riders=statistics):
            return None
        assert self.stepper.averaged_riders is not None
        values = self.stepper.averaged_riders.tolist()
        stats = {**dict(zip(names, values, strict=True)), "train/grad_norm": self.stepper.last_grad_norm}
        if ptx_loss is not None:
            stats["train/ptx_loss"] = float(ptx_loss.detach())
        return stats

    def _forward(self, batch: Rollout) -> PolicyForward:
        """Log-probs, values and entropies at ``batch``'s completion positions, with gradients (the update
        masks all but the model tokens)."""
        c = self.config
        return forward_rollout(self.policy, batch, temperature=c.temperature, entropy_grad=c.entropy_coef != 0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "stepper": self.stepper.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "generator": self.generator.get_state(),
            "real_text": self.real_text.state_dict() if self.real_text is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stepper.load_state_dict(state["stepper"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.generator.set_state(state["generator"])
        if self.real_text is not None and state.get("real_text") is not None:
            self.real_text.load_state_dict(state["real_text"])
