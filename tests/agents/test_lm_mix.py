"""The real-text LM term: its documents, its seeded batches, its loss, and the ptx option of PPO and REINFORCE."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EOS, contains_token, sample_rollout, tiny_policy

from rlfb.agents import make_agent
from rlfb.agents.configs import agent_config
from rlfb.agents.lm_mix import RealTextBatches, language_model_loss, real_text_documents
from rlfb.errors import ConfigError, DatasetError
from rlfb.models import corpus

DOCUMENTS = ["1234", "56", "789012345", "3", "44", "9876"]


class DigitTokenizer:
    """Each digit d is token 1 + d (the tiny test policies have 16 tokens; 0 is end-of-text)."""

    eos_token_id = EOS

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[1 + int(digit) for digit in text] for text in texts]}


def real_text_file(tmp_path: Path) -> str:
    path = tmp_path / "digits.txt"
    path.write_text("\n".join(DOCUMENTS) + "\n\n")
    return str(path)


def digit_policy(seed: int, value_head: bool) -> Any:
    policy = tiny_policy(seed=seed, value_head=value_head)
    policy.tokenizer = DigitTokenizer()
    return policy


# ------------------------------------------------------------------------------- documents
def test_builtin_corpus_is_the_pretraining_mix_and_its_kinds_split_it() -> None:
    everything = real_text_documents("corpus")
    reviews, sums = real_text_documents("corpus:reviews"), real_text_documents("corpus:arithmetic")
    assert len(reviews) + len(sums) == len(everything)
    assert not any(corpus.is_arithmetic(text) for text in reviews) and all(corpus.is_arithmetic(t) for t in sums)
    assert len(sums) / len(everything) == pytest.approx(0.7, abs=0.001)  # rlfb-tiny's recipe: 70% sums
    with pytest.raises(ConfigError, match="unknown built-in real text 'corpus:poems'; known: corpus, "):
        real_text_documents("corpus:poems")


def test_files_give_one_document_per_line_and_bad_json_lines_are_named(tmp_path: Path) -> None:
    assert real_text_documents(real_text_file(tmp_path)) == tuple(DOCUMENTS)  # blank lines skipped
    good = tmp_path / "texts.jsonl"
    good.write_text('{"text": "a b"}\n\n{"text": "c", "id": 2}\n')
    assert real_text_documents(str(good)) == ("a b", "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl', line 2: each line must be an object with a string field"):
        real_text_documents(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DatasetError, match="holds no document"):
        real_text_documents(str(empty))


# ------------------------------------------------------------------------------- batches
def test_batches_are_seeded_encoded_as_in_pretraining_and_resume_exactly() -> None:
    stream = RealTextBatches(DOCUMENTS, DigitTokenizer(), batch_size=5, seed=3, max_tokens=6)
    input_ids, attention_mask = stream.next_batch()
    drawn = torch.randint(len(DOCUMENTS), (5,), generator=torch.Generator().manual_seed(3)).tolist()
    for row, index in enumerate(drawn):
        expected = [1 + int(digit) for digit in DOCUMENTS[index]][:5] + [EOS]  # truncated, then end-of-text
        length = int(attention_mask[row].sum())
        assert input_ids[row, :length].tolist() == expected
        assert attention_mask[row, length:].sum() == 0  # right padding only
    saved = stream.state_dict()
    following = stream.next_batch()
    resumed = RealTextBatches(DOCUMENTS, DigitTokenizer(), batch_size=5, seed=99, max_tokens=6)
    resumed.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), following, strict=True))


def test_language_model_loss_is_the_token_mean_nll_of_real_tokens_after_the_first() -> None:
    policy = tiny_policy(seed=4, value_head=False)
    input_ids = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(2):  # one unpadded sequence at a time: the oracle
            length = int(attention_mask[row].sum())
            logits = policy.model(input_ids=input_ids[row : row + 1, :length]).logits[0]
            for t in range(1, length):
                total -= float(torch.log_softmax(logits[t - 1], -1)[input_ids[row, t]])
                count += 1
        loss = language_model_loss(policy, input_ids, attention_mask)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


# ------------------------------------------------------------------------------- the ptx option
def first_step_gradients(agent: Any, rollout: Any) -> tuple[list[torch.Tensor], dict[str, float]]:
    """``agent.update(rollout)``'s metrics, and the gradients its first optimizer step saw."""
    captured: list[list[torch.Tensor]] = []
    step = agent.stepper.step

    def capturing_step(riders: torch.Tensor | None = None) -> bool:
        captured.append([p.grad.clone() for p in agent.stepper.parameters])
        return step(riders)

    agent.stepper.step = capturing_step
    metrics = agent.update(rollout)
    return captured[0], metrics


