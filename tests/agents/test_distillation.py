"""On-policy distillation: the divergences against hand computations, the mask, the teacher, resume."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import EOS, VOCAB_SIZE, sample_rollout, tiny_policy

from rlfb.agents import make_agent
from rlfb.agents.configs import DistillationConfig, agent_config
from rlfb.agents.distillation import (
    DistillationAgent,
    completion_log_distributions,
    generalized_jsd,
    token_divergence,
)
from rlfb.agents.trajectory import build_rollout
from rlfb.errors import ConfigError
from rlfb.models.teacher import check_same_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_run_checks import CONFIG, assert_one_line_errors_before_torch  # noqa: E402


def naive_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_v p_v log(p_v / q_v), one term at a time."""
    return sum(p_v * math.log(p_v / q_v) for p_v, q_v in zip(p, q, strict=True))


def log(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).log()


P_STUDENT = [0.7, 0.2, 0.1]
P_TEACHER = [0.2, 0.5, 0.3]


def test_reverse_and_forward_kl_match_a_term_by_term_computation() -> None:
    student, teacher = log(P_STUDENT), log(P_TEACHER)
    # 0.7 ln(3.5) + 0.2 ln(0.4) + 0.1 ln(1/3) = 0.87693 - 0.18326 - 0.10986 = 0.58381
    assert float(token_divergence(student, teacher, "reverse_kl")) == pytest.approx(naive_kl(P_STUDENT, P_TEACHER))
    assert float(token_divergence(student, teacher, "reverse_kl")) == pytest.approx(0.58381, abs=1e-5)
    assert float(token_divergence(student, teacher, "forward_kl")) == pytest.approx(naive_kl(P_TEACHER, P_STUDENT))


def test_jsd_at_one_half_is_the_symmetric_jensen_shannon_divergence() -> None:
    mixture = [(s + t) / 2 for s, t in zip(P_STUDENT, P_TEACHER, strict=True)]
    expected = 0.5 * naive_kl(P_TEACHER, mixture) + 0.5 * naive_kl(P_STUDENT, mixture)
    assert float(generalized_jsd(log(P_STUDENT), log(P_TEACHER), 0.5)) == pytest.approx(expected)
    assert expected < math.log(2)


def test_jsd_with_an_uneven_beta_weights_the_teacher_by_beta() -> None:
    beta = 0.2
    mixture = [beta * t + (1 - beta) * s for s, t in zip(P_STUDENT, P_TEACHER, strict=True)]
    expected = beta * naive_kl(P_TEACHER, mixture) + (1 - beta) * naive_kl(P_STUDENT, mixture)
    assert float(generalized_jsd(log(P_STUDENT), log(P_TEACHER), beta)) == pytest.approx(expected)


def test_jsd_limits_are_the_forward_and_the_reverse_kl() -> None:
    student, teacher = log(P_STUDENT), log(P_TEACHER)
    forward, reverse = naive_kl(P_TEACHER, P_STUDENT), naive_kl(P_STUDENT, P_TEACHER)
    # GKD: JSD(beta) / beta -> KL(p_t || p_s) as beta -> 0, JSD(beta) / (1 - beta) -> KL(p_s || p_t) as beta -> 1
    small = 1e-6
    assert float(generalized_jsd(student, teacher, small)) / small == pytest.approx(forward, rel=1e-4)
    assert float(generalized_jsd(student, teacher, 1 - small)) / small == pytest.approx(reverse, rel=1e-4)
    assert float(generalized_jsd(student, teacher, 0.0)) == pytest.approx(forward)
    assert float(generalized_jsd(student, teacher, 1.0)) == pytest.approx(reverse)


def two_tiny_models() -> tuple[object, object]:
    """A student policy and a different frozen teacher model over the same 16-token vocabulary."""
    student = tiny_policy(seed=0, value_head=False)
    teacher = tiny_policy(seed=1, value_head=False).model.merge_and_unload()
    return student, teacher


def multi_turn_rollout():
    """Two episodes: one with an environment reply between two model turns, one single-turn."""
    return build_rollout(
        prompt_ids=[[3, 4], [5]],
        segments=[[([1, 2], True), ([7, 8, 9], False), ([3], True)], [([4, 6, 2, 1], True)]],
        scores=[0.0, 0.0], pad_token_id=EOS,
    )


