"""Every sampling setting as the sampler applies it, checked against a naive forward pass over the output:
temperature (log-probs), top-k and top-p (tokens they can no longer draw), max_new_tokens, EOS ids, pad."""

from __future__ import annotations

import torch
from wiring_helpers import EOS, VOCAB_SIZE, tiny_lm, tiny_policy

from rlfb.models.sampler import Generation, SamplingConfig, filter_logits, generate

ROWS = 64


def sample(model: torch.nn.Module, sampling: SamplingConfig, eos: int | list[int] = EOS, pad: int = EOS,
           seed: int = 0) -> tuple[torch.Tensor, Generation]:
    prompts = (torch.arange(ROWS) % (VOCAB_SIZE - 1) + 1).unsqueeze(1)  # one-token prompts 1..15
    generation = generate(model, prompts, torch.ones_like(prompts), sampling, eos_token_id=eos, pad_token_id=pad,
                          generator=torch.Generator().manual_seed(seed))
    return prompts, generation


def step_logits(model: torch.nn.Module, prompts: torch.Tensor, generation: Generation) -> torch.Tensor:
    """(B, T, V) the model's logits before each completion token, from one plain forward pass."""
    full = torch.cat([prompts, generation.completion_ids], dim=1)
    with torch.no_grad():
        logits = model(full).logits  # no padding before the completion: positions are 0..L-1
    return logits[:, prompts.shape[1] - 1: -1].float()


def test_logprobs_are_those_of_the_temperature_scaled_softmax() -> None:
    model = tiny_lm()
    prompts, generation = sample(model, SamplingConfig(temperature=0.5, max_new_tokens=6))
    expected = torch.log_softmax(step_logits(model, prompts, generation) / 0.5, -1)
    expected = expected.gather(-1, generation.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = generation.completion_mask.bool()
    assert torch.allclose(generation.logprobs[mask], expected[mask], atol=1e-4)


def test_top_k_alone_never_draws_outside_the_k_most_likely_tokens() -> None:
    model = tiny_lm()
    prompts, generation = sample(model, SamplingConfig(top_k=3, max_new_tokens=6))
    logits = step_logits(model, prompts, generation)
    kth = logits.topk(3, dim=-1).values[..., -1]
    chosen = logits.gather(-1, generation.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = generation.completion_mask.bool()
    assert bool((chosen[mask] >= kth[mask] - 1e-5).all())
    # Without the filter the same sampler does draw outside the top 3 (the check has teeth).
    prompts, unfiltered = sample(model, SamplingConfig(max_new_tokens=6))
    logits = step_logits(model, prompts, unfiltered)
    chosen = logits.gather(-1, unfiltered.completion_ids.unsqueeze(-1)).squeeze(-1)
    assert bool((chosen < logits.topk(3, dim=-1).values[..., -1] - 1e-5)[unfiltered.completion_mask.bool()].any())


def nucleus(probs: torch.Tensor, top_p: float) -> list[set[int]]:
    """The top-p sets of (N, V) probabilities, with a plain loop: the most likely tokens until their mass reaches top_p."""
    sets = []
    for row in probs.tolist():
        kept, mass = set(), 0.0
        for token in sorted(range(len(row)), key=lambda t: -row[t]):
            if mass >= top_p:
                break
            kept.add(token)
            mass += row[token]
        sets.append(kept)
    return sets


def test_top_p_alone_draws_only_from_the_nucleus() -> None:
    model = tiny_lm()
    prompts, generation = sample(model, SamplingConfig(top_p=0.5, max_new_tokens=6))
    mask = generation.completion_mask.bool()
    probs = torch.softmax(step_logits(model, prompts, generation), -1)[mask]  # (N, V)
    allowed = nucleus(probs.double(), 0.5)
    tokens = generation.completion_ids[mask].tolist()
    assert all(token in kept for token, kept in zip(tokens, allowed, strict=True))
    assert max(len(kept) for kept in allowed) < VOCAB_SIZE  # the nucleus did exclude tokens


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p() -> None:
    # Two tokens of probability exactly 0.5: with top_p = 0.5 the first one already holds the mass.
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert int(filter_logits(logits, top_p=0.5).isfinite().sum()) == 1
    assert int(filter_logits(logits, top_p=0.51).isfinite().sum()) == 2


def test_rows_without_eos_get_exactly_max_new_tokens() -> None:
    _, generation = sample(tiny_lm(), SamplingConfig(max_new_tokens=5), eos=[VOCAB_SIZE - 1])
    lengths = generation.completion_mask.sum(1)
    ended = ((generation.completion_ids == VOCAB_SIZE - 1) & generation.completion_mask.bool()).any(1)
    assert generation.completion_ids.shape[1] == 5
    assert bool((lengths[~ended] == 5).all()) and bool((~ended).any())


def test_every_eos_id_of_a_list_ends_its_row_and_pad_follows() -> None:
    eos_ids, pad = [2, 5], 9
    _, generation = sample(tiny_lm(), SamplingConfig(max_new_tokens=8), eos=eos_ids, pad=pad)
    ended_with = []
    for ids, mask in zip(generation.completion_ids.tolist(), generation.completion_mask.tolist(), strict=True):
        length = sum(mask)
        real = ids[:length]
        assert not any(token in eos_ids for token in real[:-1])  # nothing after the first EOS is real
        if real[-1] in eos_ids:
            ended_with.append(real[-1])
            assert ids[length:] == [pad] * (len(ids) - length)  # pad_token_id after the EOS, mask 0
    assert set(ended_with) == set(eos_ids)  # both ids ended some row


def test_sampling_with_the_adapter_disabled_is_sampling_from_the_reference() -> None:
    policy = tiny_policy(value_head=False, moved=True)
    prompts = (torch.arange(16) % (VOCAB_SIZE - 1) + 1).unsqueeze(1)
    sampling = SamplingConfig(max_new_tokens=6)
    with policy.reference():
        generation = generate(policy.model, prompts, torch.ones_like(prompts), sampling, eos_token_id=EOS,
                              pad_token_id=EOS, generator=torch.Generator().manual_seed(0))
    full = torch.cat([prompts, generation.completion_ids], 1)
    reference = policy.reference_logprobs(full, torch.cat([torch.ones_like(prompts), generation.completion_mask], 1), 1)
    adapted = policy.forward_logprobs_values(full, torch.ones_like(full), 1, with_values=False).logprobs.detach()
    mask = generation.completion_mask.bool()
    assert torch.allclose(generation.logprobs[mask], reference[mask], atol=1e-4)
    assert not torch.allclose(generation.logprobs[mask], adapted[mask], atol=1e-2)  # the adapter does matter
