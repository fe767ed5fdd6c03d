"""Evolution strategies on the LoRA vector: no backprop, no activation memory.

theta is the flat vector of the LoRA parameters. Each update evaluates a population of N members on one
batch of completions each; member i's fitness is the mean over its B completions b of the return (final
score plus turn rewards plus dense rewards, what REINFORCE calls R) less a KL penalty to the reference:

    F_i = 1/B sum_b [ R_ib - beta * KL_ib ],   KL_ib = sum_t m_ibt [log pi_i(a_ibt | s_ibt) - log pi_ref(a_ibt | s_ibt)]

over the model tokens t (mask m), with log pi_i the sampler's log-probs of the tokens member i drew (its
own weights, at the sampling temperature: no extra pass) and log pi_ref those of the base model (adapter
disabled, same temperature), one no-grad forward over the N * B rows per update. KL_ib is the k1 estimate
of KL(pi_i || pi_ref) of the completion, the one PPO puts in its reward (Ziegler et al. 2019; rlfb/agents/kl.py).
beta is ``kl_coef``, or adapted toward ``kl_target`` by the controller of Ziegler et al. 2019 from the
population's mean KL (N * B samples per update). With beta = 0 (the default) no reference pass runs and F_i
is the mean return, as Qiu et al. 2025. Two modes:

``mode: es`` (Salimans et al. 2017; Qiu et al. 2025 at LLM scale)
    members theta_i = theta + sigma * eps_i, eps_i ~ N(0, I) drawn from member i's seed; with
    ``antithetic`` they come in pairs eps_{2j+1} = -eps_{2j} (mirrored sampling). Fitness shaping
    u = shape(F) (centred ranks, z-scores, or F - mean F), then the search-gradient estimate

        g = 1 / (N sigma) * sum_i u_i eps_i          ~ grad_theta E_eps[F(theta + sigma eps)]

    and one ascent step of Adam (Kingma & Ba 2015) or SGD (theta <- theta + lr * g) on theta alone.

``mode: genetic`` (Such et al. 2017, plus uniform crossover)
    a population of N LoRA vectors; truncation selection keeps the ``num_parents`` fittest; the next
    generation is the fittest unchanged (elitism: re-evaluated, so a lucky batch does not keep it) and
    N - 1 children, each a uniform crossover of two random parents (with probability ``crossover_rate``,
    else a copy of one) plus the mutation sigma * eps. The policy holds the fittest.

Every random draw is a pure function of (seed, update, purpose, index) through NumPy's ``SeedSequence``,
so the agent keeps no RNG stream: another process that knows the seed and the update number rebuilds every
member from its index, and only the N fitness values need to travel (with an adaptive beta also each
rank's mean KL). On W ranks each rank evaluates its block of N / W members (rank r: members
r N/W .. (r + 1) N/W - 1) and the ranks exchange their fitness values, nothing else: every rank then takes
the same step, the one a single process takes (members share their draws under ``common_random_numbers``,
which several ranks require, so a member's rollout does not depend on the rank that evaluates it). The
noise is drawn on the CPU, so it is the same on every device. Everything runs under ``no_grad``.

With ``common_random_numbers`` every member of an update sees the same prompts (the env reset with one
seed) and the same sampler noise (one generator seed): the fitness differences are then the
perturbations' doing, not the draws' (common random numbers; antithetic pairs compared on the same draws).
Members are evaluated one after the other on the trainer's vector env (several members in one forward
pass would need a batched-LoRA forward; docs/algorithms.md gives the measured cost of each way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rlfb import distributed
from rlfb.agents.base import Agent, Collected, Sample
from rlfb.agents.configs import ESConfig
from rlfb.agents.kl import make_kl_controller
from rlfb.agents.rollout import rollout_reference_logprobs
from rlfb.agents.trajectory import Rollout, concatenate_rollouts
from rlfb.errors import ConfigError
from rlfb.models.policy import Policy

# Adam's constants (Kingma & Ba 2015, the defaults Salimans et al. 2017 kept).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# The purposes a seed is drawn for: one stream each, so changing one never moves another.
NOISE, DRAWS, MUTATION, SELECTION = 0, 1, 2, 3
SEED_BOUND = 2**31 - 1  # reset seeds of the envs (and torch's manual_seed) take this comfortably


def derived_seed(*key: int) -> int:
    """A seed in [0, 2**31 - 1) that is a pure function of the integers ``key`` (NumPy's SeedSequence hash).

    Example:
        >>> derived_seed(0, 3, 1) == derived_seed(0, 3, 1) != derived_seed(0, 3, 2)
        True
    """
    return int(np.random.SeedSequence([int(value) for value in key]).generate_state(1)[0]) % SEED_BOUND


def noise(seed: int, size: int) -> torch.Tensor:
    """(size,) float32 standard Gaussian noise from ``seed``, drawn on the CPU (the same on every device)."""
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- fitness shaping
def centered_ranks(fitness: torch.Tensor) -> torch.Tensor:
    """u_i = rank(F_i) / (N - 1) - 1/2 in [-1/2, 1/2], ties sharing their mean rank (Salimans et al. 2017).

    Invariant to any increasing transform of the fitness, so one outlier cannot dominate the step. Ties
    matter under common random numbers, where two members often write the same completions: equal fitness
    must give equal weight, or an antithetic pair of equal fitness would push theta along its noise.

    Example:
        >>> centered_ranks(torch.tensor([0.3, -1.0, 0.3, 2.0])).tolist()
        [0.0, -0.5, 0.0, 0.5]
    """
    below = (fitness.unsqueeze(0) < fitness.unsqueeze(1)).sum(1).double()  # (N,) members strictly worse
    equal = (fitness.unsqueeze(0) == fitness.unsqueeze(1)).sum(1).double()  # (N,) itself included
    ranks = below + (equal - 1) / 2  # 0-based mean rank of each tie
    return (ranks / (fitness.numel() - 1) - 0.5).to(fitness.dtype)


def shape_fitness(fitness: torch.Tensor, shaping: str) -> torch.Tensor:
    """The weights u of the gradient estimate: centred ranks, z-scores (F - mean) / std, or F - mean."""
    if shaping == "centered_ranks":
        return centered_ranks(fitness)
    centred = fitness - fitness.mean()
    if shaping == "z_score":  # Qiu et al. 2025; all-equal fitness gives 0, not NaN
        return centred / (fitness.std(unbiased=False) + 1e-8)
    return centred


# ------------------------------------------------------------------------------- the agent
class ESAgent(Agent):
    """Evolution strategies (or a genetic algorithm) over the LoRA vector; see the module docstring.

    Args:
        policy: The policy; its trainable parameters (the LoRA adapter) are theta. A value head, if any,
            is left alone.
        config: Hyper-parameters.
    """

    name = "es"

    def __init__(self, policy: Policy, config: ESConfig | None = None) -> None:
        self.config = config or ESConfig()
        self.policy = policy
        self.parameters = [p for p in policy.model.parameters() if p.requires_grad]
        self.size = sum(p.numel() for p in self.parameters)
        self.updates = 0
        c = self.config
        self.kl_controller = make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)
        self.adam_mean: torch.Tensor | None = None  # Adam's moments of g (``optimizer: adam`` only)
        self.adam_square: torch.Tensor | None = None
        self.population: torch.Tensor | None = None  # (N, size) the genetic mode's members
        if c.mode == "genetic":
            theta = self.theta()
            # Generation 0: the initial adapter and N - 1 mutants of it.
            self.population = torch.stack([theta] + [theta + c.sigma * self._noise(MUTATION, member)
                                                     for member in range(1, c.population_size)])

    # ---------------------------------------------------------------- theta as one vector
    def theta(self) -> torch.Tensor:
        """The LoRA parameters as one float32 vector on the CPU (a copy)."""
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in self.parameters])

    @torch.no_grad()
    def set_theta(self, theta: torch.Tensor) -> None:
        """Write the vector ``theta`` into the LoRA parameters."""
        first = 0
        for parameter in self.parameters:
            count = parameter.numel()
            parameter.copy_(theta[first : first + count].view_as(parameter))
            first += count

    def _noise(self, purpose: int, index: int) -> torch.Tensor:
        return noise(derived_seed(self.config.seed, self.updates, purpose, index), self.size)

    def member_noise(self, member: int) -> torch.Tensor:
        """eps_i of member i this update (ES mode): pair j = i // 2 shares one draw, the odd member negated."""
        if not self.config.antithetic:
            return self._noise(NOISE, member)
        eps = self._noise(NOISE, member // 2)
        return -eps if member % 2 else eps

    def member_theta(self, member: int, theta: torch.Tensor) -> torch.Tensor:
        """The LoRA vector member i is evaluated with: theta + sigma * eps_i, or the genetic population's row."""
        if self.population is not None:
            return self.population[member]
        return theta + self.config.sigma * self.member_noise(member)

    def local_members(self) -> range:
        """The members this rank evaluates: its block of N / W (every member with one process)."""
        context = distributed.DistributedContext.current()
        share = self.config.population_size // context.world_size
        return range(context.rank * share, (context.rank + 1) * share)

    # ---------------------------------------------------------------- collect: one batch per member
    @torch.no_grad()
    def collect(self, sample: Sample) -> Collected:
        """Evaluate this rank's members on a batch each; the rows of its k-th member are block k of the rollout.

        Returns:
            The members' rollouts concatenated in member order (N / W * B rows), and the mean of their
            episode metrics (members have equal batches, so this is the metric over all rows).
        """
        c = self.config
        theta = self.theta()
        draws = derived_seed(c.seed, self.updates, DRAWS, 0)
        rollouts: list[Rollout] = []
        metrics: list[dict[str, float]] = []
        try:
            for member in self.local_members():
                self.set_theta(self.member_theta(member, theta))
                if c.common_random_numbers:
                    generator = torch.Generator(device=self.policy.device).manual_seed(draws)
                    rollout, episode_metrics = sample(generator=generator, seed=draws)
                else:
                    rollout, episode_metrics = sample()
                rollouts.append(rollout)
                metrics.append(episode_metrics)
        finally:  # an interrupted collection leaves theta, not a member, in the policy
            self.set_theta(theta)
        merged = {key: float(np.mean([values[key] for values in metrics])) for key in metrics[0]}
        return concatenate_rollouts(rollouts, pad_token_id=self._pad_token_id()), merged

    def _pad_token_id(self) -> int:
        tokenizer = self.policy.tokenizer
        return int(getattr(tokenizer, "pad_token_id", None) or 0)

    def fitness(self, rollout: Rollout, kl_coef: float = 0.0,
                sequence_kl: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) float64 F_i = mean over member i's rows of R - beta * KL (the module docstring), over every
        rank's members: this rank's from ``rollout``, the others' gathered (N / W numbers each).

        Args:
            rollout: This rank's members' rows, its k-th member's in block k (what :meth:`collect` returned).
            kl_coef: beta.
            sequence_kl: (rows,) KL of each row to the reference (:meth:`sequence_kl`); None: no KL term.
        """
        members = len(self.local_members())
        if rollout.batch_size % members:
            raise ConfigError(f"a rollout of {rollout.batch_size} rows does not split into {members} members; "
                              "the ES agent's update reads the batch its own collect() returned")
        returns = rollout.scores.double() + rollout.turn_rewards.double().sum(1)
        if rollout.per_token_rewards is not None:
            returns = returns + (rollout.per_token_rewards.double() * rollout.action_mask).sum(1)
        if sequence_kl is not None:
            returns = returns - kl_coef * sequence_kl.double()  # R - beta * KL, per row
        local = returns.cpu().view(members, -1).mean(1)  # (N / W,) rows of this rank's k-th member are block k
        return torch.cat(distributed.gather_objects(local))  # (N,) rank r's block r

    def sequence_kl(self, rollout: Rollout) -> torch.Tensor:
        """(B,) float64 KL_b = sum_t m_bt (log pi(a_bt) - log pi_ref(a_bt)): the sampled log-probs (each row
        under the weights of the member that drew it) against one no-grad pass of the reference."""
        reference_logprobs = rollout_reference_logprobs(self.policy, rollout, self.config.temperature)
        mask = rollout.action_mask.double()
        return ((rollout.sampled_logprobs.double() - reference_logprobs.double()) * mask).sum(1).cpu()

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, rollout: Rollout) -> dict[str, float]:
        kl_coef = self.kl_controller.value
        # beta = 0 (a fixed kl_coef of 0; an adaptive one never reaches 0): the plain mean return, no pass.
        sequence_kl = self.sequence_kl(rollout) if kl_coef > 0 else None
        fitness = self.fitness(rollout, kl_coef, sequence_kl)
        if self.config.mode == "genetic":
            metrics = self._genetic_step(fitness)
        else:
            metrics = self._es_step(fitness)
        self.updates += 1
        if sequence_kl is not None:
            # Every rank holds as many rows: the mean of the ranks' means is the population's mean KL.
            observed_kl = float(distributed.average_across_ranks(sequence_kl.mean().reshape(1)))
            self.kl_controller.update(observed_kl, rollout.batch_size * distributed.world_size())
            metrics.update({"train/kl": observed_kl, "train/kl_coef": kl_coef})
        metrics.update({"train/fitness_mean": float(fitness.mean()),
                        "train/fitness_std": float(fitness.std(unbiased=False)),
                        "train/fitness_max": float(fitness.max()), "train/fitness_min": float(fitness.min()),
                        "train/sigma": self.config.sigma, "train/population_size": float(fitness.numel()),
                        "train/theta_norm": float(self.theta().norm())})
        return metrics

    def gradient_estimate(self, fitness: torch.Tensor) -> torch.Tensor:
        """g = 1 / (N sigma) * sum_i u_i eps_i with u the shaped fitness (Salimans et al. 2017, eq. for NES).

        Each eps_i is drawn again from its seed and added in turn: one noise vector in memory at a time.
        With antithetic pairs the sum is over pairs, (u_{2j} - u_{2j+1}) eps_j, one draw per pair.
        """
        c = self.config
        weights = shape_fitness(fitness, c.fitness_shaping)  # (N,)
        gradient = torch.zeros(self.size)
        if c.antithetic:
            for pair in range(c.population_size // 2):
                gradient += float(weights[2 * pair] - weights[2 * pair + 1]) * self._noise(NOISE, pair)
        else:
            for member in range(c.population_size):
                gradient += float(weights[member]) * self._noise(NOISE, member)
        return gradient / (c.population_size * c.sigma)

    def _es_step(self, fitness: torch.Tensor) -> dict[str, float]:
        c = self.config
        gradient = self.gradient_estimate(fitness)
        if c.optimizer == "sgd":
            step = c.learning_rate * gradient  # theta <- theta + lr * g (ascent)
        else:
            # Adam on -g (ascent): m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
            # theta <- theta + lr * m_hat / (sqrt(v_hat) + eps), hats the bias-corrected moments.
            beta1, beta2 = ADAM_BETAS
            if self.adam_mean is None or self.adam_square is None:
                self.adam_mean, self.adam_square = torch.zeros(self.size), torch.zeros(self.size)
            self.adam_mean.mul_(beta1).add_(gradient, alpha=1 - beta1)
            self.adam_square.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            t = self.updates + 1
            mean_hat = self.adam_mean / (1 - beta1**t)
            square_hat = self.adam_square / (1 - beta2**t)
            step = c.learning_rate * mean_hat / (square_hat.sqrt() + ADAM_EPS)
        self.set_theta(self.theta() + step)
        return {"train/grad_norm": float(gradient.norm()), "train/update_norm": float(step.norm()),
                "train/learning_rate": c.learning_rate}

    def _genetic_step(self, fitness: torch.Tensor) -> dict[str, float]:
        """Truncation selection, elitism, uniform crossover and Gaussian mutation (module docstring)."""
        c = self.config
        assert self.population is not None
        # Stable sort on -F: of equal fitness, the lower member index (the elite is member 0) ranks first.
        order = torch.argsort(-fitness, stable=True)
        parents = self.population[order[: c.num_parents]]  # (T, size) fittest first
        rng = np.random.default_rng(derived_seed(c.seed, self.updates, SELECTION, 0))
        children = [parents[0].clone()]  # the elite, unmutated
        crossovers = 0
        for child in range(1, c.population_size):
            # Two distinct parents (crossing a parent with itself would copy it).
            first, second = rng.choice(c.num_parents, size=2, replace=False) if c.num_parents > 1 else (0, 0)
            genes = parents[first]
            if rng.random() < c.crossover_rate:
                crossovers += 1
                from_first = torch.from_numpy(rng.random(self.size) < 0.5)
                genes = torch.where(from_first, parents[first], parents[second])
            # Mutation drawn for generation u + 1 (generation 0's were drawn at u = 0 in __init__).
            mutation = noise(derived_seed(c.seed, self.updates + 1, MUTATION, child), self.size)
            children.append(genes + c.sigma * mutation)
        self.population = torch.stack(children)
        self.set_theta(parents[0])
        return {"train/elite_fitness": float(fitness[order[0]]),
                "train/parents_fitness_mean": float(fitness[order[: c.num_parents]].mean()),
                "train/crossover_fraction": crossovers / (c.population_size - 1)}

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """theta, Adam's moments, the genetic population, the KL coefficient and the update count (which
        fixes every seed): copies, so later updates do not change a state already taken."""
        return {"config": dataclasses.asdict(self.config), "updates": self.updates, "theta": self.theta(),
                "kl_controller": self.kl_controller.state_dict(),
                **{key: _copy(getattr(self, key)) for key in ("adam_mean", "adam_square", "population")}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.set_theta(state["theta"])
        for key in ("adam_mean", "adam_square", "population"):
            setattr(self, key, _copy(state[key]))
        if "kl_controller" in state:  # absent from checkpoints written before ES had a KL term
            self.kl_controller.load_state_dict(state["kl_controller"])


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()