@pytest.mark.parametrize(("agent_name", "options"), [("ppo", {"num_minibatches": 1, "epochs": 1}), ("grpo", {})])
def test_ptx_adds_gamma_times_the_real_text_gradient_and_nothing_at_zero(
        agent_name: str, options: dict[str, Any], tmp_path: Path) -> None:
    source = real_text_file(tmp_path)
    base_options = {"learning_rate": 1e-2, "group_size": 4, **options} if agent_name == "grpo" else \
        {"learning_rate": 1e-2, **options}

    def gradients(ptx_coef: float) -> list[torch.Tensor]:
        policy = digit_policy(seed=5, value_head=agent_name == "ppo")
        agent = make_agent(agent_name, policy, {**base_options, "ptx_coef": ptx_coef, "ptx_data": source,
                                                "ptx_batch_size": 3, "seed": 7})
        assert (agent.real_text is None) == (ptx_coef == 0)  # at 0 no stream is even built
        rollout = sample_rollout(policy, contains_token(5), 8, torch.Generator().manual_seed(0), group_size=4)
        return first_step_gradients(agent, rollout)[0]

    without, with_ptx = gradients(0.0), gradients(0.5)
    # The oracle: the gradient of 0.5 * L_LM on the stream's first batch (same seed), alone.
    policy = digit_policy(seed=5, value_head=agent_name == "ppo")
    batch = RealTextBatches(DOCUMENTS, DigitTokenizer(), batch_size=3, seed=7, max_tokens=32).next_batch()
    (0.5 * language_model_loss(policy, *batch)).backward()
    parameters = make_agent(agent_name, policy, base_options).stepper.parameters
    lm_gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    assert sum(float(g.abs().sum()) for g in lm_gradients) > 0
    for plain, mixed, lm in zip(without, with_ptx, lm_gradients, strict=True):
        torch.testing.assert_close(mixed - plain, lm, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("agent_name", ["ppo", "reinforce"])
def test_ptx_loss_is_logged_only_when_on_and_the_stream_resumes(agent_name: str, tmp_path: Path) -> None:
    options = {"learning_rate": 1e-2, "ptx_coef": 0.3, "ptx_data": real_text_file(tmp_path), "ptx_batch_size": 2}
    policy = digit_policy(seed=6, value_head=agent_name == "ppo")
    agent = make_agent(agent_name, policy, options)
    generator = torch.Generator().manual_seed(1)
    metrics = agent.update(sample_rollout(policy, contains_token(5), 8, generator))
    assert metrics["train/ptx_loss"] > 0
    off = make_agent(agent_name, digit_policy(seed=6, value_head=agent_name == "ppo"), {"learning_rate": 1e-2})
    assert "train/ptx_loss" not in off.update(sample_rollout(off.policy, contains_token(5), 8, generator))

    saved = copy.deepcopy(agent.state_dict())  # Adam's moments are tensors the next update changes in place
    next_rollout = sample_rollout(policy, contains_token(5), 8, generator)
    resumed_policy = digit_policy(seed=99, value_head=agent_name == "ppo")
    resumed_policy.model.load_state_dict(policy.model.state_dict())
    if policy.value_head is not None:
        resumed_policy.value_head.load_state_dict(policy.value_head.state_dict())
    resumed = make_agent(agent_name, resumed_policy, options)
    resumed.load_state_dict(saved)
    assert resumed.update(next_rollout) == agent.update(next_rollout)


def test_ptx_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ptx_coef must be >= 0, got -0.1"):
        agent_config("ppo", {"ptx_coef": -0.1})
    with pytest.raises(ConfigError, match="ptx_data 'poems.docx' is neither a built-in corpus"):
        agent_config("grpo", {"ptx_coef": 0.1, "ptx_data": "poems.docx"})
    with pytest.raises(ConfigError, match="ptx_data file 'missing.txt' does not exist"):
        agent_config("reinforce", {"ptx_coef": 0.1, "ptx_data": "missing.txt"})
    assert agent_config("ppo", {"ptx_coef": 0.1, "ptx_data": real_text_file(tmp_path)}).ptx_coef == 0.1
