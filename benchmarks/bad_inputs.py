"""A battery of bad inputs to ``rlfb train``: each must end in one clear line, with no traceback, and
leave no files behind.

Every case runs the command line (``python -m rlfb ...``) in a subprocess, in a fresh temporary
directory holding a copy of ``configs/sentiment_ppo.yaml`` as ``run.yaml`` (so the run's ``output_dir``,
``runs``, is inside it) plus whatever files the case needs. One row per case:

    case | exit | traceback | files changed | message

* exit: the exit code (1: an error rlfb reported; 0: the run went ahead, as the few cases that are
  no longer errors should) and, in brackets, the command's wall time, start of Python included;
* traceback: whether ``Traceback`` appears on stderr;
* files changed: files created, modified or deleted in the temporary directory (a half-made run
  directory shows here), or ``-``;
* message: the last line of stderr.

The cases that should now succeed train for one update (``budget.updates=1``), so the built-in model
must be built (``rlfb models build rlfb-tiny``) or the first such case builds it.

Usage:
    nice -n 10 python benchmarks/bad_inputs.py [--only SUBSTRING] [--timeout 180]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "configs" / "sentiment_ppo.yaml"
GRPO_CONFIG = REPO / "configs" / "arithmetic_grpo.yaml"
# Appended where a case should train: one short update, no periodic evaluation or checkpoint.
SHORT_RUN = ("budget.updates=1", "eval.num_prompts=4", "eval.every=0", "checkpoint.every=0",
             "logging.progress_bar=false")


@dataclass
class Case:
    """One bad input: the command line after ``rlfb`` and the files the temporary directory needs."""

    name: str
    argv: list[str]
    files: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def train(*overrides: str, config: str = "run.yaml") -> list[str]:
    """``train CONFIG --set A --set B ...``."""
    return ["train", config, *[part for override in overrides for part in ("--set", override)]]


def dataset(path: str, **options: str) -> str:
    """A ``task=`` override for the dataset task."""
    extra = "".join(f", {key}: {value}" for key, value in options.items())
    return f"task={{name: dataset, kwargs: {{path: {path}{extra}}}}}"


def read_only_runs(directory: Path) -> None:
    (directory / "runs").mkdir()
    (directory / "runs").chmod(0o555)


CASES = [
    Case("unknown key in the file", train(config="typo.yaml"),
         files={"typo.yaml": "task: sentiment\nbudget: {updatse: 3}\n"}),
    Case("unknown section (--set)", train("sampel.temperature=0.5")),
    Case("--set typo (agent option)", train("agent.learning_rat=3e-4")),
    Case("--set without '='", ["train", "run.yaml", "--set", "budget.updates"]),
    Case("wrong type (integer)", train("budget.updates=many")),
    Case("wrong type (boolean)", train("logging.tensorboard=yes please")),
    Case("bad choice: device", train("device=gpu")),
    Case("bad choice: agent", train("agent.name=sac")),
    Case("agent option out of range", train("agent.epochs=0")),
    Case("bad choice: REINFORCE baseline", train("agent.name=reinforce", "agent.baseline=mean")),
    Case("option contradicting the agent's preset", train("agent.name=grpo", "agent.baseline=rloo")),
    Case("bad choice: lr_schedule", train("agent.lr_schedule=cosine")),
    Case("bad choice: model.dtype", train("model.dtype=float8")),
    Case("negative budget", train("budget.updates=-5")),
    Case("zero temperature", train("sampling.temperature=0")),
    Case("lora.r = 0", train("lora.r=0")),
    Case("threads = 0", train("threads=0")),
    Case("reward_scale.clip < 0", train("reward_scale.clip=-1")),
    Case("num_envs not a multiple of the group", train("budget.num_envs=30", config=str(GRPO_CONFIG))),
    Case("config file missing (typo)", ["train", "rn.yaml"]),
    Case("config file not YAML", ["train", "broken.yaml"], files={"broken.yaml": "task: [sentiment\n"}),
    Case("config file a list", ["train", "list.yaml"], files={"list.yaml": "- task\n- model\n"}),
    Case("no config, no --resume", ["train"]),
    Case("--resume of a missing directory", ["train", "--resume", "runs/nowhere"]),
    Case("--resume of a directory that is not a run", ["train", "--resume", "notes"], files={"notes/a.txt": "x"}),
    Case("--set agent.name=grpo on the PPO config (now trains)", train("agent.name=grpo", *SHORT_RUN)),
    Case("PPO-only option with a GRPO config", train("agent.early_stop_kl=0.02", config=str(GRPO_CONFIG))),
    Case("unknown reward name", train("rewards.0.name=sentimnt")),
    Case("reward module that does not exist", train("rewards.0.name=my_rewards:short_and_positive")),
    Case("reward module without the function", train("rewards.0.name=my_rewards:short_and_positive"),
         files={"my_rewards.py": "def other(prompts, completions, **kwargs):\n    return [0.0] * len(prompts)\n"},
         env={"PYTHONPATH": f".{os.pathsep}{REPO}"}),
    Case("reward with bad kwargs", train("rewards=[{name: length, kwargs: {target: 5, colour: red}}]")),
    Case("unknown task", train("task=sentimnt")),
    Case("unknown task option", train("task.kwargs.num_prompts=3")),
    Case("missing dataset file", train(dataset("prompts.jsonl"))),
    Case("missing org/name-shaped dataset path (a hub id)", train(dataset("data/prompts"))),
    Case("relative dataset path in the file: read next to the config (wrong column)",
         ["train", "configs/data.yaml"],
         files={"configs/prompts.jsonl": '{"prompt": "The film was"}\n{"prompt": "The acting was"}\n',
                "configs/data.yaml": "task: {name: dataset, kwargs: {path: prompts.jsonl, prompt_column: text}}\n"
                                     "rewards: [sentiment]\n"}),
    Case("malformed JSONL line", train(dataset("prompts.jsonl")),
         files={"prompts.jsonl": '{"prompt": "The film was"}\n{"prompt": "The plot was",\n'}),
    Case("empty dataset file", train(dataset("prompts.jsonl")), files={"prompts.jsonl": "\n"}),
    Case("dataset file of unknown type", train(dataset("prompts.docx")), files={"prompts.docx": "x"}),
    Case("model directory that does not exist", train("model=./no_such_model")),
    Case("device cuda without CUDA", train("device=cuda")),
    Case("device cuda:3", train("device=cuda:3")),
    Case("output_dir is a file", train("output_dir=a_file"), files={"a_file": "x"}),
    Case("output_dir inside a file", train("output_dir=a_file/runs"), files={"a_file": "x"}),
    Case("output_dir read-only (root ignores it)", train(*SHORT_RUN), prepare=read_only_runs),
]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime in ns) of every file under ``directory``."""
    return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in directory.rglob("*") if path.is_file()}


def changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    """A short description of the files created, modified and deleted."""
    created = sorted(set(after) - set(before))
    modified = sorted(path for path in set(before) & set(after) if before[path] != after[path])
    deleted = sorted(set(before) - set(after))
    parts = []
    for label, paths in (("created", created), ("modified", modified), ("deleted", deleted)):
        if paths:
            roots = sorted({path.split(os.sep)[0] + (os.sep if os.sep in path else "") for path in paths})
            parts.append(f"{label} {len(paths)} ({', '.join(roots[:3])})")
    return "; ".join(parts) or "-"


def run_case(case: Case, timeout: float) -> tuple[str, str, str, float, str]:
    """(exit, traceback, files changed, seconds, message) of one case, in a fresh temporary directory."""
    with tempfile.TemporaryDirectory(prefix="rlfb-bad-input-") as temporary:
        directory = Path(temporary)
        shutil.copy(SHIPPED_CONFIG, directory / "run.yaml")
        for relative, text in case.files.items():
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / relative).write_text(text)
        if case.prepare is not None:
            case.prepare(directory)
        before = snapshot(directory)
        environment = {**os.environ, "PYTHONPATH": str(REPO), **case.env}
        started = time.perf_counter()
        try:
            result = subprocess.run([sys.executable, "-m", "rlfb", *case.argv], cwd=directory, env=environment,
                                    capture_output=True, text=True, timeout=timeout)
            code, stderr = str(result.returncode), result.stderr
        except subprocess.TimeoutExpired as expired:
            stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
            code = f"timeout {timeout:.0f}s"
        seconds = time.perf_counter() - started
        changed = changes(before, snapshot(directory))
        for path in directory.rglob("*"):  # let the temporary directory be removed
            if path.is_dir():
                path.chmod(0o755)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return code, "yes" if "Traceback" in stderr else "no", changed, seconds, lines[-1].strip() if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per case")
    args = parser.parse_args()
    cases = [case for case in CASES if args.only is None or args.only in case.name]
    print(f"{len(cases)} cases; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("case | exit | traceback | files changed | message")
    for case in cases:
        code, traceback, changed, seconds, message = run_case(case, args.timeout)
        print(f"{case.name} | {code} ({seconds:.1f} s) | {traceback} | {changed} | {message}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
