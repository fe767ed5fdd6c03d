"""The Policy: LoRA targets, one copy of the base weights, the reference, values, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from rlfb.errors import ConfigError, ModelNotFoundError
from rlfb.models.policy import LoraSettings, Policy, default_target_modules

VOCAB = 16


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def sequences() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows: a left-padded prompt of 2 tokens (row 1) and completions of 3 tokens."""
    input_ids = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 9, 5, 1, 2, 2]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    return input_ids, attention_mask


def base_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Completion log-probs under a plain HF model, computed independently of the Policy."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logprobs = torch.log_softmax(logits[:, start - 1 : -1], -1)
    return logprobs.gather(-1, input_ids[:, start:, None]).squeeze(-1)


@pytest.mark.parametrize(("model_type", "expected"), [
    ("gpt2", ["c_attn"]), ("llama", ["k_proj", "q_proj", "v_proj"]), ("qwen2", ["k_proj", "q_proj", "v_proj"]),
    ("smollm3", ["k_proj", "q_proj", "v_proj"]), ("olmo2", ["k_proj", "q_proj", "v_proj"]),
    ("phi3", ["qkv_proj"]), ("gpt_neox", ["query_key_value"]), ("opt", ["k_proj", "q_proj", "v_proj"]),
])
def test_one_rule_picks_the_query_key_and_value_projections_of_every_family(model_type: str,
                                                                              expected: list[str]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"gpt2": {"n_embd": 16, "n_layer": 1, "n_head": 2},
             "opt": {"hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "word_embed_proj_dim": 16}}.get(model_type, {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2})
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0, **sizes)
    assert default_target_modules(AutoModelForCausalLM.from_config(config)) == expected


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft's note on fan_in_fan_out for Conv1D
def test_all_linear_adapts_every_linear_layer_of_the_blocks_but_not_the_head() -> None:
    policy = Policy(gpt2(), tokenizer=None, lora=LoraSettings(r=2, target_modules=["all-linear"]),
                    value_head=False, device="cpu")
    adapted = {name.rsplit(".", 1)[-1] for name, module in policy.model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"c_attn", "c_proj", "c_fc"}  # attention and MLP, never lm_head
    assert {name.rsplit(".", 1)[-1] for name in policy.lora_target_modules} == adapted  # the adapter config saves them


def test_a_dotted_path_targets_one_module_with_gpt2s_transposed_layout() -> None:
    """``h.1.mlp.c_proj`` adapts that one Conv1D (peft matches a dotted suffix), told it is transposed: no
    warning from peft, and the policy's log-probs move with the adapter as the layer's own forward says."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out")  # peft: a Conv1D target told it is not transposed
        policy = Policy(gpt2(), tokenizer=None, lora=LoraSettings(r=2, target_modules=["h.1.mlp.c_proj"]),
                        value_head=False, device="cpu")
    adapted = [name for name, module in policy.model.named_modules() if hasattr(module, "lora_A")]
    assert [name.split("transformer.", 1)[1] for name in adapted] == ["h.1.mlp.c_proj"]
    assert policy.model.peft_config["default"].fan_in_fan_out


def test_unknown_architecture_falls_back_to_attention_names_or_explains() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(4, 4)
            self.dense = nn.Linear(4, 4)

    assert default_target_modules(Attention()) == ["query"]
    with pytest.raises(ConfigError, match=r"Linear layers found: dense, out.*lora.target_modules"):
        default_target_modules(nn.ModuleDict({"dense": nn.Linear(4, 4), "out": nn.Linear(4, 4)}))


def test_reference_is_the_same_weights_with_the_adapter_disabled() -> None:
    base = gpt2()
    base_pointers = {name: p.data_ptr() for name, p in base.named_parameters()}
    base_count = sum(p.numel() for p in base.parameters())
    input_ids, attention_mask = sequences()
    expected = base_logprobs(gpt2(), input_ids, attention_mask, start=3)  # an identical, separate copy

    policy = Policy(base, tokenizer=None, lora=LoraSettings(r=4), device="cpu")

    # One copy: every base tensor is still the original storage, and the only new parameters are LoRA's.
    wrapped = {
        name.replace("base_model.model.", "").replace(".base_layer", ""): p
        for name, p in policy.model.named_parameters()
        if "lora_" not in name
    }
    assert {name: p.data_ptr() for name, p in wrapped.items()} == base_pointers
    assert sum(p.numel() for p in wrapped.values()) == base_count
    assert all(not p.requires_grad for p in wrapped.values())

    # Before training the policy, the reference and the untouched base model agree.
    reference = policy.reference_logprobs(input_ids, attention_mask, 3)
    torch.testing.assert_close(reference, expected)
    current = policy.forward_logprobs_values(input_ids, attention_mask, 3).logprobs
    torch.testing.assert_close(current, expected)

    # A few steps on the adapter move the policy; the reference stays the base model.
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=0.05)
    for _ in range(3):
        loss = -policy.forward_logprobs_values(input_ids, attention_mask, 3).logprobs.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = policy.forward_logprobs_values(input_ids, attention_mask, 3).logprobs
    assert (trained - expected).abs().max() > 0.1
    torch.testing.assert_close(policy.reference_logprobs(input_ids, attention_mask, 3), expected)


def test_left_padding_does_not_change_logprobs() -> None:
    policy = Policy(gpt2(), tokenizer=None, device="cpu")
    unpadded = policy.forward_logprobs_values(torch.tensor([[9, 5, 1, 2]]), torch.ones(1, 4, dtype=torch.long), 2)
    padded = policy.forward_logprobs_values(
        torch.tensor([[0, 0, 9, 5, 1, 2]]), torch.tensor([[0, 0, 1, 1, 1, 1]]), 4
    )
    torch.testing.assert_close(padded.logprobs, unpadded.logprobs)
    torch.testing.assert_close(padded.entropy, unpadded.entropy)


def test_entropy_is_detached_unless_its_gradient_is_asked_for() -> None:
    # With no entropy bonus the agents take the entropy as a metric only: no (B, T, V) graph behind it.
    policy = Policy(gpt2(), tokenizer=None, device="cpu")
    input_ids, attention_mask = sequences()
    with_grad = policy.forward_logprobs_values(input_ids, attention_mask, 3)
    metric_only = policy.forward_logprobs_values(input_ids, attention_mask, 3, entropy_grad=False)
    assert with_grad.entropy.requires_grad and not metric_only.entropy.requires_grad
    assert metric_only.logprobs.requires_grad  # the log-probs still carry the gradient
    torch.testing.assert_close(metric_only.entropy, with_grad.entropy.detach())


def test_outputs_shapes_value_head_and_temperature() -> None:
    policy = Policy(gpt2(), tokenizer=None, device="cpu")
    input_ids, attention_mask = sequences()
    out = policy.forward_logprobs_values(input_ids, attention_mask, 3)
    assert out.logprobs.shape == out.values.shape == out.entropy.shape == (2, 3)
    assert torch.all(out.values == 0)  # zero-initialised head
    assert torch.all(out.entropy > 0) and torch.all(out.entropy <= torch.log(torch.tensor(float(VOCAB))) + 1e-5)
    hot = policy.forward_logprobs_values(input_ids, attention_mask, 3, temperature=2.0)
    assert torch.all(hot.entropy > out.entropy)  # a higher temperature flattens the distribution
    no_head = Policy(gpt2(), tokenizer=None, value_head=False, device="cpu")
    assert no_head.forward_logprobs_values(input_ids, attention_mask, 3).values is None


def test_save_and_load_adapter_round_trip(tmp_path: Path) -> None:
    input_ids, attention_mask = sequences()
    trained = Policy(gpt2(), tokenizer=None, lora=LoraSettings(r=4), device="cpu")
    with torch.no_grad():
        for name, parameter in trained.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
        trained.value_head.bias.fill_(1.5)
    trained.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh = Policy(gpt2(), tokenizer=None, lora=LoraSettings(r=4), device="cpu")
    fresh.load_adapter(tmp_path / "adapter")
    expected = trained.forward_logprobs_values(input_ids, attention_mask, 3)
    loaded = fresh.forward_logprobs_values(input_ids, attention_mask, 3)
    torch.testing.assert_close(loaded.logprobs, expected.logprobs)
    torch.testing.assert_close(loaded.values, expected.values)

    with pytest.raises(ModelNotFoundError, match="no LoRA adapter in"):
        fresh.load_adapter(tmp_path / "missing")


def test_lora_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="lora.r must be a positive integer, got 0"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\)"):
        LoraSettings(dropout=1.0)


def test_scorer_gives_policy_and_reference_logprobs() -> None:
    policy = Policy(gpt2(), tokenizer=None, lora=LoraSettings(r=4), device="cpu")
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    input_ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(input_ids)
    policy_logprobs = policy.forward_logprobs_values(input_ids, mask, 2).logprobs[0]
    reference_logprobs = policy.reference_logprobs(input_ids, mask, 2)[0]
    assert (policy_logprobs - reference_logprobs).abs().max() > 0.01
    scored = policy.scorer.completion_logprobs([[3, 4]], [[5, 6, 7]], reference=False)[0]
    scored_reference = policy.scorer.completion_logprobs([[3, 4]], [[5, 6, 7]], reference=True)[0]
    torch.testing.assert_close(scored, policy_logprobs.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(scored_reference, reference_logprobs, atol=1e-5, rtol=0)


def test_tanh_gelu_runs_as_one_kernel_with_the_same_outputs() -> None:
    from transformers.activations import GELUTanh, NewGELUActivation

    from rlfb.models.loading import fuse_tanh_gelu

    model = gpt2()  # GPT-2's activation_function is "gelu_new"
    input_ids, attention_mask = sequences()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert fuse_tanh_gelu(model) == model.config.n_layer
    assert not any(isinstance(module, NewGELUActivation) for module in model.modules())
    assert all(isinstance(block.mlp.act, GELUTanh) for block in model.transformer.h)
    with torch.no_grad():
        fused = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    assert fuse_tanh_gelu(model) == 0  # idempotent
    # A model handed to Policy is the caller's: it is wrapped, not altered (load_model is where rlfb fuses).
    assert fuse_tanh_gelu(Policy(gpt2(), tokenizer=None, device="cpu").model) == model.config.n_layer


def test_describe_names_the_adapted_modules_and_the_sampling_path() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    policy = Policy(gpt2(), tokenizer=None, lora=LoraSettings(r=2), value_head=False, device="cpu")
    trainable = sum(parameter.numel() for parameter in policy.trainable_parameters())
    assert policy.describe() == (f"LoRA r=2 on c_attn of gpt2 ({trainable:,} trainable parameters); "
                                 "sampling with the lean GPT2Decoder")
    opt = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "opt", vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
        word_embed_proj_dim=16, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    described = Policy(opt, tokenizer=None, lora=LoraSettings(r=2), value_head=False, device="cpu").describe()
    assert described.startswith("LoRA r=2 on k_proj, q_proj, v_proj of opt") and described.endswith("own forward (slower)")


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft's note on fan_in_fan_out for Conv1D
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2", "gpt_neox", "opt"])
def test_rows_that_share_a_prompt_encode_it_once_with_the_same_outputs_and_gradients(
        model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six rows from two prompts (one left-padded): log-probs, values, entropies and the LoRA and value-head
    gradients of the shared-prompt pass equal the one-pass forward's, and the prompt pass sees two rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import rlfb.models.policy as policy_module

    torch.manual_seed(0)
    sizes = {"gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 2},
             "opt": {"hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "word_embed_proj_dim": 16}}.get(model_type, {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1 if model_type != "gpt_neox" else 2})
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                  **sizes)
    policy = Policy(AutoModelForCausalLM.from_config(config).eval(), tokenizer=None, lora=LoraSettings(r=2),
                    device="cpu")
    for parameter in policy.trainable_parameters():  # B starts at 0: give every LoRA factor a gradient
        nn.init.normal_(parameter, std=0.3)
    prompts = torch.tensor([[0, 3, 4], [5, 6, 7]])
    prompt_masks = torch.tensor([[0, 1, 1], [1, 1, 1]])
    rows = torch.tensor([0, 1, 0, 1, 1, 0])
    completions = torch.randint(1, VOCAB, (6, 4))
    completion_masks = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0],
                                     [1, 1, 1, 1]])
    input_ids = torch.cat([prompts[rows], completions], 1)
    attention_mask = torch.cat([prompt_masks[rows], completion_masks], 1)
    batch_sizes: list[int] = []
    hook = policy.model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)

    def outputs(share: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for parameter in policy.trainable_parameters():
            parameter.grad = None
        forward = policy.forward_logprobs_values(input_ids, attention_mask, 3, share_prompts=share)
        mask = completion_masks.float()
        ((forward.logprobs + forward.values + forward.entropy) * mask).sum().backward()
        parameters = policy.trainable_parameters()
        return ([forward.logprobs * mask, forward.values * mask, forward.entropy * mask],
                [parameter.grad.clone() for parameter in parameters])

    one_pass, one_pass_grads = outputs(share=False)
    assert batch_sizes == [6]
    shared, shared_grads = outputs(share=True)
    assert batch_sizes[1:] == [2, 6]  # the two distinct prompts, then every row's completion
    # By default only when the saving pays: 4 rows x 3 prompt tokens saved, times the parameters
    saved_work = 4 * 3 * policy._parameter_count
    for threshold, calls in ((saved_work + 1, [6]), (saved_work, [2, 6])):
        monkeypatch.setattr(policy_module, "MIN_SHARED_PROMPT_WORK", threshold)
        batch_sizes.clear()
        policy.forward_logprobs_values(input_ids, attention_mask, 3, share_prompts=None)
        assert batch_sizes == calls
    hook.remove()
    # float32 rounding (the attention's sums split in two passes, a prompt's gradient summed over its rows),
    # on the scale of the largest output or gradient; a row given another row's prompt is off by far more
    for got_group, expected_group in ((shared, one_pass), (shared_grads, one_pass_grads)):
        scale = max(float(expected.abs().max()) for expected in expected_group)
        for got, expected in zip(got_group, expected_group, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_rows_longer_than_a_sliding_window_do_not_share_their_prompt() -> None:
    """Past the window a layer's cache keeps only its last columns, so the split would compute another thing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  sliding_window=4, pad_token_id=0)
    policy = Policy(AutoModelForCausalLM.from_config(config).eval(), tokenizer=None, lora=LoraSettings(r=2),
                    device="cpu")
    batch_sizes: list[int] = []
    policy.model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    input_ids = torch.tensor([[3, 4, 5, 6], [3, 4, 7, 8]])
    for width, calls in ((4, [1, 2]), (5, [2])):  # within the window: shared; past it: one pass
        batch_sizes.clear()
        ids = torch.cat([input_ids, torch.ones(2, width - 4, dtype=torch.long)], 1)
        policy.forward_logprobs_values(ids, torch.ones_like(ids), 2, share_prompts=True)
        assert batch_sizes == calls
