"""Slow checks (`pytest -m slow`): a shipped config really trains the built-in model.

Deselected by the default suite (setup.cfg); on 2 CPU cores this takes about a minute, plus a couple of
minutes to build rlfb-tiny on first use.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlfb.config import load_config
from rlfb.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.slow
def test_sentiment_reinforce_raises_held_out_sentiment(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = load_config(CONFIGS / "sentiment_reinforce.yaml", [
        "budget.updates=100", "budget.time_limit_s=null", "eval.every=0", "checkpoint.every=0",
        "logging.progress_bar=false", "logging.tensorboard=false", "device=cpu", f"output_dir={tmp_path}"])
    result = Trainer(config).train()
    assert result.before is not None and result.after is not None
    before, after = result.before.rewards["sentiment"], result.after.rewards["sentiment"]
    assert after > before + 0.3, (before, after)
