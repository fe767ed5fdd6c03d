"""On-policy distillation: the student samples, a frozen teacher grades every token it wrote.

The student pi_s (the policy: base model + LoRA) samples completions as any agent's rollout does; at
each model token t of a sampled episode (``rollout.action_mask``: environment replies of a multi-turn
episode are states, not actions, and carry no loss) the update compares the student's next-token
distribution p_s = pi_s(. | s_t) with the teacher's p_t = pi_t(. | s_t) over the whole vocabulary V:

    reverse KL  D(s_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))                 (Gu et al. 2024, MiniLLM)
    forward KL  D(s_t) = sum_v p_t(v) (log p_t(v) - log p_s(v))
    JSD(beta)   D(s_t) = beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
                                                                            (Agarwal et al. 2024, GKD)

and minimises  L = sum_{i,t} mask_it D(s_it) / sum_{i,t} mask_it,  the mean over the batch's model
tokens. This is GKD's on-policy objective (student-generated sequences, lambda = 1): the gradient flows
through p_s at each visited state but not through the sampling of the states (Agarwal et al.
2024). JSD(beta) / beta -> KL(p_t || p_s) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(p_s || p_t) as
beta -> 1, so beta = 0 and beta = 1 use those two KLs, as TRL's GKDTrainer does.

``token_estimate: sampled`` replaces the sum over the vocabulary with the one sample the student drew,
k1_t = log p_s(y_t) - log p_t(y_t), used as a per-token cost of a policy gradient with no credit to later
tokens (the "on-policy distillation" recipe of Lu & Thinking Machines Lab 2025):

    L = sum_{i,t} mask_it stopgrad(k1_it) log p_s(y_it) / sum mask

whose expected gradient over y_t ~ p_s is exactly the gradient of the per-token reverse KL above
(E[(log p_s - log p_t) grad log p_s] = grad KL(p_s || p_t), as E[grad log p_s] = 0). It needs the
teacher's log-prob of one token only, the form that scales to large vocabularies; the full sum is exact
and cheap on a small vocabulary. Both are divided by the sampling temperature before the softmax.

The shared regularization options (docs/algorithms.md, "Regularization") add to L, both off by default:
beta * KL_k3, the k3 estimate of KL(pi_s || pi_ref) to the student's own base model (the adapter disabled)
per model token, beta = ``kl_coef`` (fixed, or adapted toward ``kl_target``), and - c_H * H, the student's
entropy exact over the vocabulary per model token, c_H = ``entropy_coef``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from rlfb.agents.base import Agent, GradientStepper
from rlfb.agents.configs import DistillationConfig
from rlfb.agents.kl import make_kl_controller
from rlfb.agents.rollout import Rollout, rollout_reference_logprobs
from rlfb.models.policy import Policy
from rlfb.models.teacher import check_same_tokenizer, load_teacher


# ------------------------------------------------------------------------------- per-token divergences
def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the last dimension.

    Args:
        log_p, log_q: (..., V) log-probabilities.

    Returns:
        (...) the divergence at each position.
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s.

    beta = 0 gives KL(p_t || p_s) and beta = 1 gives KL(p_s || p_t): the limits of JSD(beta) / beta and
    JSD(beta) / (1 - beta) (Agarwal et al. 2024; TRL's ``GKDTrainer.generalized_jsd_loss``).

    Args:
        student_log_probs, teacher_log_probs: (..., V) log-probabilities.
        beta: The interpolation weight in [0, 1].
    """
    if beta == 0.0:
        return kl_divergence(teacher_log_probs, student_log_probs)
    if beta == 1.0:
        return kl_divergence(student_log_probs, teacher_log_probs)
    log_mixture = torch.logaddexp(teacher_log_probs + math.log(beta),
                                  student_log_probs + math.log(1.0 - beta))  # (..., V) log m
    return beta * kl_divergence(teacher_log_probs, log_mixture) + (1 - beta) * kl_divergence(student_log_probs,
                                                                                            log_mixture)


def token_divergence(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: str,
                     beta: float = 0.5) -> torch.Tensor:
    """The configured per-position divergence D(s_t) between student and teacher, (..., V) -> (...)."""
    if divergence == "reverse_kl":
        return kl_divergence(student_log_probs, teacher_log_probs)
    if divergence == "forward_kl":
        return kl_divergence(teacher_log_probs, student_log_probs)
    return generalized_jsd(student_log_probs, teacher_log_probs, beta)