def test_the_logged_divergence_is_the_mean_kl_over_model_tokens_of_an_independent_forward_pass() -> None:
    student, teacher = two_tiny_models()
    rollout = multi_turn_rollout()
    expected_terms = []
    with torch.no_grad():
        for row in range(rollout.batch_size):  # one unpadded sequence at a time, every position by hand
            prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
            completion = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
            sequence = torch.cat([prompt, completion]).unsqueeze(0)
            student_logits = student.model(input_ids=sequence).logits[0].double()
            teacher_logits = teacher(input_ids=sequence).logits[0].double()
            for t in range(len(completion)):
                if rollout.action_mask[row, t]:
                    position = len(prompt) - 1 + t  # the logits that predict completion token t
                    p = torch.softmax(student_logits[position], -1).tolist()
                    q = torch.softmax(teacher_logits[position], -1).tolist()
                    expected_terms.append(naive_kl(p, q))
    agent = DistillationAgent(student, DistillationConfig(teacher="in-memory"), teacher=(teacher, None))
    metrics = agent.update(rollout)
    assert len(expected_terms) == 7  # 3 model tokens + 4; the 3 environment tokens are no action
    assert metrics["train/divergence"] == pytest.approx(sum(expected_terms) / len(expected_terms), rel=1e-5)
    assert metrics["train/reverse_kl"] == metrics["train/divergence"]


def test_the_loss_ignores_environment_tokens_and_padding() -> None:
    student, teacher = two_tiny_models()
    rollout = multi_turn_rollout()
    agent = DistillationAgent(student, DistillationConfig(teacher="in-memory"), teacher=(teacher, None))
    teacher_log_probs = agent.teacher_log_distributions(rollout)
    student_log_probs = agent.student_log_distributions(rollout)
    terms = agent.loss_terms(student_log_probs, teacher_log_probs, rollout)
    not_actions = ~rollout.action_mask.bool()
    assert bool((terms[not_actions] == 0).all()) and bool((terms[~not_actions] > 0).all())
    # A teacher that disagrees wildly wherever the model did not act changes nothing.
    scrambled = teacher_log_probs.clone()
    scrambled[not_actions] = torch.log_softmax(torch.randn(int(not_actions.sum()), VOCAB_SIZE) * 10, -1)
    assert torch.equal(agent.loss_terms(student_log_probs, scrambled, rollout), terms)


def test_a_student_equal_to_its_teacher_has_zero_loss_and_no_gradient() -> None:
    student = tiny_policy(seed=0, value_head=False)
    with torch.no_grad():  # a LoRA that is not the identity, so the teacher is not simply the base model
        for parameter in student.trainable_parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    rollout = sample_rollout(student, lambda ids, mask: torch.zeros(len(ids)), 8, torch.Generator().manual_seed(0))
    other_teacher = tiny_policy(seed=1, value_head=False).model
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        config = DistillationConfig(teacher="in-memory", divergence=divergence, learning_rate=1e-9)
        same = DistillationAgent(student, config, teacher=(copy.deepcopy(student.model), None)).update(rollout)
        other = DistillationAgent(student, config, teacher=(other_teacher, None)).update(rollout)
        # The same computation gives the same floats: D = 0 up to the rounding of the mixture (JSD), and so is the
        # gradient, p_s (1 - sum_v p_s) for the KLs.
        assert abs(same["train/divergence"]) < 1e-7 and same["train/grad_norm"] < 1e-6, divergence
        assert other["train/divergence"] > 0.05 and other["train/grad_norm"] > 1e-2, divergence


