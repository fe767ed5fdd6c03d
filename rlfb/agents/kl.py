"""KL-penalty coefficients: fixed, or adapted toward a target KL (Ziegler et al. 2019).

The penalty keeps the policy near the reference model (the base model, adapter disabled). Its coefficient
beta multiplies the per-token KL estimate ``log pi(a_t|s_t) - log pi_ref(a_t|s_t)`` (the "k1" estimator,
unbiased for KL(pi || pi_ref) when a_t ~ pi; Schulman 2020, "Approximating KL Divergence").

Example:
    >>> controller = AdaptiveKLController(initial_coef=0.1, target=4.0, horizon=1000)
    >>> controller.update(observed_kl=8.0, num_samples=100)  # KL above target: beta grows
    >>> round(controller.value, 4)
    0.102
"""

from __future__ import annotations

from typing import Any

from rlfb.errors import ConfigError


class FixedKLController:
    """A constant KL coefficient.

    Args:
        initial_coef: beta, the weight of the per-token KL in the reward.
    """

    def __init__(self, initial_coef: float) -> None:
        if initial_coef < 0:
            raise ConfigError(f"kl coefficient must be >= 0, got {initial_coef}")
        self.value = float(initial_coef)

    def update(self, observed_kl: float, num_samples: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences"; the log-space proportional controller, in the form of their lm-human-preferences code):

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t),   with K_beta = n_samples / horizon

    so beta moves by at most 20% of ``n/horizon`` per update: up when the policy drifts past the target,
    down when it stays close.

    Args:
        initial_coef: Starting beta.
        target: Target KL in nats per completion (sum over its tokens).
        horizon: Number of samples over which beta may change by ~e^{0.2}; larger is slower.
    """

    PROPORTIONAL_ERROR_CLIP = 0.2  # Ziegler et al. 2019

    def __init__(self, initial_coef: float, target: float, horizon: float) -> None:
        if initial_coef <= 0:
            raise ConfigError(f"adaptive kl needs an initial coefficient > 0, got {initial_coef}")
        if target <= 0:
            raise ConfigError(f"kl target must be > 0 nats, got {target}")
        if horizon <= 0:
            raise ConfigError(f"kl horizon must be > 0 samples, got {horizon}")
        self.value = float(initial_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, observed_kl: float, num_samples: int) -> None:
        """Move beta after a batch of ``num_samples`` completions whose mean KL was ``observed_kl``."""
        clip = self.PROPORTIONAL_ERROR_CLIP
        proportional_error = min(max(observed_kl / self.target - 1.0, -clip), clip)
        self.value *= 1.0 + proportional_error * num_samples / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only beta is state; target and horizon are configuration, so a resume with a changed
        # ``agent.kl_target`` or ``agent.kl_horizon`` applies the new values (rlfb/run_directory.py records them).
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(coef: float, target: float | None, horizon: float) -> KLController:
    """An adaptive controller when ``target`` is set, else a fixed one.

    Args:
        coef: Fixed beta, or the adaptive controller's starting beta.
        target: Target KL (nats per completion) or ``None`` for a fixed coefficient.
        horizon: Adaptive controller horizon in samples.
    """
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)
