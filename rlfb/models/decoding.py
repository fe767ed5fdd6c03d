"""Lean KV-cached decoders for the common model families, which :class:`~rlfb.models.sampler.TokenSampler`
runs instead of the model's own forward when one applies (:func:`lean_decoder_for`).

Sampling calls the model once per token. For a small model the cost of a call is mostly Python, not
arithmetic: transformers' GPT-2 forward makes about seventy module calls, builds a 4-D mask and grows its
cache by concatenation on every token (on rlfb-tiny, 32 rows: about 2 ms per step, of which the matrix
products are about 0.7 ms). :class:`GPT2Decoder` and :class:`LlamaDecoder` compute the same function from
the same weights with plain tensor operations:

* a LoRA adapter enters as merged weights ``W + scale * (B A)^T``, computed once per batch with peft's own
  ``get_delta_weight`` (the model's weights are not modified); with the adapter disabled, ``W`` alone;
* keys and values go to buffers of the batch's final width, so a step writes one column instead of
  copying the cache;
* rows that finish leave the batch (:meth:`GPT2Decoder.select_rows`), as with the transformers cache.

:class:`GPT2Decoder` applies to ``model_type == "gpt2"`` models (rlfb-tiny, GPT-2 and its fine-tunes),
:class:`NeoXDecoder` to GPT-NeoX (Pythia);
:class:`LlamaDecoder` to the Llama family, whose blocks are the same up to names and small variants
(``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma``, ``olmo2``, ``phi3``, ``smollm3``: RMSNorm, rotary
positions from the model's own rotary module, grouped-query attention, a gated MLP), without
sliding-window layers. Both need
eval mode and the model bare or with plain LoRA adapters on the projections of its blocks (``supports``);
anything else goes through the model's own forward, which :func:`lean_decoder_for` reports once per
model type. Their logits agree with transformers' to float rounding (tests/models/test_decoding.py). Merged and unmerged LoRA weights round differently in the last bits, which
is harmless here: the agents recompute every log-prob they train on with the model's own forward.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft import PeftType
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)


class _Projection(NamedTuple):
    """A Conv1D-style affine map y = x W + b of 2-D inputs, W of shape (in, out)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class _Linear(NamedTuple):
    """An ``nn.Linear``-style affine map y = x W^T + b, W of shape (out, in); bias may be None."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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


def _projection(module: Any) -> Any:
    """The effective weights of a Conv1D (a :class:`_Projection`) or an ``nn.Linear`` (a :class:`_Linear`),
    with the active LoRA adapters merged in (not in place)."""
    base: Any = module.get_base_layer() if isinstance(module, LoraLayer) else module
    weight = base.weight
    if isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged:
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                # the base weight's layout ((in, out) for Conv1D, (out, in) for Linear), scale included;
                # peft keeps adapters in float32 on a bf16 / fp16 model
                delta = module.get_delta_weight(adapter)  # type: ignore[attr-defined]
                weight = weight + delta.to(weight.dtype)
    return _Projection(weight, base.bias) if isinstance(base, Conv1D) else _Linear(weight, base.bias)


def _supports_lora(model: nn.Module, projections: set[Any], layer_type: type) -> bool:
    """Whether ``model`` is in eval mode, bare or with plain, unmerged LoRA adapters on ``projections`` only
    (each a ``layer_type`` underneath): what a lean decoder computes exactly."""
    peft_configs = getattr(model, "peft_config", None)
    if isinstance(peft_configs, dict) and any(
        getattr(config, "peft_type", None) != PeftType.LORA for config in peft_configs.values()
    ):
        return False  # prompt or prefix tuning add tokens a lean decoder does not know
    if model.training:
        return False  # dropout would differ
    for module in _unwrap(model).modules():
        if not isinstance(module, LoraLayer):
            continue
        if module not in projections or not isinstance(module.get_base_layer(), layer_type):
            return False  # an adapter on the embeddings, the head, or a layer the decoder does not know
        if any(module.lora_variant.values()) or any(getattr(module, "lora_bias", {}).values()):
            return False  # DoRA and other variants, LoRA biases
        if module.merged:
            return False  # peft unmerges it when the adapter is disabled; the decoder would keep it
    return all(isinstance(module.get_base_layer() if isinstance(module, LoraLayer) else module, layer_type)
               for module in projections)  # fmt: skip


def _attention_masks(attention_mask: torch.Tensor, new: int | None = None) -> torch.Tensor:
    """(A, 1, T, L + T) mask of T new tokens after L cached columns (a prefill: L = 0, T = the width).

    Query i (at column L + i) sees the keys j <= L + i that are real tokens (``attention_mask`` (A, L + T)).
    A padding query also sees itself, so that no softmax row is empty (an all-masked row gives NaN, which
    would reach the cache).
    """
    width = attention_mask.shape[1]
    new = width if new is None else new
    causal = torch.ones(new, width, dtype=torch.bool, device=attention_mask.device).tril(diagonal=width - new)
    allowed = causal & attention_mask.bool()[:, None, :]
    allowed |= torch.eye(new, width, dtype=torch.bool, device=attention_mask.device).roll(width - new, dims=1)
    return allowed[:, None]


def _cache_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Under autocast (bf16 on CUDA) keys and values come out of the projections in the autocast dtype:
    store them so, as transformers' cache does (half the memory of float32 buffers, no casts per step)."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


class Decoder:
    """What the sampler calls on a decoder: ``prefill``, ``step``, ``extend``, ``select_rows``, and, to keep a
    conversation's cache between turns, ``take_rows`` and ``load`` (see :class:`GPT2Decoder`).

    A cache holds columns [0, L) of every row; which of them are real tokens is the sampler's attention mask
    (padding columns are never attended). Positions are passed in, so a column's index is not its position.
    Rows taken out of a cache and loaded back are one tensor (layers, 2, n, heads, L, head_dim): each layer's
    keys, then its values.
    """

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        raise NotImplementedError

    @property
    def can_rebuild(self) -> bool:
        """Whether :meth:`take_rows` and :meth:`load` keep a cache exactly (a cache that keeps every column)."""
        return True

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Encode left-padded prompts into a fresh cache; returns the (A, V) logits of their last tokens."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One token per row; returns the (A, V) next-token logits."""
        raise NotImplementedError

    def extend(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """T new tokens per row after the L cached columns; returns the (A, V) logits of the last column.

        Args:
            input_ids: (A, T) the new tokens, left-padded within the block (each row's last column real).
            position_ids: (A, T) their positions.
            attention_mask: (A, L + T) over the cached columns and the new ones, 1 for real tokens.
        """
        raise NotImplementedError

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) cache rows: ``rows`` (A',) indexes the current rows."""
        raise NotImplementedError

    def take_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        """The (layers, 2, n, heads, L, head_dim) cached columns of ``rows`` (n,), a copy; None: of every row,
        which may share the cache's memory (the cache itself is unchanged)."""
        raise NotImplementedError

    def load(self, rows: torch.Tensor, extra_width: int) -> None:
        """Replace the cache by ``rows`` (layers, 2, A', heads, W, head_dim), with room for ``extra_width``
        more columns."""
        raise NotImplementedError


class LeanDecoder(Decoder):
    """A decoder of plain tensor operations (see the module docstring) over preallocated buffers.

    Subclasses hold one buffer (blocks, 2, A, heads, width, head_dim), filled up to ``_length`` columns, and
    read each block's keys and values as views of it (``_keys``, ``_values``): moving rows is one copy, not
    two per block.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model: Any = _unwrap(model)
        self._buffer = torch.zeros(0)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._blocks: list[Any] = []
        self._length = 0

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether the decoder computes exactly what ``model``'s forward does."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return int(self._buffer.shape[2]) if self._keys else 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) cache rows: ``rows`` (A',) indexes the current rows."""
        # index_select copies each row's (heads, width, head_dim) block whole; advanced indexing of the middle
        # dimension (``buffer[:, :, rows]``) computes every element's offset, 8x slower on CPU at 32 rows.
        self._set_buffer(self._buffer.index_select(2, rows))

    def take_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        """As :meth:`Decoder.take_rows`."""
        cached = self._buffer[..., : self._length, :]
        return cached if rows is None else cached.index_select(2, rows)

    def load(self, rows: torch.Tensor, extra_width: int) -> None:
        """A buffer of W + ``extra_width`` columns holding ``rows`` in its first W; the weights stay those of
        the last :meth:`prefill` (one collection, one set of weights)."""
        if not self._blocks:
            raise RuntimeError("load() needs the weights of a prefill first")
        *shape, width, head_dim = rows.shape
        buffer = rows.new_empty((*shape, width + extra_width, head_dim))
        buffer[..., :width, :] = rows
        self._set_buffer(buffer)
        self._length = width

    def _new_cache(self, hidden: torch.Tensor, heads: int, width: int, head_dim: int) -> None:
        shape = (len(self._blocks), 2, hidden.shape[0], heads, width, head_dim)
        self._set_buffer(hidden.new_empty(shape, dtype=_cache_dtype(hidden)))
        self._length = 0

    def _set_buffer(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer
        self._keys = [block[0] for block in buffer.unbind(0)]
        self._values = [block[1] for block in buffer.unbind(0)]


class GPT2Decoder(LeanDecoder):
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

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether :class:`GPT2Decoder` computes exactly what ``model``'s forward does.

        True for a GPT-2 causal LM in eval mode without cross-attention, bare or with plain, unmerged LoRA
        adapters (no DoRA or other variant, no LoRA bias) on the Conv1D layers of its blocks. False for
        every other peft method (prompt or prefix tuning add tokens this decoder does not know) and for a
        merged adapter (peft unmerges it when the adapter is disabled; the decoder would keep it).
        """
        inner = _unwrap(model)
        config = getattr(inner, "config", None)
        if getattr(config, "model_type", None) != "gpt2" or getattr(config, "add_cross_attention", False):
            return False
        if not hasattr(inner, "transformer") or not hasattr(inner, "lm_head"):
            return False
        projections = {
            module
            for block in inner.transformer.h
            for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        }
        return _supports_lora(model, projections, Conv1D)

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
        self._new_cache(hidden, heads, width + max_new_tokens, head_dim)
        return self._forward(hidden, _attention_masks(attention_mask))

    def extend(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`Decoder.extend`."""
        transformer = self.model.transformer
        hidden = transformer.wte(input_ids) + transformer.wpe(position_ids)  # (A, T, C)
        return self._forward(hidden, _attention_masks(attention_mask, input_ids.shape[1]))

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


class _LlamaBlockWeights(NamedTuple):
    """One layer of the Llama family, with the variants of its members (None where a member has no such part).

    Norms are the model's own RMSNorm modules, called as they are (Llama's, Gemma's ``1 + w``, OLMo2's: their
    own numerics).
    """

    attention_input_norm: nn.Module | None  # Llama's input_layernorm (OLMo2 has none)
    attention_output_norm: nn.Module | None  # OLMo2's post_attention_layernorm, on the attention's output
    mlp_input_norm: nn.Module | None  # Llama's post_attention_layernorm (OLMo2 has none)
    mlp_output_norm: nn.Module | None  # OLMo2's post_feedforward_layernorm
    query: _Linear | None  # separate projections, or ...
    key: _Linear | None
    value: _Linear | None
    qkv: _Linear | None  # ... Phi-3's fused one, split as (heads, kv_heads, kv_heads) x head_dim
    query_norm: nn.Module | None  # Qwen3: per head; OLMo2: over the whole projection
    key_norm: nn.Module | None
    output: _Linear
    gate: _Linear | None  # separate gate and up projections, or ...
    up: _Linear | None
    gate_up: _Linear | None  # ... Phi-3's fused one (gate first)
    down: _Linear
    activation: nn.Module
    scaling: float
    rotate: Any  # the family's apply_rotary_pos_emb, or None for a layer without RoPE (SmolLM3's NoPE layers)


def _optional_projection(module: Any, name: str) -> _Linear | None:
    return _projection(getattr(module, name)) if hasattr(module, name) else None


class LlamaDecoder(LeanDecoder):
    """KV-cached prefill and decode steps of a Llama-family model (see the module docstring).

    Per layer, with x the residual stream: ``x += o(attention(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))``,
    then ``x += down(act(gate(n2(x))) * up(n2(x)))``; rotary cos/sin come from the model's own
    ``rotary_emb`` (so every RoPE scaling it implements is honoured) and grouped-query attention shares each
    key/value head between ``heads / kv_heads`` query heads. The members' variants: Qwen2's q/k/v biases,
    Qwen3's per-head query and key norms, Gemma's scaled embeddings (its embedding module scales them) and
    ``1 + w`` norms, OLMo2's norms after attention and MLP instead of before, and over whole projections,
    Phi-3's fused qkv and gate-up projections, SmolLM3's layers without RoPE.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
        >>> LlamaDecoder.supports(model)
        True
        >>> prompt, mask = torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]])
        >>> with torch.no_grad():
        ...     logits = LlamaDecoder(model).prefill(prompt, mask, max_new_tokens=2)
        ...     expected = model(prompt, attention_mask=mask, position_ids=torch.tensor([[0, 0, 1]])).logits[:, -1]
        >>> bool(torch.allclose(logits, expected, atol=1e-5))
        True
    """

    MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo2", "phi3", "smollm3"})
    _PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")),
                    ("mlp", ("gate_proj", "up_proj", "gate_up_proj", "down_proj")))

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True for a causal LM of :attr:`MODEL_TYPES` without sliding-window layers, in eval mode, bare or
        with plain LoRA adapters on the attention and MLP projections of its layers."""
        inner = _unwrap(model)
        config = getattr(inner, "config", None)
        if getattr(config, "model_type", None) not in LlamaDecoder.MODEL_TYPES:
            return False
        if not hasattr(inner, "model") or not hasattr(inner, "lm_head") or not hasattr(inner.model, "rotary_emb"):
            return False
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            if any(kind != "full_attention" for kind in layer_types):
                return False  # sliding-window layers (Qwen2 / Qwen3 with use_sliding_window)
        elif getattr(config, "sliding_window", None) is not None:
            return False  # Mistral, Phi-3 with a sliding window
        if getattr(config, "pretraining_tp", 1) != 1:
            return False
        projections = {
            getattr(getattr(layer, part), name)
            for layer in inner.model.layers
            for part, names in LlamaDecoder._PROJECTIONS
            for name in names
            if hasattr(getattr(layer, part), name)
        }
        return _supports_lora(model, projections, nn.Linear)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`GPT2Decoder.prefill`."""
        decoder = self.model.model
        self._blocks = [self._block_weights(layer) for layer in decoder.layers[: self.model.config.num_hidden_layers]]
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = decoder.embed_tokens(input_ids)
        attention = decoder.layers[0].self_attn
        heads = self.model.config.num_key_value_heads
        self._new_cache(hidden, heads, input_ids.shape[1] + max_new_tokens, attention.head_dim)
        return self._forward(hidden, position_ids, _attention_masks(attention_mask))

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`GPT2Decoder.step`."""
        hidden = self.model.model.embed_tokens(tokens[:, None])  # (A, 1, C)
        return self._forward(hidden, position_ids[:, None], attention_mask.bool()[:, None, None, :])

    def extend(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`Decoder.extend`."""
        hidden = self.model.model.embed_tokens(input_ids)  # (A, T, C)
        return self._forward(hidden, position_ids, _attention_masks(attention_mask, input_ids.shape[1]))

    def _forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The layers over ``hidden`` (A, T, C) at cache columns [L, L + T); logits at the last position."""
        rows, new, _ = hidden.shape
        start, end = self._length, self._length + new
        cos, sin = self.model.model.rotary_emb(hidden, position_ids)  # (A, T, D) each
        for block, keys, values in zip(self._blocks, self._keys, self._values, strict=True):
            kv_heads, head_dim = keys.shape[1], keys.shape[3]
            x = hidden if block.attention_input_norm is None else block.attention_input_norm(hidden)
            query, key, value = self._query_key_value(block, x, kv_heads, head_dim)
            query = query.transpose(1, 2)
            key = key.transpose(1, 2)
            if block.rotate is not None:
                query, key = block.rotate(query, key, cos, sin)
            keys[:, :, start:end] = key
            values[:, :, start:end] = value.transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                query, keys[:, :, :end], values[:, :, :end], attn_mask=allowed, scale=block.scaling,
                enable_gqa=query.shape[1] != kv_heads,
            )  # (A, H, T, D)
            attended = block.output(attended.transpose(1, 2).reshape(rows, new, -1))
            hidden = hidden + (attended if block.attention_output_norm is None else block.attention_output_norm(attended))
            x = hidden if block.mlp_input_norm is None else block.mlp_input_norm(hidden)
            if block.gate_up is not None:
                gate, up = block.gate_up(x).chunk(2, dim=-1)
            else:
                assert block.gate is not None and block.up is not None
                gate, up = block.gate(x), block.up(x)
            mlp = block.down(block.activation(gate) * up)
            hidden = hidden + (mlp if block.mlp_output_norm is None else block.mlp_output_norm(mlp))
        self._length = end
        return self.model.lm_head(self.model.model.norm(hidden[:, -1]))

    @staticmethod
    def _query_key_value(block: _LlamaBlockWeights, x: torch.Tensor, kv_heads: int,
                         head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, T, heads, D) queries and (A, T, kv_heads, D) keys and values, normed as the family norms them."""
        rows, new, _ = x.shape
        if block.qkv is not None:
            fused = block.qkv(x)
            query, key, value = fused.split([fused.shape[-1] - 2 * kv_heads * head_dim, kv_heads * head_dim,
                                             kv_heads * head_dim], dim=-1)
        else:
            assert block.query is not None and block.key is not None and block.value is not None
            query, key, value = block.query(x), block.key(x), block.value(x)
        per_head = block.query_norm is not None and block.query_norm.weight.numel() == head_dim
        if block.query_norm is not None and block.key_norm is not None and not per_head:
            query, key = block.query_norm(query), block.key_norm(key)  # OLMo2: over the whole projection
        query = query.view(rows, new, -1, head_dim)
        key = key.view(rows, new, kv_heads, head_dim)
        if per_head and block.query_norm is not None and block.key_norm is not None:
            query, key = block.query_norm(query), block.key_norm(key)  # Qwen3: over each head
        return query, key, value.view(rows, new, kv_heads, head_dim)

    @staticmethod
    def _block_weights(layer: Any) -> _LlamaBlockWeights:
        attention, mlp = layer.self_attn, layer.mlp
        family = sys.modules[type(attention).__module__]
        post_norms = not hasattr(layer, "input_layernorm")  # OLMo2: norms after attention and MLP
        return _LlamaBlockWeights(
            attention_input_norm=None if post_norms else layer.input_layernorm,
            attention_output_norm=layer.post_attention_layernorm if post_norms else None,
            mlp_input_norm=None if post_norms else layer.post_attention_layernorm,
            mlp_output_norm=layer.post_feedforward_layernorm if post_norms else None,
            query=_optional_projection(attention, "q_proj"),
            key=_optional_projection(attention, "k_proj"),
            value=_optional_projection(attention, "v_proj"),
            qkv=_optional_projection(attention, "qkv_proj"),
            query_norm=getattr(attention, "q_norm", None),
            key_norm=getattr(attention, "k_norm", None),
            output=_projection(attention.o_proj),
            gate=_optional_projection(mlp, "gate_proj"),
            up=_optional_projection(mlp, "up_proj"),
            gate_up=_optional_projection(mlp, "gate_up_proj"),
            down=_projection(mlp.down_proj),
            activation=getattr(mlp, "act_fn", None) or mlp.activation_fn,
            scaling=float(attention.scaling),
            rotate=family.apply_rotary_pos_emb if getattr(attention, "use_rope", True) else None,
        )


class NeoXDecoder(LeanDecoder):
    """KV-cached prefill and decode steps of a GPT-NeoX model (Pythia; see the module docstring).

    Per layer: ``q, k, v`` from one fused projection laid out per head as ``[q | k | v]``, RoPE on the first
    ``rotary_pct`` of each head (the model's own rotary module and ``apply_rotary_pos_emb``), and either the
    parallel residual ``x += attention(ln1(x)) + mlp(ln2(x))`` or the sequential one, as the config says.
    """

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True for a ``gpt_neox`` causal LM in eval mode, bare or with plain LoRA adapters on its layers'
        attention and MLP projections."""
        inner = _unwrap(model)
        if getattr(getattr(inner, "config", None), "model_type", None) != "gpt_neox":
            return False
        if not hasattr(inner, "gpt_neox") or inner.get_output_embeddings() is None:
            return False
        projections = {
            module
            for layer in inner.gpt_neox.layers
            for module in (layer.attention.query_key_value, layer.attention.dense, layer.mlp.dense_h_to_4h,
                           layer.mlp.dense_4h_to_h)
        }
        return _supports_lora(model, projections, nn.Linear)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`GPT2Decoder.prefill`."""
        body = self.model.gpt_neox
        self._blocks = [(layer, _projection(layer.attention.query_key_value), _projection(layer.attention.dense),
                         _projection(layer.mlp.dense_h_to_4h), _projection(layer.mlp.dense_4h_to_h))
                        for layer in body.layers]
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = body.embed_in(input_ids)
        attention = body.layers[0].attention
        self._new_cache(hidden, self.model.config.num_attention_heads, input_ids.shape[1] + max_new_tokens,
                        attention.head_size)
        return self._forward(hidden, position_ids, _attention_masks(attention_mask))

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`GPT2Decoder.step`."""
        hidden = self.model.gpt_neox.embed_in(tokens[:, None])  # (A, 1, C)
        return self._forward(hidden, position_ids[:, None], attention_mask.bool()[:, None, None, :])

    def extend(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`Decoder.extend`."""
        hidden = self.model.gpt_neox.embed_in(input_ids)  # (A, T, C)
        return self._forward(hidden, position_ids, _attention_masks(attention_mask, input_ids.shape[1]))

    def _forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        rows, new, channels = hidden.shape
        start, end = self._length, self._length + new
        body = self.model.gpt_neox
        cos, sin = body.rotary_emb(hidden, position_ids)
        rotate = sys.modules[type(body.layers[0].attention).__module__].apply_rotary_pos_emb
        for (layer, qkv, dense, up, down), keys, values in zip(self._blocks, self._keys, self._values, strict=True):
            heads, head_dim = keys.shape[1], keys.shape[3]
            fused = qkv(layer.input_layernorm(hidden)).view(rows, new, heads, 3 * head_dim).transpose(1, 2)
            query, key, value = fused.chunk(3, dim=-1)
            query, key = rotate(query, key, cos, sin)
            keys[:, :, start:end] = key
            values[:, :, start:end] = value
            attended = F.scaled_dot_product_attention(query, keys[:, :, :end], values[:, :, :end], attn_mask=allowed,
                                                      scale=layer.attention.scaling)
            attention_output = dense(attended.transpose(1, 2).reshape(rows, new, channels))
            if layer.use_parallel_residual:
                hidden = hidden + attention_output + down(layer.mlp.act(up(layer.post_attention_layernorm(hidden))))
            else:
                hidden = hidden + attention_output
                hidden = hidden + down(layer.mlp.act(up(layer.post_attention_layernorm(hidden))))
        self._length = end
        return self.model.get_output_embeddings()(body.final_layer_norm(hidden[:, -1]))


class ForwardDecoder(Decoder):
    """The model's own forward and its transformers cache, for the models no lean decoder computes.

    Between turns (:meth:`take_rows`, :meth:`load`) its layers' key and value tensors are read and replaced,
    which is exact for a ``DynamicCache`` of full-attention layers (:attr:`can_rebuild`); a cache that drops
    or transforms columns (sliding windows, quantized, linear attention) is not taken apart.

    Args:
        model: A Hugging Face causal LM (or a peft model around one) that accepts ``cache=``,
            ``position_ids=`` and ``logits_to_keep=``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache: Any = None

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        layers = getattr(self.cache, "layers", None)
        return int(layers[0].keys.shape[0]) if layers else 0

    @property
    def can_rebuild(self) -> bool:
        """True for a ``DynamicCache`` whose layers all keep every column (``DynamicLayer``), of one shape."""
        if type(self.cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            return False
        return len({(layer.keys.shape, layer.values.shape) for layer in self.cache.layers}) == 1

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`Decoder.prefill` (the cache grows as it goes: ``max_new_tokens`` is not needed)."""
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1)
        self.cache = outputs.cache
        return outputs.logits[:, -1, :]

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`Decoder.step`."""
        outputs = self.model(input_ids=tokens[:, None], attention_mask=attention_mask,
                             position_ids=position_ids[:, None], cache=self.cache, use_cache=True)
        self.cache = outputs.cache
        return outputs.logits[:, -1, :]

    def extend(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`Decoder.extend`."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = outputs.cache
        return outputs.logits[:, -1, :]

    def select_rows(self, rows: torch.Tensor) -> None:
        """As :meth:`Decoder.select_rows`."""
        self.cache.batch_select_indices(rows)

    def take_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        """As :meth:`Decoder.take_rows`; needs :attr:`can_rebuild`."""
        every = slice(None) if rows is None else rows
        return torch.stack([torch.stack([layer.keys[every], layer.values[every]]) for layer in self.cache.layers])

    def load(self, rows: torch.Tensor, extra_width: int) -> None:
        """As :meth:`Decoder.load` (the layers grow by concatenation: ``extra_width`` is not needed)."""
        for layer, (keys, values) in zip(self.cache.layers, rows, strict=True):
            layer.keys, layer.values = keys, values


LEAN_DECODERS: tuple[type[LeanDecoder], ...] = (GPT2Decoder, LlamaDecoder, NeoXDecoder)
_REPORTED: set[str] = set()


def lean_decoder_for(model: nn.Module) -> LeanDecoder | None:
    """A lean decoder for ``model``, or None (the sampler then calls the model's own forward).

    The first time a model type gets None, a log line says so (``rlfb.models.decoding``, level INFO for a
    model in training mode or with an adapter the decoders do not compute, WARNING for an unknown family),
    so a slower rollout is never silent.
    """
    for decoder in LEAN_DECODERS:
        if decoder.supports(model):
            return decoder(model)
    model_type = str(getattr(getattr(_unwrap(model), "config", None), "model_type", type(model).__name__))
    if model_type not in _REPORTED and not model.training:
        _REPORTED.add(model_type)
        covered = {"gpt2", "gpt_neox", *LlamaDecoder.MODEL_TYPES}
        known = model_type in covered
        logger.log(logging.INFO if known else logging.WARNING,
                   "sampling %s with the generic path (the model's own forward, slower for small models): %s",
                   model_type, "its adapter or settings are not ones the lean decoder computes exactly" if known
                   else f"lean decoders cover {', '.join(sorted(covered))}")
    return None


def decoder_for(model: nn.Module, lean: bool = True) -> Decoder:
    """The lean decoder of ``model`` (:func:`lean_decoder_for`) where one applies and ``lean``, else its own
    forward (:class:`ForwardDecoder`)."""
    decoder = lean_decoder_for(model) if lean else None
    return decoder if decoder is not None else ForwardDecoder(model)
