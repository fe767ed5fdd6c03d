"""A lean KV-cached decoder for GPT-2-architecture models, which :class:`~rlfb.models.sampler.TokenSampler`
runs instead of the model's own forward when it applies.

Sampling calls the model once per token. For a small model the cost of a call is mostly Python, not
arithmetic: transformers' GPT-2 forward makes about seventy module calls, builds a 4-D mask and grows its
cache by concatenation on every token (on rlfb-tiny, 32 rows: about 2 ms per step, of which the matrix
products are about 0.7 ms). :class:`GPT2Decoder` computes the same function from the same weights with plain
tensor operations:

* a LoRA adapter enters as merged weights ``W + scale * (B A)^T``, computed once per batch with peft's own
  ``get_delta_weight`` (the model's weights are not modified); with the adapter disabled, ``W`` alone;
* keys and values go to buffers of the batch's final width, so a step writes one column instead of
  copying the cache;
* rows that finish leave the batch (:meth:`GPT2Decoder.select_rows`), as with the transformers cache.

It applies to ``model_type == "gpt2"`` models (rlfb-tiny, GPT-2 and its fine-tunes) in eval mode, bare or
with plain LoRA adapters on their ``Conv1D`` layers (:meth:`GPT2Decoder.supports`); anything else goes
through the model's own forward. Its logits agree with transformers' to float rounding
(tests/models/test_decoding.py). Merged and unmerged LoRA weights round differently in the last bits, which
is harmless here: the agents recompute every log-prob they train on with the model's own forward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft import PeftType
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D


class _Projection(NamedTuple):
    """A Conv1D-style affine map y = x W + b of 2-D inputs, W of shape (in, out)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class _BlockWeights(NamedTuple):
    ln_1: nn.LayerNorm
    attention: _Projection  # c_attn: hidden -> q, k, v
    attention_output: _Projection  # attn.c_proj
    ln_2: nn.LayerNorm
    mlp_input: _Projection  # mlp.c_fc
    mlp_output: _Projection  # mlp.c_proj
    activation: nn.Module
    scaling: float  # the attention's 1 / sqrt(head_dim) (and 1 / (layer + 1) if the config says so)


def _unwrap(model: nn.Module) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _projection(module: Any) -> _Projection:
    """The effective weights of a Conv1D, with the active LoRA adapters merged in (not in place)."""
    if isinstance(module, LoraLayer):
        base: Any = module.get_base_layer()
        weight = base.weight
        if not module.disable_adapters and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    # (in, out), scale included; peft keeps adapters in float32 on a bf16 / fp16 model
                    delta = module.get_delta_weight(adapter)  # type: ignore[attr-defined]
                    weight = weight + delta.to(weight.dtype)
        return _Projection(weight, base.bias)
    return _Projection(module.weight, module.bias)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


