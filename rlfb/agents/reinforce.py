"""REINFORCE with a baseline: moving average, leave-one-out (RLOO) or group-normalised (GRPO).

The whole episode is one action (a bandit over sequences), so the policy gradient is

    grad J = E[ A(x, y) * sum_t grad log pi(y_t | s_t) ]                     (Williams 1992)

with the episode advantage A = R - b and t running over the model's tokens only: in a multi-turn episode
the environment's replies are part of the states s_t, not actions, so they add no log-prob, KL or loss
term (``rollout.action_mask``; a single-turn completion is all model tokens). The return R is the final
score plus every turn's reward and dense reward. The baselines b:

* ``"ema"``: b is an exponential moving average of past batch-mean returns, updated after use so that it
  never depends on the sample it is subtracted from (the plainest variance reduction; Williams 1992).
* ``"rloo"``: k completions per prompt; b_i = mean of the other k-1 returns of the same prompt,
  i.e. A_i = k/(k-1) * (R_i - mean_j R_j) (Kool et al. 2019; Ahmadian et al. 2024).
* ``"grpo"``: k completions per prompt; A_i = (R_i - mean_j R_j) / (std_j R_j + eps)
  (Shao et al. 2024, "DeepSeekMath", GRPO with outcome supervision).

KL to the reference (over model tokens) either enters the return, R = score - beta * sum_t (log pi - log pi_ref)_t
(``kl_penalty="reward"``, as in Ziegler et al. 2019 and Ahmadian et al. 2024), or is a loss term
beta * mean_t k3_t with k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (``kl_penalty="loss"``,
Shao et al. 2024; Schulman 2020). One gradient step per rollout: the samples are on-policy. With
``ptx_coef`` gamma > 0 the step's loss also gets gamma * L_LM on a batch of real text (PPO-ptx, Ouyang et al.
2022; rlfb/agents/lm_mix.py); at 0 nothing of it runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from rlfb.agents.base import Agent, GradientStepper
from rlfb.agents.configs import ReinforceConfig
from rlfb.agents.kl import make_kl_controller
from rlfb.agents.lm_mix import real_text_batches, real_text_loss
from rlfb.agents.rollout import Rollout, evaluate_rollout, forward_rollout, rollout_reference_logprobs
from rlfb.distributed import token_shares, world_size
from rlfb.errors import ConfigError
from rlfb.models.policy import Policy, PolicyForward


# ------------------------------------------------------------------------------- group advantages
def rloo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages: A_i = R_i - mean_{j != i} R_j within each group of ``group_size``.

    Args:
        returns: (B,) with B a multiple of ``group_size``, groups consecutive.
    """
    groups = returns.view(-1, group_size)  # (B / k, k)
    others_mean = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


