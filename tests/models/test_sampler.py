"""Tests of the batched sampler: reproducibility, cache correctness, filters, per-row EOS."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlfb.models.sampler import SamplingConfig, TokenSampler, _choose_tokens, filter_logits, generate

VOCAB = 24
EOS = 0


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config).eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([[EOS, EOS, 5, 6, 7], [3, 4, 5, 6, 7], [EOS, EOS, EOS, EOS, 9]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    return input_ids, attention_mask


def naive_greedy(model: GPT2LMHeadModel, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding of one unpadded prompt by re-running the whole sequence each step (no cache)."""
    sequence = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([sequence]), use_cache=False).logits[0, -1]
        token = int(torch.argmax(logits))
        sequence.append(token)
        if token == EOS:
            break
    return sequence[len(prompt) :]


def test_same_seed_gives_same_tokens_and_other_seed_differs(model: GPT2LMHeadModel) -> None:
    input_ids, attention_mask = left_padded_batch()
    sampling = SamplingConfig(temperature=1.5, max_new_tokens=12)
    runs = [
        generate(model, input_ids, attention_mask, sampling, EOS, EOS, torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)
    assert not torch.equal(runs[0].completion_ids, runs[2].completion_ids)


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0, max_new_tokens=10),
                                      SamplingConfig(top_k=1, max_new_tokens=10)])
def test_greedy_with_cache_and_left_padding_equals_naive_loop(
    model: GPT2LMHeadModel, sampling: SamplingConfig
) -> None:
    input_ids, attention_mask = left_padded_batch()
    out = generate(model, input_ids, attention_mask, sampling, EOS, EOS)
    for row in range(input_ids.shape[0]):
        prompt = input_ids[row][attention_mask[row].bool()].tolist()
        expected = naive_greedy(model, prompt, sampling.max_new_tokens)
        got = out.completion_ids[row][out.completion_mask[row].bool()].tolist()
        assert got == expected


def test_logprobs_match_a_forward_pass_over_the_completion(model: GPT2LMHeadModel) -> None:
    prompt = torch.tensor([[3, 4, 5]])
    sampling = SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=6)
    out = generate(model, prompt, torch.ones_like(prompt), sampling, EOS, EOS, torch.Generator().manual_seed(1))
    length = int(out.completion_mask.sum())
    sequence = torch.cat([prompt, out.completion_ids[:, :length]], dim=1)
    logits = model(sequence).logits[0, prompt.shape[1] - 1 : -1] / sampling.temperature
    expected = torch.log_softmax(logits, dim=-1).gather(-1, sequence[0, prompt.shape[1] :, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs[0, :length], expected, atol=1e-5, rtol=1e-5)


def test_filter_logits_on_a_hand_made_distribution() -> None:
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]])
    logits = torch.log(probs)
    assert filter_logits(logits, top_k=2).isfinite().tolist() == [[False, True, True, False, False]]
    # 0.4 + 0.3 = 0.7 < 0.8, so the nucleus needs the third most likely token (0.15) too.
    assert filter_logits(logits, top_p=0.8).isfinite().tolist() == [[False, True, True, True, False]]
    assert filter_logits(logits, top_p=0.7).isfinite().tolist() == [[False, True, True, False, False]]
    assert filter_logits(logits, top_p=0.01).isfinite().tolist() == [[False, True, False, False, False]]
    assert filter_logits(logits, top_k=3, top_p=0.5).isfinite().tolist() == [[False, True, True, False, False]]
    assert torch.equal(filter_logits(logits), logits)


def test_sampling_never_leaves_the_top_k_set() -> None:
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]])).repeat(2000, 1)
    tokens, logprobs = _choose_tokens(logits, SamplingConfig(top_k=2), torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=5)
    assert counts[[0, 3, 4]].sum() == 0
    # renormalised: 0.4 / 0.7 of the draws should be token 1
    assert abs(counts[1].item() / 2000 - 0.4 / 0.7) < 0.05
    # log-probs are those of the unfiltered distribution
    torch.testing.assert_close(logprobs, logits[0, tokens])


def test_rows_stop_at_their_own_eos(model: GPT2LMHeadModel) -> None:
    input_ids, attention_mask = left_padded_batch()
    # A random model rarely emits a chosen token, so the "EOS" of this test is the token greedy decoding
    # ends row 2 with; every row must stop where (and only where) it first produces it.
    greedy = generate(model, input_ids, attention_mask, SamplingConfig(temperature=0, max_new_tokens=8), -1, EOS)
    stop_token = int(greedy.completion_ids[2, -1])
    out = generate(model, input_ids, attention_mask, SamplingConfig(temperature=0, max_new_tokens=8), stop_token, EOS)
    stop_lengths = set()
    for row in range(3):
        row_tokens = greedy.completion_ids[row].tolist()
        stop_at = row_tokens.index(stop_token) + 1 if stop_token in row_tokens else len(row_tokens)
        stop_lengths.add(stop_at)
        assert out.completion_mask[row].sum().item() == stop_at
        assert out.completion_ids[row, :stop_at].tolist() == row_tokens[:stop_at]
        assert (out.completion_ids[row, stop_at:] == EOS).all()
        assert (out.logprobs[row, stop_at:] == 0).all()
    assert len(stop_lengths) > 1, "the rows should stop at different steps for this test to mean anything"