class GPT2Decoder:
    """KV-cached prefill and decode steps of a GPT-2 model (see the module docstring).

    Args:
        model: A ``GPT2LMHeadModel``, or a peft model around one; check :meth:`supports` first.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> _ = torch.manual_seed(0)
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2)).eval()
        >>> GPT2Decoder.supports(model)
        True
        >>> decoder = GPT2Decoder(model)
        >>> prompt, mask = torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]])
        >>> with torch.no_grad():
        ...     logits = decoder.prefill(prompt, mask, max_new_tokens=2)
        ...     expected = model(prompt, attention_mask=mask, position_ids=torch.tensor([[0, 0, 1]])).logits[:, -1]
        >>> bool(torch.allclose(logits, expected, atol=1e-5))
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.model: Any = _unwrap(model)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._blocks: list[_BlockWeights] = []
        self._length = 0

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether :class:`GPT2Decoder` computes exactly what ``model``'s forward does.

        True for a GPT-2 causal LM in eval mode without cross-attention, bare or with plain, unmerged LoRA
        adapters (no DoRA or other variant, no LoRA bias) on the Conv1D layers of its blocks. False for
        every other peft method (prompt or prefix tuning add tokens this decoder does not know) and for a
        merged adapter (peft unmerges it when the adapter is disabled; the decoder would keep it).
        """
        peft_configs = getattr(model, "peft_config", None)
        if isinstance(peft_configs, dict) and any(
            getattr(config, "peft_type", None) != PeftType.LORA for config in peft_configs.values()
        ):
            return False
        inner = _unwrap(model)
        config = getattr(inner, "config", None)
        if getattr(config, "model_type", None) != "gpt2" or getattr(config, "add_cross_attention", False):
            return False
        if model.training or not hasattr(inner, "transformer") or not hasattr(inner, "lm_head"):
            return False
        projections = {
            module
            for block in inner.transformer.h
            for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        }
        for module in inner.modules():
            if not isinstance(module, LoraLayer):
                continue
            if module not in projections or not isinstance(module.get_base_layer(), Conv1D):
                return False  # an adapter on the embeddings, the head, or a layer this decoder does not know
            if any(module.lora_variant.values()) or any(getattr(module, "lora_bias", {}).values()):
                return False
            if module.merged:
                return False
        return all(isinstance(module.get_base_layer() if isinstance(module, LoraLayer) else module, Conv1D)
                   for module in projections)  # fmt: skip

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return int(self._keys[0].shape[0]) if self._keys else 0

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode left-padded prompts into a fresh cache; returns the (A, V) logits of their last tokens.

        Args:
            input_ids: (A, P) prompt token ids.
            attention_mask: (A, P) 1 for real tokens.
            max_new_tokens: Steps :meth:`step` may take after this (the cache's extra width).
            position_ids: (A, P); default: counting real tokens, 0 at each row's first.
        """
        transformer = self.model.transformer
        self._blocks = [self._block_weights(block) for block in transformer.h]
        rows, width = input_ids.shape
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = transformer.wte(input_ids) + transformer.wpe(position_ids)
        heads = transformer.h[0].attn.num_heads
        head_dim = hidden.shape[-1] // heads
        shape = (rows, heads, width + max_new_tokens, head_dim)
        # Under autocast (bf16 on CUDA) keys and values come out of the projections in the autocast dtype:
        # store them so, as transformers' cache does (half the memory of float32 buffers, no casts per step).
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        self._keys = [hidden.new_empty(shape, dtype=dtype) for _ in self._blocks]
        self._values = [hidden.new_empty(shape, dtype=dtype) for _ in self._blocks]
        # Query i sees keys j <= i that are real tokens; a padding query also sees itself, so that no softmax
        # row is empty (an all-masked row gives NaN, which would reach the cache).
        causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()
        allowed = causal & attention_mask.bool()[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool, device=input_ids.device)
        self._length = 0
        return self._forward(hidden, allowed[:, None])

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One token per row; returns the (A, V) next-token logits.

        Args:
            tokens: (A,) the tokens just taken.
            position_ids: (A,) their positions.
            attention_mask: (A, L + 1) over the cached columns and this one, 1 for real tokens.
        """
        transformer = self.model.transformer
        hidden = transformer.wte(tokens[:, None]) + transformer.wpe(position_ids[:, None])  # (A, 1, C)
        return self._forward(hidden, attention_mask.bool()[:, None, None, :])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) cache rows: ``rows`` (A',) indexes the current rows."""
        self._keys = [keys[rows] for keys in self._keys]
        self._values = [values[rows] for values in self._values]

    def _forward(self, hidden: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The blocks over ``hidden`` (A, T, C) at cache columns [L, L + T); logits at the last position."""
        rows, new, channels = hidden.shape
        start, end = self._length, self._length + new
        hidden = hidden.reshape(rows * new, channels)  # 2-D between the attentions: plain addmm, no reshapes
        for block, keys, values in zip(self._blocks, self._keys, self._values, strict=True):
            heads, head_dim = keys.shape[1], keys.shape[3]
            query, key, value = block.attention(_layer_norm(block.ln_1, hidden)).split(channels, dim=-1)
            keys[:, :, start:end] = key.view(rows, new, heads, head_dim).transpose(1, 2)
            values[:, :, start:end] = value.view(rows, new, heads, head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                query.view(rows, new, heads, head_dim).transpose(1, 2),
                keys[:, :, :end], values[:, :, :end], attn_mask=allowed, scale=block.scaling,
            )  # fmt: skip
            hidden = hidden + block.attention_output(attended.transpose(1, 2).reshape(rows * new, channels))
            hidden = hidden + block.mlp_output(block.activation(block.mlp_input(_layer_norm(block.ln_2, hidden))))
        self._length = end
        last = _layer_norm(self.model.transformer.ln_f, hidden.view(rows, new, channels)[:, -1])  # (A, C)
        return self.model.lm_head(last)

    @staticmethod
    def _block_weights(block: Any) -> _BlockWeights:
        return _BlockWeights(
            ln_1=block.ln_1,
            attention=_projection(block.attn.c_attn),
            attention_output=_projection(block.attn.c_proj),
            ln_2=block.ln_2,
            mlp_input=_projection(block.mlp.c_fc),
            mlp_output=_projection(block.mlp.c_proj),
            activation=block.mlp.act,
            scaling=float(block.attn.scaling),
        )
