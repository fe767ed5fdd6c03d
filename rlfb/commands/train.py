"""``rlfb train CONFIG [--set KEY=VALUE ...] [--resume RUN_DIR]``: train a policy from a YAML run config."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlfb.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config, e.g. configs/sentiment_ppo.yaml "
                        "(optional with --resume: the run's own config.yaml is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set budget.updates=10 --set agent.learning_rate=3e-4 "
                             "(values are YAML; repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest intact checkpoint")
    parser.add_argument("--allow-import", dest="allow_imports", action="append", default=[], metavar="MODULE",
                        help="with --resume and no CONFIG: let the run's config import MODULE for a "
                             "'MODULE:attr' reward (repeatable); a run directory's config imports nothing otherwise")
    parser.add_argument("--show-keys", action="store_true",
                        help="list every config key with its type and meaning, then exit")


def run(args: argparse.Namespace) -> int:
    from rlfb.checkpoint import CONFIG_FILE
    from rlfb.config import load_config
    from rlfb.rewards.registry import TRUST_ALL
    from rlfb.run_directory import import_trust
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
    config_path = Path(args.config) if args.config else Path(args.resume) / CONFIG_FILE
    config = load_config(config_path, args.overrides)
    # The user's own config file may import what it names; a run directory's only what --allow-import says.
    trust = TRUST_ALL if args.config else import_trust(config_path, args.allow_imports)
    result = Trainer(config, resume_from=args.resume, import_trust=trust).train()
    print(f"run directory: {result.run_dir}")
    return 130 if result.interrupted else 0

