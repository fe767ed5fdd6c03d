"""``rlfb bench CONFIG [--set KEY=VALUE ...] [--output-dir DIR]``: compare reward designs on one task.

Trains every design of the bench config with every seed (same agent, budget and held-out evaluation),
then writes results.md, results.csv, runs.csv, gold_vs_step.png, gold_vs_kl.png and one TensorBoard run
per design and seed to the output directory. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="bench YAML, e.g. benchmarks/sentiment_reward_designs.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a bench value, e.g. --set budget.updates=5 --set seeds=[0] "
                             "--set designs.0.kl.coef=0.05 (values are YAML; repeatable)")
    parser.add_argument("--output-dir", help="where results go (default: the config's output_dir); a rerun "
                        "into the same directory reuses finished runs and cached reward models")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and list the runs it would train, then stop")
    parser.add_argument("--no-progress-bar", action="store_true", help="no per-run tqdm bar (for logs)")


def run(args: argparse.Namespace) -> int:
    from rlfb.bench import load_bench_config, run_bench
    from rlfb.cpu_threads import configure_threads
    from rlfb.preflight import check_device, check_run_inputs

    config = load_bench_config(args.config, args.overrides)
    for design in config.designs:
        run_config = config.run_config(design, config.seeds[0], runs_dir=args.output_dir or config.output_dir)
        # A reward model the bench trains first gets its path then: check the rest of its kwargs now.
        rewards = [dataclasses.replace(reward, kwargs={**reward.kwargs, "path": "(trained by the bench)"})
                   if index in design.recipes else reward for index, reward in enumerate(run_config.rewards)]
        check_run_inputs(dataclasses.replace(run_config, rewards=rewards))
    configure_threads(config.threads or None)  # the bench's `threads: 0` keeps torch's default
    check_device(config.run_config(config.designs[0], config.seeds[0]).device)
    if args.check:
        budget = config.run_config(config.designs[0], config.seeds[0]).budget
        print(f"{args.config}: valid; {len(config.designs)} designs x {len(config.seeds)} seeds, "
              f"{budget.updates} updates of {budget.num_envs} completions each")
        for design in config.designs:
            rewards = ", ".join(f"{r.weight:g}*{r.label or r.name}" for r in design.rewards)
            kl = ", ".join(f"{k}={v}" for k, v in design.agent_kl.items()) or "agent default"
            scale = "".join(f"; reward_scale.{k}={v}" for k, v in design.reward_scale.items())
            print(f"  {design.name}: {rewards}; KL {kl}{scale}")
        return 0
    out = run_bench(config, output_dir=args.output_dir, progress_bar=not args.no_progress_bar)
    print((out / "results.md").read_text())
    return 0
