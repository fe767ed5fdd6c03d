"""The regularization every gradient agent shares (docs/algorithms.md, "Regularization"), by its effect on one
update: weight decay, the entropy bonus, the KL penalty in the loss, and LoRA dropout in gradient passes only."""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import multi_turn_rollout, tiny_policy
from transformers import GPT2Config, GPT2LMHeadModel

from rlfb.agents import make_agent
from rlfb.agents.base import Agent, GradientStepper
from rlfb.agents.configs import AGENTS, KL_OPTIONS, REGULARIZATION_OPTIONS, DistillationConfig, run_agent
from rlfb.agents.distillation import DistillationAgent
from rlfb.agents.rollout import Rollout
from rlfb.config import config_from_dict
from rlfb.errors import ConfigError
from rlfb.models.policy import GradientPassDropout, LoraSettings, Policy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_run_checks import CONFIG, assert_one_line_errors_before_torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# One gradient step per update for each agent, on multi_turn_rollout()'s two groups of two episodes (self-training
# keeps every row, so its means run over the same 13 model tokens as the others').
ONE_STEP = {
    "ppo": {"epochs": 1, "num_minibatches": 1, "kl_target": None},
    "reinforce": {"kl_target": None},
    "grpo": {"group_size": 2, "kl_target": None},
    "self_training": {"group_size": 2, "keep": "top_fraction", "keep_fraction": 1.0},
    "distillation": {"teacher": "in-memory"},
}
KL_IN_THE_LOSS = ("grpo", "self_training", "distillation")


def trained_policy(agent_name: str, dropout: float = 0.0) -> Policy:
    """A tiny policy whose LoRA is not the identity (B != 0), so it differs from its reference."""
    policy = tiny_policy(seed=0, value_head=agent_name == "ppo", dropout=dropout)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return policy


def build(agent_name: str, policy: Policy, **options: Any) -> Agent:
    options = {**ONE_STEP[agent_name], **options}
    if agent_name == "distillation":
        teacher = tiny_policy(seed=7, value_head=False).model
        return DistillationAgent(policy, DistillationConfig(**options), teacher=(teacher, None))
    return make_agent(agent_name, policy, options)


def recorded_losses(agent: Agent) -> list[float]:
    """The losses the agent hands to its stepper, in order (one per gradient step here)."""
    losses: list[float] = []
    backward = agent.stepper.backward  # type: ignore[attr-defined]

    def record(loss: torch.Tensor) -> bool:
        losses.append(float(loss.detach()))
        return backward(loss)

    agent.stepper.backward = record  # type: ignore[attr-defined]
    return losses


def loss_of_one_update(agent_name: str, policy: Policy, rollout: Rollout, **options: Any) -> float:
    agent = build(agent_name, copy.deepcopy(policy), **options)
    losses = recorded_losses(agent)
    agent.update(rollout)
    assert len(losses) == 1
    return losses[0]


def per_token(policy: Policy, rollout: Rollout, measure: Callable[[torch.Tensor, int], float]) -> list[float]:
    """``measure(log_probs, token)`` at every model token of ``rollout``, one unpadded sequence at a time."""
    values = []
    with torch.no_grad():
        for row in range(rollout.batch_size):
            prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
            completion = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
            logits = policy.model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0].double()
            for t in range(len(completion)):
                if rollout.action_mask[row, t]:
                    log_probs = torch.log_softmax(
                        logits[len(prompt) - 1 + t], -1
                    )  # predicts completion token t
                    values.append(measure(log_probs, int(completion[t])))
    return values


def entropy(log_probs: torch.Tensor, token: int) -> float:
    return float(-(log_probs.exp() * log_probs).sum())


