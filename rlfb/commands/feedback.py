"""``rlfb feedback synthesize``: feedback data for the built-in tasks, labelled by their gold reward."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlfb.rewards.feedback import KINDS, TASKS

    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    synthesize = actions.add_parser(
        "synthesize", help="write a JSONL file of synthetic feedback",
        description="Completions come from the built-in grammar (or a model with --model); labels come from the task's gold reward "
                    "(VADER for sentiment, correctness for arithmetic) with a share of them corrupted.")
    synthesize.add_argument("--task", required=True, choices=TASKS, help="built-in task")
    synthesize.add_argument("--kind", required=True, choices=KINDS,
                            help="pairwise (prompt, chosen, rejected), pointwise (binary label), "
                                 "rating (scalar), token (labelled segments)")
    synthesize.add_argument("--size", type=int, default=2000, help="number of rows (default 2000)")
    synthesize.add_argument("--noise", type=float, default=0.1,
                            help="share of labels corrupted, in [0, 1] (default 0.1)")
    synthesize.add_argument("--split", choices=("train", "eval"), default="train",
                            help="prompts from the task's train or held-out eval split (default train)")
    synthesize.add_argument("--model", default=None,
                            help="sample the completions from this causal LM (built-in name, directory or hub id) "
                                 "instead of the built-in grammar")
    synthesize.add_argument("--max-new-tokens", type=int, default=24,
                            help="longest sampled completion with --model (default 24)")
    synthesize.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synthesize.add_argument("--out", required=True, help="output JSONL file")


def run(args: argparse.Namespace) -> int:
    from rlfb.errors import DatasetError
    from rlfb.rewards.feedback import synthesize, write_jsonl

    if args.size < 1:
        raise DatasetError(f"--size must be at least 1, got {args.size}")
    rows = synthesize(args.task, args.kind, size=args.size, noise=args.noise, seed=args.seed, split=args.split,
                      model=args.model, max_new_tokens=args.max_new_tokens)
    count = write_jsonl(rows, args.out)
    print(f"wrote {count} {args.kind} rows for {args.task} (noise {args.noise:g}, {args.split} prompts) to {args.out}")
    return 0
