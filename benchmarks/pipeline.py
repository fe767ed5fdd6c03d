"""Issue 15's targets for ``rlfb pipeline`` (configs/pipeline_sentiment.yaml on the built-in model):

1. the pipeline reaches held-out gold VADER >= 0.7 within 20 minutes (a fresh pipeline directory);
2. rerunning the finished pipeline takes at most 10 seconds (a new process, as a user reruns it);
3. kill -9 during a run of each stage kind, then a rerun: the final metrics equal the uninterrupted run's.
   Each kill starts from a copy of the finished directory with the newest run of that kind and everything
   after it removed (the runs before it are what an interrupted pipeline had finished), kills the process
   once that run is half way (by its recorded time), and reruns to the end;
4. changing only the RL stages' learning rate leaves every stage before the first RL stage done and makes
   the RL stages and what follows them stale (``--status``), and (with ``--run-changed``) a rerun runs those only.

    python benchmarks/pipeline.py                          # all four, on configs/pipeline_sentiment.yaml
    python benchmarks/pipeline.py --kill-kinds rl eval     # fewer kills
    python benchmarks/pipeline.py --set stages.2.budget.updates=20 ...   # a quicker variant (say so)

Every pipeline process runs with one torch thread (the config's ``threads``). Timings depend on the
machine's load: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("sft", "reward_model", "rl", "feedback", "eval")


def pipeline_command(config: Path, out: Path, overrides: list[str], *extra: str) -> list[str]:
    sets = [item for override in overrides for item in ("--set", override)]
    return [sys.executable, "-m", "rlfb", "pipeline", str(config), "--output-dir", str(out), *sets, *extra]


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("a") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - started


def stage_records(out: Path) -> dict[str, dict[str, Any]]:
    return {path.parent.name: json.loads(path.read_text()) for path in sorted((out / "stages").glob("*/stage.json"))}


def final_metrics(out: Path) -> dict[str, float]:
    records = stage_records(out)
    state = json.loads((out / "state.json").read_text())
    name = state["rounds"][-1]["eval"] if state["rounds"] else [n for n, r in records.items() if r["kind"] == "eval"][-1]
    return records[name]["metrics"]


def ordered_runs(out: Path) -> list[str]:
    """The stage runs in the order they ran (their records' modification times)."""
    return sorted(stage_records(out), key=lambda name: (out / "stages" / name / "stage.json").stat().st_mtime)


def kill_during(kind: str, finished: Path, config: Path, overrides: list[str], work: Path, log: Path) -> dict[str, Any]:
    """Copy ``finished`` minus the newest run of ``kind`` and what followed, kill -9 half way through it, rerun."""
    order = ordered_runs(finished)
    records = stage_records(finished)
    victim = [name for name in order if records[name]["kind"] == kind][-1]
    copy = work / f"kill_{kind}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(finished, copy, symlinks=True)
    for name in order[order.index(victim):]:
        shutil.rmtree(copy / "stages" / name)
    process = subprocess.Popen(pipeline_command(config, copy, overrides), cwd=ROOT, stdout=log.open("a"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    running = copy / "stages" / victim / "running.json"
    while not running.is_file():
        if process.poll() is not None:
            raise RuntimeError(f"the pipeline ended before {victim} started (see {log})")
        time.sleep(0.05)
    time.sleep(records[victim]["seconds"] / 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    status = subprocess.run(pipeline_command(config, copy, overrides, "--status"), cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    state_after_kill = next(line.split()[2] for line in status.splitlines() if line.split()[0] == victim)
    seconds = run(pipeline_command(config, copy, overrides), log)
    equal = final_metrics(copy) == final_metrics(finished)
    return {"kind": kind, "killed": victim, "state_after_kill": state_after_kill, "rerun_s": seconds, "equal": equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "pipeline_sentiment.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=None, help="where the pipeline directories go (default: a temp dir)")
    parser.add_argument("--kill-kinds", nargs="*", default=list(KINDS), choices=KINDS)
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="the changed RL learning rate (target 4; the config's is 5e-4)")
    parser.add_argument("--run-changed", action="store_true", help="also rerun the pipeline with the changed rate")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rlfb-pipeline-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "pipeline.log"
    finished = work / "finished"
    shutil.rmtree(finished, ignore_errors=True)
    print(f"pipeline directories and the log in {work}", flush=True)

    total = run(pipeline_command(args.config, finished, args.overrides), log)
    metrics = final_metrics(finished)
    state = json.loads((finished / "state.json").read_text())
    print("\n| round | eval | gold/sentiment | KL | fluency |\n|---|---|---|---|---|")
    for record in state["rounds"]:
        values = record["metrics"]
        print(f"| {record['round']} | {record['eval']} | {values['gold/sentiment']:.3f} | {values['kl']:.2f} | "
              f"{values['fluency']:.3f} |")
    print(f"\nrounds stopped: {state['stop_reason']}")
    print("stage seconds: " + ", ".join(f"{name} {record['seconds']:.0f}"
                                        for name, record in ((n, stage_records(finished)[n]) for n in ordered_runs(finished))))
    gold = metrics["gold/sentiment"]
    print(f"1. gold {gold:.3f} (target >= 0.7) in {total / 60:.1f} min (target <= 20): "
          f"{'met' if gold >= 0.7 and total <= 1200 else 'NOT met'}", flush=True)

    rerun = run(pipeline_command(args.config, finished, args.overrides), log)
    print(f"2. rerun of the finished pipeline: {rerun:.1f} s (target <= 10): {'met' if rerun <= 10 else 'NOT met'}",
          flush=True)

    results = [kill_during(kind, finished, args.config, args.overrides, work, log) for kind in args.kill_kinds]
    for result in results:
        print(f"3. kill -9 during {result['killed']} ({result['kind']}): status said {result['state_after_kill']}; "
              f"rerun {result['rerun_s']:.0f} s; final metrics equal: {result['equal']}", flush=True)
    if results:
        print(f"3. {'met' if all(r['equal'] for r in results) else 'NOT met'} for {', '.join(args.kill_kinds)}")

    from rlfb.pipeline import load_pipeline_config, pipeline_status

    config = load_pipeline_config(args.config, args.overrides)
    rl_stages = [index for index, stage in enumerate(config.stages) if stage.kind == "rl"]
    changed = args.overrides + [f"stages.{index}.agent.learning_rate={args.learning_rate}" for index in rl_stages]
    statuses = pipeline_status(load_pipeline_config(args.config, changed), finished)
    first_rl = next(index for index, status in enumerate(statuses) if status.kind == "rl")
    stale = [status.name for status in statuses if status.state != "done"]
    before_done = all(status.state == "done" for status in statuses[:first_rl])
    after_stale = all(status.state == "stale" for status in statuses[first_rl:])
    print(f"4. with the RL learning rate {args.learning_rate:g}: stale {', '.join(stale)}; everything before "
          f"{statuses[first_rl].name} done: {before_done}; it and all after it stale: {after_stale}: "
          f"{'met' if before_done and after_stale else 'NOT met'}")
    if args.run_changed:
        lines_before = log.read_text().count("\n")
        seconds = run(pipeline_command(args.config, finished, changed), log)
        ran = [line.split()[1] for line in log.read_text().splitlines()[lines_before:]
               if line.startswith("pipeline: ") and line.endswith(" ...")]
        print(f"4. the rerun ran {', '.join(ran)} in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
