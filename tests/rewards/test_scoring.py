"""ModelScorer (reference through the disabled adapter) and the likelihood reward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlfb.rewards import RewardSet
from rlfb.rewards.scoring import LogProbScorer, ModelScorer

PROMPT_IDS = [[5, 6, 7], [8], []]
COMPLETION_IDS = [[9, 10], [11, 12, 13, 14], [15]]


@pytest.fixture()
def tiny_lm(tiny_base_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_base_model), AutoTokenizer.from_pretrained(tiny_base_model)


def manual_logprobs(model, prompt, completion):
    prompt = prompt or [model.config.bos_token_id]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    targets = ids[0, 1:]
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[len(prompt) - 1:]


def test_batched_scores_with_padding_match_one_at_a_time(tiny_lm):
    model, _ = tiny_lm
    scorer = ModelScorer(model, batch_size=2)
    assert isinstance(scorer, LogProbScorer)
    batched = scorer.completion_logprobs(PROMPT_IDS, COMPLETION_IDS, reference=True)
    for values, prompt, completion in zip(batched, PROMPT_IDS, COMPLETION_IDS, strict=True):
        assert values.shape == (len(completion),)
        torch.testing.assert_close(values, manual_logprobs(model, prompt, completion), atol=1e-5, rtol=1e-5)


def test_scoring_restores_training_mode_and_builds_no_graph(tiny_lm):
    model, _ = tiny_lm
    model.train()
    values = ModelScorer(model).completion_logprobs(PROMPT_IDS, COMPLETION_IDS, reference=False)
    assert model.training
    assert not values[0].requires_grad


def test_reference_disables_the_lora_adapter(tiny_lm):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_lm
    base_values = [manual_logprobs(model, p, c) for p, c in zip(PROMPT_IDS, COMPLETION_IDS, strict=True)]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    with torch.no_grad():  # make the adapter do something (lora_B starts at zero)
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    scorer = ModelScorer(peft_model)
    reference = scorer.completion_logprobs(PROMPT_IDS, COMPLETION_IDS, reference=True)
    policy = scorer.completion_logprobs(PROMPT_IDS, COMPLETION_IDS, reference=False)
    for base, ref, own in zip(base_values, reference, policy, strict=True):
        torch.testing.assert_close(ref, base, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(own, base, atol=1e-3)


def test_likelihood_reward_mean_sum_and_dense(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = ["The film was", "17+25="]
    completions = [" great.", "42"]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    rewards = RewardSet([{"name": "likelihood", "label": "mean"},
                         {"name": "likelihood", "label": "sum", "kwargs": {"reduction": "sum"}, "weight": 0.0},
                         {"name": "likelihood", "label": "dense", "kwargs": {"per_token": True}}])
    assert rewards.needs_scorer
    rewards.bind_scorer(ModelScorer(model, tokenizer))
    result = rewards(prompts, completions, completion_ids=completion_ids)
    expected = [manual_logprobs(model, tokenizer(p)["input_ids"], ids).double().numpy()
                for p, ids in zip(prompts, completion_ids, strict=True)]
    np.testing.assert_allclose(result.components["mean"], [values.mean() for values in expected], rtol=1e-5)
    np.testing.assert_allclose(result.components["sum"], [values.sum() for values in expected], rtol=1e-5)
    for per_token, values in zip(result.per_token, expected, strict=True):
        np.testing.assert_allclose(per_token, values, rtol=1e-5)
    np.testing.assert_allclose(result.total, result.components["mean"])


def test_likelihood_uses_given_prompt_ids_and_leaves_empty_completions_out(tiny_lm):
    model, _ = tiny_lm
    rewards = RewardSet(["likelihood", {"name": "length", "kwargs": {"target": 1}}])
    rewards.bind_scorer(ModelScorer(model))  # no tokenizer: prompt_ids must come with the batch
    result = rewards(["a", "b"], ["c", ""], completion_ids=[[9], []], prompt_ids=[[5], [6]])
    assert np.isnan(result.components["likelihood"][1])
    assert result.components["likelihood"][0] < 0


def test_likelihood_loads_its_own_frozen_model(tiny_base_model, tiny_lm):
    model, tokenizer = tiny_lm
    standalone = RewardSet([{"name": "likelihood", "kwargs": {"model": tiny_base_model, "device": "cpu"}}])
    assert not standalone.needs_scorer
    ids = tokenizer(" great.", add_special_tokens=False)["input_ids"]
    result = standalone(["The film was"], [" great."], completion_ids=[ids])
    expected = manual_logprobs(model, tokenizer("The film was")["input_ids"], ids).double().mean()
    assert result.total[0] == pytest.approx(float(expected), rel=1e-5)