def k3_terms(policy: Policy, rollout: Rollout) -> list[float]:
    """exp(d) - d - 1, d = log pi_ref(y_t) - log pi(y_t), at every model token, by hand."""
    logprobs = per_token(policy, rollout, lambda log_probs, token: float(log_probs[token]))
    with policy.reference():
        reference = per_token(policy, rollout, lambda log_probs, token: float(log_probs[token]))
    return [
        float(torch.tensor(r - p).exp()) - (r - p) - 1.0 for p, r in zip(logprobs, reference, strict=True)
    ]


def sequence_kl(policy: Policy, rollout: Rollout) -> float:
    """k1 per completion: the mean over rows of sum_t (log pi - log pi_ref)(y_t), by hand."""
    logprobs = per_token(policy, rollout, lambda log_probs, token: float(log_probs[token]))
    with policy.reference():
        reference = per_token(policy, rollout, lambda log_probs, token: float(log_probs[token]))
    return (sum(logprobs) - sum(reference)) / rollout.batch_size


# ------------------------------------------------------------------------------- the options, torch-free
def test_every_gradient_agent_has_every_regularization_option_and_es_the_kl_penalty_alone() -> None:
    for name, spec in AGENTS.items():
        fields = {field.name for field in dataclasses.fields(spec.config_class)}
        if spec.is_gradient_agent:
            assert set(REGULARIZATION_OPTIONS) <= fields, name
        else:
            assert set(REGULARIZATION_OPTIONS) & fields == set(KL_OPTIONS), name
    assert {name for name, spec in AGENTS.items() if not spec.is_gradient_agent} == {"es"}


MISTAKES = {  # agent section, lora section, the error's words
    "dropout in the agent": (
        {"name": "grpo", "lora_dropout": 0.1},
        {},
        r"'agent.lora_dropout' is not an agent option: LoRA dropout is set by 'lora.dropout'",
    ),
    "typo": ({"name": "ppo", "weight_decy": 0.1}, {}, r"did you mean 'agent.weight_decay'"),
    "es regularized": (
        {"name": "es", "entropy_coef": 0.01},
        {},
        r"agent 'es' takes no gradient steps, so it has no regularization option 'entropy_coef' \(its KL "
        r"penalty is kl_coef, kl_target, kl_horizon\); the gradient agents have them: ppo, reinforce",
    ),
    "es with dropout": (
        {"name": "es"},
        {"dropout": 0.1},
        r"'lora.dropout' is 0.1 but agent 'es' takes no gradient",
    ),
    "adaptive from 0": (
        {"name": "self_training", "kl_target": 2.0},
        {},
        r"an adaptive KL \(kl_target 2.0\) needs kl_coef > 0",
    ),
    "decay past 1": (
        {"name": "distillation", "teacher": "rlfb-tiny", "weight_decay": 2000.0},
        {},
        r"weight_decay 2000.0 x learning_rate 0.001 must be < 1",
    ),
    "entropy penalty": ({"name": "self_training", "entropy_coef": -0.1}, {}, r"entropy_coef must be >= 0"),
}


def run_agent_of(agent: dict[str, Any], lora: dict[str, Any]) -> None:
    run_agent(config_from_dict({"task": "sentiment", "agent": agent, "lora": lora}))


@pytest.mark.parametrize("case", list(MISTAKES))
def test_regularization_mistakes_name_the_option_and_the_fix(case: str) -> None:
    agent, lora, message = MISTAKES[case]
    with pytest.raises(ConfigError, match=message):
        run_agent_of(agent, lora)


def test_every_regularizer_at_once_is_a_valid_config() -> None:
    run_agent_of(
        {
            "name": "self_training",
            "kl_coef": 0.1,
            "kl_target": 2.0,
            "weight_decay": 0.01,
            "entropy_coef": 0.01,
        },
        {"dropout": 0.1},
    )


