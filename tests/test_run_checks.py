"""Checks made before a run loads anything: the CLI's bad-input errors, before torch is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlfb.config import config_from_dict
from rlfb.errors import ConfigError, DatasetError
from rlfb.preflight import check_device, check_output_dir, check_run_inputs

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "sentiment_ppo.yaml"

# Runs each `rlfb train` command line in one fresh interpreter; reports its exit code, its stderr, and
# whether torch had been imported when the command returned.
_CLI_PROBE = """
import contextlib, io, json, sys
from rlfb.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    results.append({"code": code, "stderr": stderr.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def run_python(code: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=environment, capture_output=True,
                            text=True, timeout=120, check=True)
    return result.stdout


def assert_one_line_errors_before_torch(cases: dict[str, tuple[list[str], str]], cwd: Path) -> None:
    """Run each case's argv in one fresh interpreter: exit 1, one error line holding its message, no torch."""
    argvs = [argv for argv, _ in cases.values()]
    results = json.loads(run_python(_CLI_PROBE, json.dumps(argvs), cwd=cwd))
    for (case, (_, message)), result in zip(cases.items(), results, strict=True):
        lines = [line for line in result["stderr"].strip().splitlines() if not line.startswith("rlfb train: note:")]
        assert result["code"] == 1, (case, result)
        assert len(lines) == 1 and lines[0].startswith("rlfb train: error: "), (case, lines)
        assert message in lines[0], (case, lines[0])
        assert not result["torch"], f"{case}: torch was imported before the error"


def test_config_mistakes_fail_in_one_line_before_torch_is_imported(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (tmp_path / "notes.docx").write_text("x")
    (tmp_path / "typo.yaml").write_text("task: sentiment\nbudget: {updatse: 3}\n")
    cases = {
        "unknown key": (["typo.yaml"], "unknown key 'budget.updatse' (did you mean 'budget.updates'?)"),
        "wrong type": (["--set", "budget.updates=many"], "'budget.updates' must be an integer or null"),
        "bad choice": (["--set", "device=gpu"], "'device' is 'gpu'; it must be auto, cpu, cuda"),
        "negative budget": (["--set", "budget.updates=-5"], "'budget.updates' is -5; it must be >= 1"),
        "output_dir a file": (["--set", "output_dir=a_file"], "output_dir 'a_file' is a file; set output_dir"),
        "unknown reward": (["--set", "rewards.0.name=sentimnt"], "rewards.0.name: unknown reward 'sentimnt'"),
        "missing reward module": (["--set", "rewards.0.name=my_rewards:short"],
                                  "cannot import module 'my_rewards'"),
        "missing dataset file": (["--set", "task={name: dataset, kwargs: {path: prompts.jsonl}}"],
                                 "prompts.jsonl' (task option path) does not exist"),
        "unknown task option": (["--set", "task.kwargs.num_prompts=3"], "got unknown option(s) ['num_prompts']"),
        "malformed JSONL": (["--set", "task={name: dataset, kwargs: {path: broken.jsonl}}"],
                            "broken.jsonl', line 2: not valid JSON"),
        "unknown file type": (["--set", "task={name: dataset, kwargs: {path: notes.docx}}"],
                              "unknown file type '.docx'"),
        "unknown agent": (["--set", "agent.name=sac"], "unknown agent 'sac' in agent.name; known: ppo"),
        "unknown agent option": (["--set", "agent.epoch=2"], "unknown key 'agent.epoch' (did you mean 'agent.epochs'?)"),
        "agent option out of range": (["--set", "agent.epochs=0"], "agent (ppo): epochs and num_minibatches must be >= 1"),
        "unknown baseline": (["--set", "agent.name=reinforce", "--set", "agent.baseline=mean"],
                             "agent (reinforce): unknown baseline 'mean'; known: ema, rloo, grpo"),
        "preset contradicted": (["--set", "agent.name=grpo", "--set", "agent.baseline=rloo"],
                                "agent 'grpo' uses baseline 'grpo'; got baseline='rloo'"),
        "bad lr schedule": (["--set", "agent.lr_schedule=cosine"], "unknown lr_schedule 'cosine'; known: constant"),
        "group size": (["--set", "agent.name=grpo", "--set", "budget.num_envs=30"],
                       "'budget.num_envs' is 30; it must be a multiple of the group size 4 of agent 'grpo'"),
        "unknown dtype": (["--set", "model.dtype=int8"], "'model.dtype' is 'int8'; it must be one of float32"),
        "resume of a missing directory": (["--resume", "nowhere"], "--resume 'nowhere' is not a directory"),
        "resume of a directory that is not a run": (["--resume", "."], "--resume '.' has no config.yaml, so it is "
                                                                     "not a run directory written by rlfb train"),
        "missing model directory": (["--set", "model=./no_such_model"],
                                    "model path './no_such_model' does not exist"),
        "bad reward kwargs": (["--set", "rewards=[{name: length, kwargs: {target: 5, colour: red}}]"],
                              "rewards.0.kwargs: reward 'length': bad kwargs {'target': 5, 'colour': 'red'}: "
                              "got an unexpected keyword argument 'colour'"),
    }
    assert_one_line_errors_before_torch(
        {case: (["train", *(args if args[0].endswith(".yaml") else [str(CONFIG), *args])], message)
         for case, (args, message) in cases.items()}, tmp_path)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["a_file", "broken.jsonl", "notes.docx", "typo.yaml"]  # nothing written


def test_the_cli_sets_one_torch_thread_and_a_sleeping_openmp_before_torch_loads(tmp_path: Path) -> None:
    # `rlfb eval` (no config: the default count) fails after importing torch; then `rlfb train` stops at
    # the device check, after setting its config's `threads` on the loaded torch.
    probe = ("import os, sys; from rlfb.cli import main; main(['eval', './no_such_run']); import torch; "
             "print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY']); "
             "main(['train', sys.argv[1], '--set', 'device=cuda:7', '--set', 'threads=2']); "
             "print(torch.get_num_threads())")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", probe, str(CONFIG)], cwd=tmp_path, capture_output=True,
                            env={**environment, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, text=True,
                            timeout=120)
    assert result.stdout.split() == ["1", "PASSIVE", "2"], result.stderr


def test_a_users_own_openmp_wait_policy_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlfb.cpu_threads import configure_threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_threads(None)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_output_dir_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    check_output_dir(tmp_path / "new" / "deeper")  # a directory that does not exist yet is fine
    with pytest.raises(ConfigError, match=r"output_dir '.*file/runs' is inside '.*file', which is a file"):
        check_output_dir(tmp_path / "file" / "runs")
    # Permissions do not bind root, so the not-writable branch is driven through os.access.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=r"output_dir '.*new': '.*' is not writable; set output_dir"):
        check_output_dir(tmp_path / "new")


def test_device_checks_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    check_device("cpu")
    check_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device is 'cuda' but torch .* sees no CUDA GPU; use --set device=cpu"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"'cuda:2' but this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        check_device("cuda:2")


def test_run_inputs_check_task_files_and_rewards(tmp_path: Path) -> None:
    missing = {"name": "dataset", "kwargs": {"path": str(tmp_path / "gone.jsonl")}}
    with pytest.raises(DatasetError, match="gone.jsonl' .* does not exist"):
        check_run_inputs(config_from_dict({"task": missing, "rewards": ["sentiment"], "output_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"rewards.1.name: reward 'rlfb.rewards:nothing_here': module "
                                          r"'rlfb.rewards' has no attribute"):
        check_run_inputs(config_from_dict({"rewards": ["sentiment", "rlfb.rewards:nothing_here"],
                                           "output_dir": str(tmp_path)}))
    check_run_inputs(config_from_dict({"rewards": ["sentiment", "rlfb.rewards.builtin:SentimentReward"],
                                       "output_dir": str(tmp_path)}))
