"""The evolution-strategies agent: the gradient estimate, antithetic pairs, rank shaping, the KL penalty in
the fitness, the genetic mode, what an update touches, resume, and the collect hook the trainer calls
(unchanged for the other agents)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_rollout, tiny_policy

from rlfb.agents import make_agent
from rlfb.agents.configs import ESConfig, agent_config
from rlfb.agents.es import NOISE, ESAgent, centered_ranks, derived_seed, noise, shape_fitness
from rlfb.agents.rollout import evaluate_rollout, rollout_reference_logprobs
from rlfb.agents.trajectory import Rollout, concatenate_rollouts
from rlfb.config import config_from_dict
from rlfb.errors import ConfigError
from rlfb.logging import read_metrics
from rlfb.trainer import Trainer


def es_agent(**options: Any) -> ESAgent:
    """An ES agent over a tiny random GPT-2 with a rank-1 adapter (256 LoRA parameters)."""
    agent = make_agent("es", tiny_policy(value_head=False, r=1), options)
    assert isinstance(agent, ESAgent)
    return agent


def fitness_rollout(fitness_per_row: list[float]) -> Rollout:
    """A rollout whose rows score the given values (one row per member unless more are given)."""
    rows = len(fitness_per_row)
    return make_rollout(torch.ones(rows, 1, dtype=torch.long), torch.ones(rows, 1, dtype=torch.long),
                        torch.tensor(fitness_per_row))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------- the gradient estimate
def test_gradient_estimate_of_one_pair_is_the_finite_difference_along_its_noise() -> None:
    agent = es_agent(population_size=2, sigma=0.1, fitness_shaping="none")
    # g = 1 / (N sigma) * sum_i (F_i - mean F) eps_i = (F+ - F-) / (2 sigma) * eps for one pair
    expected = (0.7 - 0.2) / (2 * 0.1) * noise(derived_seed(0, 0, NOISE, 0), agent.size)
    assert torch.allclose(agent.gradient_estimate(torch.tensor([0.7, 0.2], dtype=torch.float64)), expected)


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("shaping", ["none", "z_score", "centered_ranks"])
def test_gradient_estimate_points_along_the_analytic_gradient_of_a_toy_fitness(shaping: str,
                                                                               antithetic: bool) -> None:
    agent = es_agent(population_size=1024, sigma=0.01, fitness_shaping=shaping, antithetic=antithetic)
    theta = agent.theta()
    target = torch.randn(agent.size, generator=torch.Generator().manual_seed(1))

    def toy_fitness(vector: torch.Tensor) -> float:  # F = -|theta - target|^2, grad F = 2 (target - theta)
        return -float(((vector - target) ** 2).sum())

    fitness = torch.tensor([toy_fitness(agent.member_theta(i, theta)) for i in range(1024)], dtype=torch.float64)
    estimate = agent.gradient_estimate(fitness)
    # Over d = 256 dimensions and 1024 members the estimate's cosine with the true gradient is ~0.8 (ranks
    # and independent draws lose some); a wrong sign or a wrong member's noise gives ~0 or -0.8.
    assert cosine(estimate, 2 * (target - theta)) > 0.5
    if shaping == "none":  # unshaped, the estimate is unbiased: its size is the gradient's too
        assert float(estimate.norm() / (2 * (target - theta)).norm()) == pytest.approx(1.0, rel=0.6)


def test_antithetic_members_mirror_each_other_and_pairs_differ() -> None:
    agent = es_agent(population_size=6, sigma=0.05)
    theta = agent.theta()
    offsets = [agent.member_theta(i, theta) - theta for i in range(6)]
    for pair in range(3):
        assert torch.allclose(offsets[2 * pair], -offsets[2 * pair + 1], atol=1e-7)
        assert torch.allclose(offsets[2 * pair], 0.05 * noise(derived_seed(0, 0, NOISE, pair), agent.size))
    assert cosine(offsets[0], offsets[2]) < 0.3 and cosine(offsets[2], offsets[4]) < 0.3
    independent = es_agent(population_size=6, sigma=0.05, antithetic=False)
    assert not torch.allclose(independent.member_theta(0, theta), 2 * theta - independent.member_theta(1, theta))


def test_members_are_a_pure_function_of_seed_and_update() -> None:
    first, second = es_agent(population_size=4), es_agent(population_size=4)
    theta = first.theta()
    assert torch.equal(first.member_theta(3, theta), second.member_theta(3, theta))
    second.updates = 1  # the next update draws other members
    assert not torch.equal(first.member_theta(3, theta), second.member_theta(3, theta))
    other_seed = es_agent(population_size=4, seed=1)
    assert not torch.equal(first.member_theta(3, theta), other_seed.member_theta(3, theta))


# ------------------------------------------------------------------------------- fitness shaping
def test_centered_ranks_by_hand_with_ties() -> None:
    # ranks 0-based: -3 -> 0, 1 and 1 -> mean of 1 and 2 = 1.5, 5 -> 3; u = rank / 3 - 0.5
    assert centered_ranks(torch.tensor([1.0, -3.0, 5.0, 1.0])).tolist() == pytest.approx([0.0, -0.5, 0.5, 0.0])


def test_rank_shaping_ignores_the_fitness_scale_and_outliers() -> None:
    fitness = torch.tensor([0.1, -0.4, 0.3, 0.2, 0.0, -0.1], dtype=torch.float64)
    distorted = torch.exp(10 * fitness) + torch.tensor([0, 0, 1e6, 0, 0, 0])  # increasing, with an outlier
    assert torch.equal(shape_fitness(fitness, "centered_ranks"), shape_fitness(distorted, "centered_ranks"))
    assert not torch.allclose(shape_fitness(fitness, "z_score"), shape_fitness(distorted, "z_score"))
    z = shape_fitness(fitness, "z_score")
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-12) and float(z.std(unbiased=False)) == pytest.approx(1.0)


def test_an_antithetic_pair_of_equal_fitness_does_not_move_theta() -> None:
    agent = es_agent(population_size=4, fitness_shaping="centered_ranks")
    gradient = agent.gradient_estimate(torch.tensor([0.5, 0.5, 0.9, 0.1], dtype=torch.float64))
    # Pair 0 tied: only pair 1's noise is in the estimate.
    pair_1 = noise(derived_seed(0, 0, NOISE, 1), agent.size)
    assert cosine(gradient, pair_1) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------- the update
def test_update_moves_only_the_lora_parameters_and_computes_no_gradient() -> None:
    agent = make_agent("es", tiny_policy(value_head=True, r=2), {"population_size": 4, "learning_rate": 1e-2})
    model = agent.policy.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    head_before = [p.detach().clone() for p in agent.policy.value_head.parameters()]
    metrics = agent.update(fitness_rollout([0.3, -0.2, 0.5, 0.1, 0.0, 0.2, 0.4, -0.1]))  # 2 rows per member
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    lora = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == lora and lora and all("lora_" in name for name in lora)
    assert all(torch.equal(p, q) for p, q in zip(agent.policy.value_head.parameters(), head_before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert metrics["train/fitness_mean"] == pytest.approx(0.15)
    assert metrics["train/fitness_max"] == pytest.approx(0.3) and metrics["train/fitness_min"] == pytest.approx(0.05)
    assert metrics["train/update_norm"] == pytest.approx(float((agent.theta() - torch.cat(
        [before[name].reshape(-1) for name, p in model.named_parameters() if p.requires_grad])).norm()), rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_step_by_hand(optimizer: str) -> None:
    agent = es_agent(population_size=2, sigma=0.1, learning_rate=0.01, optimizer=optimizer, fitness_shaping="none")
    theta = agent.theta()
    gradient = agent.gradient_estimate(torch.tensor([0.7, 0.2], dtype=torch.float64))
    agent.update(fitness_rollout([0.7, 0.2]))
    # SGD: theta + lr g. Adam's first step: m_hat = g, v_hat = g^2, so theta + lr * g / (|g| + eps).
    step = 0.01 * gradient if optimizer == "sgd" else 0.01 * gradient / (gradient.abs() + 1e-8)
    assert torch.allclose(agent.theta(), theta + step, atol=1e-7)


def test_update_refuses_a_batch_that_does_not_split_into_members() -> None:
    with pytest.raises(ConfigError, match="does not split into 4 members"):
        es_agent(population_size=4).update(fitness_rollout([0.1, 0.2, 0.3]))


def fake_sampler(agent: ESAgent, calls: list[dict[str, Any]]) -> Any:
    """A collector whose one row scores the member's distance to a target: F = -|theta_i - target|^2."""
    target = torch.full((agent.size,), 0.05)

    def sample(**kwargs: Any) -> tuple[Rollout, dict[str, float]]:
        calls.append(kwargs)
        score = -float(((agent.theta() - target) ** 2).sum())
        return fitness_rollout([score]), {"rollout/success_rate": score}

    return sample


