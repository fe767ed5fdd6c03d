"""Training reward models from feedback: ``rlfb reward-model train CONFIG``.

* ``pairwise`` preferences train a scalar head with TRL's ``RewardTrainer``: the Bradley-Terry loss
  -log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (Ouyang et al. 2022, Eq. 1), or with
  ``pairwise_loss: margin_ranking`` the hinge max(0, m + r(x, y_rejected) - r(x, y_chosen)), which stops
  pushing a pair apart once the chosen completion leads by the margin m (:func:`pairwise_loss`).
* ``pointwise`` binary labels train the scalar head with binary cross-entropy on its logit.
* ``rating`` scalar ratings train the scalar head with mean squared error.
* ``token`` labels train a per-token head (``AutoModelForTokenClassification``, one logit per token) with
  binary cross-entropy on the labelled tokens of the completion.

The base is any causal LM name or path (a built-in such as ``rlfb-tiny``, a directory, a hub id); its
transformer is reused and a fresh head is added. The output directory holds the model and its tokenizer in
Hugging Face format (``from_pretrained`` loads it; the ``reward_model`` reward uses it) and
``rlfb_reward_model.json`` with the config and the held-out metrics.

Held-out metrics, on the rows of ``eval_data`` or on a random ``eval_fraction`` of ``data``:
``accuracy`` (pairwise: chosen scored above rejected; pointwise: sign of the logit matches the label;
token: same per labelled token), ``pearson`` (rating), and when ``gold`` names a built-in task the same
figures against the task's gold reward instead of the (possibly noisy) labels in the file
(``gold_accuracy``, ``gold_pearson``, ``gold_spearman``).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rlfb.errors import ConfigError
from rlfb.rewards import feedback
from rlfb.rewards.reward_model import RewardModelReward

METADATA_FILE = "rlfb_reward_model.json"
PAIRWISE_LOSSES = ("bradley_terry", "margin_ranking")


@dataclass
class RewardModelConfig:
    """What ``rlfb reward-model train`` reads from its YAML config.

    Attributes:
        kind: Feedback kind: "pairwise", "pointwise", "rating" or "token".
        data: Feedback JSONL file (see :mod:`rlfb.rewards.feedback` for the formats).
        output_dir: Where the trained reward model is written.
        base_model: Causal LM to start from (built-in name, directory or hub id).
        eval_data: Held-out JSONL file; when empty, ``eval_fraction`` of ``data`` is held out.
        eval_fraction: Share of ``data`` held out when there is no ``eval_data``.
        gold: A built-in task ("sentiment" or "arithmetic") whose gold reward the held-out metrics compare
            with, or empty for none.
        pairwise_loss: "bradley_terry" (-log sigmoid(r_chosen - r_rejected)) or "margin_ranking"
            (max(0, margin + r_rejected - r_chosen)); pairwise feedback only.
        margin: The margin m of "margin_ranking", in reward units (> 0).
        epochs: Passes over the training rows.
        learning_rate: Peak AdamW learning rate (linear decay to 0 after ``warmup_ratio`` of the steps).
        warmup_ratio: Share of the steps with linear warm-up.
        weight_decay: AdamW weight decay.
        batch_size: Rows per step (pairs for pairwise feedback).
        max_length: Longest prompt + completion in tokens (longer pairs are skipped, others truncated).
        seed: Seeds the split, the head's initialisation and the data order.
        device: "auto", "cpu" or "cuda".
        threads: CPU threads for torch (0 = torch's default).
    """

    kind: str
    data: str
    output_dir: str
    base_model: str = "rlfb-tiny"
    eval_data: str = ""
    eval_fraction: float = 0.1
    gold: str = ""
    pairwise_loss: str = "bradley_terry"
    margin: float = 1.0
    epochs: float = 2.0
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        if self.kind not in feedback.KINDS:
            raise ConfigError(f"reward-model kind {self.kind!r} is not one of {list(feedback.KINDS)}")
        if self.gold and self.gold not in feedback.TASKS:
            raise ConfigError(f"reward-model gold {self.gold!r} is not one of {list(feedback.TASKS)} (or empty)")
        if self.pairwise_loss not in PAIRWISE_LOSSES:
            raise ConfigError(f"reward-model pairwise_loss {self.pairwise_loss!r} is not one of {list(PAIRWISE_LOSSES)}")
        if self.pairwise_loss != "bradley_terry" and self.kind != "pairwise":
            raise ConfigError(f"reward-model pairwise_loss {self.pairwise_loss!r} needs kind 'pairwise', got "
                              f"{self.kind!r}; remove pairwise_loss")
        if not self.margin > 0:
            raise ConfigError(f"reward-model margin must be > 0, got {self.margin!r}")
        if not self.eval_data and not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in (0, 1) when there is no eval_data, got {self.eval_fraction}")
        for name in ("epochs", "learning_rate", "batch_size", "max_length"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"reward-model {name} must be positive, got {getattr(self, name)!r}")


def load_reward_model_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RewardModelConfig:
    """Read a reward-model YAML config; ``overrides`` replace its values (relative paths are from the cwd).

    Raises:
        ConfigError: unknown keys, missing required keys, or invalid values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reward-model config {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: expected a mapping of settings, got {type(raw).__name__}")
    raw.update(overrides or {})
    known = {f.name for f in fields(RewardModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path.name}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    missing = [name for name in ("kind", "data", "output_dir") if name not in raw]
    if missing:
        raise ConfigError(f"{path.name}: missing required key(s) {missing}")
    return RewardModelConfig(**raw)


@dataclass
class TrainReport:
    """What training produced: the output directory, held-out metrics, and how long it took."""

    output_dir: str
    metrics: dict[str, float]
    train_rows: int
    eval_rows: int
    seconds: float


def train_reward_model(config: RewardModelConfig) -> TrainReport:
    """Train a reward model as ``config`` says, save it, and evaluate it on held-out rows."""
    import torch

    from rlfb.checkpoint import save_atomically
    from rlfb.models.loading import resolve_device

    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rows = feedback.read_feedback(config.data, config.kind)
    if config.eval_data:
        train_rows, eval_rows = rows, feedback.read_feedback(config.eval_data, config.kind)
    else:
        shuffled = list(rows)
        random.Random(config.seed).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * config.eval_fraction))
        train_rows, eval_rows = shuffled[n_eval:], shuffled[:n_eval]
    device = resolve_device(config.device)
    model, tokenizer = _load_base(config)
    model.to(device)
    if config.kind == "pairwise":
        _train_pairwise(model, tokenizer, train_rows, config)
    else:
        from rlfb.rewards.pointwise import train_pointwise

        train_pointwise(model, tokenizer, train_rows, config, device)
    seconds = time.perf_counter() - started
    metrics: dict[str, float] = {}

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        metrics.update(evaluate_reward_model(str(directory), config.kind, eval_rows, gold=config.gold,
                                             device=config.device, max_length=config.max_length))
        metadata = {"config": asdict(config), "metrics": metrics, "train_rows": len(train_rows),
                    "eval_rows": len(eval_rows), "train_seconds": round(seconds, 2)}
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    # Written next to output_dir and renamed into place: a crash leaves the previous model (or none),
    # never a half-written one that a run's reward_model path would load.
    save_atomically(config.output_dir, write)
    return TrainReport(output_dir=str(config.output_dir), metrics=metrics, train_rows=len(train_rows),
                       eval_rows=len(eval_rows), seconds=seconds)


def _load_base(config: RewardModelConfig) -> tuple[Any, Any]:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as transformers_logging

    from rlfb.models.loading import resolve_model_path

    path = resolve_model_path(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model_class = AutoModelForTokenClassification if config.kind == "token" else AutoModelForSequenceClassification
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the new head is "missing from the checkpoint" by design
    try:
        model = model_class.from_pretrained(path, num_labels=1)
    finally:
        transformers_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence heads read the last non-pad token
    return model, tokenizer


def pairwise_loss(chosen: Any, rejected: Any, loss: str = "bradley_terry", margin: float = 1.0) -> Any:
    """Mean pairwise loss of a batch of reward pairs s_c = r(x, y_chosen), s_r = r(x, y_rejected).

    * ``bradley_terry``: -log sigmoid(s_c - s_r), the negative log-likelihood of the preference under the
      Bradley-Terry model (Ouyang et al. 2022, Eq. 1); it keeps pushing the pair apart at any distance.
    * ``margin_ranking``: max(0, m + s_r - s_c), the hinge of a ranking SVM (Herbrich et al. 1999;
      ``torch.nn.MarginRankingLoss``): 0 once the chosen reward leads by the margin m.

    Args:
        chosen, rejected: (N,) tensors of rewards.
        loss: ``"bradley_terry"`` or ``"margin_ranking"``.
        margin: m of the margin ranking loss.

    Example:
        >>> import torch
        >>> float(pairwise_loss(torch.tensor([2.0, 0.5]), torch.tensor([0.5, 1.0]), "margin_ranking", 1.0))
        0.75
    """
    import torch

    if loss == "margin_ranking":
        return torch.clamp(margin + rejected - chosen, min=0.0).mean()
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def _train_pairwise(model: Any, tokenizer: Any, rows: list[dict[str, Any]], config: RewardModelConfig) -> None:
    """Pairwise training with TRL's RewardTrainer on pre-tokenized pairs (its own Bradley-Terry loss, or
    :func:`pairwise_loss` for ``margin_ranking``).

    The pairs are tokenized here exactly as the ``reward_model`` reward tokenizes what it scores
    (prompt + completion, no special tokens), so training and scoring see the same inputs.
    """
    import datasets
    from trl import RewardConfig, RewardTrainer

    class MarginRankingTrainer(RewardTrainer):
        """RewardTrainer whose loss is the margin ranking hinge (TRL's collator stacks chosen, then rejected)."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            inputs["use_cache"] = False
            outputs = model(**inputs)
            chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
            loss = pairwise_loss(chosen, rejected, "margin_ranking", config.margin)
            return (loss, outputs) if return_outputs else loss

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pairs = [{"chosen_ids": ids(row["prompt"] + row["chosen"]), "rejected_ids": ids(row["prompt"] + row["rejected"])}
             for row in rows]
    trainer_class = MarginRankingTrainer if config.pairwise_loss == "margin_ranking" else RewardTrainer
    with tempfile.TemporaryDirectory(prefix="rlfb-reward-trainer-") as scratch:
        arguments = RewardConfig(
            output_dir=scratch, num_train_epochs=config.epochs, learning_rate=config.learning_rate,
            per_device_train_batch_size=config.batch_size, warmup_steps=config.warmup_ratio,
            weight_decay=config.weight_decay, lr_scheduler_type="linear", max_length=config.max_length,
            seed=config.seed, data_seed=config.seed, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=config.device == "cpu",
        )
        trainer = trainer_class(model=model, args=arguments, train_dataset=datasets.Dataset.from_list(pairs),
                                processing_class=tokenizer)
        trainer.train()


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_reward_model(path: str, kind: str, rows: list[dict[str, Any]], *, gold: str = "",
                          device: str = "auto", max_length: int = 256) -> dict[str, float]:
    """Held-out metrics of a saved reward model on feedback rows (see the module docstring)."""
    scorer = RewardModelReward(path, max_length=max_length, device=device)
    prompts = [row["prompt"] for row in rows]
    metrics: dict[str, float] = {}
    if kind == "pairwise":
        chosen = np.array(scorer(prompts, [row["chosen"] for row in rows]), dtype=float)
        rejected = np.array(scorer(prompts, [row["rejected"] for row in rows]), dtype=float)
        metrics["accuracy"] = float(np.mean(chosen > rejected))
        if gold:
            gold_chosen = np.array([feedback.gold_score(gold, row["prompt"], row["chosen"]) for row in rows])
            gold_rejected = np.array([feedback.gold_score(gold, row["prompt"], row["rejected"]) for row in rows])
            decided = gold_chosen != gold_rejected  # gold ties have no right answer
            agree = (chosen > rejected) == (gold_chosen > gold_rejected)
            metrics["gold_accuracy"] = float(np.mean(agree[decided]))
        return metrics
    completions = [row["completion"] for row in rows]
    if kind == "token":
        return _evaluate_tokens(scorer, rows, gold)
    scores = np.array(scorer(prompts, completions), dtype=float)
    if kind == "pointwise":
        labels = np.array([row["label"] for row in rows], dtype=float)
        metrics["accuracy"] = float(np.mean((scores > 0) == (labels > 0.5)))
        if gold:
            gold_labels = np.array([feedback.gold_label(gold, row["prompt"], row["completion"]) for row in rows])
            metrics["gold_accuracy"] = float(np.mean((scores > 0) == (gold_labels > 0.5)))
            gold_scores = np.array([feedback.gold_score(gold, row["prompt"], row["completion"]) for row in rows])
            metrics["gold_spearman"] = _spearman(scores, gold_scores)
    else:
        metrics["pearson"] = _pearson(scores, np.array([row["rating"] for row in rows], dtype=float))
        if gold:
            gold_values = np.array([feedback.gold_rating(gold, row["prompt"], row["completion"]) for row in rows])
            metrics["gold_pearson"] = _pearson(scores, gold_values)
            metrics["gold_spearman"] = _spearman(scores, gold_values)
    return metrics


def _evaluate_tokens(scorer: RewardModelReward, rows: list[dict[str, Any]], gold: str) -> dict[str, float]:
    """Per-labelled-token accuracy of the token head (logit > 0 means label 1)."""
    import torch

    from rlfb.rewards.pointwise import token_labels

    tokenizer, model = scorer.tokenizer, scorer.model
    agree, agree_gold, count, count_gold = 0, 0, 0, 0
    for row in rows:
        input_ids, labels = token_labels(tokenizer, row["prompt"], row["completion"], row["segments"])
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([input_ids], device=model.device)).logits[0, :, 0]
        predicted = (logits > 0).tolist()  # one copy to the host, not one .item() per token
        agreed, labelled_count = _agreement(predicted, labels)
        agree, count = agree + agreed, count + labelled_count
        if gold:
            gold_row = feedback.gold_segments(gold, row["prompt"], row["completion"])
            _, gold_labels = token_labels(tokenizer, row["prompt"], row["completion"], gold_row)
            agreed, labelled_count = _agreement(predicted, gold_labels)
            agree_gold, count_gold = agree_gold + agreed, count_gold + labelled_count
    metrics = {"token_accuracy": agree / max(count, 1)}
    if gold:
        metrics["gold_token_accuracy"] = agree_gold / max(count_gold, 1)
    return metrics


def _agreement(predicted: list[bool], labels: list[int]) -> tuple[int, int]:
    """(tokens where the prediction matches the label, labelled tokens); a label < 0 means unlabelled."""
    labelled = [i for i, label in enumerate(labels) if label >= 0]
    return sum(predicted[i] == bool(labels[i]) for i in labelled), len(labelled)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    def ranks(values: np.ndarray) -> np.ndarray:  # average ranks, so ties (many gold zeros) are fair
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        sorted_values = values[order]
        start = 0
        while start < len(values):
            end = start
            while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
                end += 1
            result[order[start:end + 1]] = (start + end) / 2.0
            start = end + 1
        return result

    value = _pearson(ranks(x), ranks(y))
    return value if not math.isnan(value) else float("nan")
