"""The turn sampler keeps each conversation's cache across turns: its log-probs are a full forward pass's over
the whole conversation, each later turn encodes only the reply (and the turn's last token), ended rows leave
with their caches, and a cache that cannot be taken apart is encoded again (said once in the log)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from test_decoding import EOS, VOCAB, gpt2, with_trained_lora
from test_llama_decoding import family
from test_llama_decoding import with_trained_lora as lora_on_llama_projections

from rlfb.models import turn_sampler
from rlfb.models.decoding import Decoder, ForwardDecoder, GPT2Decoder, LlamaDecoder
from rlfb.models.sampler import SamplingConfig
from rlfb.models.turn_sampler import TurnSampler

OPENINGS = [[3, 4, 5], [3, 4, 5], [7, 8], [9, 10, 11, 12, 13]]  # rows 0 and 1: one group
ENDS_AFTER = [3, 3, 1, 2]  # the turn after which each row's episode ends


def reply(row: int, turn: int) -> list[int]:
    """An environment reply of 1 to 4 tokens (no EOS), different per row and turn."""
    return [1 + (row + turn + offset) % (VOCAB - 2) for offset in range(1 + (row * 3 + turn) % 4)]


def play(model: torch.nn.Module, lean: bool, sampling: SamplingConfig,
         seed: int = 0) -> tuple[list[list[int]], list[list[tuple[list[int], list[float]]]], list[list[int]]]:
    """Three turns of four conversations with scripted replies; returns each row's final tokens, its turns,
    and per turn the real tokens each live row fed to ``extend`` (the reply prefill)."""
    sampler = TurnSampler(model, sampling, torch.Generator().manual_seed(seed), eos_token_id=EOS, lean_decoder=lean)
    conversations = [list(opening) for opening in OPENINGS]
    turns: list[list[tuple[list[int], list[float]]]] = [[] for _ in OPENINGS]
    fed: list[list[int]] = []
    rows = list(range(len(OPENINGS)))
    for turn in range(1, 4):
        budgets = [4 if row != 3 else 2 for row in rows]
        sampled = sampler.sample_turns(rows, [conversations[row] for row in rows], budgets)
        for row, (ids, logprobs) in zip(rows, sampled, strict=True):
            assert 1 <= len(ids) <= budgets[rows.index(row)]
            turns[row].append((ids, logprobs))
            conversations[row] += ids
        rows = [row for row in rows if ENDS_AFTER[row] > turn]
        for row in rows:
            conversations[row] += reply(row, turn)
        if rows and sampler._turn_decoder is not None:
            record_extend(sampler._turn_decoder, fed)
    return conversations, turns, fed


def record_extend(decoder: Decoder, fed: list[list[int]]) -> None:
    """Make the decoder's next ``extend`` append the real tokens each row feeds to ``fed``."""
    real_extend = decoder.extend

    def counting_extend(input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        fed.append(attention_mask[:, -input_ids.shape[1]:].sum(1).tolist())
        decoder.extend = real_extend  # type: ignore[method-assign]
        return real_extend(input_ids, position_ids, attention_mask)

    decoder.extend = counting_extend  # type: ignore[method-assign]


@torch.no_grad()
def full_forward_logprobs(model: torch.nn.Module, tokens: list[int], temperature: float) -> list[float]:
    """log softmax(logits / temperature) of each token given the ones before it, one unpadded row."""
    logits = model(torch.tensor([tokens]), use_cache=False).logits[0].float()
    scaled = logits if temperature in (0, 1) else logits / temperature
    logprobs = torch.log_softmax(scaled, -1)[:-1].gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)
    return [0.0, *logprobs.tolist()]


def assert_turns_follow_the_full_forward(model: torch.nn.Module, conversations: list[list[int]],
                                        turns: list[list[tuple[list[int], list[float]]]], temperature: float) -> None:
    """Each turn sits in its conversation, its log-probs those of one forward pass over the whole of it."""
    for row, conversation in enumerate(conversations):
        expected = full_forward_logprobs(model, conversation, temperature)
        position = len(OPENINGS[row])
        for turn, (ids, logprobs) in enumerate(turns[row]):
            assert conversation[position:position + len(ids)] == ids
            torch.testing.assert_close(logprobs, expected[position:position + len(ids)], atol=1e-5, rtol=0)
            position += len(ids) + (len(reply(row, turn + 1)) if ENDS_AFTER[row] > turn + 1 else 0)


def gpt2_with_adapter() -> torch.nn.Module:
    return with_trained_lora(gpt2(seed=0))


def llama_with_adapter() -> torch.nn.Module:
    return lora_on_llama_projections(family("llama"))


