"""The policy: a causal LM with a LoRA adapter, a value head, and its own frozen reference.

One copy of the base weights serves two roles. With the adapter enabled it is the policy being trained;
inside ``peft_model.disable_adapter()`` it is the reference policy of the KL penalty (the model as it was
before training). No second model is loaded and nothing is deep-copied, so a 1B model costs 1B weights,
not 2B.

The value head is one ``nn.Linear(hidden_size, 1)`` on the last hidden state of the shared trunk, as in
the original RLHF code of Ziegler et al. (2019), where the value function is a scalar head on the policy's
transformer. Value-loss gradients flow into the LoRA parameters (the trunk's trainable part); the value
coefficient of the loss (``vf_coef``, 0.1 in Ziegler et al. 2019) keeps them from dominating the policy
gradient. docs/algorithms.md discusses the choice.

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    >>> policy = Policy(base, tokenizer=None, lora=LoraSettings(r=4), device="cpu")
    >>> policy.lora_target_modules
    ['c_attn']
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> out = policy.forward_logprobs_values(ids, torch.ones_like(ids), completion_start=2)
    >>> out.logprobs.shape, out.values.shape
    (torch.Size([1, 2]), torch.Size([1, 2]))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import (
    load_peft_weights,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from rlfb.errors import ConfigError, ModelNotFoundError
from rlfb.models.loading import load_model, resolve_device

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"

# Leaf-module names that are attention projections in common architectures. Used only when peft's table
# (model_type -> modules) does not know the model; LoRA on attention is the setting of Hu et al. (2021).
# The query, key and value projections of attention layers, fused or not, as the families name them:
# q/k/v_proj (Llama, Mistral, Qwen, Gemma, OPT, OLMo, SmolLM), c_attn (GPT-2), qkv_proj (Phi-3),
# query_key_value (GPT-NeoX, Falcon, BLOOM), Wqkv (MPT), query/key/value (BERT-style), q/k/v_lin (DistilBERT).
QKV_PROJECTION_NAMES = (
    "q_proj", "k_proj", "v_proj", "c_attn", "qkv_proj", "query_key_value", "Wqkv", "query", "key", "value",
    "q_lin", "k_lin", "v_lin",
)  # fmt: skip
ALL_LINEAR = "all-linear"


@dataclass
class LoraSettings:
    """LoRA adapter settings (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    Attributes:
        r: Rank of the update ``B @ A``. 16 learns noticeably faster than 8 on the built-in tiny model
            at the same cost per step (the adapter is a small fraction of the compute).
        alpha: Scale numerator; the update is multiplied by ``alpha / r`` (2.0 by default, as in the
            common ``alpha = 2r`` setting).
        dropout: Dropout on the adapter input (peft's ``lora_dropout``), applied in the forward passes that
            compute a gradient and in no other: sampling, evaluation and the no-grad passes of the updates
            (old and reference log-probs) see the whole adapter, and the base model's own dropout stays off
            (:class:`GradientPassDropout`; docs/algorithms.md, "Regularization").
        target_modules: Module names to adapt. ``None`` applies one rule to every family: the query, key
            and value projections of the attention layers, fused or not (GPT-2: ``c_attn``; Llama, Qwen,
            Mistral, Gemma, OPT: ``q_proj, k_proj, v_proj``; Phi-3: ``qkv_proj``; GPT-NeoX, Falcon:
            ``query_key_value``), never the output projection, the MLP, the embeddings or the head.
            ``["all-linear"]`` adapts every linear layer but the head (peft's ``all-linear``).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


class GradientPassDropout(nn.Dropout):
    """Dropout that acts exactly when autograd records (``torch.is_grad_enabled()``), whatever the mode.

    The policy stays in eval mode for good (the base model's dropout off, the lean decoders usable); peft's
    LoRA dropout modules are replaced by this one, so every gradient pass of every agent drops adapter
    inputs and every no-grad or inference pass does not.

    Example:
        >>> dropout, x = GradientPassDropout(p=0.5).eval(), torch.ones(1000)
        >>> with torch.no_grad():
        ...     bool((dropout(x) == x).all())
        True
        >>> kept = dropout(x.requires_grad_()) != 0
        >>> 400 < int(kept.sum()) < 600
        True
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(input, self.p, training=torch.is_grad_enabled(), inplace=self.inplace)


def dropout_in_gradient_passes(model: nn.Module) -> int:
    """Replace every LoRA dropout module of a peft ``model`` by :class:`GradientPassDropout`; returns how many."""
    replaced = 0
    for module in model.modules():
        adapters = getattr(module, "lora_dropout", None)
        if not isinstance(adapters, nn.ModuleDict):
            continue
        for name, dropout in adapters.items():
            if isinstance(dropout, nn.Dropout) and not isinstance(dropout, GradientPassDropout):
                adapters[name] = GradientPassDropout(p=dropout.p)
                replaced += 1
    return replaced


# Encode a prompt once for the rows that share it only when the prompt tokens saved, times the model's
# parameters (what each token costs), reach this: the split costs a second model call, whose fixed cost on
# a small model is what a forward of about 170 tokens of rlfb-tiny's 0.87M parameters costs (on CPU, one
# thread: 16 rows x 26 columns in 17 ms, one row in 5 ms). benchmarks/shared_prompts.py (rlfb-tiny, 16 rows,
# forward and backward): 72-84 prompt tokens saved (6-column prompts) 0.96-1.18x between runs, so left
# whole; 240-280 (20 columns) 1.25-1.29x; 480-560 (40 columns) 1.40-1.66x. At 124M parameters every saved
# token pays.
MIN_SHARED_PROMPT_WORK = 2e8  # prompt tokens saved x parameters


def _shared_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int,
                    parameters: int | None) -> torch.Tensor | None:
    """(B,) the index of each row's prompt among the distinct prompts (columns before ``completion_start``,
    ids and mask), or None when no prompt repeats or encoding each once would save less than
    ``MIN_SHARED_PROMPT_WORK`` (prompt tokens saved x ``parameters``; ``parameters=None``: any saving).

    >>> ids = torch.tensor([[5, 6, 1], [5, 6, 2], [7, 8, 3], [5, 6, 4]])
    >>> _shared_prompts(ids, torch.ones_like(ids), 2, parameters=10**8)  # 2 of 4 prompts: 4 tokens saved
    tensor([0, 0, 1, 0])
    >>> _shared_prompts(ids, torch.ones_like(ids), 2, parameters=10**6) is None  # 4e6, too little to pay
    True
    """
    rows = input_ids.shape[0]
    if parameters is not None and (rows - 1) * completion_start * parameters < MIN_SHARED_PROMPT_WORK:
        return None  # even one prompt for every row would not pay: no need to look (rlfb-tiny's passes)
    prompts = torch.cat([input_ids[:, :completion_start], attention_mask[:, :completion_start].long()], 1)
    distinct, copies = torch.unique(prompts, dim=0, return_inverse=True)
    saved_tokens = (rows - len(distinct)) * completion_start
    if saved_tokens == 0 or (parameters is not None and saved_tokens * parameters < MIN_SHARED_PROMPT_WORK):
        return None
    return copies


class PolicyForward(NamedTuple):
    """Per-completion-token outputs of one forward pass; every tensor is (B, T) float32.

    ``logprobs[b, t]`` is log pi(completion token t | prompt, tokens < t); ``values[b, t]`` is V of the
    state before token t (None without a value head); ``entropy[b, t]`` is the entropy of the next-token
    distribution at that state (None when not requested).
    """

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None


def default_target_modules(model: nn.Module) -> list[str]:
    """The modules LoRA adapts by default: the attention's query, key and value projections (one rule).

    Args:
        model: A Hugging Face causal LM.

    Returns:
        Module names for ``peft.LoraConfig.target_modules``, sorted.

    Raises:
        ConfigError: When no linear layer is named like a query, key or value projection; the message lists
            the linear layers found so the user can name some.
    """
    linear_names = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear | Conv1D)}
    )
    found = [name for name in linear_names if name in QKV_PROJECTION_NAMES]
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ConfigError(
            f"cannot pick LoRA target modules for model type {model_type!r}: no linear layer is named like a "
            f"query, key or value projection. Linear layers found: {', '.join(linear_names) or 'none'}. "
            "Set lora.target_modules to some of them, or to [all-linear]."
        )
    return found


class Policy:
    """A causal LM with a LoRA adapter and an optional value head; the adapter-disabled model is the reference.

    Args:
        model: A Hugging Face causal LM, or a ``PeftModel`` that already carries a LoRA adapter.
        tokenizer: Its tokenizer (stored for users of the policy; the forward passes take token ids).
        lora: Adapter settings; ignored when ``model`` is already a ``PeftModel``.
        value_head: Whether to add a scalar value head (PPO needs one; REINFORCE does not).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``, ...
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        lora: LoraSettings | None = None,
        value_head: bool = True,
        device: str | torch.device = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.tokenizer = tokenizer
        lora = lora or LoraSettings()
        if isinstance(model, PeftModel):
            self.model = model
        else:
            target_modules: list[str] | str = lora.target_modules or default_target_modules(model)
            if target_modules == [ALL_LINEAR]:
                target_modules = ALL_LINEAR  # peft's every linear layer but the output head
            # GPT-2 style Conv1D layers store the weight transposed; peft must be told.
            # (a target is a module's last name, "c_attn", or a dotted suffix of its path, "h.3.mlp.c_proj", as peft matches)
            conv1d_targets = any(
                isinstance(module, Conv1D) and (target_modules == ALL_LINEAR or any(
                    name == target or name.endswith(f".{target}") for target in target_modules))
                for name, module in model.named_modules()
            )
            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; a float is fine
                lora_dropout=lora.dropout,
                target_modules=target_modules,
                fan_in_fan_out=conv1d_targets,
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(model, config)
        self.model.to(self.device)
        # Eval mode for good: the base model's dropout would make two forward passes of the same weights
        # disagree and break the PPO ratio (Ziegler et al. 2019 train without dropout). LoRA dropout, when
        # asked for, acts in the gradient passes only.
        self.model.eval()
        dropout_in_gradient_passes(self.model)
        self.value_head: nn.Linear | None = None
        if value_head:
            hidden_size = self.model.get_input_embeddings().embedding_dim
            self.value_head = nn.Linear(hidden_size, 1).to(self.device)
            # Zero init: V = 0 at the start, so early advantages equal the (KL-penalised) returns rather
            # than returns minus noise from a random head.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self._scorer: Any = None
        # What a token costs the forward, for the choice to encode shared prompts once (_shared_prompts)
        self._parameter_count = sum(parameter.numel() for parameter in self.model.parameters())
        # A sliding-window layer's cache keeps only the window's last columns; past it the split would differ
        config = getattr(self.model, "config", None)
        sliding = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", None) is False:  # Qwen2 declares a window it does not use
            sliding = None
        self._sliding_window: int | None = sliding if isinstance(sliding, int) else None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        lora: LoraSettings | None = None,
        value_head: bool = True,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
    ) -> Policy:
        """Load a built-in model name, hub id or local path and wrap it with a fresh LoRA adapter.

        Args:
            name_or_path: ``"rlfb-tiny"``, a hub id such as ``"gpt2"``, or a local model directory.
            lora: Adapter settings (defaults: :class:`LoraSettings`).
            value_head: Whether to add the value head.
            device: ``"auto"`` picks CUDA when present.
            dtype: Weight dtype; ``None`` keeps the loader's default (fp32 on CPU).

        Returns:
            The policy, in eval mode, on ``device``.
        """
        model, tokenizer = load_model(name_or_path, device=resolve_device(device), dtype=dtype)
        policy = cls(model, tokenizer, lora=lora, value_head=value_head, device=device)
        # peft would record the directory the weights were read from (for rlfb-tiny, a cache path on this
        # machine); the name as given resolves on any machine, so adapter_config.json records that.
        for adapter_config in policy.model.peft_config.values():
            adapter_config.base_model_name_or_path = name_or_path
        return policy

    # ---------------------------------------------------------------- properties
    def describe(self) -> str:
        """One line: the LoRA rank and the modules it adapts (leaf names), its trainable parameters, and
        whether sampling runs on a lean decoder or the model's own forward."""
        from rlfb.models.decoding import lean_decoder_for

        leaves = sorted({name.rsplit(".", 1)[-1] for name in self.lora_target_modules})
        config = self.model.peft_config[self.model.active_adapter]
        trainable = sum(parameter.numel() for parameter in self.trainable_parameters())
        decoder = lean_decoder_for(self.model)
        model_type = getattr(self.model.get_base_model().config, "model_type", "?")
        path = f"the lean {type(decoder).__name__}" if decoder is not None else "the model's own forward (slower)"
        return (f"LoRA r={config.r} on {', '.join(leaves)} of {model_type} ({trainable:,} trainable parameters); "
                f"sampling with {path}")

    @property
    def lora_target_modules(self) -> list[str]:
        """The module names the adapter is attached to, sorted."""
        return sorted(getattr(self.model.peft_config[self.model.active_adapter], "target_modules", None) or [])

    @property
    def scorer(self) -> Any:
        """A ``rlfb.rewards.scoring.ModelScorer`` over this model (reference = adapter disabled)."""
        if self._scorer is None:
            from rlfb.rewards.scoring import ModelScorer

            self._scorer = ModelScorer(self.model, self.tokenizer)
        return self._scorer

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA parameters and the value head's; the base weights stay frozen."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return params

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on CUDA; nothing (fp32) on CPU, where bf16 is slow and imprecise."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the reference policy: the same weights with the LoRA adapter switched off."""
        with self.model.disable_adapter():
            yield

    # ---------------------------------------------------------------- forward passes
    def forward_logprobs_values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_start: int,
        *,
        temperature: float = 1.0,
        with_values: bool = True,
        with_entropy: bool = True,
        entropy_grad: bool = True,
        share_prompts: bool | None = False,
    ) -> PolicyForward:
        """Log-probs, values and entropies of the completion tokens in one forward pass.

        Args:
            input_ids: (B, L) the left-padded prompt followed by the right-padded completion.
            attention_mask: (B, L) 1 for real tokens.
            completion_start: Index where the completion begins (the padded prompt length P); T = L - P.
            temperature: Logits are divided by it, so log-probs match the sampling distribution
                (Huang et al. 2024, "The N+ implementation details of RLHF with PPO").
            with_values: Compute values (ignored without a value head).
            with_entropy: Compute entropies.
            entropy_grad: Let gradients flow through the entropies. False computes them detached, for a
                metric: with an entropy bonus of 0, the (B, T, V) entropy graph would cost memory and a
                backward pass for nothing.
            share_prompts: Whether rows whose prompt columns are equal (the k completions of a group)
                encode their prompt once: the same values to float rounding, with 1 / k of the prompts'
                compute, rounding in the last bits differently from one pass (so two passes whose outputs
                are compared, such as PPO's pi_old and pi_new, must choose alike). ``None``: when that saves
                enough to pay for a second model call (:func:`_shared_prompts`); ``True``: whenever a
                prompt repeats; ``False`` (default): never. Never past a sliding attention window.

        Returns:
            A :class:`PolicyForward` of (B, T) tensors. Gradients flow unless called under ``no_grad``.
        """
        num_completion = input_ids.shape[1] - completion_start
        if completion_start < 1 or num_completion < 1:
            raise ValueError(
                f"completion_start={completion_start} must leave at least one prompt and one completion "
                f"token in a sequence of length {input_ids.shape[1]}"
            )
        want_values = with_values and self.value_head is not None
        # Positions count real tokens only, so a left-padded prompt sees the same positions as unpadded.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        copies = None
        within_window = self._sliding_window is None or input_ids.shape[1] <= self._sliding_window
        if share_prompts is not False and within_window:
            parameters = self._parameter_count if share_prompts is None else None
            copies = _shared_prompts(input_ids, attention_mask, completion_start, parameters)
        with self.autocast():
            if copies is None:
                output = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    output_hidden_states=want_values,
                    use_cache=False,
                    # The logits at P-1 .. L-2 predict the completion tokens; keep only those (plus the last,
                    # dropped below) instead of materialising (B, L, V).
                    logits_to_keep=num_completion + 1,
                )
                logits, hidden = output.logits[:, :-1], output.hidden_states[-1] if want_values else None
            else:
                logits, hidden = self._forward_shared_prompts(
                    input_ids, attention_mask, position_ids, completion_start, copies, want_values
                )
        logits = logits.float()  # (B, T, V)
        if temperature != 1.0:  # dividing by 1 would copy (B, T, V) floats for an identical result
            logits = logits / temperature
        log_distribution = torch.log_softmax(logits, dim=-1)  # (B, T, V)
        targets = input_ids[:, completion_start:]  # (B, T)
        logprobs = log_distribution.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = -(log_distribution.exp() * log_distribution).sum(-1)  # (B, T)
        values = None
        if want_values:
            assert self.value_head is not None and hidden is not None
            if copies is None:
                hidden = hidden[:, completion_start - 1 : -1]
            values = self.value_head(hidden.float()).squeeze(-1)  # (B, T) from the (B, T, H) states
        return PolicyForward(logprobs, values, entropy)

    def _forward_shared_prompts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        completion_start: int,
        copies: torch.Tensor,
        want_values: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (B, T, V) logits predicting the completion tokens, and the (B, T, H) last hidden states of the
        same positions (None unless ``want_values``), encoding each distinct prompt once.

        Pass 1 runs the distinct prompts (D rows) and keeps their keys and values; the cache rows are then
        repeated to the B rows (``copies`` (B,) indexes the distinct prompts; indexing is differentiable, so
        each prompt's gradient is the sum over the rows that share it); pass 2 runs the completion columns
        on top. The position before the first completion token is the prompt's last, whose outputs come
        from pass 1. The model's own forward both times, with its own cache; only the attention's
        arithmetic is split in two, which rounds in the last bits differently from one pass.
        """
        prompt = torch.zeros(int(copies.max()) + 1, dtype=torch.long, device=copies.device)
        prompt[copies] = torch.arange(len(copies), device=copies.device)  # a row (any) holding each prompt
        P = completion_start
        encoded = self.model(
            input_ids=input_ids[prompt, :P],
            attention_mask=attention_mask[prompt, :P],
            position_ids=position_ids[prompt, :P],
            output_hidden_states=want_values,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = encoded.cache
        cache.reorder_cache(copies)  # (D, ...) -> (B, ...)
        continued = self.model(
            input_ids=input_ids[:, P:],
            attention_mask=attention_mask,
            position_ids=position_ids[:, P:],
            cache=cache,
            output_hidden_states=want_values,
            use_cache=True,
        )
        logits = torch.cat([encoded.logits[copies], continued.logits[:, :-1]], 1)
        if not want_values:
            return logits, None
        last = encoded.hidden_states[-1][copies, -1:]
        return logits, torch.cat([last, continued.hidden_states[-1][:, :-1]], 1)

    @torch.no_grad()
    def reference_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_start: int,
        *,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """(B, T) log-probs of the completion tokens under the reference policy (adapter disabled)."""
        with self.reference():
            forward = self.forward_logprobs_values(
                input_ids,
                attention_mask,
                completion_start,
                temperature=temperature,
                with_values=False,
                with_entropy=False,
            )
        return forward.logprobs

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """Write the adapter (peft format: ``adapter_config.json``, ``adapter_model.safetensors``) and
        ``value_head.safetensors`` to ``directory``; plain peft code can load the adapter.

        ``adapter_config.json``'s ``base_model_name_or_path`` is the model name given to
        :meth:`from_pretrained` (``rlfb-tiny``, a hub id, or the user's path as written).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # rlfb never resizes the vocabulary, so the full embedding matrices need not be saved; peft's "auto"
        # would look the base model's name up on the hub to find out, a network call at every checkpoint
        # (the name is ``rlfb-tiny`` or the user's, not necessarily a local directory).
        self.model.save_pretrained(str(directory), save_embedding_layers=False)
        if self.value_head is not None:
            state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.value_head.state_dict().items()}
            save_file(state, str(directory / VALUE_HEAD_FILE))

    def load_adapter(self, directory: str | Path, require_value_head: bool = True) -> None:
        """Load adapter (and value head) weights written by :meth:`save` into this policy.

        Args:
            directory: an adapter directory (peft format).
            require_value_head: with a value head, fail when ``directory`` has none; False keeps the
                current head then (an SFT adapter continued by PPO starts from a zero value head).

        Raises:
            ModelNotFoundError: When ``directory`` holds no adapter, or the policy has a value head and
                the directory none (with ``require_value_head``).
        """
        directory = Path(directory)
        if not (directory / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"no LoRA adapter in {directory} (adapter_config.json missing); pass a directory written by "
                "Policy.save or a training checkpoint"
            )
        weights = load_peft_weights(str(directory), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ModelNotFoundError(
                f"the adapter in {directory} does not fit this model: unexpected keys {unexpected[:3]}; "
                "was it trained on another base model or with other LoRA target modules?"
            )
        if self.value_head is not None:
            head_path = directory / VALUE_HEAD_FILE
            if not head_path.is_file() and not require_value_head:
                return
            if not head_path.is_file():
                raise ModelNotFoundError(f"{head_path.name} missing in {directory}; the policy has a value head")
            self.value_head.load_state_dict(load_file(str(head_path), device=str(self.device)))
