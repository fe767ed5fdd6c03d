"""``rlfb eval RUN_DIR_OR_MODEL [--n N]``: held-out evaluation of a trained run (against its base model)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="RUN_DIR_OR_MODEL",
                        help="a run directory (its newest checkpoint is evaluated against the base model), "
                             "a checkpoint directory, or a model (built-in name, path or hub id)")
    parser.add_argument("--n", type=int, default=None, help="held-out prompts (default: the run's eval.num_prompts, "
                                                            "or 64 for a model)")
    parser.add_argument("--task", default=None, help="task of a model given without a run (default: sentiment)")
    parser.add_argument("--reward", dest="rewards", action="append", default=None, metavar="NAME",
                        help="reward to measure (repeatable; default: the run's rewards, or the task's default)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's eval.seed)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--allow-import", dest="allow_imports", action="append", default=[], metavar="MODULE",
                        help="let the run's config import MODULE for a 'MODULE:attr' reward (repeatable); "
                             "a run directory's config imports nothing otherwise")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    from rlfb.checkpoint import CONFIG_FILE
    from rlfb.config import RunConfig
    from rlfb.envs.tasks import make_task
    from rlfb.errors import ConfigError
    from rlfb.evaluation import comparison_table, evaluate_policy, load_policy
    from rlfb.models.sampler import SamplingConfig
    from rlfb.rewards import RewardSet, RewardSpec
    from rlfb.run_directory import import_trust, open_run, reward_specs

    run = open_run(args.target, "eval")
    trained = run is not None
    config = run[1] if run is not None else RunConfig()
    task = make_task(args.task or ({"name": config.task.name, **config.task.kwargs} if trained else "sentiment"))
    multi_turn = trained and config.env.kind == "multi_turn"  # a conversation per held-out row, as in training
    if args.rewards:  # named on the command line by the user: trusted
        specs = [RewardSpec(name=name) for name in args.rewards]
    elif run is not None:  # named by the run directory: imports only what --allow-import allows
        specs = reward_specs(config.rewards, import_trust(run[0] / CONFIG_FILE, args.allow_imports))
    else:
        specs = [RewardSpec(name=name) for name in task.default_rewards]
    if not specs and not multi_turn:  # a multi-turn run may be scored by its protocol alone
        raise ConfigError(f"task '{task.name}' has no default reward; name one with --reward")
    rewards = RewardSet(specs) if specs else None
    policy, _ = load_policy(run[0] if run is not None else args.target, device=args.device)
    if rewards is not None and rewards.needs_scorer:
        rewards.bind_scorer(policy.scorer)
    n = args.n if args.n is not None else (config.eval.num_prompts if trained else 64)
    sampling = SamplingConfig(temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                              top_p=config.sampling.top_p, max_new_tokens=config.sampling.max_new_tokens)
    seed = args.seed if args.seed is not None else config.eval.seed
    if multi_turn:
        from rlfb.agents.multi_turn import make_multi_turn_venv
        from rlfb.evaluation import evaluate_episodes
        from rlfb.trainer import EVAL_BATCH

        venv = make_multi_turn_venv(config, policy, task, rewards, min(n, EVAL_BATCH), "eval")

        def measure():
            return evaluate_episodes(policy, venv, sampling, seed=seed, num_episodes=n,
                                     num_samples=config.eval.num_samples)
    else:
        rows = [row for row in task.eval_rows()[:n] for _ in range(config.eval.completions_per_prompt)]  # as training's

        def measure():
            return evaluate_policy(policy, rows, rewards, sampling, seed=seed, num_samples=config.eval.num_samples,
                                   max_prompt_tokens=config.sampling.max_prompt_tokens)

    after = measure()
    before = None
    if trained:
        with policy.reference():  # the base model: the same weights with the adapter switched off
            before = measure()
    if args.json:
        print(json.dumps({"before": before.to_dict() if before else None, "after": after.to_dict()}, indent=2))
    elif before is not None:
        print(comparison_table(before, after))
    else:
        width = max(len(key) for key in after.metrics(""))
        print(f"held-out evaluation of {args.target} on {after.num_prompts} prompts")
        print("\n".join(f"{key:<{width}}  {value:9.3f}" for key, value in after.metrics("").items()))
        print("samples:\n" + "\n".join(f"  [{s['reward']:+.2f}] {s['prompt']}|{s['completion']}"
                                       for s in after.samples))
    return 0
