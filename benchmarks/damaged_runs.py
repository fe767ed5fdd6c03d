"""A battery of damaged run directories and hostile configs, each run through the real command line.

One small real run is trained once (a tiny random GPT-2 written by this script, three updates, a
checkpoint after each, so the run holds ``checkpoints/step_00000001``, ``step_00000002`` and
``final/``); every case copies it, damages the copy (truncates or deletes a file, edits the config,
plants a module), runs one ``rlfb`` command in a subprocess and prints one row:

    case | exit | traceback | files changed | code executed | message

``exit`` is the exit code, ``traceback`` whether one reached stderr, ``files changed`` which files that
were there before the command differ after it (every file is hashed before and after), ``code executed``
whether code the run directory named ran (each planted module and the ``os:system`` command create a
marker file), and ``message`` the last line of stderr. A case states the exit code it expects; the last
line counts the cases that behaved as expected.

Usage (about 3 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=1 python benchmarks/damaged_runs.py [--only SUBSTRING] [--keep DIR]

The cases are importable (``CASES``, ``build_base_run``, ``run_case``, ``format_row``) so other
batteries and tests can reuse them; ``benchmarks/bad_inputs.py`` prints rows in the same format.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPOSITORY = Path(__file__).resolve().parent.parent
MARKER = "CODE_RAN"  # a planted module or command creates this file in the case's directory
ROW_FORMAT = "case | exit | traceback | files changed | code executed | message"


@dataclass(frozen=True)
class Case:
    """One damaged run and the command run on it.

    Attributes:
        name: what the case damages and runs.
        damage: changes the copied run directory (given the run and the case's working directory).
        command: the ``rlfb`` arguments (given the run and the working directory).
        expected_exit: the exit code a correct rlfb returns.
    """

    name: str
    damage: Callable[[Path, Path], None]
    command: Callable[[Path, Path], list[str]]
    expected_exit: int


@dataclass(frozen=True)
class Row:
    """What one case did."""

    case: str
    exit_code: int
    traceback: bool
    files_changed: list[str]
    code_executed: bool
    message: str
    expected_exit: int

    @property
    def as_expected(self) -> bool:
        return self.exit_code == self.expected_exit and not self.traceback and not self.code_executed_unasked

    @property
    def code_executed_unasked(self) -> bool:
        return self.code_executed and "allow-import" not in self.case


# ------------------------------------------------------------------------------------------ the base run
def tiny_model(directory: Path) -> Path:
    """A 2-layer, 32-wide random GPT-2 with a byte-level BPE tokenizer (the test suite's model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlfb.models.builtin import train_tokenizer
    from rlfb.models.corpus import pretraining_corpus

    tokenizer = train_tokenizer(list(pretraining_corpus(600, seed=0)), vocab_size=300)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def base_config(model_dir: Path, output_dir: Path) -> dict:
    """Three PPO updates of 4 completions, a checkpoint after each (the test suite's tiny run)."""
    return {
        "task": "sentiment", "model": str(model_dir),
        "rewards": [{"name": "regex", "kwargs": {"pattern": "[aeiou]"}, "label": "vowel"}],
        "agent": {"name": "ppo", "learning_rate": 1e-2},
        "lora": {"r": 4, "alpha": 8},
        "sampling": {"max_new_tokens": 6},
        "budget": {"updates": 3, "num_envs": 4},
        "eval": {"num_prompts": 2},
        "logging": {"progress_bar": False, "tensorboard": False, "samples_every": 1, "run_name": "base"},
        "checkpoint": {"every": 1, "keep_last": 3},
        "device": "cpu", "output_dir": str(output_dir), "seed": 3,
    }


def build_base_run(workdir: Path) -> Path:
    """Train the run every case copies; returns its directory (``workdir/runs/base``)."""
    import torch

    from rlfb.config import config_from_dict
    from rlfb.trainer import Trainer

    torch.set_num_threads(1)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_model(workdir / "model")
    config = base_config(model_dir, workdir / "runs")
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return Trainer(config_from_dict(config)).train().run_dir


# ------------------------------------------------------------------------------------------ damage
def truncate(relative: str, keep: float = 0.5) -> Callable[[Path, Path], None]:
    """Cut a file to ``keep`` of its bytes (what an interrupted copy leaves)."""
    def damage(run: Path, workdir: Path) -> None:
        path = run / relative
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return damage


def delete(*relatives: str) -> Callable[[Path, Path], None]:
    def damage(run: Path, workdir: Path) -> None:
        for relative in relatives:
            path = run / relative
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


def both(*damages: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def damage(run: Path, workdir: Path) -> None:
        for one in damages:
            one(run, workdir)
    return damage


def edit_configs(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    """Apply ``change`` to the run's config.yaml and to every checkpoint's, and rewrite the checkpoints'
    manifests (a manifest detects damage, it is no signature: whoever edits a run can rewrite it)."""
    from rlfb.checkpoint import write_manifest

    def damage(run: Path, workdir: Path) -> None:
        for path in [run / "config.yaml", *run.glob("*/config.yaml"), *run.glob("checkpoints/*/config.yaml")]:
            config = yaml.safe_load(path.read_text())
            change(config)
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            if path.parent != run:
                write_manifest(path.parent)
    return damage


def os_system_reward(workdir_marker: str) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        config["rewards"] = [{"name": "os:system", "kwargs": {"command": f"touch {workdir_marker}"}}]
    return change


def planted_module_reward(run: Path, workdir: Path) -> None:
    """A module inside the run directory that leaves the marker when imported, named by the config."""
    (run / "run_reward.py").write_text(
        "import pathlib\npathlib.Path('CODE_RAN').touch()\n"
        "def reward(prompts, completions, **kwargs):\n    return [0.0] * len(completions)\n")
    edit_configs(lambda config: config.update(rewards=[{"name": "run_reward:reward"}]))(run, workdir)


def append_to(relative: str, text: str) -> Callable[[Path, Path], None]:
    def damage(run: Path, workdir: Path) -> None:
        with (run / relative).open("a") as file:
            file.write(text)
    return damage


def damage_middle_line(relative: str) -> Callable[[Path, Path], None]:
    def damage(run: Path, workdir: Path) -> None:
        path = run / relative
        lines = path.read_text().splitlines(keepends=True)
        lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
        path.write_text("".join(lines))
    return damage


def plant(relative: str) -> Callable[[Path, Path], None]:
    """A temporary directory a killed save left behind (the process id of a process that is gone)."""
    def damage(run: Path, workdir: Path) -> None:
        (run / relative).mkdir(parents=True)
        (run / relative / "agent.pt").write_bytes(b"half")
    return damage


def nothing(run: Path, workdir: Path) -> None:
    """No damage."""


# ------------------------------------------------------------------------------------------ commands
def resume(*extra: str) -> Callable[[Path, Path], list[str]]:
    """``rlfb train --resume RUN`` one update further (the base run ended at update 3)."""
    return lambda run, workdir: ["train", "--resume", str(run), "--set", "budget.updates=4", *extra]


def evaluate(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda run, workdir: ["eval", str(run), "--n", "2", "--json", *extra]


def generate(run: Path, workdir: Path) -> list[str]:
    return ["generate", str(run), "--prompt", "The plot was", "--max-new-tokens", "4"]


def train_fresh(*overrides: str) -> Callable[[Path, Path], list[str]]:
    """``rlfb train CONFIG`` (the base run's own config) with ``overrides``."""
    return lambda run, workdir: ["train", str(workdir / "config.yaml"), "--set", "budget.updates=1",
                                 *(item for override in overrides for item in ("--set", override))]


FINAL = "final"
CASES: list[Case] = [
    Case("resume: truncated final/agent.pt", truncate(f"{FINAL}/agent.pt"), resume(), 0),
    Case("resume: truncated final/rng.pt", truncate(f"{FINAL}/rng.pt"), resume(), 0),
    Case("resume: truncated adapter weights", truncate(f"{FINAL}/adapter/adapter_model.safetensors"), resume(), 0),
    Case("resume: truncated value head", truncate(f"{FINAL}/adapter/value_head.safetensors"), resume(), 0),
    Case("resume: empty final/trainer_state.json", truncate(f"{FINAL}/trainer_state.json", 0.0), resume(), 0),
    Case("resume: deleted final/agent.pt", delete(f"{FINAL}/agent.pt"), resume(), 0),
    Case("resume: deleted final/adapter", delete(f"{FINAL}/adapter"), resume(), 0),
    Case("resume: final and step 2 damaged", both(delete(f"{FINAL}/rng.pt"),
                                                  truncate("checkpoints/step_00000002/agent.pt")), resume(), 0),
    Case("resume: every checkpoint damaged", both(delete(f"{FINAL}/rng.pt"),
                                                  *(truncate(f"checkpoints/step_0000000{i}/agent.pt")
                                                    for i in (1, 2))), resume(), 1),
    Case("resume: damaged checkpoint given itself", truncate(f"{FINAL}/agent.pt"),
         lambda run, workdir: ["train", "--resume", str(run / FINAL), "--set", "budget.updates=4"], 1),
    Case("resume: os:system reward in config.yaml", edit_configs(os_system_reward(MARKER)), resume(), 1),
    Case("resume: reward module planted in the run", planted_module_reward, resume(), 1),
    Case("resume: planted module, --allow-import run_reward", planted_module_reward,
         lambda run, workdir: [*resume("--allow-import", "run_reward")(run, workdir)], 0),
    Case("eval: os:system reward in config.yaml", edit_configs(os_system_reward(MARKER)), evaluate(), 1),
    Case("eval: reward module planted in the run", planted_module_reward, evaluate(), 1),
    Case("eval: truncated final adapter", truncate(f"{FINAL}/adapter/adapter_model.safetensors"), evaluate(), 0),
    Case("generate: deleted final/adapter/adapter_config.json", delete(f"{FINAL}/adapter/adapter_config.json"),
         generate, 0),
    Case("resume: --set lora.r=8 (a shape change)", nothing, resume("--set", "lora.r=8"), 1),
    Case("resume: --set agent.name=reinforce", nothing, resume("--set", "agent.name=reinforce"), 1),
    Case("resume: --set agent.learning_rate=0.02 (recorded)", nothing,
         resume("--set", "agent.learning_rate=0.02"), 0),
    Case("resume: partial last line in metrics.jsonl", append_to("metrics.jsonl", '{"step": 4, "rollout/rew'),
         resume(), 0),
    Case("resume: damaged middle line in metrics.jsonl", damage_middle_line("metrics.jsonl"), resume(), 1),
    Case("resume: truncated eval.json", truncate("eval.json"), resume(), 1),
    Case("resume: .tmp-final of a dead process", plant(".tmp-final-999999999"), resume(), 0),
    Case("resume: deleted config.yaml", delete("config.yaml"), resume(), 1),
    Case("train: logging.run_name=../escape", nothing, train_fresh("logging.run_name=../escape"), 1),
    Case("train: logging.run_name=/tmp/absolute", nothing, train_fresh("logging.run_name=/tmp/absolute"), 1),
]


# ------------------------------------------------------------------------------------------ running
def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path."""
    return {path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def run_case(case: Case, base_run: Path, scratch: Path, timeout_s: float = 300) -> Row:
    """Copy ``base_run`` into a fresh directory under ``scratch``, damage it, run the command, judge it."""
    workdir = Path(tempfile.mkdtemp(prefix="case-", dir=scratch))
    shutil.copy(base_run.parent.parent / "config.yaml", workdir / "config.yaml")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["output_dir"] = str(workdir / "runs")
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run = workdir / "runs" / base_run.name
    shutil.copytree(base_run, run)
    case.damage(run, workdir)
    before = file_hashes(workdir)
    # Without transformers' weight-loading bar, stderr's last line is rlfb's own.
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    # The run directory is the working directory, so a module planted there is importable if rlfb tries.
    done = subprocess.run([sys.executable, "-m", "rlfb", *case.command(run, workdir)], cwd=run, env=environment,
                          capture_output=True, text=True, timeout=timeout_s)
    after = file_hashes(workdir)
    changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return Row(case=case.name, exit_code=done.returncode, traceback="Traceback (most recent call last)" in done.stderr,
               files_changed=changed, code_executed=(run / MARKER).exists() or (workdir / MARKER).exists(),
               message=lines[-1] if lines else "", expected_exit=case.expected_exit)


def format_row(row: Row) -> str:
    """``case | exit | traceback | files changed | code executed | message``."""
    changed = "no" if not row.files_changed else f"yes: {', '.join(row.files_changed[:3])}" + (
        f" (+{len(row.files_changed) - 3})" if len(row.files_changed) > 3 else "")
    return " | ".join([row.case, str(row.exit_code), "yes" if row.traceback else "no", changed,
                       "yes" if row.code_executed else "no", row.message])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the copies (default: a temp dir)")
    args = parser.parse_args(argv)
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="rlfb-damaged-runs-"))
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the base run's own report is not a case
            base = build_base_run(scratch / "base")
        print(ROW_FORMAT)
        rows = []
        for case in (case for case in CASES if args.only in case.name):
            row = run_case(case, base, scratch)
            rows.append(row)
            print(format_row(row) + ("" if row.as_expected else f"   <-- expected exit {row.expected_exit}"),
                  flush=True)
        good = sum(row.as_expected for row in rows)
        print(f"{good} of {len(rows)} cases as expected (exit code, no traceback, no code run unasked) "
              f"in {time.perf_counter() - started:.0f} s")
        return 0 if good == len(rows) else 1
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPOSITORY))
    raise SystemExit(main())