def completion_log_distributions(model: Any, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) log-softmax of ``model``'s next-token logits / temperature at every completion position.

    Position t is the distribution the completion's token t was drawn from (model tokens) or that the
    model would have given an environment token (masked out by the callers). Gradients flow unless called
    under ``no_grad``.
    """
    attention_mask = rollout.attention_mask
    # Positions count real tokens only, so a left-padded prompt sees the same positions as unpadded.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    width = rollout.completion_ids.shape[1]
    logits = model(input_ids=rollout.input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, logits_to_keep=width + 1).logits[:, :-1].float()  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


# ------------------------------------------------------------------------------- the agent
class DistillationAgent(Agent):
    """On-policy distillation to a frozen teacher (see the module docstring).

    Args:
        policy: The student :class:`~rlfb.models.policy.Policy` (a value head, if any, is not used).
        config: Hyper-parameters; ``config.teacher`` names the teacher.
        teacher: A ``(model, tokenizer)`` to use instead of loading ``config.teacher`` (tests, notebooks).

    Raises:
        ConfigError: the teacher's tokenizer or vocabulary differs from the student's.
    """

    name = "distillation"

    def __init__(self, policy: Policy, config: DistillationConfig, teacher: tuple[Any, Any] | None = None) -> None:
        self.config = config
        self.policy = policy
        teacher_model, teacher_tokenizer = teacher if teacher is not None else load_teacher(config.teacher,
                                                                                               policy.device)
        check_same_tokenizer(policy.tokenizer, teacher_tokenizer, policy.model, teacher_model, config.teacher)
        self.teacher_model = teacher_model.to(policy.device).eval().requires_grad_(False)
        parameters = [p for p in policy.model.parameters() if p.requires_grad]
        self.stepper = GradientStepper(
            parameters, learning_rate=config.learning_rate, lr_schedule=config.lr_schedule,
            total_updates=config.total_updates, max_grad_norm=config.max_grad_norm,
            weight_decay=config.weight_decay, max_consecutive_skips=config.max_consecutive_skips,
        )  # fmt: skip
        self.kl_controller = make_kl_controller(config.kl_coef, config.kl_target, config.kl_horizon)

    @torch.no_grad()
    def teacher_log_distributions(self, rollout: Rollout) -> torch.Tensor:
        """(B, T, V) log p_t at every completion position (no grad; one teacher pass per rollout)."""
        with self.policy.autocast():
            return completion_log_distributions(self.teacher_model, rollout, self.config.temperature)

    def student_log_distributions(self, rollout: Rollout) -> torch.Tensor:
        """(B, T, V) log p_s at every completion position, with gradients."""
        with self.policy.autocast():
            return completion_log_distributions(self.policy.model, rollout, self.config.temperature)

    def loss_terms(self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor,
                   rollout: Rollout) -> torch.Tensor:
        """(B, T) per-token loss: D(s_t) ("full"), or stopgrad(k1_t) log p_s(y_t) ("sampled"); 0 off model tokens."""
        c = self.config
        mask = rollout.action_mask.to(student_log_probs.dtype)
        if c.token_estimate == "full":
            return token_divergence(student_log_probs, teacher_log_probs, c.divergence, c.jsd_beta) * mask
        tokens = rollout.completion_ids.unsqueeze(-1)  # (B, T, 1)
        student_token = student_log_probs.gather(-1, tokens).squeeze(-1)  # (B, T) log p_s(y_t)
        k1 = (student_token - teacher_log_probs.gather(-1, tokens).squeeze(-1)).detach() * mask
        return k1 * student_token * mask

    def regularization_terms(self, student_log_probs: torch.Tensor, reference_logprobs: torch.Tensor | None,
                             rollout: Rollout, total_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL_k3, H): this chunk's share of the per-model-token means of the k3 KL to the reference (0 without
        ``reference_logprobs``) and of the student's entropy (0 when ``entropy_coef`` is: no (b, T, V) graph
        for a term that weighs nothing; ``train/entropy`` is measured apart), with gradients."""
        mask = rollout.action_mask.to(student_log_probs.dtype)
        entropy = student_log_probs.new_zeros(())
        if self.config.entropy_coef:
            entropy = (-(student_log_probs.exp() * student_log_probs).sum(-1) * mask).sum() / total_tokens
        if reference_logprobs is None:
            return entropy.new_zeros(()), entropy
        student_token = student_log_probs.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)  # (b, T)
        # k3 = exp(d) - d - 1, d = log pi_ref - log pi_s, zeroed off the model tokens before exp (Schulman 2020)
        log_ratio = (reference_logprobs - student_token) * mask
        return ((torch.exp(log_ratio) - log_ratio - 1.0) * mask).sum() / total_tokens, entropy

    def update(self, rollout: Rollout) -> dict[str, float]:
        c = self.config
        mask = rollout.action_mask.float()  # (B, T) the model's tokens: the only ones with a loss term
        total_tokens = mask.sum().clamp(min=1)
        teacher_log_probs = self.teacher_log_distributions(rollout)  # (B, T, V)
        kl_coef = self.kl_controller.value
        # log pi_ref(y_t), (B, T): one no-grad pass with the adapter disabled, only when a KL term is asked for
        reference_logprobs = rollout_reference_logprobs(self.policy, rollout, c.temperature) if kl_coef > 0 else None
        chunk = c.minibatch_size or rollout.batch_size
        # Measured on the first pass, before any step: the student that sampled the rollout.
        # (divergence, reverse KL, forward KL, student entropy, teacher log-prob of the sampled token) per model
        # token, then the KL to the reference: k3 per model token and k1 per completion.
        sums = torch.zeros(7, dtype=torch.float64, device=mask.device)
        for epoch in range(c.epochs):
            for first in range(0, rollout.batch_size, chunk):
                rows = torch.arange(first, min(first + chunk, rollout.batch_size), device=mask.device)
                batch = rollout if chunk >= rollout.batch_size else rollout.select(rows)
                student_log_probs = self.student_log_distributions(batch)  # (b, T, V)
                teacher_rows = teacher_log_probs[rows]
                reference_rows = reference_logprobs[rows] if reference_logprobs is not None else None
                kl_loss, entropy = self.regularization_terms(student_log_probs, reference_rows, batch, total_tokens)
                # L = D + beta * KL_k3 - c_H * H, each a mean over the batch's model tokens
                loss = (self.loss_terms(student_log_probs, teacher_rows, batch).sum() / total_tokens
                        + kl_coef * kl_loss - c.entropy_coef * entropy)
                if epoch == 0:
                    sums[:5] += self._measures(student_log_probs.detach(), teacher_rows, batch, total_tokens)
                    sums[5] += kl_loss.detach().double()
                    if reference_rows is not None:
                        student_token = student_log_probs.detach().gather(
                            -1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
                        sums[6] += ((student_token - reference_rows) * batch.action_mask).sum().double()
                if not self.stepper.backward(loss):
                    break
            if not self.stepper.step():  # a loss here or on another rank, or the gradient, was not finite
                break
        learning_rate = self.stepper.learning_rate
        self.stepper.finish_update()
        divergence, reverse_kl, forward_kl, entropy, teacher_logprob, kl_loss, kl_sum = sums.tolist()
        metrics = {}
        if reference_logprobs is not None:  # k1 per completion, the KL the controller follows
            metrics = {"train/kl": kl_sum / rollout.batch_size, "train/kl_loss": kl_loss}
            self.kl_controller.update(metrics["train/kl"], rollout.batch_size)
        return {
            **metrics,
            "train/kl_coef": kl_coef,
            "train/divergence": divergence,
            "train/reverse_kl": reverse_kl,
            "train/forward_kl": forward_kl,
            "train/entropy": entropy,
            "train/teacher_logprob": teacher_logprob,
            "train/grad_norm": self.stepper.last_grad_norm,
            "train/learning_rate": learning_rate,
            "train/skipped_updates": float(self.stepper.skipped_updates),
        }

    def _measures(self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, batch: Rollout,
                  total_tokens: torch.Tensor) -> torch.Tensor:
        """(5,) this chunk's share of the per-model-token means the update logs (all exact, over V)."""
        c = self.config
        mask = batch.action_mask.to(student_log_probs.dtype)
        per_token = [
            token_divergence(student_log_probs, teacher_log_probs, c.divergence, c.jsd_beta),
            kl_divergence(student_log_probs, teacher_log_probs),
            kl_divergence(teacher_log_probs, student_log_probs),
            -(student_log_probs.exp() * student_log_probs).sum(-1),  # entropy of p_s
            teacher_log_probs.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1),  # log p_t(y_t)
        ]
        return torch.stack([(values * mask).sum() / total_tokens for values in per_token]).double()

    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "stepper": self.stepper.state_dict(),
                "kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stepper.load_state_dict(state["stepper"])
        if "kl_controller" in state:  # absent from checkpoints written before distillation had a KL term
            self.kl_controller.load_state_dict(state["kl_controller"])
