"""``rlfb generate RUN_DIR_OR_MODEL --prompt TEXT [-n N] [--seed S]``: sample completions."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="RUN_DIR_OR_MODEL",
                        help="a run directory (its newest checkpoint), a checkpoint directory, or a model")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: the run's sampling.temperature (1.0 for a model); 0 is greedy")
    parser.add_argument("--top-k", type=int, default=None, help="default: the run's sampling.top_k")
    parser.add_argument("--top-p", type=float, default=None, help="default: the run's sampling.top_p")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's sampling.max_new_tokens")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from rlfb.config import RunConfig
    from rlfb.errors import ConfigError
    from rlfb.evaluation import load_policy, sample_completions
    from rlfb.models.sampler import SamplingConfig
    from rlfb.run_directory import open_run

    if args.num_samples < 1:
        raise ConfigError(f"-n is {args.num_samples}; it must be >= 1")
    run = open_run(args.target, "generate")
    policy, _ = load_policy(run[0] if run is not None else args.target, device=args.device)
    defaults = (run[1] if run is not None else RunConfig()).sampling

    def pick(value, default):
        return default if value is None else value

    try:
        sampling = SamplingConfig(temperature=pick(args.temperature, defaults.temperature),
                                  top_k=pick(args.top_k, defaults.top_k), top_p=pick(args.top_p, defaults.top_p),
                                  max_new_tokens=pick(args.max_new_tokens, defaults.max_new_tokens))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    completions = sample_completions(policy, args.prompt, sampling, seed=args.seed, num_samples=args.num_samples,
                                     max_prompt_tokens=defaults.max_prompt_tokens)
    for prompt, texts in zip(args.prompt, completions, strict=True):
        for text in texts:
            print(f"{prompt}{text}")
    return 0