def test_the_sampled_estimate_has_the_exact_reverse_kl_gradient_in_expectation() -> None:
    student, teacher = two_tiny_models()
    # One completion token, every value of it: row v is the sample y = v from the same state.
    rollout = build_rollout(prompt_ids=[[3, 4]] * VOCAB_SIZE, segments=[[([v], True)] for v in range(VOCAB_SIZE)],
                            scores=[0.0] * VOCAB_SIZE, pad_token_id=EOS)
    parameters = student.trainable_parameters()

    def gradient(token_estimate: str) -> list[torch.Tensor]:
        agent = DistillationAgent(student, DistillationConfig(teacher="in-memory", token_estimate=token_estimate),
                                  teacher=(teacher, None))
        student_log_probs = agent.student_log_distributions(rollout)  # (V, 1, V), every row the same state
        terms = agent.loss_terms(student_log_probs, agent.teacher_log_distributions(rollout), rollout)[:, 0]
        if token_estimate == "sampled":  # E_{y ~ p_s}[term(y)]: weight sample y by p_s(y)
            loss = (student_log_probs[0, 0].exp().detach() * terms).sum()
        else:
            loss = terms[0]
        return torch.autograd.grad(loss, parameters)

    exact, sampled = gradient("full"), gradient("sampled")
    assert sum(float(g.abs().sum()) for g in exact) > 1e-3
    assert all(torch.allclose(e, s, atol=1e-6) for e, s in zip(exact, sampled, strict=True))


class _Tokenizer:
    def __init__(self, vocab: dict[str, int], eos_token_id: int = 0) -> None:
        self.vocab, self.eos_token_id = vocab, eos_token_id

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line() -> None:
    student, teacher = two_tiny_models()
    ours = _Tokenizer({f"t{i}": i for i in range(VOCAB_SIZE)})
    theirs = _Tokenizer({f"t{(i + 1) % VOCAB_SIZE}": i for i in range(VOCAB_SIZE)})
    check_same_tokenizer(ours, _Tokenizer(ours.get_vocab()), student.model, teacher, "same")  # accepted
    with pytest.raises(ConfigError, match=r"teacher 'other' has a different tokenizer .*16 of 16 tokens differ") as error:
        check_same_tokenizer(ours, theirs, student.model, teacher, "other")
    assert "\n" not in str(error.value)
    student.tokenizer = ours
    with pytest.raises(ConfigError, match="must use the student's tokenizer"):
        DistillationAgent(student, DistillationConfig(teacher="other"), teacher=(teacher, theirs))
    wider = tiny_policy(seed=1, value_head=False).model.merge_and_unload()
    wider.resize_token_embeddings(VOCAB_SIZE + 4)
    with pytest.raises(ConfigError, match="teacher 'wide' predicts 20 tokens, the student 16"):
        check_same_tokenizer(None, None, student.model, wider, "wide")


def test_a_resumed_agent_updates_exactly_as_an_uninterrupted_one() -> None:
    def rollouts() -> list:
        sampler = tiny_policy(seed=5, value_head=False)
        generator = torch.Generator().manual_seed(3)
        return [sample_rollout(sampler, lambda ids, mask: torch.zeros(len(ids)), 8, generator) for _ in range(3)]

    teacher = tiny_policy(seed=1, value_head=False).model.merge_and_unload()
    config = DistillationConfig(teacher="in-memory", learning_rate=1e-2, divergence="jsd")
    batches = rollouts()
    straight = tiny_policy(seed=0, value_head=False)
    agent = DistillationAgent(straight, config, teacher=(teacher, None))
    straight_metrics = [agent.update(batch) for batch in batches]

    first = tiny_policy(seed=0, value_head=False)
    interrupted = DistillationAgent(first, config, teacher=(teacher, None))
    resumed_metrics = [interrupted.update(batches[0])]
    weights = {name: value.clone() for name, value in first.model.state_dict().items() if "lora" in name}
    state = copy.deepcopy(interrupted.state_dict())
    second = tiny_policy(seed=0, value_head=False)
    with torch.no_grad():  # other adapter weights to start with: all must come from the checkpoint
        for parameter in second.trainable_parameters():
            parameter.normal_()
    missing = second.model.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys
    resumed = DistillationAgent(second, config, teacher=(teacher, None))
    resumed.load_state_dict(state)
    resumed_metrics += [resumed.update(batch) for batch in batches[1:]]
    assert resumed_metrics == straight_metrics
    for (name, value), other in zip(straight.model.state_dict().items(), second.model.state_dict().values(),
                                    strict=True):
        assert torch.equal(value, other), name


