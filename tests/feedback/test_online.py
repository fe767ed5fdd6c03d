"""Online fine-tuning: the first reward model from the store, retraining as judgments come, the adapter
published for the server, and the server's pool following it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rlfb.config import config_from_dict
from rlfb.errors import ConfigError
from rlfb.feedback.exchange import import_rows
from rlfb.feedback.items import ItemPool, PolicySource, published_step
from rlfb.feedback.online import OnlineFeedback, prepare_reward_model, store_of
from rlfb.feedback.store import FeedbackStore
from rlfb.rewards.feedback import synthesize


def _config(tmp_path: Path, **feedback: Any) -> Any:
    directory = str(tmp_path / "fb")
    return config_from_dict({
        "task": "sentiment", "model": "rlfb-tiny", "agent": {"name": "reinforce"}, "device": "cpu",
        "rewards": [{"name": "reward_model", "kwargs": {"path": f"{directory}/reward_model", "device": "cpu"}}],
        "budget": {"updates": 4, "num_envs": 4}, "sampling": {"max_new_tokens": 8}, "eval": {"num_prompts": 0},
        "logging": {"tensorboard": False, "progress_bar": False}, "checkpoint": {"every": 0},
        "output_dir": str(tmp_path / "runs"),
        "feedback": {"dir": directory, "kind": "pointwise", "min_judgments": 8, "retrain_every": 5,
                     "publish_every": 2, "wait_s": 0.5,
                     "reward_model": {"epochs": 1, "batch_size": 8, "max_length": 32}, **feedback}})


def test_the_first_reward_model_waits_for_enough_judgments(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with pytest.raises(ConfigError, match="0 of the 8 pointwise judgments"):
        prepare_reward_model(config, poll_s=0.1, say=lambda line: None)


def test_online_run_retrains_on_new_judgments_and_publishes_its_adapter(tmp_path: Path) -> None:
    from rlfb.trainer import Trainer

    config = _config(tmp_path)
    store = store_of(config.feedback)
    import_rows(store, synthesize("sentiment", "pointwise", size=10, seed=0), "pointwise", "early")
    prepare_reward_model(config, say=lambda line: None)
    trainer = Trainer(config)
    online = OnlineFeedback(trainer, say=lambda line: None)

    def raters_judge(step: int, metrics: dict[str, float]) -> None:
        if step == 1:  # judgments arriving while the policy trains
            import_rows(store, synthesize("sentiment", "pointwise", size=6, seed=1), "pointwise", "late")

    trainer.callbacks += [raters_judge, online]
    trainer.train()
    assert online.retrainings == 1
    assert published_step(tmp_path / "fb" / "policy") == 4
    import json

    metadata = json.loads((tmp_path / "fb" / "reward_model" / "rlfb_reward_model.json").read_text())
    assert metadata["train_rows"] + metadata["eval_rows"] == 16
    from rlfb.rewards.reward_model import RewardModelReward, load_reward_model

    (reward,) = [c.function for c in trainer.reward_set._components if isinstance(c.function, RewardModelReward)]
    saved, _, _ = load_reward_model(str(tmp_path / "fb" / "reward_model"), "cpu")
    for (name, live), (_, disk) in zip(reward.model.state_dict().items(), saved.state_dict().items(), strict=True):
        assert (live == disk).all(), name  # the run scores with the retrained model


class _FakePolicy:
    def __init__(self) -> None:
        self.loaded: list[Path] = []

    def load_adapter(self, directory: Path) -> None:
        self.loaded.append(directory)


def test_the_pool_follows_a_published_policy_and_drops_the_old_ones_items(tmp_path: Path) -> None:
    import json

    follow = tmp_path / "policy"
    policy = _FakePolicy()
    source = PolicySource(policy, sampling=None, follow=follow)
    source.complete = lambda prompts, n: [[" x"] * n for _ in prompts]  # type: ignore[method-assign]
    pool = ItemPool(FeedbackStore(tmp_path / "s.sqlite"), source, ["P"], capacity=4, batch_size=4)
    pool.fill_once()
    assert {item.policy_version for item in pool._ready} == {"base"}
    follow.mkdir()
    (follow / "policy_step.json").write_text(json.dumps({"step": 6}))
    pool.fill_once()
    assert policy.loaded == [follow]
    assert {(item.policy_version, item.policy_step) for item in pool._ready} == {("step_6", 6)}
    assert len(pool._ready) == 4


def test_judgments_arriving_before_the_run_starts_count_towards_the_first_retraining(tmp_path: Path) -> None:
    # Raters keep judging while the first reward model trains and the policy loads: those judgments are
    # new to the reward model, so they count towards retrain_every.
    config = _config(tmp_path)
    store = store_of(config.feedback)
    import_rows(store, synthesize("sentiment", "pointwise", size=10, seed=0), "pointwise", "early")
    prepare_reward_model(config, say=lambda line: None)
    import_rows(store, synthesize("sentiment", "pointwise", size=6, seed=1), "pointwise", "meanwhile")

    class Trainer:
        def __init__(self) -> None:
            self.config, self.policy, self.reward_set = config, None, None

    online = OnlineFeedback(Trainer(), say=lambda line: None)
    assert online.trained_on == 10
    retrained: list[int] = []
    online.retrain = lambda step, judgments: retrained.append(judgments)  # type: ignore[method-assign]
    online(1, {})  # step 1: not a publishing step (publish_every 2)
    assert retrained == [16]


def test_the_pool_refills_by_whole_batches_not_one_item_per_judgment(tmp_path: Path) -> None:
    batches: list[int] = []

    class CountingSource:
        version = ("base", 0)

        def refresh(self) -> None:
            pass

        def complete(self, prompts: Any, num_samples: int) -> list[list[str]]:
            batches.append(len(prompts))
            return [[" x"] * num_samples for _ in prompts]

    pool = ItemPool(FeedbackStore(tmp_path / "s.sqlite"), CountingSource(), ["P"], capacity=8, batch_size=4)
    assert pool.fill_once() == 4 and pool.fill_once() == 4 and pool.fill_once() == 0
    for rater in ("a", "b", "c"):
        assert pool.next_for(rater, wait_s=0.0) is not None
    assert pool.fill_once() == 0  # room for 3: less than a batch
    pool.next_for("d", wait_s=0.0)
    assert pool.fill_once() == 4
    assert batches == [4, 4, 4]