def test_regularization_mistakes_fail_in_one_line_before_torch_is_imported(tmp_path: Path) -> None:
    cases = {
        "negative weight decay": (
            ["--set", "agent.weight_decay=-0.1"],
            "weight_decay must be >= 0, got -0.1",
        ),
        "dropout in the agent": (
            ["--set", "agent.lora_dropout=0.1"],
            "LoRA dropout is set by 'lora.dropout'",
        ),
        "es with dropout": (
            ["--set", "agent.name=es", "--set", "lora.dropout=0.1"],
            "agent 'es' takes no gradient steps",
        ),
    }
    assert_one_line_errors_before_torch(
        {case: (["train", str(CONFIG), *args], message) for case, (args, message) in cases.items()}, tmp_path
    )


def test_the_regularization_section_documents_every_option() -> None:
    text = (REPO / "docs" / "algorithms.md").read_text()
    section = text.split("## Regularization", 1)[1].split("\n## ", 1)[0]
    for option in (*REGULARIZATION_OPTIONS, "lora.dropout", "kl_penalty"):
        assert f"`{option}`" in section, option


# ------------------------------------------------------------------------------- weight decay
def test_weight_decay_shrinks_parameters_by_one_minus_lr_times_lambda_when_the_gradient_is_zero() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    stepper = GradientStepper([weight], learning_rate=0.1, weight_decay=0.5)
    for _ in range(3):
        assert (
            stepper.backward((0.0 * weight).sum()) and stepper.step()
        )  # a zero gradient: Adam moves nothing
    assert torch.allclose(weight.detach(), torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5) ** 3, atol=1e-7)


def test_a_resume_keeps_the_configured_weight_decay() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    saved = GradientStepper([weight], learning_rate=0.1, weight_decay=0.5)
    resumed = GradientStepper([torch.nn.Parameter(torch.ones(3))], learning_rate=0.1, weight_decay=0.01)
    resumed.load_state_dict(saved.state_dict())  # --set agent.weight_decay=0.01 on resume
    assert resumed.optimizer.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize("agent_name", list(ONE_STEP))
def test_weight_decay_is_decoupled_in_every_gradient_agent(agent_name: str) -> None:
    """AdamW: p <- p - lr * lambda * p_old - adam_step, so decay moves each parameter by exactly -lr * lambda * p_old."""
    rollout = multi_turn_rollout()
    policy = trained_policy(agent_name)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    plain, decayed = copy.deepcopy(policy), copy.deepcopy(policy)
    build(agent_name, plain, learning_rate=0.01).update(rollout)
    build(agent_name, decayed, learning_rate=0.01, weight_decay=2.0).update(rollout)
    for old, without, with_decay in zip(
        before, plain.trainable_parameters(), decayed.trainable_parameters(), strict=True
    ):
        assert not torch.equal(without, old)  # the step itself moved the parameters
        assert torch.allclose(with_decay.detach(), without.detach() - 0.01 * 2.0 * old, atol=1e-6)


# ------------------------------------------------------------------------------- entropy bonus and KL
@pytest.mark.parametrize("agent_name", list(ONE_STEP))
def test_the_entropy_bonus_lowers_the_loss_by_its_coefficient_times_the_hand_computed_entropy(
    agent_name: str,
) -> None:
    rollout = multi_turn_rollout()
    policy = trained_policy(agent_name)
    entropies = per_token(policy, rollout, entropy)
    assert len(entropies) == int(rollout.action_mask.sum()) == 13  # model tokens only
    mean_entropy = sum(entropies) / len(entropies)
    without = loss_of_one_update(agent_name, policy, rollout)
    with_bonus = loss_of_one_update(agent_name, policy, rollout, entropy_coef=0.3)
    assert with_bonus - without == pytest.approx(-0.3 * mean_entropy, rel=1e-4)


@pytest.mark.parametrize("agent_name", KL_IN_THE_LOSS)
def test_a_kl_in_the_loss_adds_beta_times_the_hand_computed_k3(agent_name: str) -> None:
    rollout = multi_turn_rollout()
    policy = trained_policy(agent_name)
    terms = k3_terms(policy, rollout)
    without = loss_of_one_update(agent_name, policy, rollout, kl_coef=0.0)
    with_kl = loss_of_one_update(agent_name, policy, rollout, kl_coef=0.4)
    assert sum(terms) > 0.01  # the policy is not its reference
    assert with_kl - without == pytest.approx(0.4 * sum(terms) / len(terms), rel=1e-4)


