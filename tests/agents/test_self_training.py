"""Self-training: the keep rules, the joint objective against a hand computation, resume, learning, config checks."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import contains_token, multi_turn_rollout, sample_rollout, tiny_policy
from test_lm_mix import DOCUMENTS, DigitTokenizer, digit_policy, first_step_gradients, real_text_file

from rlfb.agents import make_agent
from rlfb.agents.lm_mix import RealTextBatches
from rlfb.agents.rollout import Rollout
from rlfb.agents.self_training import episode_returns, keep_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the CLI probe of test_run_checks
from test_run_checks import REPO, assert_one_line_errors_before_torch  # noqa: E402

RETURNS = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.3, 0.3, -1.0, 0.5])  # four groups of two


def kept(rule: str, **options: Any) -> list[int]:
    return keep_mask(RETURNS, rule, **options).nonzero().squeeze(1).tolist()


def test_keep_rules_pick_the_right_rows() -> None:
    assert kept("threshold", threshold=0.3) == [1, 2, 3, 4, 5, 7]
    assert kept("best_of_group", group_size=2) == [1, 2, 4, 7]  # a tie keeps the group's first row
    assert kept("best_of_group", group_size=2, threshold=0.4) == [1, 2, 7]  # the floor drops group 3's best
    assert kept("best_of_group", group_size=4) == [1, 7]
    assert kept("top_fraction", fraction=0.3) == [1, 2, 3]  # ceil(0.3 * 8) = 3; ties: earlier rows first
    assert kept("top_fraction", fraction=0.5) == [1, 2, 3, 7]
    assert kept("top_fraction", fraction=0.01) == [1]  # at least one row


def test_returns_add_turn_and_dense_rewards_over_model_tokens() -> None:
    rollout = multi_turn_rollout()  # scores 1, -1, 0.5, -0.5; turn rewards 0.3, -0.2, 0, 0.1
    assert episode_returns(rollout).tolist() == pytest.approx([1.3, -1.2, 0.5, -0.4])
    dense = torch.ones(rollout.completion_ids.shape) * 0.5
    # Row 0 has 4 model tokens (of 6); the environment tokens' dense rewards do not count.
    assert float(episode_returns(rollout._replace(per_token_rewards=dense))[0]) == pytest.approx(1.3 + 2.0)


# ------------------------------------------------------------------------------- the oracle: naive loops
def action_logprobs(policy: Any, rollout: Rollout, row: int, reference: bool = False) -> torch.Tensor:
    """log pi of each model token of one row, from one unpadded sequence (with grad unless ``reference``)."""
    prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
    length = int(rollout.completion_mask[row].sum())
    completion = rollout.completion_ids[row, :length]
    sequence = torch.cat([prompt, completion]).unsqueeze(0)
    if reference:
        with torch.no_grad(), policy.reference():
            logits = policy.model(input_ids=sequence).logits[0]
    else:
        logits = policy.model(input_ids=sequence).logits[0]
    values = []
    for t in range(length):
        if rollout.action_mask[row, t]:
            values.append(torch.log_softmax(logits[len(prompt) + t - 1], -1)[completion[t]])
    return torch.stack(values)


def naive_lm_loss(policy: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    terms = []
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        logits = policy.model(input_ids=input_ids[row : row + 1, :length]).logits[0]
        terms += [-torch.log_softmax(logits[t - 1], -1)[input_ids[row, t]] for t in range(1, length)]
    return torch.stack(terms).mean()


def perturbed_digit_policy(seed: int) -> Any:
    policy = digit_policy(seed=seed, value_head=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the reference, so the KL term is not 0
        for parameter in policy.trainable_parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return policy


def test_loss_is_over_the_kept_rows_model_tokens_only() -> None:
    rollout = multi_turn_rollout()  # best of each group of two: rows 0 and 2
    policy = tiny_policy(seed=1, value_head=False)
    with torch.no_grad():
        hand = -torch.cat([action_logprobs(policy, rollout, row) for row in (0, 2)]).mean()
    metrics = make_agent("self_training", policy, {"group_size": 2}).update(rollout)
    assert metrics["train/pseudo_loss"] == pytest.approx(float(hand), rel=1e-5)
    assert (metrics["train/kept_fraction"], metrics["train/kept_prompts"], metrics["train/steps"]) == (0.5, 1.0, 1.0)
    assert metrics["train/kept_return_mean"] == pytest.approx((1.3 + 0.5) / 2)

    # The rows left out do not matter: other tokens in rows 1 and 3 give the very same weights.
    changed = rollout.completion_ids.clone()
    changed[[1, 3]] = (changed[[1, 3]] + 3) % 16
    weights = []
    for completion_ids in (rollout.completion_ids, changed):
        policy = tiny_policy(seed=1, value_head=False)
        make_agent("self_training", policy, {"group_size": 2}).update(rollout._replace(completion_ids=completion_ids))
        weights.append([p.detach().clone() for p in policy.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_joint_objective_gradient_matches_a_hand_computation(tmp_path: Path) -> None:
    # L = lambda * L_LM + (1 - lambda) * L_pseudo + beta * KL_k3, lambda = 0.3, beta = 0.2
    rollout = multi_turn_rollout()
    options = {"group_size": 2, "lm_coef": 0.3, "kl_coef": 0.2, "lm_data": real_text_file(tmp_path),
               "lm_batch_size": 3, "seed": 5}
    agent = make_agent("self_training", perturbed_digit_policy(2), options)
    gradients, metrics = first_step_gradients(agent, rollout)

    policy = perturbed_digit_policy(2)
    logprobs = torch.cat([action_logprobs(policy, rollout, row) for row in (0, 2)])
    reference = torch.cat([action_logprobs(policy, rollout, row, reference=True) for row in (0, 2)])
    pseudo = -logprobs.mean()
    log_ratio = reference - logprobs
    k3 = (torch.exp(log_ratio) - log_ratio - 1).mean()
    batch = RealTextBatches(DOCUMENTS, DigitTokenizer(), batch_size=3, seed=5, max_tokens=32).next_batch()
    lm = naive_lm_loss(policy, *batch)
    (0.3 * lm + 0.7 * pseudo + 0.2 * k3).backward()
    for name, value in [("train/pseudo_loss", pseudo), ("train/kl_loss", k3), ("train/lm_loss", lm)]:
        assert metrics[name] == pytest.approx(float(value.detach()), rel=1e-5), name
    assert float(k3.detach()) > 1e-3  # the KL term is really there
    for got, parameter in zip(gradients, policy.trainable_parameters(), strict=True):
        torch.testing.assert_close(got, parameter.grad, rtol=1e-3, atol=1e-5)  # float32 summation order


def test_an_update_that_keeps_nothing_takes_no_step() -> None:
    policy = tiny_policy(seed=3, value_head=False)
    weights = [p.detach().clone() for p in policy.trainable_parameters()]
    agent = make_agent("self_training", policy, {"group_size": 2, "keep": "threshold", "keep_threshold": 5.0})
    metrics = agent.update(multi_turn_rollout())
    assert metrics["train/kept_fraction"] == 0.0 and metrics["train/steps"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(weights, policy.trainable_parameters(), strict=True))
    assert agent.updates == 1


def test_state_dict_round_trip_gives_an_identical_next_update(tmp_path: Path) -> None:
    options = {"group_size": 4, "keep": "top_fraction", "keep_fraction": 0.5, "epochs": 2, "minibatch_size": 1,
               "lm_coef": 0.2, "lm_data": real_text_file(tmp_path), "lm_batch_size": 2, "kl_coef": 0.1,
               "learning_rate": 1e-2}
    policy = digit_policy(seed=4, value_head=False)
    agent = make_agent("self_training", policy, options)
    generator = torch.Generator().manual_seed(0)
    agent.update(sample_rollout(policy, contains_token(5), 8, generator, group_size=4))
    next_rollout = sample_rollout(policy, contains_token(5), 8, generator, group_size=4)

    resumed_policy = digit_policy(seed=99, value_head=False)
    resumed_policy.model.load_state_dict(policy.model.state_dict())
    resumed = make_agent("self_training", resumed_policy, options)
    resumed.load_state_dict(copy.deepcopy(agent.state_dict()))
    assert resumed.update(next_rollout) == agent.update(next_rollout)
    for a, b in zip(policy.model.parameters(), resumed_policy.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_self_training_learns_to_emit_the_rewarded_token() -> None:
    # Reward 1 when the 4-token completion contains token 5 (about 10% of random ones); keep the right ones.
    policy = tiny_policy(seed=0, value_head=False)
    agent = make_agent("self_training", policy, {"group_size": 8, "keep": "threshold", "keep_threshold": 1.0,
                                                 "learning_rate": 2e-2})
    generator = torch.Generator().manual_seed(0)

    def mean_reward() -> float:
        rollout = sample_rollout(policy, contains_token(5), 64, torch.Generator().manual_seed(123), group_size=8)
        return float(rollout.scores.mean())

    before = mean_reward()
    for _ in range(15):
        agent.update(sample_rollout(policy, contains_token(5), 32, generator, group_size=8))
    after = mean_reward()
    assert before < 0.3 and after > 0.5, f"mean reward {before:.2f} -> {after:.2f}"


def test_config_mistakes_fail_in_one_line_before_torch_is_imported(tmp_path: Path) -> None:
    config = str(REPO / "configs" / "arithmetic_self_training.yaml")
    ppo = str(REPO / "configs" / "sentiment_ppo.yaml")
    cases = {
        "unknown keep rule": ([config, "--set", "agent.keep=best"],
                              "agent (self_training): unknown keep rule 'best'; known: threshold, best_of_group"),
        "threshold without one": ([config, "--set", "agent.keep=threshold", "--set", "agent.keep_threshold=null"],
                                  "keep 'threshold' needs keep_threshold"),
        "lambda of 1": ([config, "--set", "agent.lm_coef=1"], "lm_coef (lambda) must be in [0, 1), got 1"),
        "best of a group of one": ([config, "--set", "budget.group_size=1"],
                                   "keep 'best_of_group' needs group_size >= 2 samples per prompt, got 1"),
        "missing real text": ([config, "--set", "agent.lm_data=missing.txt"],
                              "lm_data file 'missing.txt' does not exist"),
        "unknown option": ([config, "--set", "agent.keep_fracton=0.5"],
                           "unknown key 'agent.keep_fracton' (did you mean 'agent.keep_fraction'?)"),
        "negative ptx": ([ppo, "--set", "agent.ptx_coef=-1"], "agent (ppo): ptx_coef must be >= 0, got -1"),
        "ptx of a docx": ([ppo, "--set", "agent.name=grpo", "--set", "agent.ptx_data=notes.docx"],
                          "agent (grpo): ptx_data 'notes.docx' is neither a built-in corpus"),
    }
    assert_one_line_errors_before_torch({case: (["train", *args], message) for case, (args, message) in cases.items()},
                                        tmp_path)


def test_trainer_run_with_real_text_resumes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_trainer import reproducible, tiny_config

    from rlfb.logging import read_metrics
    from rlfb.trainer import Trainer

    overrides = ("agent={name: self_training, keep: top_fraction, keep_fraction: 0.5, lm_coef: 0.3, "
                 "lm_data: 'corpus:reviews', lm_batch_size: 2, kl_coef: 0.1, learning_rate: 0.01}",
                 "budget.group_size=2")
    straight = Trainer(tiny_config(tiny_model_dir, tmp_path / "straight", *overrides)).train()
    rows = [row for row in read_metrics(straight.run_dir) if "train/lm_loss" in row]
    assert len(rows) == 4 and all(row["train/kept_fraction"] == 0.5 and row["train/lm_loss"] > 0 for row in rows)

    def ctrl_c_after_update_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    config = tiny_config(tiny_model_dir, tmp_path / "resumed", *overrides, "checkpoint.every=0")
    interrupted = Trainer(config, callbacks=[ctrl_c_after_update_2]).train()
    resumed = Trainer(config, resume_from=interrupted.run_dir).train()
    assert reproducible(read_metrics(resumed.run_dir)) == reproducible(read_metrics(straight.run_dir))
