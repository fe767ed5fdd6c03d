"""Training loops for pointwise feedback: binary labels (BCE), ratings (MSE), token labels (per-token BCE).

Pairwise preferences go through TRL's ``RewardTrainer`` (see :mod:`rlfb.rewards.training`); the three
pointwise kinds need only a short plain PyTorch loop, here. Inputs are tokenized exactly as the
``reward_model`` reward tokenizes what it scores, so a trained model scores what it was trained on.

Losses, with z the model's logit:
    pointwise: BCE(z, y) = -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]
    rating:    (z - y)^2
    token:     mean over labelled completion tokens t of BCE(z_t, y_t)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rlfb.rewards.feedback import segment_spans

if TYPE_CHECKING:
    from rlfb.rewards.training import RewardModelConfig

UNLABELLED = -1  # token label of prompt tokens and completion tokens no segment labels


def token_labels(tokenizer: Any, prompt: str, completion: str,
                 segments: Sequence[Sequence[Any]]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion and one label per token (``UNLABELLED``, 0 or 1).

    A completion token's label is the smallest label among the labelled segments it overlaps (a token
    is good only if every labelled character in it is); a token overlapping none is unlabelled.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(start, end, label) for start, end, label in segment_spans(segments) if label is not None]
    labels = [UNLABELLED] * len(prompt_ids)
    for token_start, token_end in encoded["offset_mapping"]:
        overlapping = [label for start, end, label in spans if start < token_end and token_start < end]
        labels.append(min(overlapping) if overlapping else UNLABELLED)
    return list(prompt_ids) + list(encoded["input_ids"]), labels


def train_pointwise(model: Any, tokenizer: Any, rows: list[dict[str, Any]], config: RewardModelConfig,
                    device: torch.device) -> None:
    """Train ``model`` in place on pointwise, rating or token rows (``config.kind``)."""
    generator = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup_steps = round(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    for module in model.modules():  # no dropout, as TRL's RewardTrainer does for pairwise feedback
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    order: list[int] = []
    for _ in range(total_steps):
        if len(order) < config.batch_size:  # refill with a fresh permutation for the next epoch
            permutation = list(range(len(rows)))
            generator.shuffle(permutation)
            order.extend(permutation)
        batch = [rows[index] for index in order[:config.batch_size]]
        del order[:config.batch_size]
        loss = _loss(model, tokenizer, batch, config, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    model.eval()


def _loss(model: Any, tokenizer: Any, batch: list[dict[str, Any]], config: RewardModelConfig,
          device: torch.device) -> torch.Tensor:
    if config.kind == "token":
        return _token_loss(model, tokenizer, batch, config, device)
    texts = [row["prompt"] + row["completion"] for row in batch]
    tokenizer.truncation_side = "left"  # as the reward_model reward: keep the completion's end
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=config.max_length,
                       add_special_tokens=False, return_tensors="pt").to(device)
    logits = model(**inputs).logits[:, 0]  # (B,)
    if config.kind == "pointwise":
        targets = torch.tensor([float(row["label"]) for row in batch], device=device)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    targets = torch.tensor([float(row["rating"]) for row in batch], device=device)
    return torch.nn.functional.mse_loss(logits, targets)


def _token_loss(model: Any, tokenizer: Any, batch: list[dict[str, Any]], config: RewardModelConfig,
                device: torch.device) -> torch.Tensor:
    encoded = [token_labels(tokenizer, row["prompt"], row["completion"], row["segments"]) for row in batch]
    encoded = [(ids[-config.max_length:], labels[-config.max_length:]) for ids, labels in encoded]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(encoded), length), UNLABELLED, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.tensor(row_labels)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[..., 0]  # (B, T)
    labelled = labels.to(device) != UNLABELLED
    if not labelled.any():  # a batch without labelled tokens teaches nothing; keep the graph for backward()
        return logits.sum() * 0.0
    return torch.nn.functional.binary_cross_entropy_with_logits(logits[labelled], labels.to(device)[labelled].float())
