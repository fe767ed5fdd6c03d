"""The values of the ``rollout/`` metrics (docs/metrics.md), recomputed by hand from the rollouts the
trainer collected: reward mean and (population) std, each component unweighted, length with EOS,
truncated fraction, tokens per second."""

from __future__ import annotations

from pathlib import Path

import pytest
from wiring_helpers import eos_prone_copy, run_config

import rlfb.agents.rollout as rollout_module
from rlfb.logging import read_metrics
from rlfb.trainer import Trainer


def test_rollout_metrics_match_the_collected_batches(tiny_model_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    collected = []
    real_collect = rollout_module.collect_rollout

    def recording_collect(*args, **kwargs):
        collected.append(real_collect(*args, **kwargs))
        return collected[-1]

    monkeypatch.setattr(rollout_module, "collect_rollout", recording_collect)
    model_dir = eos_prone_copy(tiny_model_dir, tmp_path / "model")
    config = run_config(model_dir, tmp_path, "budget.updates=3", "budget.num_envs=6", "eval.num_prompts=0",
                        "sampling.max_new_tokens=4", "rewards.0.weight=2.0",
                        "rewards=[{name: regex, kwargs: {pattern: '[aeiou]'}, weight: 2.0, label: vowel},"
                        " {name: length, kwargs: {target: 2}, weight: 0.5}]")
    trainer = Trainer(config)
    result = trainer.train()
    eos = trainer.policy.tokenizer.eos_token_id
    rows = [row for row in read_metrics(result.run_dir) if "rollout/reward_mean" in row]
    assert len(rows) == len(collected) == 3
    truncated_fractions = []
    for row, rollout in zip(rows, collected, strict=True):
        scores = rollout.scores.tolist()
        mean = sum(scores) / len(scores)
        assert row["rollout/reward_mean"] == pytest.approx(mean, rel=1e-5)
        assert row["rollout/reward_std"] == pytest.approx(
            (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5, rel=1e-5, abs=1e-7)
        vowel = rollout.reward_components["vowel"].tolist()
        length = rollout.reward_components["length"].tolist()
        assert scores == pytest.approx([2.0 * v + 0.5 * n for v, n in zip(vowel, length, strict=True)], rel=1e-5)
        assert row["rollout/reward/vowel"] == pytest.approx(sum(vowel) / len(vowel), rel=1e-5)
        assert row["rollout/reward/length"] == pytest.approx(sum(length) / len(length), rel=1e-5)
        masks, ids = rollout.completion_mask.tolist(), rollout.completion_ids.tolist()
        lengths = [sum(mask) for mask in masks]
        assert row["rollout/completion_length"] == pytest.approx(sum(lengths) / len(lengths))
        truncated = [eos not in tokens[:n] for tokens, n in zip(ids, lengths, strict=True)]
        truncated_fractions.append(sum(truncated) / len(truncated))
        assert row["rollout/truncated_fraction"] == pytest.approx(truncated_fractions[-1])
        assert row["time/tokens_per_s"] * row["time/rollout_s"] == pytest.approx(sum(lengths), rel=1e-6)
    assert 0 < sum(truncated_fractions) < len(truncated_fractions)  # some rows end with EOS, some do not