def test_collect_evaluates_each_member_on_the_same_draws_and_restores_theta() -> None:
    agent = es_agent(population_size=4)
    theta = agent.theta()
    calls: list[dict[str, Any]] = []
    rollout, metrics = agent.collect(fake_sampler(agent, calls))
    assert rollout.batch_size == 4 and torch.equal(agent.theta(), theta)
    expected = [-float(((agent.member_theta(i, theta) - 0.05) ** 2).sum()) for i in range(4)]
    assert rollout.scores.tolist() == pytest.approx(expected)
    assert metrics["rollout/success_rate"] == pytest.approx(sum(expected) / 4)
    # Common random numbers: one reset seed and one sampler seed for every member of the update.
    assert len({call["seed"] for call in calls}) == 1
    assert len({call["generator"].initial_seed() for call in calls}) == 1
    calls.clear()
    es_agent(population_size=4, common_random_numbers=False).collect(fake_sampler(agent, calls))
    assert calls == [{}] * 4  # the training streams, moving on


def test_an_interrupted_collection_leaves_theta_in_the_policy() -> None:
    agent = es_agent(population_size=4)
    theta = agent.theta()

    def interrupted(**kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        agent.collect(interrupted)
    assert torch.equal(agent.theta(), theta)


@pytest.mark.parametrize("mode", ["es", "genetic"])
def test_collect_then_update_improves_a_toy_fitness(mode: str) -> None:
    # The genetic mode pays sigma^2 * d per mutation on this fitness, so it needs a smaller sigma.
    agent = es_agent(mode=mode, population_size=20, sigma=0.02 if mode == "es" else 0.005, learning_rate=0.01,
                     num_parents=4)
    sample = fake_sampler(agent, [])
    start = float(agent.collect(sample)[0].scores.max())
    elite = []
    for _ in range(15):
        metrics = agent.update(agent.collect(sample)[0])
        elite.append(metrics.get("train/elite_fitness", metrics["train/fitness_max"]))
    theta_fitness = float(sample()[0].scores[0])
    assert theta_fitness > start + 0.1, (start, theta_fitness)
    if mode == "genetic":  # deterministic fitness + elitism: the best never gets worse
        assert elite == sorted(elite)


# ------------------------------------------------------------------------------- the KL penalty
def kl_rollout(agent: ESAgent, scores: list[float], kl_per_token: list[float]) -> Rollout:
    """Rows of 3 random model tokens whose sampled log-probs exceed the reference's by ``kl_per_token``."""
    rows = len(scores)
    completion_ids = torch.randint(1, 16, (rows, 3), generator=torch.Generator().manual_seed(5))
    rollout = make_rollout(completion_ids, torch.ones(rows, 3, dtype=torch.long), torch.tensor(scores))
    reference = rollout_reference_logprobs(agent.policy, rollout)
    return rollout._replace(sampled_logprobs=reference + torch.tensor(kl_per_token).unsqueeze(1))


def test_the_kl_penalty_reorders_the_members_and_so_the_step() -> None:
    # Member 0 scores more but strays: KL 3 x 2/3 = 2 nats per completion; member 1 stays on the reference.
    # F = mean(R - beta KL): beta 0 gives (0.9, 0.5), beta 0.5 gives (0.9 - 1.0, 0.5) = (-0.1, 0.5).
    scores, kl_per_token = [0.9, 0.9, 0.5, 0.5], [2 / 3, 2 / 3, 0.0, 0.0]  # 2 rows per member
    pair_0 = noise(derived_seed(0, 0, NOISE, 0), 256)
    for kl_coef, fitness, direction in ((0.0, [0.9, 0.5], 1.0), (0.5, [-0.1, 0.5], -1.0)):
        agent = es_agent(population_size=2, sigma=0.1, fitness_shaping="none", optimizer="sgd", kl_coef=kl_coef)
        rollout = kl_rollout(agent, scores, kl_per_token)
        if kl_coef:
            assert agent.sequence_kl(rollout).tolist() == pytest.approx([2.0, 2.0, 0.0, 0.0], abs=1e-5)
        theta = agent.theta()
        metrics = agent.update(rollout)
        assert metrics["train/fitness_max"] == pytest.approx(max(fitness), abs=1e-5)
        assert metrics["train/fitness_min"] == pytest.approx(min(fitness), abs=1e-5)
        assert cosine(agent.theta() - theta, pair_0) == pytest.approx(direction, abs=1e-5)  # toward the fitter


def test_beta_0_is_the_mean_return_exactly_and_runs_no_reference_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    scores = [0.31, -0.2, 0.57, 0.1]
    with_kl = es_agent(population_size=2, sigma=0.1, kl_coef=0.3)
    rollout = kl_rollout(with_kl, scores, [0.0] * 4)  # no KL: the penalised fitness is the plain one
    penalised = with_kl.fitness(rollout, 0.3, with_kl.sequence_kl(rollout))
    assert torch.allclose(penalised, torch.tensor([0.055, 0.335], dtype=torch.float64), atol=1e-6)

    def no_reference(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("beta = 0 must not run the reference")

    monkeypatch.setattr("rlfb.agents.es.rollout_reference_logprobs", no_reference)
    agent = es_agent(population_size=2, sigma=0.1)  # kl_coef 0, kl_target null: the default
    plain = agent.fitness(rollout)
    assert torch.equal(plain, rollout.scores.double().view(2, 2).mean(1))
    gradient = agent.gradient_estimate(plain)
    expected = agent.theta() + 0.02 * gradient / (gradient.abs() + 1e-8)  # Adam's first step
    metrics = agent.update(rollout)
    assert "train/kl" not in metrics and "train/kl_coef" not in metrics
    assert torch.allclose(agent.theta(), expected, atol=1e-7)


def test_an_adaptive_beta_moves_toward_the_target_and_resumes() -> None:
    agent = es_agent(population_size=2, kl_coef=0.1, kl_target=1.0, kl_horizon=40.0)
    rollout = kl_rollout(agent, [0.3, 0.1, 0.2, 0.0], [1.0, 1.0, 1.0, 1.0])  # 3 nats per completion
    metrics = agent.update(rollout)
    assert metrics["train/kl"] == pytest.approx(3.0, abs=1e-5) and metrics["train/kl_coef"] == 0.1
    # e = clip(3 / 1 - 1, -0.2, 0.2) = 0.2; beta <- 0.1 * (1 + 0.2 * 4 / 40)
    assert agent.kl_controller.value == pytest.approx(0.1 * 1.02)
    resumed = es_agent(population_size=2, kl_coef=0.1, kl_target=1.0, kl_horizon=40.0)
    resumed.load_state_dict(agent.state_dict())
    assert resumed.kl_controller.value == agent.kl_controller.value


def test_on_several_ranks_the_controller_is_fed_every_rank_s_mean_kl_and_samples(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 0 of 2 holds 3 nats per completion; the other rank (standing in: the all-reduce average) 1 nat.
    from rlfb import distributed

    agent = es_agent(population_size=2, kl_coef=0.1, kl_target=2.2, kl_horizon=40.0)
    rollout = kl_rollout(agent, [0.3, 0.1, 0.2, 0.0], [1.0, 1.0, 1.0, 1.0])
    averaged: list[float] = []

    def average_with_the_other_rank(tensor: torch.Tensor) -> torch.Tensor:
        averaged.append(float(tensor))
        return (tensor + 1.0) / 2

    monkeypatch.setattr(distributed, "average_across_ranks", average_with_the_other_rank)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [value])  # this rank's members only
    monkeypatch.setattr(agent, "local_members", lambda: [0, 1])
    metrics = agent.update(rollout)
    assert averaged == [pytest.approx(3.0, abs=1e-5)] and metrics["train/kl"] == pytest.approx(2.0, abs=1e-5)
    # e = clip(2 / 2.2 - 1, -0.2, 0.2) over both ranks' 8 rows; beta <- 0.1 * (1 + e * 8 / 40)
    assert agent.kl_controller.value == pytest.approx(0.1 * (1 + (2 / 2.2 - 1) * 8 / 40))


def test_the_kl_of_each_member_is_that_of_its_own_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The oracle: PPO's k1 from full-sequence passes, member i's rows under theta_i, at the sampling temperature.
    trainer = Trainer(tiny_es_config(tiny_model_dir, tmp_path, "agent.kl_coef=0.1", "agent.sigma=0.5",
                                     "sampling.temperature=0.7"))
    trainer._build()
    agent = trainer.agent
    assert isinstance(agent, ESAgent)
    rollout, _ = agent.collect(trainer._collect)
    trainer._close_envs()
    theta, expected = agent.theta(), []
    for member in range(4):
        block = rollout.select(torch.arange(3 * member, 3 * member + 3))
        agent.set_theta(agent.member_theta(member, theta))
        evaluation = evaluate_rollout(agent.policy, block, temperature=0.7)
        expected += ((evaluation.logprobs - evaluation.reference_logprobs) * block.action_mask).sum(1).tolist()
    agent.set_theta(theta)
    assert max(abs(value) for value in expected) > 0.1  # the members are far enough from the reference to tell
    assert agent.sequence_kl(rollout).tolist() == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------- the genetic mode
def test_genetic_children_are_mutated_crossovers_of_the_fittest_and_the_policy_holds_the_elite() -> None:
    agent = es_agent(mode="genetic", population_size=8, num_parents=3, crossover_rate=0.5, sigma=0.05)
    assert agent.population is not None
    population = agent.population.clone()
    assert torch.equal(population[0], agent.theta())  # generation 0: the initial adapter and mutants of it
    fitness = [0.1, 0.9, 0.3, 0.8, 0.0, 0.7, 0.2, 0.4]  # parents: members 1, 3, 5
    metrics = agent.update(fitness_rollout(fitness))
    assert torch.equal(agent.theta(), population[1]) and torch.equal(agent.population[0], population[1])
    assert metrics["train/elite_fitness"] == pytest.approx(0.9)
    assert metrics["train/parents_fitness_mean"] == pytest.approx(0.8)
    parents = population[[1, 3, 5]]
    from rlfb.agents.es import MUTATION

    crossed = 0
    for child in range(1, 8):
        genes = agent.population[child] - 0.05 * noise(derived_seed(0, 1, MUTATION, child), agent.size)
        matches = (genes.unsqueeze(0) - parents).abs() < 1e-6  # (T, size) which parent gave each gene
        assert bool(matches.any(0).all()), f"child {child} has a gene from no parent"
        crossed += int(matches.sum(1).max() < agent.size)  # not a copy of one parent
    assert crossed / 7 == pytest.approx(metrics["train/crossover_fraction"])
    assert 0 < crossed < 7


# ------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("mode", ["es", "genetic"])
def test_state_dict_resumes_the_next_updates_exactly(mode: str) -> None:
    straight = es_agent(mode=mode, population_size=6, num_parents=2)
    resumed = es_agent(mode=mode, population_size=6, num_parents=2)
    sample, resumed_sample = fake_sampler(straight, []), fake_sampler(resumed, [])
    straight.update(straight.collect(sample)[0])
    resumed.load_state_dict(straight.state_dict())  # theta, Adam's moments, the update count, the population
    for _ in range(2):
        straight.update(straight.collect(sample)[0])
        resumed.update(resumed.collect(resumed_sample)[0])
    assert torch.equal(straight.theta(), resumed.theta())


def tiny_es_config(model_dir: Path, output_dir: Path, *overrides: str) -> Any:
    data = {
        "task": "sentiment", "model": str(model_dir),
        "rewards": [{"name": "regex", "kwargs": {"pattern": "[aeiou]"}, "label": "vowel"}],
        "agent": {"name": "es", "population_size": 4, "sigma": 0.05, "learning_rate": 1e-2, "num_parents": 2},
        "lora": {"r": 2, "alpha": 4}, "sampling": {"max_new_tokens": 6},
        "budget": {"updates": 4, "num_envs": 3}, "eval": {"num_prompts": 2},
        "logging": {"progress_bar": False, "tensorboard": False},
        "checkpoint": {"every": 0}, "device": "cpu", "output_dir": str(output_dir), "seed": 3,
    }
    return config_from_dict(data, list(overrides))


def reproducible(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if not key.startswith("time/")} for row in rows]


@pytest.mark.parametrize("mode", ["es", "genetic", "es with an adaptive KL"])
def test_trainer_interrupt_then_resume_matches_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path,
                                                                    mode: str) -> None:
    options = [f"agent.mode={mode.split()[0]}"]
    if mode.endswith("KL"):
        options += ["agent.kl_coef=0.5", "agent.kl_target=0.01", "agent.kl_horizon=10"]
    straight = Trainer(tiny_es_config(tiny_model_dir, tmp_path / "straight", *options)).train()
    rows = read_metrics(straight.run_dir)
    assert [row["train/population_size"] for row in rows if "train/population_size" in row] == [4.0] * 4

    def ctrl_c_after_update_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    if mode.endswith("KL"):  # beta moved, so a resume that lost it would differ
        assert len({row["train/kl_coef"] for row in rows if "train/kl_coef" in row}) == 4
    config = tiny_es_config(tiny_model_dir, tmp_path / "resumed", *options)
    interrupted = Trainer(config, callbacks=[ctrl_c_after_update_2]).train()
    assert interrupted.interrupted and interrupted.step == 2
    resumed = Trainer(config, resume_from=interrupted.run_dir).train()
    assert reproducible(read_metrics(resumed.run_dir)) == reproducible(rows)


