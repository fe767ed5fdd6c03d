"""Checks of a run config against the machine, made before any model is loaded or any file written.

:func:`rlfb.config.load_config` checks keys, types and ranges. What depends on the machine is checked
here, in two steps, so that every mistake a user can make in a config fails in seconds with one line:

* :func:`check_run_inputs` (no torch): the model names a built-in model, a model directory or a hub id;
  the output directory can hold run directories; the task and its local dataset files exist; every
  reward is registered or importable and accepts its kwargs; the agent and its options are valid; a
  multi-turn protocol accepts its options;
* :func:`check_device` (imports torch, loads no model): the requested device exists.

Example:
    >>> from rlfb.config import config_from_dict
    >>> check_run_inputs(config_from_dict({"rewards": ["sentimnt"]}))
    Traceback (most recent call last):
    ...
    rlfb.errors.ConfigError: rewards.0.name: unknown reward 'sentimnt'; registered: ...
"""

from __future__ import annotations

import os
from pathlib import Path

from rlfb.agents.configs import run_agent
from rlfb.config import RunConfig
from rlfb.envs.tasks import check_task
from rlfb.errors import ConfigError
from rlfb.rewards.registry import TRUST_ALL, ImportTrust, UntrustedImportError, check_reward_kwargs, resolve


def check_run_inputs(config: RunConfig, trust: ImportTrust = TRUST_ALL) -> None:
    """Check the output directory, the task, the rewards and the agent of ``config`` without importing torch.

    Args:
        config: The run config.
        trust: The modules a ``module:attr`` reward may import (a run directory's config: only those the
            user allowed); an untrusted module is refused before it is imported.

    Raises:
        ConfigError: naming the key, the value and the fix.
        DatasetError: a local dataset file does not exist.
        ModelNotFoundError: the model is a path that does not exist, or a directory that is not a model.
    """
    run_agent(config)
    if config.env.kind == "multi_turn":
        from rlfb.envs.protocol import make_protocol

        try:  # a protocol is a small Python object: building it checks env.protocol_options
            make_protocol(config.env.protocol or "", config.env.protocol_options)
        except ConfigError as error:
            raise ConfigError(f"env.protocol_options: {error}") from None
    check_model(config.model.name)
    check_output_dir(config.output_dir)
    check_task({"name": config.task.name, **config.task.kwargs})
    for index, reward in enumerate(config.rewards):
        try:
            target = resolve(reward.name, trust)
        except UntrustedImportError:
            raise  # its message already names the reward, the config file and the flag
        except ConfigError as error:
            hint = ("; for a module in the current directory run `PYTHONPATH=. rlfb train ...`"
                    if isinstance(error.__cause__, ImportError) else "")
            raise ConfigError(f"rewards.{index}.name: {error}{hint}") from None
        try:
            check_reward_kwargs(target, reward.kwargs, reward.name)
        except ConfigError as error:
            raise ConfigError(f"rewards.{index}.kwargs: {error}") from None


def check_model(name: str) -> None:
    """Check that ``name`` can name a model: a built-in name, an existing model directory, or a hub id.

    Raises:
        ModelNotFoundError: an empty name, a path that does not exist, a directory that is not a model or
            is a damaged rlfb build (what :func:`rlfb.models.loading.resolve_model_path` refuses).
    """
    from rlfb.models.loading import BUILTIN_MODELS, resolve_model_path

    if name not in BUILTIN_MODELS:  # a built-in name is always valid (and resolving it may build it)
        resolve_model_path(name)


def check_output_dir(output_dir: str | Path) -> None:
    """Check that run directories can be created under ``output_dir`` (which may not exist yet).

    Raises:
        ConfigError: ``output_dir`` or one of its parents is a file, or the nearest existing one is not writable.
    """
    path = Path(output_dir).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is inside '{existing}', which is a file"
        raise ConfigError(f"output_dir '{output_dir}' {what}; set output_dir to a directory, "
                          "e.g. --set output_dir=runs")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir '{output_dir}': '{existing}' is not writable; set output_dir to a "
                          "directory you can write, e.g. --set output_dir=$HOME/runs")


def check_device(device: str) -> None:
    """Check that ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) exists on this machine.

    Raises:
        ConfigError: no CUDA (or MPS) device, or no GPU with index N, with the setting to use instead.
    """
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device is '{device}' but torch {torch.__version__} ({build}) sees no CUDA GPU; "
                              "use --set device=cpu, or device: auto (CUDA when present, else CPU)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device is '{device}' but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; set device to one of them")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device is 'mps' but torch sees no Apple GPU; use --set device=cpu or device: auto")
