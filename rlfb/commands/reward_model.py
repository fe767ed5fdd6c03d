"""``rlfb reward-model train CONFIG``: train a reward model from feedback data (see docs/rewards.md)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a reward model from a YAML config",
                               description="Train a reward model from JSONL feedback; the output directory "
                                           "is loadable by the reward_model reward.")
    train.add_argument("config", help="YAML config, e.g. configs/reward_model_sentiment.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set epochs=3 (values are YAML; repeatable)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from rlfb.errors import ConfigError
    from rlfb.rewards.training import load_reward_model_config, train_reward_model

    overrides = {}
    for item in args.overrides:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=3")
        overrides[key.strip()] = yaml.safe_load(value)
    config = load_reward_model_config(args.config, overrides)
    report = train_reward_model(config)
    metrics = ", ".join(f"{name} {value:.3f}" for name, value in report.metrics.items())
    print(f"trained a {config.kind} reward model on {report.train_rows} rows in {report.seconds:.1f} s; "
          f"held-out ({report.eval_rows} rows): {metrics}")
    print(f"saved to {report.output_dir} (use it with: rewards: [{{name: reward_model, kwargs: {{path: "
          f"{report.output_dir}}}}}])")
    return 0
