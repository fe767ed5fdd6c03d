"""``rlfb train CONFIG [--set KEY=VALUE ...] [--resume RUN_DIR]``: train a policy from a YAML run config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlfb.errors import ConfigError
from rlfb.logging import flatten

# Keys a resumed run may change without breaking "continues exactly" (budget, bookkeeping, hardware).
RESUMABLE_CHANGES = ("budget.updates", "budget.time_limit_s", "eval.", "logging.", "checkpoint.", "device",
                     "output_dir")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config, e.g. configs/sentiment_ppo.yaml "
                        "(optional with --resume: the run's own config.yaml is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set budget.updates=10 --set agent.learning_rate=3e-4 "
                             "(values are YAML; repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest checkpoint")
    parser.add_argument("--show-keys", action="store_true",
                        help="list every config key with its type and meaning, then exit")


def run(args: argparse.Namespace) -> int:
    from rlfb.checkpoint import CONFIG_FILE
    from rlfb.config import load_config
    from rlfb.trainer import Trainer

    if args.show_keys:
        from rlfb.config import field_help

        helps = field_help()
        width = max(map(len, helps))
        print("\n".join(f"{key:<{width}}  {text}" for key, text in helps.items()))
        print(f"{'agent.*':<{width}}  the agent's hyper-parameters: see docs/algorithms.md")
        return 0
    if args.config is None and args.resume is None:
        raise ConfigError("give a run config (e.g. rlfb train configs/sentiment_ppo.yaml) or --resume RUN_DIR")
    if args.resume is not None and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume '{args.resume}' is not a directory; pass a run directory written by rlfb train")
    config = load_config(args.config or Path(args.resume) / CONFIG_FILE, args.overrides)
    if args.resume is not None and args.config is not None:
        _warn_about_changes(load_config(Path(args.resume) / CONFIG_FILE).to_dict(), config.to_dict())
    result = Trainer(config, resume_from=args.resume).train()
    print(f"run directory: {result.run_dir}")
    return 130 if result.interrupted else 0


def _warn_about_changes(saved: dict, given: dict) -> None:
    old, new = flatten(saved), flatten(given)
    changed = sorted(key for key in old.keys() | new.keys()
                     if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES))
    if changed:
        print("rlfb train: warning: the config differs from the resumed run's in "
              + ", ".join(f"{key} ({old.get(key)!r} -> {new.get(key)!r})" for key in changed)
              + "; the run will not match an uninterrupted one", file=sys.stderr)
