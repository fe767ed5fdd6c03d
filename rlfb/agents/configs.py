"""The agent registry and the agents' hyper-parameters, importable without torch.

Each agent is an :class:`AgentSpec` in :data:`AGENTS`: its name, the dataclass of its options (the
``agent:`` section of a run config), where its class lives, the options its name fixes (RLOO and GRPO are
REINFORCE with a group baseline) and whether it needs a value head. Adding an agent is one
:func:`register_agent` call; the trainer reads only the spec. Nothing here imports torch, so ``rlfb train``
checks every agent option of a config in milliseconds, before the heavy imports (rlfb/preflight.py); the
update rules live in one file per agent (ppo.py, reinforce.py).

Example:
    >>> agent_config("grpo", {"learning_rate": 3e-4}).baseline
    'grpo'
    >>> agent_config("ppo", {"epoch": 2})
    Traceback (most recent call last):
    ...
    rlfb.errors.ConfigError: unknown option(s) 'epoch' for agent 'ppo' (did you mean 'epochs'?); known: ...
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rlfb.errors import ConfigError

if TYPE_CHECKING:
    from rlfb.config import RunConfig

LR_SCHEDULES = ("constant", "linear")


def check_learning_rate(learning_rate: float, lr_schedule: str, total_updates: int | None) -> None:
    """Raise ConfigError on a learning rate <= 0, an unknown schedule, or ``linear`` without a length."""
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    if lr_schedule == "linear" and not total_updates:
        raise ConfigError("lr_schedule 'linear' needs total_updates (the number of updates of the run)")
    if learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")


# The built-in real text (rlfb/agents/lm_mix.py): the pretraining corpus of rlfb-tiny, or one kind of its documents.
REAL_TEXT_CORPORA = ("corpus", "corpus:reviews", "corpus:arithmetic")
REAL_TEXT_FILE_TYPES = (".txt", ".jsonl")


def check_real_text(coef: float, source: str, batch_size: int, prefix: str) -> None:
    """Check the options ``{prefix}_coef``, ``{prefix}_data`` and ``{prefix}_batch_size`` of a real-text LM term.

    Raises:
        ConfigError: a negative coefficient, a batch size < 1, or a source that is neither a built-in corpus
            nor an existing .txt / .jsonl file (a relative path is read from the working directory).
    """
    if coef < 0:
        raise ConfigError(f"{prefix}_coef must be >= 0, got {coef}")
    if batch_size < 1:
        raise ConfigError(f"{prefix}_batch_size must be >= 1, got {batch_size}")
    if source in REAL_TEXT_CORPORA:
        return
    path = Path(source).expanduser()
    if path.suffix.lower() not in REAL_TEXT_FILE_TYPES:
        raise ConfigError(f"{prefix}_data {source!r} is neither a built-in corpus ({', '.join(REAL_TEXT_CORPORA)}) "
                          f"nor a {' or '.join(REAL_TEXT_FILE_TYPES)} file; set {prefix}_data to one of them")
    if not path.is_file():
        raise ConfigError(f"{prefix}_data file {source!r} does not exist (a relative path is read from the "
                          f"working directory); check the path or use {prefix}_data: corpus")


# ------------------------------------------------------------------------------- regularization
# Every gradient agent's options include these, with one meaning each (docs/algorithms.md, "Regularization");
# the KL options are also the evolution-strategies agent's, whose fitness they penalise.
KL_OPTIONS = ("kl_coef", "kl_target", "kl_horizon")
REGULARIZATION_OPTIONS = ("weight_decay", "entropy_coef", *KL_OPTIONS)
# Names a user may write in the agent section for a regularizer that another section of the run config sets.
SET_ELSEWHERE = {"lora_dropout": "lora.dropout", "dropout": "lora.dropout"}


@dataclasses.dataclass
class KLPenalty:
    """The KL penalty to the reference (the base model, adapter disabled): part of :class:`Regularization`,
    and the one regularizer of the evolution-strategies agent, which takes no gradient steps.

    Attributes:
        kl_coef: beta of the KL penalty to the reference (the base model, adapter disabled), or the adaptive
            controller's initial beta; 0 with ``kl_target: null``: no KL term.
        kl_target: Target KL in nats per completion of the adaptive controller (Ziegler et al. 2019); None:
            a fixed beta.
        kl_horizon: Adaptive controller horizon in samples (tuned: 2000, so that with batches of ~32 the
            controller acts within minutes; Ziegler et al. 2019 used 10000 with batches of 512).
    """

    kl_coef: float = 0.1
    kl_target: float | None = 3.0
    kl_horizon: float = 2000.0

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_target is not None:
            if self.kl_target <= 0:
                raise ConfigError(f"kl_target must be > 0 nats or null (a fixed kl_coef), got {self.kl_target}")
            if self.kl_coef <= 0:
                raise ConfigError(f"an adaptive KL (kl_target {self.kl_target}) needs kl_coef > 0 to start from, "
                                  "got 0; set kl_target: null for no KL term")
        if self.kl_horizon <= 0:
            raise ConfigError(f"kl_horizon must be > 0 samples, got {self.kl_horizon}")


@dataclasses.dataclass
class Regularization(KLPenalty):
    """The regularization every gradient agent shares: the same options, meanings and checks in each
    (docs/algorithms.md, "Regularization"): the :class:`KLPenalty` options and those below. LoRA dropout is
    the adapter's ``lora.dropout``.

    Attributes:
        weight_decay: lambda of AdamW's decoupled weight decay: every optimizer step first multiplies each
            trainable parameter by (1 - lr * lambda) (Loshchilov & Hutter 2019); 0 (the default): none.
        entropy_coef: c_H of the entropy bonus, - c_H * H in the loss, H the mean entropy of the policy's
            next-token distribution over the model tokens of the batch (Schulman et al. 2017, eq. 9).
    """

    weight_decay: float = 0.0
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        learning_rate = getattr(self, "learning_rate", None)
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if learning_rate is not None and learning_rate * self.weight_decay >= 1:
            raise ConfigError(f"weight_decay {self.weight_decay} x learning_rate {learning_rate} must be < 1: "
                              "each step multiplies the parameters by 1 - lr * weight_decay")
        if self.entropy_coef < 0:
            raise ConfigError(f"entropy_coef must be >= 0 (the weight of a bonus), got {self.entropy_coef}")
        super().__post_init__()


def check_option_names(config_class: type, keys: Iterable[str], agent_name: str, section: str = "agent") -> None:
    """Raise ConfigError on an option that belongs elsewhere: a regularizer another section sets, or a
    regularization option given to an agent without gradient steps."""
    for key in keys:
        if key in SET_ELSEWHERE:
            raise ConfigError(f"'{section}.{key}' is not an agent option: LoRA dropout is set by "
                              f"'{SET_ELSEWHERE[key]}' for every gradient agent (docs/algorithms.md, Regularization)")
        if key in REGULARIZATION_OPTIONS and key not in {field.name for field in dataclasses.fields(config_class)}:
            kl_only = " (its KL penalty is kl_coef, kl_target, kl_horizon)" if issubclass(config_class, KLPenalty) else ""
            raise ConfigError(f"agent {agent_name!r} takes no gradient steps, so it has no regularization option "
                              f"{key!r}{kl_only}; the gradient agents have them: "
                              f"{', '.join(name for name, spec in AGENTS.items() if spec.is_gradient_agent)}")


@dataclasses.dataclass
class PPOConfig(Regularization):
    """PPO hyper-parameters, and the :class:`Regularization` options (the KL penalty in the per-token reward;
    kl_coef 0.2 in Ziegler et al. 2019's sentiment task, kl_target 6; tuned). Literature defaults unless
    noted; "tuned" ones were measured on the built-in tiny model (see docs/algorithms.md).

    Attributes:
        learning_rate: AdamW learning rate of the LoRA and value-head parameters (tuned: LoRA on a small
            model needs ~100x the 1.41e-5 Ziegler et al. 2019 used for full fine-tuning of GPT-2).
        lr_schedule: "constant" or "linear" decay to 0 over ``total_updates``.
        total_updates: Number of updates of the run (for the linear schedule).
        epochs: Passes over each rollout (4: Ziegler et al. 2019).
        num_minibatches: Minibatches per pass (4: Ziegler et al. 2019 / lm-human-preferences).
        gamma: Discount (1.0: Ziegler et al. 2019; the episode is a short completion).
        gae_lambda: GAE lambda (0.95: Ziegler et al. 2019, Schulman et al. 2016).
        clip_range: Ratio clip epsilon (0.2: Schulman et al. 2017).
        value_clip_range: Value clip (0.2: Ziegler et al. 2019; Huang et al. 2022 detail 9).
        vf_coef: Value-loss weight (0.1: Ziegler et al. 2019).
        max_grad_norm: Global gradient-norm clip (tuned; 0.5 in Huang et al. 2022 detail 11).
        whiten_advantages: Normalise advantages to mean 0, std 1 over the batch (Huang et al. 2022 detail 7).
        early_stop_kl: Stop the epochs of an update once the approximate KL (k3, per token) between the new
            and old policy exceeds this; None disables (the ``target_kl`` of OpenAI Spinning Up's PPO).
        temperature: Sampling temperature; logits are divided by it in every forward pass.
        max_consecutive_skips: Degenerate (NaN/inf) updates in a row before the run stops.
        seed: Seed of the minibatch shuffling (and of the real-text stream of ``ptx_coef``).
        ptx_coef: gamma of the pretraining-mix term gamma * L_LM(real text) added to every minibatch's loss
            (PPO-ptx, Ouyang et al. 2022); 0 (the default) leaves PPO as it is.
        ptx_data: Its real text: a built-in corpus (``corpus``, ``corpus:reviews``, ``corpus:arithmetic``)
            or a .txt (one document per line) or .jsonl (a ``text`` field per line) file.
        ptx_batch_size: Real-text documents per gradient step.
    """

    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    total_updates: int | None = None
    epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float | None = 1.0
    whiten_advantages: bool = True
    early_stop_kl: float | None = None
    temperature: float = 1.0
    max_consecutive_skips: int = 3
    seed: int = 0
    ptx_coef: float = 0.0
    ptx_data: str = "corpus"
    ptx_batch_size: int = 16

    def __post_init__(self) -> None:
        check_learning_rate(self.learning_rate, self.lr_schedule, self.total_updates)
        super().__post_init__()
        check_real_text(self.ptx_coef, self.ptx_data, self.ptx_batch_size, "ptx")
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ConfigError(f"epochs and num_minibatches must be >= 1, got {self.epochs}, {self.num_minibatches}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ConfigError(f"gamma and gae_lambda must be in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if self.clip_range <= 0 or self.value_clip_range <= 0:
            raise ConfigError(f"clip ranges must be > 0, got {self.clip_range}, {self.value_clip_range}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


BASELINES = ("ema", "rloo", "grpo")
KL_PENALTIES = ("reward", "loss")


@dataclasses.dataclass
class ReinforceConfig(Regularization):
    """REINFORCE hyper-parameters, and the :class:`Regularization` options (the KL where ``kl_penalty`` says).

    Attributes:
        learning_rate: AdamW learning rate (tuned on the built-in tiny model).
        lr_schedule: "constant" or "linear" decay to 0 over ``total_updates``.
        total_updates: Number of updates of the run (for the linear schedule).
        baseline: "ema", "rloo" or "grpo".
        group_size: Completions per prompt k (>= 2 for "rloo" and "grpo"; rows i*k .. i*k+k-1 share a prompt).
        baseline_decay: EMA decay of the moving-average baseline, b <- d * b + (1 - d) * mean(R).
        kl_penalty: "reward" (KL in the return) or "loss" (k3 KL term in the loss, as GRPO).
        max_grad_norm: Global gradient-norm clip.
        temperature: Sampling temperature; logits are divided by it in every forward pass.
        minibatch_size: Rows per forward/backward chunk (gradients accumulate; one optimizer step per
            rollout); None = the whole batch at once.
        max_consecutive_skips: Degenerate (NaN/inf) updates in a row before the run stops.
        seed: Seed of the real-text stream of ``ptx_coef``.
        ptx_coef, ptx_data, ptx_batch_size: The pretraining-mix term gamma * L_LM(real text) added to the
            update's loss, as :class:`PPOConfig`'s; 0 (the default) leaves the update as it is.
    """

    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    total_updates: int | None = None
    baseline: str = "ema"
    group_size: int = 1
    baseline_decay: float = 0.9
    kl_penalty: str = "reward"
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    minibatch_size: int | None = None
    max_consecutive_skips: int = 3
    seed: int = 0
    ptx_coef: float = 0.0
    ptx_data: str = "corpus"
    ptx_batch_size: int = 16

    def __post_init__(self) -> None:
        check_learning_rate(self.learning_rate, self.lr_schedule, self.total_updates)
        super().__post_init__()
        check_real_text(self.ptx_coef, self.ptx_data, self.ptx_batch_size, "ptx")
        if self.baseline not in BASELINES:
            raise ConfigError(f"unknown baseline {self.baseline!r}; known: {', '.join(BASELINES)}")
        if self.kl_penalty not in KL_PENALTIES:
            raise ConfigError(f"unknown kl_penalty {self.kl_penalty!r}; known: {', '.join(KL_PENALTIES)}")
        if self.baseline in ("rloo", "grpo") and self.group_size < 2:
            raise ConfigError(
                f"baseline {self.baseline!r} needs group_size >= 2 completions per prompt, got {self.group_size}"
            )
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ConfigError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


ConfigT = TypeVar("ConfigT")


def config_from_mapping(config_class: type[ConfigT], values: Mapping[str, Any], agent_name: str) -> ConfigT:
    """Build an agent config dataclass from a mapping, naming unknown keys and the known ones.

    Raises:
        ConfigError: On a key the config does not have, or a value its checks refuse.
    """
    known = {f.name for f in dataclasses.fields(config_class)}  # type: ignore[arg-type]
    check_option_names(config_class, values, agent_name)
    unknown = sorted(set(values) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown option(s) {', '.join(repr(k) for k in unknown)} for agent {agent_name!r}{hint}; "
            f"known: {', '.join(sorted(known))}"
        )
    return config_class(**dict(values))


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """What the trainer needs to know of an agent, without importing it.

    Attributes:
        name: The ``agent.name`` of a run config.
        config_class: The dataclass of its options (the ``agent:`` section).
        agent_class: ``"module:Class"`` of the agent, imported when a run builds it (it imports torch).
        preset: Options fixed by this name (``grpo`` is REINFORCE with ``baseline: grpo``, ...).
        needs_value_head: Whether the policy gets a value head (PPO's critic).
        description: One line for ``--help`` and errors.
    """

    name: str
    config_class: type
    agent_class: str
    preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs_value_head: bool = False
    description: str = ""

    @property
    def is_gradient_agent(self) -> bool:
        """Whether the agent takes gradient steps, and so has the :class:`Regularization` options."""
        return issubclass(self.config_class, Regularization)

    @property
    def default_group_size(self) -> int:
        """Completions per prompt unless ``budget.group_size`` says otherwise."""
        return int(self.preset.get("group_size", 1))


AGENTS: dict[str, AgentSpec] = {}


def register_agent(spec: AgentSpec) -> AgentSpec:
    """Add an agent to the registry: ``agent.name: NAME`` then builds it, with no change to the trainer.

    Raises:
        ConfigError: the name is taken.
    """
    if spec.name in AGENTS:
        raise ConfigError(f"an agent named {spec.name!r} is already registered ({AGENTS[spec.name].agent_class})")
    AGENTS[spec.name] = spec
    return spec


# RLOO and GRPO are REINFORCE with a group baseline, k = 4 completions per prompt unless the config says
# otherwise. GRPO puts the KL in the loss (Shao et al. 2024): in the reward, dividing by the group's std
# would blow the KL noise of a group whose scores are all equal up to unit-size advantages.
register_agent(AgentSpec("ppo", PPOConfig, "rlfb.agents.ppo:PPOAgent", needs_value_head=True,
                         description="token-level PPO with a value head and a KL penalty (Ziegler et al. 2019)"))
register_agent(AgentSpec("reinforce", ReinforceConfig, "rlfb.agents.reinforce:ReinforceAgent",
                         description="REINFORCE with a moving-average baseline (Williams 1992)"))
register_agent(AgentSpec("rloo", ReinforceConfig, "rlfb.agents.reinforce:ReinforceAgent",
                         preset={"baseline": "rloo", "group_size": 4},
                         description="REINFORCE, leave-one-out baseline over k samples (Ahmadian et al. 2024)"))
register_agent(AgentSpec("grpo", ReinforceConfig, "rlfb.agents.reinforce:ReinforceAgent",
                         preset={"baseline": "grpo", "group_size": 4, "kl_penalty": "loss"},
                         description="REINFORCE, group-normalised advantages, KL in the loss (Shao et al. 2024)"))


# ------------------------------------------------------------------------------- self-training
KEEP_RULES = ("threshold", "best_of_group", "top_fraction")


@dataclasses.dataclass
class SelfTrainingConfig(Regularization):
    """Self-training on its own best samples (ReST-EM, RAFT, expert iteration; rlfb/agents/self_training.py),
    and the :class:`Regularization` options (the KL a k3 term over the kept samples' model tokens; none by
    default).

    Attributes:
        learning_rate: AdamW learning rate of the LoRA parameters.
        lr_schedule: "constant" or "linear" decay to 0 over ``total_updates``.
        total_updates: Number of updates (iterations) of the run (for the linear schedule).
        group_size: Samples per prompt k (``budget.group_size``; rows i*k .. i*k+k-1 share a prompt).
        keep: Which samples become training targets: "threshold" (return >= ``keep_threshold``: ReST-EM's
            binary filter, expert iteration), "best_of_group" (the best of each prompt's k: RAFT) or
            "top_fraction" (the best ``keep_fraction`` of the batch).
        keep_threshold: Minimum return of a kept sample; required by "threshold", an extra floor for the
            other rules (None: no floor).
        keep_fraction: Share of the batch "top_fraction" keeps (rounded up, at least one row).
        lm_coef: lambda of L = lambda * L_LM(real text) + (1 - lambda) * L_pseudo(kept samples), in [0, 1).
        lm_data: The real text: a built-in corpus (``corpus``, ``corpus:reviews``, ``corpus:arithmetic``) or a
            .txt / .jsonl file (see :class:`PPOConfig`'s ``ptx_data``).
        lm_batch_size: Real-text documents per gradient step.
        epochs: Passes over the kept samples per update.
        minibatch_size: Kept rows per gradient step; None = all of them in one step per epoch.
        max_grad_norm: Global gradient-norm clip.
        max_consecutive_skips: Degenerate (NaN/inf) updates in a row before the run stops.
        seed: Seed of the minibatch shuffling and of the real-text stream.
    """

    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    total_updates: int | None = None
    group_size: int = 4
    keep: str = "best_of_group"
    keep_threshold: float | None = None
    keep_fraction: float = 0.25
    lm_coef: float = 0.0
    lm_data: str = "corpus"
    lm_batch_size: int = 16
    kl_coef: float = 0.0
    kl_target: float | None = None
    epochs: int = 1
    minibatch_size: int | None = None
    max_grad_norm: float | None = 1.0
    max_consecutive_skips: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_learning_rate(self.learning_rate, self.lr_schedule, self.total_updates)
        super().__post_init__()
        check_real_text(self.lm_coef, self.lm_data, self.lm_batch_size, "lm")
        if self.keep not in KEEP_RULES:
            raise ConfigError(f"unknown keep rule {self.keep!r}; known: {', '.join(KEEP_RULES)}")
        if self.keep == "threshold" and self.keep_threshold is None:
            raise ConfigError("keep 'threshold' needs keep_threshold (the minimum return of a kept sample), "
                              "e.g. keep_threshold: 1.0 for an exact-match reward")
        if self.keep == "best_of_group" and self.group_size < 2:
            raise ConfigError(f"keep 'best_of_group' needs group_size >= 2 samples per prompt, got {self.group_size}; "
                              "set budget.group_size")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ConfigError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if not 0.0 <= self.lm_coef < 1.0:
            raise ConfigError(f"lm_coef (lambda) must be in [0, 1), got {self.lm_coef}; at 1 the kept samples "
                              "would weigh nothing")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            raise ConfigError(f"minibatch_size must be >= 1 or null, got {self.minibatch_size}")


register_agent(AgentSpec("self_training", SelfTrainingConfig, "rlfb.agents.self_training:SelfTrainingAgent",
                         preset={"group_size": 4},
                         description="fine-tuning on its own best samples (ReST-EM, RAFT, expert iteration)"))


# ------------------------------------------------------------------------------- evolution strategies
ES_MODES = ("es", "genetic")
ES_OPTIMIZERS = ("adam", "sgd")
FITNESS_SHAPINGS = ("centered_ranks", "z_score", "none")


@dataclasses.dataclass
class ESConfig(KLPenalty):
    """Evolution-strategies hyper-parameters (rlfb/agents/es.py; docs/algorithms.md, "Evolution strategies"),
    and the :class:`KLPenalty` options: beta times each member's mean KL to the reference is taken off its
    fitness (none by default). ES takes no gradient steps, so it has no other regularization option.

    Attributes:
        mode: "es" (a gradient estimate from a population of Gaussian perturbations; Salimans et al. 2017)
            or "genetic" (truncation selection, crossover and mutation over LoRA vectors; Such et al. 2017).
        population_size: Members evaluated per update, each on its own batch of ``budget.num_envs``
            completions (30: Qiu et al. 2025). Even with ``antithetic``.
        sigma: Standard deviation of the perturbations of the LoRA vector (tuned; Qiu et al. 2025 used 1e-3
            on full parameters, LoRA on rlfb-tiny needs more: docs/algorithms.md).
        learning_rate: Step size of the update along the estimated gradient (tuned).
        optimizer: "adam" (Kingma & Ba 2015, as Salimans et al. 2017) or "sgd" (Qiu et al. 2025).
        fitness_shaping: "centered_ranks" (ranks mapped to [-0.5, 0.5], ties averaged; Salimans et al.
            2017), "z_score" (Qiu et al. 2025) or "none" (the mean-centred fitness).
        antithetic: Members come in pairs theta +- sigma * eps (mirrored sampling; Salimans et al. 2017).
        common_random_numbers: Every member of an update sees the same prompts and the same sampler noise,
            so fitness differences come from the perturbations, not from the draws.
        num_parents: ("genetic") Members kept by truncation selection, the parents of the next generation.
        crossover_rate: ("genetic") Share of children made by uniform crossover of two parents; the others
            copy one parent. Every child but the elite is then mutated by sigma * eps.
        temperature: Sampling temperature (``sampling.temperature``); the reference's logits are divided by
            it too when the KL penalty compares them with the sampled log-probs.
        seed: Seed of the perturbations and draws (the run's ``seed``).
    """

    mode: str = "es"
    population_size: int = 30
    sigma: float = 0.05
    learning_rate: float = 0.02
    optimizer: str = "adam"
    fitness_shaping: str = "centered_ranks"
    antithetic: bool = True
    common_random_numbers: bool = True
    num_parents: int = 6
    crossover_rate: float = 0.5
    temperature: float = 1.0
    seed: int = 0
    kl_coef: float = 0.0
    kl_target: float | None = None

    def __post_init__(self) -> None:
        for option, value, known in (("mode", self.mode, ES_MODES), ("optimizer", self.optimizer, ES_OPTIMIZERS),
                                     ("fitness_shaping", self.fitness_shaping, FITNESS_SHAPINGS)):
            if value not in known:
                raise ConfigError(f"unknown {option} {value!r}; known: {', '.join(known)}")
        if self.population_size < 2:
            raise ConfigError(f"population_size must be >= 2, got {self.population_size}")
        if self.mode == "es" and self.antithetic and self.population_size % 2:
            raise ConfigError(f"antithetic pairs need an even population_size, got {self.population_size}; "
                              "make it even or set antithetic: false")
        if self.sigma <= 0 or self.learning_rate <= 0:
            raise ConfigError(f"sigma and learning_rate must be > 0, got {self.sigma}, {self.learning_rate}")
        if self.mode == "genetic" and not 1 <= self.num_parents <= self.population_size:
            raise ConfigError(f"num_parents must be in [1, population_size={self.population_size}], "
                              f"got {self.num_parents}")
        if not 0.0 <= self.crossover_rate <= 1.0:
            raise ConfigError(f"crossover_rate must be in [0, 1], got {self.crossover_rate}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        super().__post_init__()


register_agent(AgentSpec("es", ESConfig, "rlfb.agents.es:ESAgent",
                         description="evolution strategies on the LoRA vector, no backprop (Salimans et al. 2017)"))
# ------------------------------------------------------------------------------- end of evolution strategies

# ------------------------------------------------------------------------------- on-policy distillation
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
TOKEN_ESTIMATES = ("full", "sampled")


@dataclasses.dataclass
class DistillationConfig(Regularization):
    """On-policy distillation hyper-parameters (rlfb/agents/distillation.py; docs/algorithms.md), and the
    :class:`Regularization` options (the KL to the reference a k3 term beside the divergence to the teacher,
    the entropy exact over the vocabulary; neither by default).

    Attributes:
        teacher: The teacher: a causal LM (built-in name, local directory or hub id) or a finished rlfb run
            directory (its adapter on its base model). It must share the student's tokenizer.
        divergence: Per-token divergence between the student's next-token distribution p_s and the
            teacher's p_t at every model token the student sampled: "reverse_kl" KL(p_s || p_t) (Gu et al.
            2024, MiniLLM; Agarwal et al. 2024, GKD), "forward_kl" KL(p_t || p_s), or "jsd", GKD's
            generalized Jensen-Shannon divergence JSD(beta) (Agarwal et al. 2024).
        jsd_beta: beta of JSD(beta) in [0, 1]; 0 is forward KL and 1 reverse KL (the limits of
            JSD(beta) / beta and JSD(beta) / (1 - beta), as TRL's GKDTrainer); 0.5 is the symmetric JSD.
        token_estimate: "full" sums the divergence over the whole vocabulary at each position (exact);
            "sampled" uses the one-sample estimate log p_s(y_t) - log p_t(y_t) at the sampled token as a
            per-token reward of a policy gradient (the k1 estimator; reverse KL only).
        learning_rate: AdamW learning rate of the LoRA parameters.
        lr_schedule: "constant" or "linear" decay to 0 over ``total_updates``.
        total_updates: Number of updates of the run (for the linear schedule).
        epochs: Gradient steps per rollout (the teacher is run once per rollout); 1 is strictly on-policy.
        temperature: Sampling temperature; student and teacher logits are both divided by it.
        minibatch_size: Rows per forward/backward chunk (gradients accumulate); None = the whole batch.
        max_grad_norm: Global gradient-norm clip.
        max_consecutive_skips: Degenerate (NaN/inf) updates in a row before the run stops.
    """

    teacher: str = ""
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    token_estimate: str = "full"
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    total_updates: int | None = None
    epochs: int = 1
    temperature: float = 1.0
    minibatch_size: int | None = None
    max_grad_norm: float | None = 1.0
    max_consecutive_skips: int = 3
    kl_coef: float = 0.0
    kl_target: float | None = None

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ConfigError("agent 'distillation' needs 'teacher': a causal LM (name or directory) or a finished "
                              "rlfb run directory, e.g. --set agent.teacher=runs/my_teacher_run")
        check_learning_rate(self.learning_rate, self.lr_schedule, self.total_updates)
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"unknown divergence {self.divergence!r}; known: {', '.join(DIVERGENCES)}")
        if self.token_estimate not in TOKEN_ESTIMATES:
            raise ConfigError(f"unknown token_estimate {self.token_estimate!r}; known: {', '.join(TOKEN_ESTIMATES)}")
        if self.token_estimate == "sampled" and self.divergence != "reverse_kl":
            raise ConfigError(f"token_estimate 'sampled' estimates the reverse KL only; got divergence "
                              f"{self.divergence!r}: use token_estimate 'full' or divergence 'reverse_kl'")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ConfigError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            raise ConfigError(f"minibatch_size must be >= 1 or null, got {self.minibatch_size}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        check_teacher_path(self.teacher)
        super().__post_init__()  # last: a KL setting carried over from another agent's config file comes after


def check_teacher_path(teacher: str) -> None:
    """Raise ConfigError when ``teacher`` is written as a file system path that does not exist."""
    from pathlib import Path

    from rlfb.models.loading import BUILTIN_MODELS, looks_like_path

    if teacher not in BUILTIN_MODELS and looks_like_path(teacher) and not Path(teacher).expanduser().exists():
        raise ConfigError(f"teacher {teacher!r} does not exist; give a causal LM directory, a model name or a "
                          "finished rlfb run directory (python benchmarks/distillation.py --teacher-only builds one)")


register_agent(AgentSpec("distillation", DistillationConfig, "rlfb.agents.distillation:DistillationAgent",
                         description="on-policy distillation: per-token reverse KL or JSD to a teacher "
                                     "(Agarwal et al. 2024; Gu et al. 2024)"))

AgentConfig = PPOConfig | ReinforceConfig | SelfTrainingConfig | ESConfig | DistillationConfig


def agent_spec(name: str) -> AgentSpec:
    """The registered agent ``name``.

    Raises:
        ConfigError: naming the known agents.
    """
    check_agent_name(name)
    return AGENTS[name]


def agent_config_class(name: str) -> type[AgentConfig]:
    """The config dataclass whose fields are the options of agent ``name``."""
    return agent_spec(name).config_class


def check_agent_name(name: str) -> None:
    """Raise ConfigError naming the known agents unless ``name`` is one."""
    if name not in AGENTS:
        raise ConfigError(f"unknown agent {name!r}; known: {', '.join(AGENTS)}")


def agent_config(name: str, options: Mapping[str, Any] | None = None) -> AgentConfig:
    """The config of agent ``name``: its preset, then ``options`` over it, checked.

    Raises:
        ConfigError: On an unknown agent, an unknown option, a value out of range, or an option that
            contradicts the preset (``baseline`` of ``rloo`` or ``grpo``).
    """
    check_agent_name(name)
    merged = dict(AGENTS[name].preset)
    for key, value in (options or {}).items():
        if key == "baseline" and key in merged and value != merged[key]:
            raise ConfigError(f"agent {name!r} uses baseline {merged[key]!r}; got baseline={value!r}")
        merged[key] = value
    return config_from_mapping(agent_config_class(name), merged, name)


@dataclasses.dataclass(frozen=True)
class RunAgent:
    """The agent a run config asks for, checked: its name, options and completions per prompt.

    Attributes:
        name: A key of :data:`AGENTS`.
        options: The ``agent:`` options plus what the run config decides for the agent (``temperature``
            from ``sampling``, ``total_updates`` from ``budget``, ``seed``, ``group_size``).
        group_size: Completions per prompt (``budget.group_size``, else the preset's, else 1).
    """

    name: str
    options: dict[str, Any]
    group_size: int


# Agent options that other sections of the run config decide: option -> the key that sets it.
DECIDED_BY_RUN = {"temperature": "sampling.temperature", "total_updates": "budget.updates",
                  "group_size": "budget.group_size", "seed": "seed"}


def run_agent(config: RunConfig) -> RunAgent:
    """Check the agent of a run config and resolve its options, without importing torch.

    Raises:
        ConfigError: an unknown agent or option, a value the agent refuses, an option that contradicts
            the key of the run config deciding it, or ``budget.num_envs`` not a multiple of the group size.
    """
    from rlfb.config import check_section

    name = config.agent.name
    if name not in AGENTS:
        raise ConfigError(f"unknown agent '{name}' in agent.name; known: {', '.join(AGENTS)}")
    group_size = config.budget.group_size or AGENTS[name].default_group_size
    if config.budget.num_envs % group_size:
        raise ConfigError(f"'budget.num_envs' is {config.budget.num_envs}; it must be a multiple of the "
                          f"group size {group_size} of agent '{name}'")
    config_class = agent_config_class(name)
    check_option_names(config_class, config.agent.params, name)
    if config.lora.dropout and not AGENTS[name].is_gradient_agent:
        raise ConfigError(f"'lora.dropout' is {config.lora.dropout} but agent '{name}' takes no gradient steps, "
                          "and LoRA dropout acts in gradient passes only; set lora.dropout: 0")
    options = check_section(config_class, dict(config.agent.params), "agent")
    decided = {"temperature": config.sampling.temperature, "total_updates": config.budget.updates,
               "seed": config.seed}
    decided["group_size"] = group_size  # for agents whose config has the option
    known = {field.name for field in dataclasses.fields(config_class)}
    for key, value in decided.items():
        if key not in known:
            continue
        if key in options and options[key] != value and key != "seed":
            raise ConfigError(f"'agent.{key}' is {options[key]!r} but '{DECIDED_BY_RUN[key]}' is {value!r}; "
                              f"set only '{DECIDED_BY_RUN[key]}'")
        options.setdefault(key, value)
    try:
        agent_config(name, options)  # the agent's own checks (ranges, baseline names, ...)
    except ConfigError as error:
        raise ConfigError(f"agent ({name}): {error}") from None
    return RunAgent(name, options, group_size)


# Agents whose update reduces what is batch-wide over the ranks (rlfb/distributed.py), and those whose
# ranks split the population instead (each rank evaluates population_size / W members on full batches and
# the ranks exchange fitness values only): the others refuse several ranks. REINFORCE's presets rloo and
# grpo are REINFORCE.
DATA_PARALLEL_AGENTS = ("ppo", "reinforce", "rloo", "grpo")
POPULATION_AGENTS = ("es",)
DISTRIBUTED_AGENTS = DATA_PARALLEL_AGENTS + POPULATION_AGENTS


def check_world_size(config: RunConfig, world_size: int) -> None:
    """Check that a run can train data-parallel on ``world_size`` ranks (nothing to check for one), torch-free.

    ``budget.num_envs`` is the global batch B: each rank collects B / world_size rows, whole groups of the
    group size (a group never spans ranks). ES splits its population instead: ``population_size`` must be
    a multiple of ``world_size``, and members are evaluated on common random numbers (what a member draws
    then depends on its index alone, not on the rank that evaluates it).

    Raises:
        ConfigError: an agent, a multi-turn env or reward normalization that does not support several
            ranks yet, a batch that does not split into whole groups per rank, or a population that does
            not split over the ranks.
    """
    if world_size <= 1:
        return
    name = config.agent.name
    if name not in DISTRIBUTED_AGENTS:
        raise ConfigError(f"agent {name} does not support several ranks yet (WORLD_SIZE={world_size}); "
                          f"train it in one process, or use one of {', '.join(DISTRIBUTED_AGENTS)}")
    if config.env.kind == "multi_turn":
        raise ConfigError(f"env.kind multi_turn does not support several ranks yet (WORLD_SIZE={world_size}); "
                          "train multi-turn runs in one process")
    if config.reward_scale.normalize:
        raise ConfigError(f"reward_scale.normalize does not support several ranks yet (WORLD_SIZE={world_size}: "
                          "its running statistics would differ per rank); set reward_scale.normalize: false")
    if name in POPULATION_AGENTS:
        check_population_split(config.agent.params, world_size)
        return
    group_size = config.budget.group_size or AGENTS[name].default_group_size
    batch = config.budget.num_envs
    if batch % (world_size * group_size):
        raise ConfigError(f"'budget.num_envs' is {batch}, the global batch; with WORLD_SIZE={world_size} ranks and "
                          f"group size {group_size} it must be a multiple of {world_size * group_size} (each rank "
                          "collects whole groups)")


def check_population_split(params: Mapping[str, Any], world_size: int) -> None:
    """ES on ``world_size`` ranks: the population splits evenly, and its members share their draws.

    Raises:
        ConfigError: ``population_size`` not a multiple of the ranks, or ``common_random_numbers`` off.
    """
    population = params.get("population_size", ESConfig.population_size)
    if population % world_size:
        raise ConfigError(f"'agent.population_size' is {population}; with WORLD_SIZE={world_size} ranks it must be "
                          f"a multiple of {world_size} (each rank evaluates population_size / {world_size} members)")
    if not params.get("common_random_numbers", ESConfig.common_random_numbers):
        raise ConfigError(f"agent es on several ranks (WORLD_SIZE={world_size}) needs common_random_numbers: true "
                          "(a member's draws then depend on its index, not on the rank evaluating it); set it, "
                          "or train in one process")