MODELS = {"gpt2": (gpt2_with_adapter, GPT2Decoder), "llama": (llama_with_adapter, LlamaDecoder)}


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=8)])
def test_turn_logprobs_are_the_full_forwards_and_only_replies_are_prefilled(
        model_name: str, lean: bool, sampling: SamplingConfig) -> None:
    make, lean_type = MODELS[model_name]
    model = make()
    conversations, turns, fed = play(model, lean, sampling)
    assert_turns_follow_the_full_forward(model, conversations, turns, sampling.temperature)
    # Turn 2 feeds the live rows 0, 1, 3 their turn's last token and reply; turn 3 rows 0 and 1 (row 2 ended
    # after turn 1, row 3 after turn 2: they left with their caches).
    assert fed == [[1 + len(reply(row, 1)) for row in (0, 1, 3)], [1 + len(reply(row, 2)) for row in (0, 1)]]


@pytest.mark.parametrize("lean", [True, False])
def test_the_cache_holds_the_conversation_but_the_last_token(lean: bool) -> None:
    model = gpt2_with_adapter()
    sampler = TurnSampler(model, SamplingConfig(), torch.Generator().manual_seed(0), eos_token_id=EOS, lean_decoder=lean)
    first = sampler.sample_turns([10, 11], [[3, 4, 5], [7]], budgets=[3, 3])
    conversation = [7, *first[1][0], 5, 6, 7]
    assert isinstance(sampler._turn_decoder, GPT2Decoder if lean else ForwardDecoder)
    assert sampler.cached_tokens(10) == 3 + len(first[0][0]) - 1
    (turn, _), = sampler.sample_turns([11], [conversation], budgets=[2])
    assert sampler.cached_tokens(11) == len(conversation) + len(turn) - 1
    assert sampler.cached_tokens(10) == 0  # row 10 left: its cache went with it
    assert sampler._turn_decoder is not None and sampler._turn_decoder.batch_size == 0  # released after the turn


def test_a_conversation_that_does_not_extend_the_sampled_turn_is_refused() -> None:
    sampler = TurnSampler(gpt2(), SamplingConfig(), torch.Generator().manual_seed(0), eos_token_id=EOS)
    (turn, _), = sampler.sample_turns([0], [[3, 4]], budgets=[3])
    with pytest.raises(ValueError, match="does not extend the tokens the sampler saw"):
        sampler.sample_turns([0], [[3, 4, *turn[:-1], 6]], budgets=[3])  # the turn's last token dropped
    with pytest.raises(ValueError, match="did not play the previous turn"):
        sampler.sample_turns([5], [[3, 4, *turn, 6]], budgets=[3])
    with pytest.raises(ValueError, match="at least 1 token"):
        sampler.sample_turns([0], [[3, 4, *turn, 6]], budgets=[0])


def test_same_seed_same_turns_as_encoding_the_conversation_again() -> None:
    """The cached turns are the re-encoded ones, token for token: the sampler with its cache against the
    sampler made to encode every turn from the opening (what collection did before the cache was kept)."""
    model = gpt2_with_adapter()
    sampling = SamplingConfig(temperature=1.3)
    cached_conversations, cached_turns, _ = play(model, True, sampling, seed=4)
    original = Decoder.can_rebuild
    try:
        Decoder.can_rebuild = property(lambda self: False)  # type: ignore[method-assign]
        encoded_conversations, encoded_turns, fed = play(model, True, sampling, seed=4)
    finally:
        Decoder.can_rebuild = original  # type: ignore[method-assign]
    assert fed == []  # every turn encoded from the opening: no reply prefill
    assert cached_conversations == encoded_conversations
    for cached, encoded in zip(cached_turns, encoded_turns, strict=True):
        for (cached_ids, cached_logprobs), (ids, logprobs) in zip(cached, encoded, strict=True):
            assert cached_ids == ids
            torch.testing.assert_close(cached_logprobs, logprobs, atol=1e-5, rtol=0)


def test_a_sliding_window_cache_is_encoded_again_and_said_once(caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Mistral with a window of 4 tokens: no lean decoder, and its cache drops columns (not taken apart).
    monkeypatch.setattr(turn_sampler, "_REPORTED", set())
    model = family("mistral", sliding_window=4)
    assert not LlamaDecoder.supports(model)
    with caplog.at_level(logging.WARNING, logger="rlfb.models.turn_sampler"):
        conversations, turns, fed = play(model, True, SamplingConfig())
        play(model, True, SamplingConfig(), seed=1)
    assert fed == []
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("sampling mistral turns with the conversation encoded again")
    assert_turns_follow_the_full_forward(model, conversations, turns, 1.0)