@pytest.mark.parametrize("agent_name", ["self_training", "distillation"])
def test_an_adaptive_kl_follows_the_observed_kl_per_completion(agent_name: str) -> None:
    rollout = multi_turn_rollout()
    policy = trained_policy(agent_name)
    expected_kl = sequence_kl(policy, rollout)
    agent = build(agent_name, copy.deepcopy(policy), kl_coef=0.2, kl_target=1.0, kl_horizon=10.0)
    metrics = agent.update(rollout)
    assert metrics["train/kl"] == pytest.approx(expected_kl, rel=1e-4)
    assert metrics["train/kl_coef"] == 0.2
    error = min(max(expected_kl / 1.0 - 1.0, -0.2), 0.2)  # Ziegler et al. 2019's clipped proportional error
    assert agent.kl_controller.value == pytest.approx(0.2 * (1 + error * rollout.batch_size / 10.0), rel=1e-4)
    assert agent.kl_controller.value != 0.2


# ------------------------------------------------------------------------------- LoRA dropout
def test_lora_dropout_acts_in_gradient_passes_only_and_the_base_dropout_stays_off() -> None:
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=16, n_positions=32))
    assert base.config.resid_pdrop > 0  # the base model has dropout of its own
    policy = Policy(
        copy.deepcopy(base), None, lora=LoraSettings(r=8, dropout=0.5), value_head=False, device="cpu"
    )
    plain = Policy(
        copy.deepcopy(base), None, lora=LoraSettings(r=8, dropout=0.0), value_head=False, device="cpu"
    )
    dropouts = [module for module in policy.model.modules() if isinstance(module, GradientPassDropout)]
    assert len(dropouts) == 2 and all(module.p == 0.5 for module in dropouts)  # c_attn of both layers
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])

    def logprobs(model: Policy, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return model.forward_logprobs_values(
                ids, torch.ones_like(ids), completion_start=2
            ).logprobs.detach()

    # B = 0: the adapter adds nothing, so a gradient pass equals a no-grad one: no base-model dropout.
    assert torch.equal(logprobs(policy, True), logprobs(policy, False))
    plain.model.load_state_dict(policy.model.state_dict())
    with torch.no_grad():
        for (name, parameter), (_, twin) in zip(
            policy.model.named_parameters(), plain.model.named_parameters(), strict=True
        ):
            if "lora_B" in name:
                parameter.add_(torch.randn(parameter.shape))
                twin.copy_(parameter)
    assert torch.equal(logprobs(policy, False), logprobs(plain, False))  # sampling and evaluation: no dropout
    assert torch.equal(logprobs(plain, True), logprobs(plain, False))
    assert not torch.equal(logprobs(policy, True), logprobs(policy, False))  # gradient passes: dropout


@pytest.mark.parametrize("agent_name", list(ONE_STEP))
def test_every_gradient_agent_trains_through_lora_dropout(agent_name: str) -> None:
    rollout = multi_turn_rollout()
    with_dropout = trained_policy(agent_name, dropout=0.5)
    without = copy.deepcopy(with_dropout)
    for module in without.model.modules():
        if isinstance(module, GradientPassDropout):
            module.p = 0.0
    no_dropout_loss = loss_of_one_update(agent_name, without, rollout)
    torch.manual_seed(1)
    first = loss_of_one_update(agent_name, with_dropout, rollout)
    torch.manual_seed(1)
    assert loss_of_one_update(agent_name, with_dropout, rollout) == first  # the masks come from torch's seed
    assert first != pytest.approx(no_dropout_loss, rel=1e-3)
