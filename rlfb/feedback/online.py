"""Online fine-tuning from people's judgments: ``rlfb train`` with a ``feedback`` section.

    before training: wait until the store holds feedback.min_judgments usable judgments, train the
                     reward model on them (FEEDBACK_DIR/reward_model), which the run's reward_model reward loads
    after each update (a trainer callback, :class:`OnlineFeedback`):
        every publish_every updates: publish the adapter (FEEDBACK_DIR/policy), which the server reloads
        every retrain_every new judgments (or retrain_minutes with some new): retrain the reward model on
            the store (judgments older than max_staleness updates left out) and reload it into the reward

RL then continues against the new reward model, and raters judge the latest policy's completions; every
judgment records the policy version it was made on (``policy_step``), which is what ``max_staleness``
reads. The reward model is retrained from scratch on all usable judgments each time (seeded, so the same
store gives the same model).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlfb.config import FEEDBACK_REWARD_MODEL_DIR, FeedbackConfig, RunConfig
from rlfb.errors import ConfigError
from rlfb.feedback.exchange import export_rows
from rlfb.feedback.items import publish_policy
from rlfb.feedback.store import FeedbackStore

STORE_FILE = "store.sqlite"
DATA_FILE = "reward_model_data.jsonl"  # under feedback.dir: the rows the reward model was last trained on
TRAINED_ON_FILE = "reward_model_judgments.json"  # under feedback.dir: {"judgments": the store's count then}


def store_of(feedback: FeedbackConfig) -> FeedbackStore:
    assert feedback.dir is not None
    return FeedbackStore(Path(feedback.dir) / STORE_FILE)


def usable_rows(store: FeedbackStore, feedback: FeedbackConfig, step: int) -> list[dict[str, Any]]:
    """The rows of ``feedback.kind`` the store's judgments make, stale ones left out."""
    return export_rows(store, feedback.kind, current_step=step, max_staleness=feedback.max_staleness)


def train_feedback_reward_model(config: RunConfig, rows: list[dict[str, Any]], judgments: int) -> Any:
    """Train the run's reward model on ``rows`` into FEEDBACK_DIR/reward_model (atomically); its report.

    ``judgments`` (the store's count, taken before ``rows`` were read) is recorded in TRAINED_ON_FILE: the
    judgments after it are the new ones that count towards ``retrain_every``.
    """
    from rlfb.rewards.feedback import write_jsonl
    from rlfb.rewards.training import RewardModelConfig, train_reward_model

    feedback = config.feedback
    assert feedback.dir is not None
    data = Path(feedback.dir) / DATA_FILE
    write_jsonl(rows, data)
    options = {"base_model": config.model.name, "device": config.device if config.device != "auto" else "auto",
               "seed": config.seed, "threads": config.threads or 0, **feedback.reward_model}
    report = train_reward_model(RewardModelConfig(kind=feedback.kind, data=str(data),
                                                  output_dir=str(Path(feedback.dir) / FEEDBACK_REWARD_MODEL_DIR),
                                                  **options))
    (Path(feedback.dir) / TRAINED_ON_FILE).write_text(json.dumps({"judgments": judgments}) + "\n")
    return report


def trained_on(feedback: FeedbackConfig) -> int:
    """The store's judgment count when the reward model in FEEDBACK_DIR was trained (0 if unknown)."""
    assert feedback.dir is not None
    try:
        return int(json.loads((Path(feedback.dir) / TRAINED_ON_FILE).read_text())["judgments"])
    except (OSError, ValueError, KeyError):
        return 0


def prepare_reward_model(config: RunConfig, poll_s: float = 2.0, say: Any = print) -> None:
    """Before the run: wait for ``min_judgments`` usable judgments, then train the first reward model.

    A reward model already in FEEDBACK_DIR (a resumed run) is kept.

    Raises:
        ConfigError: ``wait_s`` passed with too few judgments.
    """
    feedback = config.feedback
    assert feedback.dir is not None
    if (Path(feedback.dir) / FEEDBACK_REWARD_MODEL_DIR / "config.json").is_file():
        return
    store = store_of(feedback)
    deadline = time.monotonic() + feedback.wait_s
    announced = -1
    while True:
        judgments = store.count()
        rows = usable_rows(store, feedback, 0)
        if len(rows) >= feedback.min_judgments:
            break
        if time.monotonic() > deadline:
            raise ConfigError(f"feedback: {len(rows)} of the {feedback.min_judgments} {feedback.kind} judgments the "
                              f"first reward model needs came in {feedback.wait_s:g} s; serve the page with "
                              f"`rlfb feedback serve CONFIG` and rate, or lower feedback.min_judgments")
        if len(rows) != announced:
            say(f"feedback: waiting for judgments ({len(rows)} of {feedback.min_judgments} {feedback.kind} rows "
                f"in {store.path}); serve the page with `rlfb feedback serve CONFIG`")
            announced = len(rows)
        time.sleep(poll_s)
    report = train_feedback_reward_model(config, rows, judgments)
    say(f"feedback: trained the first reward model on {report.train_rows} rows ({report.metrics})")


class OnlineFeedback:
    """The trainer callback of an online run (see the module docstring).

    Args:
        trainer: the :class:`rlfb.trainer.Trainer` (its policy is published, its reward set reloaded).
        say: where progress lines go.
    """

    def __init__(self, trainer: Any, say: Any = print) -> None:
        self.trainer = trainer
        self.config: RunConfig = trainer.config
        self.feedback = self.config.feedback
        assert self.feedback.dir is not None
        self.store = store_of(self.feedback)
        self.say = say
        self.trained_on = trained_on(self.feedback)  # judgments that came in since count as new
        self.trained_at = time.monotonic()
        self.retrainings = 0

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        feedback = self.feedback
        if step % feedback.publish_every == 0:
            publish_policy(self.trainer.policy, feedback.dir, step)
        judgments = self.store.count()
        new = judgments - self.trained_on
        due_by_count = feedback.retrain_every > 0 and new >= feedback.retrain_every
        due_by_time = feedback.retrain_minutes is not None and new > 0 \
            and time.monotonic() - self.trained_at >= 60 * feedback.retrain_minutes
        if due_by_count or due_by_time:
            self.retrain(step, judgments)
        return True

    def retrain(self, step: int, judgments: int) -> None:
        """Retrain the reward model on the store (``judgments``: its count, taken before the rows are read)
        and load it into the run's reward."""
        rows = usable_rows(self.store, self.feedback, step)
        if len(rows) < self.feedback.min_judgments:
            return
        report = train_feedback_reward_model(self.config, rows, judgments)
        reloaded = reload_reward_models(self.trainer.reward_set, report.output_dir)
        self.trained_on, self.trained_at = judgments, time.monotonic()
        self.retrainings += 1
        self.say(f"feedback: update {step}: retrained the reward model on {report.train_rows} rows "
                 f"({judgments} judgments; {reloaded} reward(s) reloaded)")


def reload_reward_models(reward_set: Any, path: str) -> int:
    """Load the model at ``path`` into every ``reward_model`` reward of ``reward_set`` that scores with it.

    Returns:
        How many rewards were reloaded.
    """
    from rlfb.rewards.reward_model import RewardModelReward, load_reward_model

    count = 0
    for component in getattr(reward_set, "_components", []):
        reward = component.function
        if isinstance(reward, RewardModelReward) and Path(reward.path) == Path(path):
            device = reward.model.device
            reward.model, reward.tokenizer, reward.is_token_level = load_reward_model(path, str(device))
            count += 1
    return count
