"""``rlfb rewards``: list the registered reward functions, one line each."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="modules", action="append", default=[], metavar="MODULE",
                        help="import MODULE first so the rewards it registers are listed too (repeatable)")


def run(args: argparse.Namespace) -> int:
    import importlib

    from rlfb.errors import ConfigError
    from rlfb.rewards import list_rewards

    for module in args.modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"--import {module!r}: {error}") from error
    rewards = list_rewards()
    width = max(len(name) for name in rewards)
    for name, summary in rewards.items():
        print(f"{name:<{width}}  {summary}")
    print("\nA config entry may also name any 'package.module:attr' (e.g. trl.rewards:think_format_reward).")
    return 0
