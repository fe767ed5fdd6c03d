"""Checks of a run config against the machine, made before any model is loaded or any file written.

:func:`rlfb.config.load_config` checks keys, types and ranges. What depends on the machine is checked
here, in two steps, so that every mistake a user can make in a config fails in seconds with one line:

* :func:`check_run_inputs` (no torch): the model names a built-in model, a model directory or a hub id;
  ``lora.init_from`` holds an adapter whose shape matches the ``lora`` section; the output directory can
  hold run directories; the task and its local dataset files exist; every
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

import json
import os
from pathlib import Path
from typing import Any

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
    if config.lora.init_from is not None:
        check_init_adapter(config)
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


def init_adapter_directory(init_from: str | Path) -> Path:
    """The adapter directory ``lora.init_from`` names: itself, or a run directory's newest checkpoint's.

    A run directory's checkpoints are verified when the trainer loads one (:func:`rlfb.checkpoint.find_checkpoint`);
    here only the shape is read, without torch.

    Raises:
        ConfigError: the path does not exist or holds no adapter, naming what to pass instead.
    """
    path = Path(init_from)
    if not path.exists():
        raise ConfigError(f"lora.init_from '{init_from}' does not exist; pass a peft adapter directory (with "
                          "adapter_config.json) or a run directory written by rlfb train")
    if (path / "adapter_config.json").is_file():
        return path
    candidates = [path / "adapter", path / "final" / "adapter",
                  *sorted((path / "checkpoints").glob("step_*/adapter"), reverse=True)]
    for candidate in candidates:
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ConfigError(f"lora.init_from '{init_from}' holds no LoRA adapter (no adapter_config.json there, nor in "
                      "a checkpoint of a run directory); pass an adapter directory or a finished run")


def check_init_adapter(config: RunConfig) -> None:
    """Check that the adapter ``lora.init_from`` names has the rank, alpha and target modules of ``lora``.

    Raises:
        ConfigError: naming the differing setting and the value that matches the adapter.
    """
    assert config.lora.init_from is not None
    directory = init_adapter_directory(config.lora.init_from)
    try:
        saved: dict[str, Any] = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"lora.init_from: {directory / 'adapter_config.json'} is not readable JSON ({error}); "
                          "pass an adapter written by peft or rlfb") from None
    lora = config.lora
    wanted = {"r": (lora.r, saved.get("r")), "alpha": (lora.alpha, saved.get("lora_alpha"))}
    for key, (value, adapter_value) in wanted.items():
        if adapter_value is not None and float(value) != float(adapter_value):
            raise ConfigError(f"lora.{key} is {value} but the adapter in lora.init_from ({directory}) has "
                              f"{adapter_value}; set lora.{key}: {adapter_value} to continue training it")
    targets = saved.get("target_modules")
    if lora.target_modules not in (None, ["all-linear"]) and targets is not None:  # peft resolves all-linear
        given = sorted(lora.target_modules or [])
        have = sorted(targets) if isinstance(targets, list) else [targets]
        if given != have:
            raise ConfigError(f"lora.target_modules is {given} but the adapter in lora.init_from ({directory}) "
                              f"adapts {have}; set lora.target_modules to {have}, or remove it")


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