def test_make_agent_builds_the_distillation_agent_with_a_model_name_as_teacher() -> None:
    from rlfb.models.policy import Policy

    student = Policy.from_pretrained("rlfb-tiny", value_head=False, device="cpu")
    agent = make_agent("distillation", student, {"teacher": "rlfb-tiny"})
    assert isinstance(agent, DistillationAgent)
    rollout = build_rollout(prompt_ids=[[5, 6]], segments=[[([7, 8], True)]], scores=[0.0], pad_token_id=0)
    # The teacher is the base model, the student's LoRA starts at the identity: nothing to learn.
    assert agent.update(rollout)["train/divergence"] == pytest.approx(0.0, abs=1e-6)


def test_student_and_teacher_distributions_come_from_the_same_positions_as_the_policy_log_probs() -> None:
    student = tiny_policy(seed=0, value_head=False)
    rollout = multi_turn_rollout()
    log_probs = completion_log_distributions(student.model, rollout)  # (B, T, V)
    gathered = log_probs.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    policy_log_probs = student.forward_logprobs_values(rollout.input_ids, rollout.attention_mask,
                                                       rollout.completion_start, with_values=False).logprobs
    mask = rollout.completion_mask.bool()
    assert torch.allclose(gathered[mask], policy_log_probs[mask], atol=1e-6)


def test_config_checks_name_the_option() -> None:
    assert agent_config("distillation", {"teacher": "rlfb-tiny"}).divergence == "reverse_kl"
    with pytest.raises(ConfigError, match="unknown divergence 'kl'; known: reverse_kl, forward_kl, jsd"):
        DistillationConfig(teacher="rlfb-tiny", divergence="kl")
    with pytest.raises(ConfigError, match=r"jsd_beta must be in \[0, 1\], got 1.5"):
        DistillationConfig(teacher="rlfb-tiny", divergence="jsd", jsd_beta=1.5)


def test_distillation_config_mistakes_fail_in_one_line_before_torch_is_imported(tmp_path: Path) -> None:
    distill = ["--set", "agent.name=distillation"]
    cases = {
        "no teacher": (distill, "agent 'distillation' needs 'teacher'"),
        "missing teacher directory": ([*distill, "--set", "agent.teacher=./no_such_run"],
                                      "teacher './no_such_run' does not exist"),
        "unknown divergence": ([*distill, "--set", "agent.teacher=rlfb-tiny", "--set", "agent.divergence=kl"],
                               "unknown divergence 'kl'"),
        "sampled jsd": ([*distill, "--set", "agent.teacher=rlfb-tiny", "--set", "agent.divergence=jsd",
                         "--set", "agent.token_estimate=sampled"], "token_estimate 'sampled' estimates the reverse KL"),
        "beta out of range": ([*distill, "--set", "agent.teacher=rlfb-tiny", "--set", "agent.jsd_beta=-0.5"],
                              "jsd_beta must be in [0, 1], got -0.5"),
    }
    assert_one_line_errors_before_torch({case: (["train", str(CONFIG), *args], message)
                                         for case, (args, message) in cases.items()}, tmp_path)


def test_minibatches_accumulate_to_the_whole_batch_step_and_epochs_take_more_steps() -> None:
    rollout = sample_rollout(tiny_policy(seed=5, value_head=False), lambda ids, mask: torch.zeros(len(ids)), 8,
                             torch.Generator().manual_seed(4))
    teacher = tiny_policy(seed=1, value_head=False).model.merge_and_unload()

    def update(**options) -> tuple[dict, torch.Tensor]:
        student = tiny_policy(seed=0, value_head=False)
        metrics = DistillationAgent(student, DistillationConfig(teacher="in-memory", learning_rate=1e-2, **options),
                                    teacher=(teacher, None)).update(rollout)
        return metrics, torch.cat([p.detach().flatten() for p in student.trainable_parameters()])

    whole, whole_weights = update()
    chunked, chunked_weights = update(minibatch_size=3)
    assert chunked["train/divergence"] == pytest.approx(whole["train/divergence"], rel=1e-5)
    assert torch.allclose(chunked_weights, whole_weights, atol=1e-6)
    twice, twice_weights = update(epochs=2)
    assert twice["train/divergence"] == whole["train/divergence"]  # measured before the first step
    start = torch.cat([p.detach().flatten() for p in tiny_policy(seed=0, value_head=False).trainable_parameters()])
    assert (twice_weights - start).norm() > 1.5 * (whole_weights - start).norm()
