"""The agent interface, the gradient-step guard shared by the backprop agents, and masked statistics.

An :class:`Agent` asks for the batch it learns from (:meth:`Agent.collect`: by default the trainer's one
rollout of the current policy), turns it into an update of its policy and reports metrics named
``train/...`` (documented in docs/metrics.md). The interface assumes no backprop, so the
evolution-strategies agent fits it (its ``collect`` samples one batch per population member); PPO and
REINFORCE share a :class:`GradientStepper` by composition.
"""

from __future__ import annotations

import abc
import importlib
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from rlfb.agents.configs import agent_config, agent_spec, check_learning_rate
from rlfb.agents.rollout import Rollout
from rlfb.distributed import all_reduce_gradients, global_masked_moments, world_size
from rlfb.errors import RlfbError

logger = logging.getLogger(__name__)

class DegenerateUpdateError(RlfbError, RuntimeError):
    """Several updates in a row produced a NaN or inf loss or gradient."""


# What one collection gives: the rollout, and the episode metrics of a multi-turn one ({} for completions).
Collected = tuple[Rollout, dict[str, float]]


class Sample(Protocol):
    """The trainer's collector: one batch sampled from the policy as its weights are now.

    By default it draws from the training streams (the sampling generator, the env's ``np_random``);
    ``generator`` samples with another generator and ``seed`` reseeds the env's reset (the same prompts
    for the same seed), so an agent can evaluate several weights on the same draws.
    """

    def __call__(self, *, generator: torch.Generator | None = None, seed: int | None = None) -> Collected: ...


class Agent(abc.ABC):
    """Base class of rlfb agents: ``collect(sample) -> batch``, ``update(batch) -> metrics``, a resumable state.

    Subclasses set ``name`` and implement :meth:`update`, :meth:`state_dict` and :meth:`load_state_dict`;
    one that learns from several batches per update overrides :meth:`collect`.
    """

    name: ClassVar[str]

    def collect(self, sample: Sample) -> Collected:
        """The batch the next :meth:`update` learns from: by default one batch of the current policy.

        Args:
            sample: Collects one batch with the policy's current weights (see :class:`Sample`).

        Returns:
            The rollout for :meth:`update` and its episode metrics (``rollout/...``).
        """
        return sample()

    @abc.abstractmethod
    def update(self, rollout: Rollout) -> dict[str, float]:
        """Improve the policy from one batch of completions.

        Args:
            rollout: Completions sampled from the current policy, with their rewards.

        Returns:
            Metric name (``train/...``) -> value.
        """

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the policy weights needed to resume exactly (optimizer, schedules, ...)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


