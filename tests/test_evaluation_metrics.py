"""evaluate_policy's measures against a naive oracle: greedy completions decoded one prompt at a time with
plain forward passes, KL and fluency summed per row, rewards called directly, distinct-n by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from wiring_helpers import eos_prone_copy, move_adapter

from rlfb.envs.tasks import make_task
from rlfb.evaluation import distinct_n, evaluate_policy
from rlfb.models.policy import LoraSettings, Policy
from rlfb.models.sampler import SamplingConfig
from rlfb.rewards import RewardSet, RewardSpec

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Policy:
    """The tiny model (EOS-prone, so lengths differ) with a moved adapter: policy != reference."""
    model_dir = eos_prone_copy(tiny_model_dir, tmp_path_factory.mktemp("eos-prone"), scale=300.0)
    torch.manual_seed(0)  # LoRA's A matrices come from torch's global RNG: the same policy in any test order
    policy = Policy.from_pretrained(str(model_dir), lora=LoraSettings(r=4, alpha=8), value_head=False, device="cpu")
    move_adapter(policy.model, scale=0.3)
    return policy


def rows(count: int = 6) -> list[dict]:
    return list(make_task("sentiment").eval_rows())[:count]


def rewards() -> RewardSet:
    return RewardSet([RewardSpec(name="regex", kwargs={"pattern": "[aeiou]"}, weight=2.0, label="vowel"),
                      RewardSpec(name="length", kwargs={"target": 3}, weight=0.5)])


def naive_greedy(policy: Policy, prompt: str) -> tuple[list[int], list[float], list[float]]:
    """Greedy completion of one unpadded prompt, with its policy and reference log-probs per token."""
    tokenizer = policy.tokenizer
    ids = tokenizer(prompt)["input_ids"]
    completion, policy_logprobs, reference_logprobs = [], [], []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            context = torch.tensor([ids + completion])
            logits = policy.model(context).logits[0, -1].float()
            with policy.reference():
                reference_logits = policy.model(context).logits[0, -1].float()
            token = int(logits.argmax())
            completion.append(token)
            policy_logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            reference_logprobs.append(float(torch.log_softmax(reference_logits, -1)[token]))
            if token == tokenizer.eos_token_id:
                break
    return completion, policy_logprobs, reference_logprobs


def naive_distinct(texts: list[str], n: int) -> float:
    grams = []
    for text in texts:
        words = re.findall(r"\w+(?:'\w+)?|[^\w\s]", text.lower())
        grams += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def test_every_measure_matches_a_row_by_row_oracle(policy: Policy) -> None:
    held_out = rows()
    sampling = SamplingConfig(top_k=1, max_new_tokens=MAX_NEW_TOKENS)  # greedy: the oracle can replay it
    result = evaluate_policy(policy, held_out, rewards(), sampling, seed=0, num_samples=len(held_out))
    oracle = [naive_greedy(policy, row["prompt"]) for row in held_out]
    lengths = [len(ids) for ids, _, _ in oracle]
    assert len(set(lengths)) > 1  # some completions end with EOS, others at max_new_tokens
    texts = [policy.tokenizer.decode(ids, skip_special_tokens=True) for ids, _, _ in oracle]
    assert [sample["completion"] for sample in result.samples] == texts
    kl = [sum(p) - sum(r) for _, p, r in oracle]  # nats per completion
    reference_tokens = [value for _, _, r in oracle for value in r]
    assert result.kl == pytest.approx(sum(kl) / len(kl), rel=1e-3, abs=1e-4)
    assert abs(result.kl) > 0.05
    assert result.fluency == pytest.approx(sum(reference_tokens) / len(reference_tokens), rel=1e-4)
    assert result.completion_length == pytest.approx(sum(lengths) / len(lengths))
    prompts = [row["prompt"] for row in held_out]
    vowel = [1.0 if re.search("[aeiou]", text) else 0.0 for text in texts]
    length = [-abs(n - 3) / 3 for n in lengths]
    assert result.rewards["vowel"] == pytest.approx(sum(vowel) / len(vowel))
    assert result.rewards["length"] == pytest.approx(sum(length) / len(length))
    assert result.rewards["total"] == pytest.approx(sum(2 * v + 0.5 * n for v, n in zip(vowel, length, strict=True)) / len(texts))
    assert [s["prompt"] for s in result.samples] == prompts
    assert result.distinct_1 == pytest.approx(naive_distinct(texts, 1))
    assert result.distinct_2 == pytest.approx(naive_distinct(texts, 2))
    assert result.distinct_1 != result.distinct_2


def test_the_seed_decides_the_samples(policy: Policy) -> None:
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS)

    def completions(seed: int) -> list[str]:
        result = evaluate_policy(policy, rows(), rewards(), sampling, seed=seed, num_samples=6)
        return [sample["completion"] for sample in result.samples]

    assert completions(5) == completions(5)
    assert completions(5) != completions(6)


def test_distinct_n_counts_lowercased_word_ngrams() -> None:
    assert distinct_n(["The film", "the film"], 1) == 0.5  # {the, film} of 4 unigrams
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # {a b, b c, b d} of 4 bigrams
    assert distinct_n(["a b", "a b"], 3) == 0.0
