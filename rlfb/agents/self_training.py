"""Self-training on pseudo-samples: sample k completions per prompt, keep the best, fine-tune on them.

One update is one iteration of generate-then-improve (ReST-EM, Singh et al. 2023; RAFT, Dong et al. 2023;
expert iteration, Anthony et al. 2017). The trainer's rollout is the generate step: k = ``group_size``
completions of each prompt, scored by the rewards. The improve step:

1. Returns R_i = score_i + sum_k turn_reward_ik + sum_t dense_it (t over model tokens), as REINFORCE's.
2. Keep rule (``keep``): "threshold" keeps R_i >= tau (ReST-EM's binary filter; expert iteration keeps
   the solutions the expert got right); "best_of_group" keeps the best of each prompt's k (RAFT's
   reward-ranked selection); "top_fraction" keeps the best ceil(f * B) of the batch. ``keep_threshold``
   is a floor for every rule.
3. ``epochs`` passes over the kept rows in shuffled minibatches, each a gradient step on the joint objective

       L = lambda * L_LM(real text) + (1 - lambda) * L_pseudo + beta * KL_k3 - c_H * H

   with L_pseudo = -(1/N) sum_{kept i, t} m_it log pi(y_it | s_it), the token-mean negative log-likelihood
   of the kept samples over their model tokens m (environment replies of a multi-turn episode are context,
   not targets), L_LM the same on a batch of real text (rlfb/agents/lm_mix.py; lambda = ``lm_coef``), and
   KL_k3 = (1/N) sum m_it (exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1) to the base model
   (the adapter disabled; Schulman 2020), beta = ``kl_coef`` (fixed, or adapted toward ``kl_target`` from the
   kept samples' KL per completion), and H the mean entropy of the policy over those tokens, c_H =
   ``entropy_coef`` (the shared regularization options, docs/algorithms.md).

Unlike ReST-EM, which fine-tunes the base model afresh at each iteration, the adapter keeps training across
iterations (as RAFT does): an iteration is one trainer update. Log-likelihoods are at temperature 1 (the
sampling temperature shapes which samples exist, not what the model is fitted to). An iteration that keeps
nothing takes no gradient step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from rlfb.agents.base import Agent, GradientStepper, masked_mean
from rlfb.agents.configs import SelfTrainingConfig
from rlfb.agents.kl import make_kl_controller
from rlfb.agents.lm_mix import real_text_batches, real_text_loss
from rlfb.agents.reinforce import check_groups
from rlfb.agents.rollout import Rollout, forward_rollout, rollout_reference_logprobs
from rlfb.models.policy import Policy


def episode_returns(rollout: Rollout) -> torch.Tensor:
    """(B,) R = score + sum of turn rewards + sum of dense rewards over model tokens (no KL)."""
    returns = rollout.scores.float() + rollout.turn_rewards.sum(1)
    if rollout.per_token_rewards is not None:
        returns = returns + (rollout.per_token_rewards * rollout.action_mask).sum(1)
    return returns


def keep_mask(returns: torch.Tensor, rule: str, group_size: int = 1, threshold: float | None = None,
              fraction: float = 0.25) -> torch.Tensor:
    """(B,) bool: the rows the keep rule selects.

    Args:
        returns: (B,) returns; rows i*k .. i*k+k-1 share a prompt when ``group_size`` k > 1.
        rule: "threshold" (R >= threshold), "best_of_group" (the first row of each group with the group's
            largest R) or "top_fraction" (the ceil(fraction * B) largest R of the batch, earlier rows first
            on ties).
        group_size: k.
        threshold: Minimum return of a kept row (required by "threshold"; None: no floor).
        fraction: Share of the batch "top_fraction" keeps.

    Example:
        >>> keep_mask(torch.tensor([0.0, 1.0, 1.0, 0.5]), "best_of_group", group_size=2).tolist()
        [False, True, True, False]
    """
    if rule == "threshold":
        assert threshold is not None, "keep 'threshold' needs a threshold"
        return returns >= threshold
    kept = torch.zeros_like(returns, dtype=torch.bool)
    if rule == "best_of_group":
        best = returns.view(-1, group_size).argmax(1)  # (B / k,) argmax returns the first maximum
        kept[torch.arange(best.numel(), device=returns.device) * group_size + best] = True
    elif rule == "top_fraction":
        order = torch.sort(returns, descending=True, stable=True).indices
        kept[order[: max(1, math.ceil(fraction * returns.numel()))]] = True
    else:
        raise ValueError(f"unknown keep rule {rule!r}")
    return kept if threshold is None else kept & (returns >= threshold)


def pseudo_sample_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_pseudo = -(1/N) sum_{i,t} m_it log pi(y_it | s_it), N = sum m: the kept samples' NLL per model token."""
    return -masked_mean(logprobs, mask)


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/N) sum m_it (exp(d) - d - 1), d = log pi_ref - log pi: the k3 estimate of KL(pi || pi_ref) per token.

    d is zeroed off the model tokens before exp, so an environment token cannot overflow into inf * 0 = NaN.
    """
    log_ratio = (reference_logprobs - logprobs) * mask
    return masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask)


class SelfTrainingAgent(Agent):
    """Fine-tunes the policy's adapter on its own kept samples, optionally mixed with real text (see the module).

    Args:
        policy: A :class:`~rlfb.models.policy.Policy` (a value head, if any, is not used).
        config: Hyper-parameters.
    """

    name = "self_training"

    def __init__(self, policy: Policy, config: SelfTrainingConfig | None = None) -> None:
        self.config = config or SelfTrainingConfig()
        self.policy = policy
        c = self.config
        self.stepper = GradientStepper(
            [p for p in policy.model.parameters() if p.requires_grad],
            learning_rate=c.learning_rate,
            lr_schedule=c.lr_schedule,
            total_updates=c.total_updates,
            max_grad_norm=c.max_grad_norm,
            weight_decay=c.weight_decay,
            max_consecutive_skips=c.max_consecutive_skips,
        )
        self.generator = torch.Generator().manual_seed(c.seed)
        self.kl_controller = make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)
        self.real_text = real_text_batches(c.lm_data, policy, c.lm_batch_size, c.seed) if c.lm_coef > 0 else None

    @property
    def updates(self) -> int:
        """Updates done so far (the stepper counts them; resumed with its state)."""
        return self.stepper.updates_done

    def loss_names(self) -> list[str]:
        """The ``train/`` metrics each gradient step reports (averaged over the update's steps)."""
        names = ["train/loss", "train/pseudo_loss", "train/kl_loss", "train/kl", "train/entropy"]
        return names + (["train/lm_loss"] if self.real_text is not None else [])

    def update(self, rollout: Rollout) -> dict[str, float]:
        c = self.config
        returns = episode_returns(rollout)  # (B,)
        if c.keep == "best_of_group":
            check_groups(rollout, c.group_size)
        kept_rows = keep_mask(returns, c.keep, c.group_size, c.keep_threshold, c.keep_fraction).nonzero().squeeze(1)
        kept = rollout.select(kept_rows)

        sums = dict.fromkeys(self.loss_names(), 0.0)
        steps = 0
        kl_coef = self.kl_controller.value
        if kept.batch_size:
            reference_logprobs = rollout_reference_logprobs(self.policy, kept)  # (N_kept, T), at temperature 1
            minibatch_size = c.minibatch_size or kept.batch_size
            degenerate = False
            for _ in range(c.epochs):
                order = torch.randperm(kept.batch_size, generator=self.generator).to(returns.device)
                for first in range(0, kept.batch_size, minibatch_size):
                    rows = order[first : first + minibatch_size]
                    stats = self._step(kept.select(rows), reference_logprobs[rows], kl_coef)
                    if stats is None:  # degenerate: abandon this update
                        degenerate = True
                        break
                    steps += 1
                    for key, value in stats.items():
                        sums[key] += value
                if degenerate:
                    break
        learning_rate = self.stepper.learning_rate
        self.stepper.finish_update()

        nan = float("nan")
        metrics = {key: value / steps if steps else nan for key, value in sums.items()}
        if steps:  # the kept samples' KL per completion, over this update's steps
            self.kl_controller.update(metrics["train/kl"], kept.batch_size)
        metrics.update(
            {
                "train/kl_coef": kl_coef,
                "train/return_mean": float(returns.mean()),
                "train/kept_fraction": kept.batch_size / rollout.batch_size,
                "train/kept_prompts": len(set(kept.prompts)) / len(set(rollout.prompts)),
                "train/kept_return_mean": float(returns[kept_rows].mean()) if kept.batch_size else nan,
                "train/steps": float(steps),
                "train/grad_norm": self.stepper.last_grad_norm,
                "train/learning_rate": learning_rate,
                "train/skipped_updates": float(self.stepper.skipped_updates),
            }
        )
        return metrics

    def _step(self, batch: Rollout, reference_logprobs: torch.Tensor, kl_coef: float) -> dict[str, float] | None:
        """One gradient step on the joint objective over ``batch`` (kept rows); None when it was degenerate."""
        c = self.config
        mask = batch.action_mask.float()
        forward = forward_rollout(self.policy, batch, with_values=False, entropy_grad=c.entropy_coef != 0)
        assert forward.entropy is not None
        pseudo_loss = pseudo_sample_loss(forward.logprobs, mask)
        kl_loss = k3_kl(forward.logprobs, reference_logprobs, mask)
        entropy = masked_mean(forward.entropy, mask)
        # L = lambda * L_LM + (1 - lambda) * L_pseudo + beta * KL_k3 - c_H * H
        loss = (1.0 - c.lm_coef) * pseudo_loss + kl_coef * kl_loss - c.entropy_coef * entropy
        with torch.no_grad():  # k1 KL per completion under the weights of this step
            sequence_kl = ((forward.logprobs - reference_logprobs) * mask).sum(1).mean()
        terms = [pseudo_loss, kl_loss, sequence_kl, entropy]
        if self.real_text is not None:
            lm_loss = real_text_loss(self.real_text, self.policy)
            loss = loss + c.lm_coef * lm_loss
            terms.append(lm_loss)
        self.stepper.backward(loss)
        if not self.stepper.step():  # skipped when the loss (here or on another rank) or the gradient is not finite
            return None
        return dict(zip(self.loss_names(), torch.stack([loss, *terms]).tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "stepper": self.stepper.state_dict(),
            "generator": self.generator.get_state(),
            "kl_controller": self.kl_controller.state_dict(),
            "real_text": self.real_text.state_dict() if self.real_text is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stepper.load_state_dict(state["stepper"])
        self.generator.set_state(state["generator"])
        if "kl_controller" in state:  # absent from checkpoints written before the KL could adapt
            self.kl_controller.load_state_dict(state["kl_controller"])
        if self.real_text is not None and state.get("real_text") is not None:
            self.real_text.load_state_dict(state["real_text"])
