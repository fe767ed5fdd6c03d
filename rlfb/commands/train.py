"""``rlfb train CONFIG [--set KEY=VALUE ...] [--resume RUN_DIR]``: train a policy from a YAML run config.

Everything a config can get wrong is checked before torch is imported (keys, types, ranges, the output
directory, dataset files, rewards), then the device, then the agent's options: a mistake costs seconds
and writes nothing.

``--set agent.name=NAME`` switches the agent of a config: the config file's agent options that NAME
does not have (PPO's ``early_stop_kl`` for grpo) are dropped with a note naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rlfb.errors import ConfigError
from rlfb.rewards.registry import TRUST_ALL, ImportTrust

if TYPE_CHECKING:
    from rlfb.config import RunConfig


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
    if args.show_keys:
        from rlfb.config import field_help

        helps = field_help()
        width = max(map(len, helps))
        print("\n".join(f"{key:<{width}}  {text}" for key, text in helps.items()))
        print(f"{'agent.*':<{width}}  the agent's hyper-parameters: see docs/algorithms.md")
        return 0
    # The user's own config file may import what it names; a run directory's only what --allow-import says.
    trust = TRUST_ALL if args.config or args.resume is None else ImportTrust.only(
        args.allow_imports, source=str(Path(args.resume) / "config.yaml"))
    config = prepare_config(args.config, args.overrides, args.resume, trust)
    if config.feedback.dir is not None:  # online: the first reward model comes from people's judgments
        from rlfb.feedback.online import prepare_reward_model

        prepare_reward_model(config)
    from rlfb.trainer import Trainer

    trainer = Trainer(config, resume_from=args.resume, import_trust=trust)
    if config.feedback.dir is not None:
        from rlfb.feedback.online import OnlineFeedback

        trainer.callbacks.append(OnlineFeedback(trainer))
    result = trainer.train()
    if trainer.is_main_process:  # one line per run, not per rank
        print(f"run directory: {result.run_dir}")
    return 130 if result.interrupted else 0


def prepare_config(config_path: str | None, overrides: Sequence[str], resume: str | None,
                   trust: ImportTrust = TRUST_ALL) -> RunConfig:
    """Load and check the run config as ``rlfb train`` does, and set torch's threads; load no model.

    Raises:
        ConfigError: the first problem found, as one line naming the key, the value and the fix.
    """
    from rlfb.agents.configs import check_world_size
    from rlfb.config import load_config
    from rlfb.cpu_threads import configure_threads
    from rlfb.preflight import check_device, check_run_inputs

    if resume is None:
        if config_path is None:
            raise ConfigError("give a run config (e.g. rlfb train configs/sentiment_ppo.yaml) or --resume RUN_DIR")
        path = Path(config_path)
    else:
        from rlfb.run_directory import CONFIG_FILE

        if not Path(resume).is_dir():
            raise ConfigError(f"--resume '{resume}' is not a directory; pass a run directory written by rlfb train")
        if not (Path(resume) / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume '{resume}' has no {CONFIG_FILE}, so it is not a run directory written by "
                              "rlfb train; pass one (they are under the config's output_dir, e.g. runs/)")
        path = Path(config_path) if config_path is not None else Path(resume) / CONFIG_FILE
    config = _without_options_of_the_replaced_agent(load_config(path, overrides), load_config(path).agent.name,
                                                    overrides)
    check_run_inputs(config, trust)
    check_world_size(config, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun / accelerate launch set it
    configure_threads(config.threads)  # before torch is imported: OpenMP reads its wait policy once
    check_device(config.device)
    return config


def _without_options_of_the_replaced_agent(config: RunConfig, file_agent: str, overrides: Sequence[str]) -> RunConfig:
    """After ``--set agent.name=NEW``, drop the config file's agent options that NEW does not have, with a note.

    Options given with ``--set`` are kept (and rejected by the agent if unknown): only what the user did
    not ask for on this command line is dropped.
    """
    from rlfb.agents.configs import AGENTS, agent_config_class

    name = config.agent.name
    if name == file_agent or name not in AGENTS or file_agent not in AGENTS:
        return config
    fields = {option.name: option for option in dataclasses.fields(agent_config_class(name))}
    given = {_agent_option_of(override) for override in overrides}
    dropped = sorted(key for key in config.agent.params if key not in fields and key not in given)
    params = {key: value for key, value in config.agent.params.items() if key not in dropped}
    # A kl_target written for an agent whose KL is on by default (ppo) means an adaptive KL from that agent's
    # kl_coef: it comes along to an agent whose KL is off by default (self_training, distillation).
    carried = {}
    if "kl_target" in params and "kl_coef" not in params and fields.get("kl_coef") and fields["kl_coef"].default == 0:
        file_fields = {option.name: option for option in dataclasses.fields(agent_config_class(file_agent))}
        if "kl_coef" in file_fields:
            carried["kl_coef"] = params["kl_coef"] = file_fields["kl_coef"].default
    if not dropped and not carried:
        return config
    said = [f"dropped the config file's options that {name} does not have: {', '.join(dropped)}"] if dropped else []
    said += [f"kept {file_agent}'s kl_coef {value} with the file's kl_target" for value in carried.values()]
    print(f"rlfb train: note: --set agent.name={name} replaces agent '{file_agent}'; {'; '.join(said)}",
          file=sys.stderr)
    return dataclasses.replace(config, agent=dataclasses.replace(config.agent, params=params))


def _agent_option_of(override: str) -> str | None:
    """The agent option an override sets (``agent.kl_coef=0.1`` and ``agent.params.kl_coef=0.1``: kl_coef)."""
    parts = override.partition("=")[0].strip().split(".")
    if parts[0] != "agent" or len(parts) < 2:
        return None
    return parts[2] if parts[1] == "params" and len(parts) > 2 else parts[1]

