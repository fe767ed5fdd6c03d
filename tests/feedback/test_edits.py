"""Edits -> token labels from the diff, and the SFT loss of the edited text."""

from __future__ import annotations

import pytest

from rlfb.feedback.edits import edit_segments, sft_loss, text_pieces


def test_kept_words_are_1_changed_words_0_whitespace_unlabelled() -> None:
    segments = edit_segments(" the food was awful, sadly.", " the food was lovely.")
    assert segments == [[" the", 1], [" food", 1], [" was", 1], [" awful", 0], [",", 0], [" sadly", 0], [".", 1]]
    assert "".join(text for text, _ in segments) == " the food was awful, sadly."


def test_insertions_change_no_token_and_respacing_is_not_a_change() -> None:
    assert edit_segments(" good film", " very good film") == [[" good", 1], [" film", 1]]
    assert edit_segments(" good  film", " good film") == [[" good", 1], ["  film", 1]]
    assert [label for _, label in edit_segments(" bad film", " excellent movie")] == [0, 0]


def test_token_pieces_from_a_tokenizer_are_labelled_and_reach_token_labels(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from rlfb.rewards.pointwise import token_labels

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    original = " the food was awful."
    encoded = tokenizer(original, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [original[start:end] for start, end in encoded["offset_mapping"]]
    segments = edit_segments(original, " the food was great.", pieces=pieces)
    _, labels = token_labels(tokenizer, "Review:", original, segments)
    completion_labels = labels[-len(pieces):]
    awful = (original.index(" awful"), original.index("."))  # the changed word's characters
    expected = [0 if start < awful[1] and awful[0] < end else 1 for start, end in encoded["offset_mapping"]]
    assert 0 in expected and 1 in expected
    assert completion_labels == expected
    with pytest.raises(ValueError, match="concatenate"):
        edit_segments(original, "x", pieces=pieces[:-1])


def test_text_pieces_cover_any_text() -> None:
    text = "  Tabs\tand 3 numbers, 'quotes' & ünïcode!  "
    assert "".join(text_pieces(text)) == text


def test_sft_loss_is_the_mean_negative_log_likelihood_of_the_target_tokens(tiny_model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts, targets = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    loss = sft_loss(model, prompts, targets, pad_token_id=0)
    total, count = 0.0, 0
    for prompt, target in zip(prompts, targets, strict=True):  # the oracle: one unpadded row at a time
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        for position in range(len(prompt), len(prompt) + len(target)):
            total -= float(logprobs[position - 1, ids[0, position]])
            count += 1
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