def test_trainer_collects_one_batch_per_member_on_shared_prompts(tiny_model_dir: Path, tmp_path: Path) -> None:
    for common, expect_shared in ((True, True), (False, False)):
        trainer = Trainer(tiny_es_config(tiny_model_dir, tmp_path, f"agent.common_random_numbers={common}"))
        trainer._build()
        rollout, _ = trainer.agent.collect(trainer._collect)
        trainer._close_envs()
        members = [rollout.prompts[first: first + 3] for first in range(0, 12, 3)]
        assert rollout.batch_size == 12
        assert all(prompts == members[0] for prompts in members) == expect_shared


def test_common_random_numbers_share_the_sampler_noise(tiny_model_dir: Path, tmp_path: Path) -> None:
    # With a perturbation too small to change a token, members on the same draws write the same completions.
    trainer = Trainer(tiny_es_config(tiny_model_dir, tmp_path, "agent.sigma=1e-9"))
    trainer._build()
    rollout, _ = trainer.agent.collect(trainer._collect)
    trainer._close_envs()
    assert all(rollout.completions[first: first + 3] == rollout.completions[:3] for first in range(3, 12, 3))


# ------------------------------------------------------------------------------- the hook, other agents
@pytest.mark.parametrize("name", ["ppo", "reinforce", "grpo"])
def test_the_default_collect_is_the_trainers_one_batch(name: str) -> None:
    agent = make_agent(name, tiny_policy(value_head=name == "ppo"), {})
    calls: list[dict[str, Any]] = []
    batch = (fitness_rollout([0.1]), {"rollout/x": 1.0})

    def sample(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return batch

    assert agent.collect(sample) is batch and calls == [{}]


def test_concatenated_rollouts_keep_every_row_and_pad_to_the_widest() -> None:
    short = fitness_rollout([0.1, 0.2])
    long = make_rollout(torch.tensor([[3, 4, 5]]), torch.tensor([[1, 1, 0]]), torch.tensor([0.7]),
                        prompt_ids=torch.tensor([[1, 2]]))
    joined = concatenate_rollouts([short, long], pad_token_id=9)
    assert joined.scores.tolist() == pytest.approx([0.1, 0.2, 0.7])
    assert joined.prompt_ids.tolist() == [[9, 1], [9, 1], [1, 2]] and joined.prompt_mask[:, 0].tolist() == [0, 0, 1]
    assert joined.completion_ids.tolist() == [[1, 9, 9], [1, 9, 9], [3, 4, 5]]
    assert joined.action_mask.tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert joined.turn_ends.tolist() == [[0], [0], [1]] and joined.completions[2] == long.completions[0]


def test_config_errors_name_the_option() -> None:
    with pytest.raises(ConfigError, match="even population_size, got 5"):
        agent_config("es", {"population_size": 5})
    assert agent_config("es", {"population_size": 5, "antithetic": False}).population_size == 5
    with pytest.raises(ConfigError, match="unknown mode 'ga'; known: es, genetic"):
        agent_config("es", {"mode": "ga"})
    with pytest.raises(ConfigError, match="num_parents must be in"):
        agent_config("es", {"mode": "genetic", "population_size": 4, "num_parents": 5})
    assert isinstance(agent_config("es"), ESConfig)
