"""The ``rlfb`` command line.

Each sub-command lives in its own module under :mod:`rlfb.commands` and exposes two functions:
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
Modules are imported only when their command runs, so ``rlfb --help`` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from rlfb.cpu_threads import DEFAULT_THREADS, configure_threads
from rlfb.errors import RlfbError

# command name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rlfb.commands.train", "train a policy from a YAML run config"),
    "eval": ("rlfb.commands.evaluate", "evaluate a run directory (or a base model) on held-out prompts"),
    "generate": ("rlfb.commands.generate", "sample completions from a run directory or a model"),
    "bench": ("rlfb.commands.bench", "compare reward designs on one task"),
    "models": ("rlfb.commands.models", "build and list the built-in offline models"),
    "rewards": ("rlfb.commands.rewards", "list the registered reward functions"),
    "reward-model": ("rlfb.commands.reward_model", "train a reward model from feedback data"),
    "pipeline": ("rlfb.commands.pipeline", "run a multi-stage pipeline (sft, reward model, rl, feedback, eval)"),
    "feedback": ("rlfb.commands.feedback", "people in the loop: a rating page, a feedback store, synthetic feedback"),
}

# Commands whose config has a `threads` key; they set torch's threads themselves once it is read.
THREADS_FROM_CONFIG = frozenset({"train", "bench", "pipeline"})


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlfb",
        description="Reinforcement learning from feedback for language models.",
        epilog="Run `rlfb COMMAND --help` for the options of one command.",
    )
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND",
                        help="; ".join(f"{name}: {text}" for name, (_, text) in SUBCOMMANDS.items()))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = _top_level_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv[:1])  # prints help, or an "invalid choice" error naming the commands
        return 0
    name, rest = argv[0], argv[1:]
    # Before any command imports torch (see rlfb.cpu_threads for why the count is not torch's default).
    configure_threads(None if name in THREADS_FROM_CONFIG else DEFAULT_THREADS)
    # peft calls a transformers method that transformers 5 renamed; users can do nothing about it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    module_name, help_text = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            print(f"rlfb {name}: not available in this version of rlfb yet", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"rlfb {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except RlfbError as error:
        print(f"rlfb {name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rlfb {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
