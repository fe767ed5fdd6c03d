"""A resume applies changed configuration: saved agent state carries state (beta, Adam moments), not settings."""

import torch

from rlfb.agents.base import GradientStepper
from rlfb.agents.kl import AdaptiveKLController


def test_adaptive_kl_restores_beta_but_keeps_the_configured_target_and_horizon():
    saved = AdaptiveKLController(initial_coef=0.1, target=3.0, horizon=1000)
    saved.update(observed_kl=9.0, num_samples=100)
    resumed = AdaptiveKLController(initial_coef=0.1, target=5.0, horizon=2000)  # --set agent.kl_target=5 ...
    resumed.load_state_dict(saved.state_dict())
    assert resumed.value == saved.value == 0.1 * (1 + 0.2 * 100 / 1000)
    assert (resumed.target, resumed.horizon) == (5.0, 2000.0)


def test_gradient_stepper_restores_adam_state_but_keeps_the_configured_epsilon():
    weight = torch.nn.Parameter(torch.ones(3))
    saved = GradientStepper([weight], learning_rate=0.1, adam_eps=1e-5)
    assert saved.backward((weight ** 2).sum()) and saved.step()
    saved.finish_update()
    resumed_weight = torch.nn.Parameter(weight.detach().clone())
    resumed = GradientStepper([resumed_weight], learning_rate=0.1, adam_eps=1e-3)  # --set agent.adam_eps=1e-3
    resumed.load_state_dict(saved.state_dict())
    group = resumed.optimizer.param_groups[0]
    assert group["eps"] == 1e-3
    assert resumed.updates_done == 1
    moments = resumed.optimizer.state[resumed_weight]["exp_avg"]
    assert torch.equal(moments, saved.optimizer.state[weight]["exp_avg"])