def grpo_advantages(returns: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages: A_i = (R_i - mean_g R) / (std_g R + eps), sample std (n - 1).

    A group whose returns are all equal gets advantage 0: it carries no signal about which completion
    is better (Shao et al. 2024).
    """
    groups = returns.view(-1, group_size)  # (B / k, k)
    mean = groups.mean(1, keepdim=True)
    std = groups.std(1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def check_groups(rollout: Rollout, group_size: int) -> None:
    """Raise ConfigError unless the rollout is made of consecutive groups of ``group_size`` equal prompts."""
    if rollout.batch_size % group_size:
        raise ConfigError(
            f"batch of {rollout.batch_size} completions is not a multiple of group_size={group_size}; "
            "make num_envs a multiple of group_size"
        )
    for first in range(0, rollout.batch_size, group_size):
        group = rollout.prompts[first : first + group_size]
        if any(prompt != group[0] for prompt in group):
            raise ConfigError(
                f"rows {first}..{first + group_size - 1} of the rollout do not share one prompt; create the "
                f"vector env with group_size={group_size} so each group of {group_size} rows repeats a prompt"
            )


def advantage_statistics(advantages: torch.Tensor, mean: float, square_mean: float) -> dict[str, float]:
    """``train/advantage_mean`` and ``train/advantage_std`` (sample std, n - 1) of the batch's advantages,
    over every rank's rows when several ranks train together (``mean`` and ``square_mean``: the joined
    batch's mean of A and of A^2, averaged over the ranks)."""
    if world_size() == 1:
        return {"train/advantage_mean": float(advantages.mean()),
                "train/advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0}
    count = advantages.numel() * world_size()
    variance = max(square_mean - mean * mean, 0.0)
    return {"train/advantage_mean": mean, "train/advantage_std": math.sqrt(variance * count / (count - 1))}


# ------------------------------------------------------------------------------- the agent
class ReinforceAgent(Agent):
    """REINFORCE with a moving-average or group baseline (see the module docstring).

    Args:
        policy: A :class:`~rlfb.models.policy.Policy` (a value head, if any, is not used).
        config: Hyper-parameters.
    """

    name = "reinforce"

    def __init__(self, policy: Policy, config: ReinforceConfig | None = None) -> None:
        self.config = config or ReinforceConfig()
        self.policy = policy
        c = self.config
        parameters = [p for p in policy.model.parameters() if p.requires_grad]
        self.stepper = GradientStepper(
            parameters,
            learning_rate=c.learning_rate,
            lr_schedule=c.lr_schedule,
            total_updates=c.total_updates,
            max_grad_norm=c.max_grad_norm,
            weight_decay=c.weight_decay,
            max_consecutive_skips=c.max_consecutive_skips,
        )
        self.kl_controller = make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)
        self.baseline_value = 0.0
        self.real_text = real_text_batches(c.ptx_data, policy, c.ptx_batch_size, c.seed) if c.ptx_coef > 0 else None

    def advantages(self, returns: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """(B,) sequence advantages A = R - b for the configured baseline (EMA state is not changed)."""
        c = self.config
        if c.baseline == "ema":
            return returns - self.baseline_value
        check_groups(rollout, c.group_size)
        if c.baseline == "rloo":
            return rloo_advantages(returns, c.group_size)
        return grpo_advantages(returns, c.group_size)

    @property
    def updates(self) -> int:
        """Updates done so far (the stepper counts them; resumed with its state)."""
        return self.stepper.updates_done

    def update(self, rollout: Rollout) -> dict[str, float]:
        c = self.config
        mask = rollout.action_mask.float()  # (B, T) the model's tokens: the only ones with a log-prob or KL term
        chunk = c.minibatch_size or rollout.batch_size
        # log pi_old: when one chunk takes the whole batch, the gradient step's own forward pass (detached)
        # gives it -- same weights, same inputs, one pass fewer. With several chunks the returns need every
        # row's KL before the first chunk's loss, hence a separate no-grad pass.
        whole_batch_forward = None
        if chunk >= rollout.batch_size:
            reference_logprobs = rollout_reference_logprobs(self.policy, rollout, c.temperature)
            whole_batch_forward = self._forward(rollout, share_prompts=None)  # its own pi_old: may share
            old_logprobs = whole_batch_forward.logprobs.detach() * mask
        else:
            old = evaluate_rollout(self.policy, rollout, c.temperature, chunk_size=chunk)
            old_logprobs, reference_logprobs = old.logprobs, old.reference_logprobs
        kl = (old_logprobs - reference_logprobs) * mask  # (B, T) k1 per model token
        sequence_kl = kl.sum(1)  # (B,)
        kl_coef = self.kl_controller.value

        # R = score + sum_k turn_reward_k + sum_t dense_t  [- beta * sum_t kl_t when the KL is in the reward]
        returns = rollout.scores.float() + rollout.turn_rewards.sum(1)
        if rollout.per_token_rewards is not None:
            returns = returns + (rollout.per_token_rewards * mask).sum(1)
        if c.kl_penalty == "reward":
            returns = returns - kl_coef * sequence_kl
        advantages = self.advantages(returns, rollout)  # (B,)

        # One step: loss = -sum_{i,t} A_i log pi(y_it) / N_tokens  [+ beta * k3 mean]  [- c_H * entropy],
        # normalised by the batch's token count (a constant within the batch, so no per-sequence length
        # bias; Liu et al. 2025 "Understanding R1-Zero-Like Training"). Chunks accumulate gradients. With W
        # ranks, N is every rank's tokens and each rank divides by N / W: the ranks' averaged gradient is
        # that of one process over the joined batch (and so are the ranks' mean loss terms).
        total_tokens = mask.sum().clamp(min=1)
        shares = token_shares([mask])
        if shares is not None:  # N_r / (N_r W / N) = N / W
            total_tokens = total_tokens / shares[0]
        # (policy_loss, entropy, kl_loss) summed over chunks on the device, in float64 as Python floats would;
        # read back once after the loop rather than synchronising on every chunk.
        sums = torch.zeros(3, dtype=torch.float64, device=mask.device)
        finite = True
        for first in range(0, rollout.batch_size, chunk):
            rows = torch.arange(first, min(first + chunk, rollout.batch_size), device=mask.device)
            forward = whole_batch_forward if whole_batch_forward is not None else self._forward(rollout.select(rows))
            assert forward.entropy is not None
            batch_mask = mask[rows]
            policy_loss = -(advantages[rows].unsqueeze(1) * forward.logprobs * batch_mask).sum() / total_tokens
            entropy = (forward.entropy * batch_mask).sum() / total_tokens
            loss = policy_loss - c.entropy_coef * entropy
            kl_loss = policy_loss.new_zeros(())
            if c.kl_penalty == "loss":
                # k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 >= 0 (Shao et al. 2024). The log
                # ratio is zeroed off the model tokens before exp: an environment token the model finds very
                # unlikely would overflow exp, and inf * 0 is NaN, in the loss and in its gradient.
                log_ratio = (reference_logprobs[rows] - forward.logprobs) * batch_mask
                kl_loss = ((torch.exp(log_ratio) - log_ratio - 1.0) * batch_mask).sum() / total_tokens
                loss = loss + kl_coef * kl_loss
            if not self.stepper.backward(loss):  # the step below skips
                finite = False
                break
            sums += torch.stack([policy_loss, entropy, kl_loss]).detach().double()
        ptx_loss = None
        if finite and self.real_text is not None:  # + gamma * L_LM(real text), its gradient accumulated
            ptx_loss = real_text_loss(self.real_text, self.policy)
            finite = self.stepper.backward(c.ptx_coef * ptx_loss)
        # The batch's statistics ride in the step's gradient all-reduce (averaged over the ranks, each holding
        # as many rows: the means of the joined batch) rather than in collectives of their own.
        riders = torch.cat([sums, torch.stack([returns.mean(), sequence_kl.mean(), advantages.mean(),
                                               (advantages * advantages).mean()]).detach().double()])
        self.stepper.step(riders=riders)  # skipped, on every rank, when a loss or the gradient is not finite
        assert self.stepper.averaged_riders is not None
        averaged = self.stepper.averaged_riders.tolist()
        sums_list, (mean_return, mean_sequence_kl, advantage_mean, advantage_square_mean) = averaged[:3], averaged[3:]
        baseline_used = self.baseline_value
        if c.baseline == "ema":
            # Updated after use: b_{n+1} = d * b_n + (1 - d) * mean(R_n)
            self.baseline_value = c.baseline_decay * self.baseline_value + (1 - c.baseline_decay) * mean_return
        self.kl_controller.update(mean_sequence_kl, rollout.batch_size * world_size())
        learning_rate = self.stepper.learning_rate
        self.stepper.finish_update()

        metrics = dict(zip(("train/policy_loss", "train/entropy", "train/kl_loss"), sums_list, strict=True))
        metrics.update(
            {
                "train/kl": mean_sequence_kl,
                "train/kl_coef": kl_coef,
                "train/return_mean": mean_return,
                **advantage_statistics(advantages, advantage_mean, advantage_square_mean),
                "train/grad_norm": self.stepper.last_grad_norm,
                "train/learning_rate": learning_rate,
                "train/skipped_updates": float(self.stepper.skipped_updates),
            }
        )
        if c.baseline == "ema":
            metrics["train/baseline"] = baseline_used
        if ptx_loss is not None:
            metrics["train/ptx_loss"] = float(ptx_loss.detach())
        return metrics

    def _forward(self, batch: Rollout, share_prompts: bool | None = False) -> PolicyForward:
        """Log-probs and entropies at ``batch``'s completion positions, with gradients (no values; the update
        masks all but the model tokens); ``share_prompts`` as :func:`forward_rollout`'s."""
        c = self.config
        return forward_rollout(self.policy, batch, temperature=c.temperature, with_values=False,
                               entropy_grad=c.entropy_coef != 0, share_prompts=share_prompts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "stepper": self.stepper.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "baseline_value": self.baseline_value,
            "real_text": self.real_text.state_dict() if self.real_text is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stepper.load_state_dict(state["stepper"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.baseline_value = float(state["baseline_value"])
        if self.real_text is not None and state.get("real_text") is not None:
            self.real_text.load_state_dict(state["real_text"])
