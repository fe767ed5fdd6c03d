"""The lean GPT-2 decoder computes what the model's own forward computes, and says when it cannot."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlfb.models.decoding import GPT2Decoder, LeanDecoder
from rlfb.models.sampler import SamplingConfig, TokenSampler

VOCAB = 24
EOS = 0


def gpt2(seed: int = 0, **overrides: object) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=EOS,
                        eos_token_id=EOS, **overrides)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def with_trained_lora(model: torch.nn.Module, **overrides: object) -> torch.nn.Module:
    """A LoRA adapter on every projection (GPT-2's by default), moved off its zero init so that it changes
    the outputs."""
    options: dict[str, object] = {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, **overrides}
    config = LoraConfig(r=4, lora_alpha=8, **options)  # type: ignore[arg-type]
    wrapped = get_peft_model(model, config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return wrapped


def full_forward_last_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]


def assert_decodes_like_the_forward(decoder: LeanDecoder, model: torch.nn.Module, ids: torch.Tensor,
                                    mask: torch.Tensor) -> None:
    """Prefill then three steps, row 1 leaving after the first: logits as the model's full forward gives them."""
    logits = decoder.prefill(ids, mask, max_new_tokens=4)
    torch.testing.assert_close(logits, full_forward_last_logits(model, ids, mask), atol=1e-5, rtol=1e-5)
    for step, token in enumerate([7, 8, 9]):
        if step == 1:  # row 1 finished: it leaves the batch
            kept = torch.tensor([0, 2])
            decoder.select_rows(kept)
            ids, mask = ids[kept], mask[kept]
        tokens = torch.full((len(ids),), token)
        positions = mask.sum(-1)
        ids, mask = torch.cat([ids, tokens[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = decoder.step(tokens, positions, mask)
        torch.testing.assert_close(logits, full_forward_last_logits(model, ids, mask), atol=1e-5, rtol=1e-5)
    assert decoder.batch_size == 2


@torch.no_grad()
def test_prefill_steps_and_row_drops_match_the_model_forward() -> None:
    # Left padding, an adapter on every projection, attention scaled by layer: all that the decoder handles.
    model = with_trained_lora(gpt2(scale_attn_by_inverse_layer_idx=True))
    ids = torch.tensor([[EOS, EOS, 5, 6], [3, 4, 5, 6], [EOS, EOS, EOS, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    decoder = GPT2Decoder(model)
    assert_decodes_like_the_forward(decoder, model, ids, mask)
    assert decoder.batch_size == 2


@torch.no_grad()
def test_adapter_disabled_decodes_the_base_model() -> None:
    base = gpt2(seed=3)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    expected = full_forward_last_logits(base, ids, mask)
    model = with_trained_lora(base)
    base_weights = {name: p.clone() for name, p in model.named_parameters() if "lora_" not in name}
    adapted = GPT2Decoder(model).prefill(ids, mask, max_new_tokens=1)
    assert (adapted - expected).abs().max() > 1e-2  # the adapter matters ...
    with model.disable_adapter():
        reference = GPT2Decoder(model).prefill(ids, mask, max_new_tokens=1)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)  # ... and is off here
    # The adapter was merged into copies, never into the model's weights.
    assert all(torch.equal(p, base_weights[name]) for name, p in model.named_parameters() if "lora_" not in name)


@torch.no_grad()
def test_a_bfloat16_model_with_a_float32_adapter_decodes_like_its_forward() -> None:
    # peft keeps the adapter in float32 on a bf16 model; the merged weights must stay in the model's dtype.
    model = with_trained_lora(gpt2(seed=4).to(torch.bfloat16))
    assert any(p.dtype == torch.float32 for name, p in model.named_parameters() if "lora_" in name)
    ids, mask = torch.tensor([[EOS, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]])
    logits = GPT2Decoder(model).prefill(ids, mask, max_new_tokens=2)
    expected = full_forward_last_logits(model, ids, mask)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected.float(), atol=0.05, rtol=0.05)  # bf16 rounding


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft's notes on a LoRA over the tied head
def test_supports_only_what_it_computes_exactly() -> None:
    from peft import PromptTuningConfig

    assert GPT2Decoder.supports(gpt2())
    assert GPT2Decoder.supports(with_trained_lora(gpt2()))
    assert not GPT2Decoder.supports(gpt2().train())  # dropout would differ
    assert not GPT2Decoder.supports(with_trained_lora(gpt2(), use_dora=True))
    # Prompt tuning adds virtual tokens the decoder knows nothing of.
    prompt_tuned = get_peft_model(gpt2(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert not GPT2Decoder.supports(prompt_tuned.eval())
    # A merged adapter: peft unmerges it when the adapter is disabled, the decoder could not.
    merged = with_trained_lora(gpt2())
    merged.merge_adapter()
    assert not GPT2Decoder.supports(merged)
    on_head = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True))
    assert not GPT2Decoder.supports(on_head.eval())
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    assert not GPT2Decoder.supports(llama.eval())


def assert_same_completions_with_and_without_the_lean_decoder(
        model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, temperature: float,
        decoder: type[LeanDecoder] = GPT2Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample with the lean decoder and with the model's forward: the same tokens and log-probs (returned)."""

    def run(lean: bool) -> tuple[torch.Tensor, torch.Tensor]:
        sampler = TokenSampler(model, SamplingConfig(temperature=temperature, max_new_tokens=8),
                               torch.Generator().manual_seed(0), eos_token_id=EOS, lean_decoder=lean)  # fmt: skip
        sampler.start(ids, mask)
        assert isinstance(sampler._decoder, decoder) == lean
        tokens, logprobs = [], []
        while not sampler.done:
            step_tokens, step_logprobs = sampler.sample()
            tokens.append(step_tokens)
            logprobs.append(step_logprobs)
            sampler.advance(step_tokens)
        return torch.stack(tokens), torch.stack(logprobs)

    lean_tokens, lean_logprobs = run(True)
    model_tokens, model_logprobs = run(False)
    assert torch.equal(lean_tokens, model_tokens)
    torch.testing.assert_close(lean_logprobs, model_logprobs, atol=1e-5, rtol=1e-5)
    return lean_tokens, lean_logprobs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_gives_the_same_completions_with_and_without_the_lean_decoder(temperature: float) -> None:
    # Groups of repeated prompts (encoded once, cache rows repeated) and, sampling, rows ending early.
    model = with_trained_lora(gpt2(seed=0))
    ids = torch.tensor([[EOS, 5, 6], [EOS, 5, 6], [3, 4, 9], [3, 4, 9], [EOS, EOS, 7], [EOS, EOS, 7]])
    mask = (torch.arange(3) >= (ids == EOS).sum(1, keepdim=True)).long()

    lean_tokens, lean_logprobs = assert_same_completions_with_and_without_the_lean_decoder(model, ids, mask, temperature)
    if temperature > 0:  # rows did leave the batch before the others
        assert 0 < int((lean_tokens[-1] == EOS).sum()) < len(ids)