# ------------------------------------------------------------------------------- masked statistics
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over everything, or along ``dim``)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                  moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0.

    The mean and the (biased) variance are the batch's: over every rank's masked entries when several
    ranks train together (:func:`rlfb.distributed.global_masked_moments`, two passes as one process
    computes them), so N ranks whiten as one process whitening the joined batch. ``moments``: that
    mean and variance, when the caller computed them already (with other statistics, in the same
    all-reduces).
    """
    mean, variance = moments if moments is not None else global_masked_moments([(values, mask)])[0]
    return (values - mean) * torch.rsqrt(variance + eps) * mask


# ------------------------------------------------------------------------------- gradient steps
class GradientStepper:
    """AdamW, a learning-rate schedule, gradient clipping and the degenerate-update guard.

    A step whose loss or gradient norm is NaN or inf is skipped: gradients are zeroed, the weights and the
    optimizer state stay untouched. The agent then abandons the rest of that update and calls
    :meth:`finish_update`, which counts it, warns, and raises :class:`DegenerateUpdateError` after
    ``max_consecutive_skips`` degenerate updates in a row (the weights are still those of the last good
    step, so the last checkpoint is valid).

    Args:
        parameters: The trainable parameters.
        learning_rate: Peak learning rate.
        lr_schedule: ``"constant"`` or ``"linear"`` (decay to 0 over ``total_updates`` updates).
        total_updates: Number of :meth:`finish_update` calls of the run; needed by ``"linear"``.
        max_grad_norm: Clip the global gradient norm to this (``None``: no clipping, norm still logged).
        weight_decay: AdamW's decoupled weight decay lambda: each step multiplies every parameter by
            (1 - lr * lambda) before the Adam step (Loshchilov & Hutter 2019), the value head's too.
        adam_eps: Adam's epsilon.
        max_consecutive_skips: Degenerate updates in a row before giving up.
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        learning_rate: float,
        lr_schedule: str = "constant",
        total_updates: int | None = None,
        max_grad_norm: float | None = 1.0,
        weight_decay: float = 0.0,
        adam_eps: float = 1e-5,
        max_consecutive_skips: int = 3,
    ) -> None:
        check_learning_rate(learning_rate, lr_schedule, total_updates)
        self.parameters = [p for p in parameters if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.max_consecutive_skips = max_consecutive_skips
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, eps=adam_eps, weight_decay=weight_decay)
        self.peak_learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.total_updates = total_updates
        self.updates_done = 0
        self.skipped_updates = 0
        self.consecutive_skips = 0
        self.current_update_skipped = False
        self.last_grad_norm = 0.0
        self.averaged_riders: torch.Tensor | None = None  # the last step's riders, averaged over the ranks
        self._nonfinite_loss: str | None = None  # what the last non-finite loss since the last step was

    @property
    def learning_rate(self) -> float:
        """The learning rate of the current update."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _apply_schedule(self) -> None:
        # "linear": lr_u = lr * max(1 - u / U, 0) for update u of U (annealing, Huang et al. 2022 detail 4)
        factor = 1.0
        if self.lr_schedule == "linear" and self.total_updates:
            factor = max(1.0 - self.updates_done / self.total_updates, 0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_learning_rate * factor

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate ``loss`` (accumulating gradients); False, and nothing done, if it is not finite.

        A non-finite loss is remembered, and the next :meth:`step` skips (every caller steps after its
        backward passes, whatever they returned). With several ranks that decision is agreed in the
        step's gradient all-reduce: a non-finite loss on any rank makes every rank skip together, with
        no collective of its own.
        """
        if not bool(torch.isfinite(loss).all()):
            self._nonfinite_loss = self._nonfinite_loss or f"loss is {loss.item()}"
            return False
        loss.backward()
        return True

    def step(self, riders: torch.Tensor | None = None) -> bool:
        """Clip and apply the accumulated gradients; False (and skipped) when a loss since the last step
        was not finite, or their norm is not.

        With several ranks the gradients are first averaged over the ranks (``all_reduce_gradients``), so
        the norm, the clipping and the finite check see the same gradient on every rank: a NaN on one rank
        makes every rank skip the step together. ``riders`` (a 1-d tensor of statistics) are averaged over
        the ranks in the same all-reduce, into :attr:`averaged_riders` (``riders`` with one process), and so
        is whether any rank's loss was not finite.
        """
        nonfinite_here, self._nonfinite_loss = self._nonfinite_loss, None
        if world_size() == 1:
            self.averaged_riders = riders
            nonfinite_somewhere = nonfinite_here is not None
        else:
            dtype = riders.dtype if riders is not None else torch.float32
            flag = torch.tensor([0.0 if nonfinite_here is None else 1.0], dtype=dtype, device=self._device())
            pieces = [flag] if riders is None else [riders.detach().reshape(-1).to(flag.device), flag]
            averaged = all_reduce_gradients(self.parameters, torch.cat(pieces))
            assert averaged is not None
            nonfinite_somewhere = bool(averaged[-1] > 0)
            self.averaged_riders = averaged[:-1] if riders is not None else None
        if nonfinite_somewhere:
            self._mark_degenerate((nonfinite_here or "a loss is not finite") +
                                  (" here or on another rank" if world_size() > 1 else ""))
            return False
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, max_norm))
        if not math.isfinite(grad_norm):
            self._mark_degenerate(f"gradient norm is {grad_norm}")
            return False
        self.last_grad_norm = grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _device(self) -> torch.device:
        return self.parameters[0].device if self.parameters else torch.device("cpu")

    def _mark_degenerate(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.current_update_skipped = True
        warnings.warn(f"skipping a degenerate update: {what}", RuntimeWarning, stacklevel=3)

    def finish_update(self) -> None:
        """Advance the schedule and apply the consecutive-degenerate-update rule."""
        self.updates_done += 1
        self._apply_schedule()
        if self.current_update_skipped:
            self.skipped_updates += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        self.current_update_skipped = False
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise DegenerateUpdateError(
                f"{self.consecutive_skips} updates in a row had a NaN or inf loss or gradient and were skipped; "
                "the policy weights are those of the last good update. Try a lower learning_rate, a smaller "
                "max_grad_norm, a larger kl_coef, or check the reward functions for NaN/inf."
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "updates_done": self.updates_done,
            "skipped_updates": self.skipped_updates,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        settings = [(group["eps"], group["weight_decay"]) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        # Adam's epsilon and the weight decay are configuration, not state: a resume with a changed
        # ``agent.weight_decay`` applies it (load_state_dict would restore the saved one). The learning rate
        # is reapplied by the schedule.
        for group, (eps, weight_decay) in zip(self.optimizer.param_groups, settings, strict=True):
            group["eps"], group["weight_decay"] = eps, weight_decay
        self.updates_done = int(state["updates_done"])
        self._apply_schedule()
        self.skipped_updates = int(state["skipped_updates"])
        self.consecutive_skips = int(state["consecutive_skips"])


# ------------------------------------------------------------------------------- construction by name
def make_agent(name: str, policy: Any, config: Mapping[str, Any] | None = None) -> Agent:
    """Build a registered agent by name: ``"ppo"``, ``"reinforce"``, ``"rloo"``, ``"grpo"``, ...

    Args:
        name: Agent name (a key of :data:`rlfb.agents.configs.AGENTS`).
        policy: The :class:`~rlfb.models.policy.Policy` to train.
        config: Options of the agent's config dataclass over its preset.

    Returns:
        The agent.

    Raises:
        ConfigError: On an unknown name or option, naming the known ones.
    """
    options = agent_config(name, config)
    module, _, attribute = agent_spec(name).agent_class.partition(":")
    agent_class = getattr(importlib.import_module(module), attribute)
    return agent_class(policy, options)