def test_sampler_is_done_when_all_rows_finish(model: GPT2LMHeadModel) -> None:
    input_ids = torch.tensor([[3, 4]])
    greedy = generate(model, input_ids, torch.ones_like(input_ids), SamplingConfig(temperature=0, max_new_tokens=1), -1, EOS)
    stop_token = int(greedy.completion_ids[0, 0])
    sampler = TokenSampler(model, SamplingConfig(temperature=0, max_new_tokens=50), eos_token_id=stop_token)
    sampler.start(input_ids, torch.ones_like(input_ids))
    sampler.advance(sampler.sample()[0])
    assert sampler.done and sampler.num_generated == 1
    with pytest.raises(RuntimeError, match="call start"):
        sampler.sample()


def test_right_padded_prompts_are_rejected(model: GPT2LMHeadModel) -> None:
    sampler = TokenSampler(model, SamplingConfig(), eos_token_id=EOS)
    with pytest.raises(ValueError, match=r"rows \[1\] .*left-padded"):
        sampler.start(torch.tensor([[3, 4, 5], [3, 4, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_trailing_unattended_columns_change_nothing(model: GPT2LMHeadModel) -> None:
    input_ids, attention_mask = left_padded_batch()
    sampling = SamplingConfig(temperature=0, max_new_tokens=6)
    plain = generate(model, input_ids, attention_mask, sampling, EOS, EOS)
    widened_ids = torch.cat([torch.full((3, 4), EOS), input_ids, torch.full((3, 5), EOS)], dim=1)
    widened_mask = torch.cat([torch.zeros(3, 4, dtype=torch.long), attention_mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    widened = generate(model, widened_ids, widened_mask, sampling, EOS, EOS)
    assert torch.equal(plain.completion_ids, widened.completion_ids)
    torch.testing.assert_close(plain.logprobs, widened.logprobs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"),
     ({"max_new_tokens": 0}, "max_new_tokens")],
)
def test_sampling_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_prompt_plus_completion_beyond_the_context_is_a_clear_error(model: GPT2LMHeadModel) -> None:
    sampler = TokenSampler(model, SamplingConfig(max_new_tokens=60), eos_token_id=EOS)
    with pytest.raises(ValueError, match="a prompt of 5 tokens plus max_new_tokens=60 exceeds .* 64 positions"):
        sampler.start(torch.tensor([[3, 4, 5, 6, 7]]), torch.ones(1, 5, dtype=torch.long))


def test_sampled_tensors_are_ordinary_tensors_usable_in_a_loss(model: GPT2LMHeadModel) -> None:
    input_ids, attention_mask = left_padded_batch()
    sampler = TokenSampler(model, SamplingConfig(max_new_tokens=4), torch.Generator().manual_seed(0), eos_token_id=EOS)
    sampler.start(input_ids, attention_mask)
    tokens, logprobs = sampler.sample()
    assert not tokens.is_inference() and not logprobs.is_inference()
    weight = torch.ones(3, requires_grad=True)
    (weight * logprobs).sum().backward()  # an inference tensor would refuse to be saved for backward
    assert torch.equal(weight.grad, logprobs)
    tokens[0] = EOS  # and they can be modified in place


def test_sampled_token_frequencies_follow_the_probabilities() -> None:
    # 100,000 draws: each frequency within 0.01 of its probability (5 standard errors at most); a token of
    # probability 0 is never drawn, wherever it sits in the vocabulary.
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    logits = torch.log(probs).expand(100_000, -1)
    tokens, logprobs = _choose_tokens(logits, SamplingConfig(), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=len(probs)).float() / len(tokens)
    assert torch.allclose(frequencies, probs, atol=0.01), frequencies
    assert frequencies[probs == 0].sum() == 0
    torch.testing.assert_close(logprobs, torch.log(probs)[tokens])


def test_nan_probabilities_are_a_clear_error() -> None:
    from rlfb.errors import DivergedModelError

    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]])
    with pytest.raises(DivergedModelError, match="NaN or inf: the model's weights or logits have diverged"):
        _choose_tokens(logits, SamplingConfig(), torch.Generator().manual_seed(0))
