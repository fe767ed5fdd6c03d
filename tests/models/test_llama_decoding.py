"""The lean Llama-family decoder computes what each family's own forward computes, and says when it cannot."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_decoding import (
    EOS,
    VOCAB,
    assert_decodes_like_the_forward,
    assert_same_completions_with_and_without_the_lean_decoder,
    full_forward_last_logits,
    gpt2,
)
from test_decoding import with_trained_lora as lora_on_gpt2_projections
from transformers import AutoConfig, AutoModelForCausalLM

from rlfb.models import decoding
from rlfb.models.decoding import GPT2Decoder, LlamaDecoder, lean_decoder_for

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


def family(model_type: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A random 2-layer model of ``model_type`` with grouped-query attention (4 query heads, 2 key/value)."""
    torch.manual_seed(seed)
    settings: dict[str, object] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)  # fmt: skip
    if model_type in ("mistral", "phi3"):
        settings["sliding_window"] = None
    if model_type == "gemma":
        settings["head_dim"] = 8
    if model_type == "smollm3":
        settings["no_rope_layers"] = [1, 0]  # the second layer without RoPE
    if model_type == "llama":
        settings["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}  # the model's own rotary module applies it
    config = AutoConfig.for_model(model_type, **{**settings, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def with_trained_lora(model: torch.nn.Module) -> torch.nn.Module:
    return lora_on_gpt2_projections(model, target_modules=PROJECTIONS, fan_in_fan_out=False)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "olmo2", "phi3", "smollm3"]


@torch.no_grad()
@pytest.mark.parametrize("model_type", FAMILIES)
def test_prefill_steps_and_row_drops_match_each_familys_forward(model_type: str) -> None:
    model = with_trained_lora(family(model_type))
    if model_type == "qwen2":  # Qwen2's q/k/v projections have biases; move them off zero
        for name, parameter in model.named_parameters():
            if name.endswith("proj.base_layer.bias"):
                parameter.normal_(0, 0.5)
    ids = torch.tensor([[EOS, EOS, 5, 6], [3, 4, 5, 6], [EOS, EOS, EOS, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert LlamaDecoder.supports(model) and not GPT2Decoder.supports(model)
    assert_decodes_like_the_forward(LlamaDecoder(model), model, ids, mask)


@torch.no_grad()
def test_the_adapter_counts_and_disabling_it_decodes_the_base_model() -> None:
    base = family("qwen3", seed=2)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    expected = full_forward_last_logits(base, ids, mask)
    model = with_trained_lora(base)
    assert (LlamaDecoder(model).prefill(ids, mask, max_new_tokens=1) - expected).abs().max() > 1e-2
    with model.disable_adapter():
        torch.testing.assert_close(LlamaDecoder(model).prefill(ids, mask, max_new_tokens=1), expected,
                                   atol=1e-5, rtol=1e-5)


def test_supports_only_what_it_computes_exactly() -> None:
    assert LlamaDecoder.supports(family("llama"))
    assert not LlamaDecoder.supports(family("llama").train())
    assert not LlamaDecoder.supports(family("mistral", sliding_window=8))
    assert not LlamaDecoder.supports(family("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0))
    assert not LlamaDecoder.supports(gpt2())
    on_head = get_peft_model(family("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"])).eval()
    assert not LlamaDecoder.supports(on_head)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_sampler_gives_the_same_completions_with_and_without_the_lean_decoder(temperature: float) -> None:
    model = with_trained_lora(family("qwen2", seed=5))
    ids = torch.tensor([[EOS, 5, 6], [EOS, 5, 6], [3, 4, 9], [EOS, EOS, 7]])
    mask = (torch.arange(3) >= (ids == EOS).sum(1, keepdim=True)).long()

    assert_same_completions_with_and_without_the_lean_decoder(model, ids, mask, temperature, LlamaDecoder)


def test_a_model_without_a_lean_decoder_is_reported_once(caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoding, "_REPORTED", set())
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "opt", vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
        word_embed_proj_dim=16, max_position_embeddings=32)).eval()
    with caplog.at_level(logging.INFO, logger="rlfb.models.decoding"):
        assert lean_decoder_for(opt) is None and lean_decoder_for(opt) is None
        assert isinstance(lean_decoder_for(family("llama")), LlamaDecoder)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("sampling opt with the generic path")
    assert caplog.records[0].levelno == logging.WARNING


@torch.no_grad()
@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_prefill_and_steps_match_its_forward(parallel: bool) -> None:
    from rlfb.models.decoding import NeoXDecoder

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt_neox", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                  rotary_pct=0.5, partial_rotary_factor=0.5, use_parallel_residual=parallel,
                                  bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = lora_on_gpt2_projections(base, target_modules=["query_key_value", "dense", "dense_h_to_4h",
                                                           "dense_4h_to_h"], fan_in_fan_out=False)
    assert NeoXDecoder.supports(model) and not LlamaDecoder.supports(model)
    assert isinstance(lean_decoder_for(model), NeoXDecoder)
    ids = torch.tensor([[EOS, EOS, 5, 6], [3, 4, 5, 6], [EOS, EOS, EOS, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert_decodes_like_the_forward(NeoXDecoder(model), model, ids, mask)
