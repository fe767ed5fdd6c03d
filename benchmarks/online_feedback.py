"""The online learning curve: a simulated rater judges the live policy through the HTTP API while ``rlfb
train`` retrains its reward model from the store; held-out gold VADER against judgments and wall time.

    python benchmarks/online_feedback.py                       # configs/sentiment_online.yaml, 1,500 judgments
    python benchmarks/online_feedback.py --kinds rating --think-s 0.3 --set feedback.retrain_every=150

Everything runs as a user would run it, on a fresh feedback directory: ``rlfb feedback serve CONFIG``
(completions from the adapter the run publishes), one :class:`~rlfb.feedback.simulated.SimulatedRater`
(VADER with ``--noise``, ``--think-s`` seconds per judgment) in this process, and ``rlfb train CONFIG``.
The run's config is the given one with two changes: its paths point into the output directory, and a
gold reward ``{name: sentiment, weight: 0, label: gold}`` is added, so each held-out evaluation logs
``eval/reward/gold`` (VADER of held-out completions) without training on it. The rater stops after
``--judgments``; training stops at its budget, or when ``--minutes`` of wall time have passed (SIGINT).

Prints one line per held-out evaluation (update, wall seconds since the start, judgments stored, gold
VADER, the reward model's score, KL), then the first evaluation at or above ``--target`` and its
judgments and wall time; writes ``curve.json`` and, with matplotlib, ``curve.png`` to ``--out``.
Requires ``pip install 'rlfb[feedback]'``.

Target (issue 14, 2 CPU cores): gold VADER from the base (~0.05) to at least 0.6 with at most 1,500
judgments, in at most 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from rlfb.feedback.simulated import RaterReport, SimulatedRater, free_port, start_server
from rlfb.feedback.store import FeedbackStore

GOLD = {"name": "sentiment", "weight": 0.0, "label": "gold"}
GOLD_KEY = "eval/reward/gold"


def online_config(config_path: Path, out: Path) -> Path:
    """The config with its feedback paths under ``out``, a weight-0 gold reward, and a fixed run name."""
    data = yaml.safe_load(config_path.read_text())
    old_dir = str(data["feedback"]["dir"])
    new_dir = str(out / "feedback")
    for reward in data.get("rewards", []):
        path = reward.get("kwargs", {}).get("path") if isinstance(reward, dict) else None
        if isinstance(path, str) and path.startswith(old_dir):
            reward["kwargs"]["path"] = new_dir + path[len(old_dir):]
    data["rewards"] = [*data["rewards"], GOLD]
    data["feedback"]["dir"] = new_dir
    data["output_dir"] = str(out / "runs")
    data.setdefault("logging", {}).update({"run_name": "online", "progress_bar": False})
    written = out / "config.yaml"
    written.write_text(yaml.safe_dump(data, sort_keys=False))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/sentiment_online.yaml")
    parser.add_argument("--judgments", type=int, default=1500, help="the rater's budget")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock limit of the whole run")
    parser.add_argument("--kinds", default="choice", help="kinds the server offers (comma-separated)")
    parser.add_argument("--noise", type=float, default=0.1, help="share of random judgments")
    parser.add_argument("--think-s", type=float, default=0.0, help="the rater's seconds per judgment")
    parser.add_argument("--target", type=float, default=0.6, help="gold VADER to reach")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to rlfb train (repeatable)")
    parser.add_argument("--out", default=None, help="output directory (default: a fresh temporary one)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="online_feedback_"))
    out.mkdir(parents=True, exist_ok=True)
    config = online_config(Path(args.config), out)
    store_path = out / "feedback" / "store.sqlite"
    store = FeedbackStore(store_path)
    token = store.add_rater("sim")
    port = free_port()
    started = time.monotonic()
    server = start_server([str(config), "--kinds", args.kinds], out / "server.log", port, timeout_s=180)
    print(f"server up after {time.monotonic() - started:.1f} s; output in {out}", flush=True)
    stop = threading.Event()
    reports: list[RaterReport] = []
    failures: list[BaseException] = []

    def rate() -> None:
        try:
            reports.append(SimulatedRater(f"http://127.0.0.1:{port}", token, noise=args.noise, seed=0,
                                          retry_for_s=60, think_s=args.think_s).run(args.judgments, stop))
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    rater = threading.Thread(target=rate, daemon=True)
    rater.start()
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    overrides = [part for override in args.overrides for part in ("--set", override)]
    with (out / "train.log").open("wb") as log:
        train = subprocess.Popen([sys.executable, "-m", "rlfb", "train", str(config), *overrides], env=environment,
                                 stdout=log, stderr=subprocess.STDOUT)
    curve = follow_training(train, out / "runs" / "online" / "metrics.jsonl", store, started, 60 * args.minutes)
    stop.set()
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    rater.join(timeout=60)
    if failures:
        print(f"the rater failed: {failures[0]}")
    report(curve, store, args, out, time.monotonic() - started, reports)


def follow_training(train: subprocess.Popen[bytes], metrics_path: Path, store: FeedbackStore, started: float,
                    limit_s: float) -> list[dict[str, Any]]:
    """Watch the run's metrics.jsonl until it exits; one point per held-out evaluation (SIGINT at the limit)."""
    curve: list[dict[str, Any]] = []
    offset, interrupted = 0, False
    print(f"{'update':>6} {'wall_s':>7} {'judgments':>9} {'gold':>6} {'rm':>7} {'kl':>5}", flush=True)
    while True:
        running = train.poll() is None
        if metrics_path.is_file():
            with metrics_path.open() as metrics:
                metrics.seek(offset)
                for line in iter(metrics.readline, ""):
                    if not line.endswith("\n"):
                        break  # half written: read it next time
                    offset += len(line)
                    row = json.loads(line)
                    if GOLD_KEY in row:
                        point = {"update": row["step"], "wall_s": time.monotonic() - started,
                                 "judgments": store.count(), "gold": row[GOLD_KEY],
                                 "reward_model": row.get("eval/reward/reward_model", float("nan")),
                                 "kl": row.get("eval/kl", float("nan"))}
                        curve.append(point)
                        print(f"{point['update']:>6} {point['wall_s']:>7.0f} {point['judgments']:>9} "
                              f"{point['gold']:>6.3f} {point['reward_model']:>7.3f} {point['kl']:>5.2f}", flush=True)
        if not running:
            return curve
        if not interrupted and time.monotonic() - started > limit_s:
            print(f"wall-clock limit reached: stopping training (SIGINT) with {store.count()} judgments", flush=True)
            train.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.5)


def report(curve: list[dict[str, Any]], store: FeedbackStore, args: argparse.Namespace, out: Path, wall_s: float,
           reports: list[RaterReport]) -> None:
    judgments = store.count()
    reached = next((point for point in curve if point["gold"] >= args.target), None)
    print(f"{judgments} judgments stored in {wall_s:.0f} s of wall time; gold VADER {curve[0]['gold']:.3f} before "
          f"training, {curve[-1]['gold']:.3f} at the end" if curve else "no evaluation logged: see train.log")
    if reached is None:
        print(f"target gold >= {args.target}: not reached")
    else:
        verdict = "met" if reached["judgments"] <= 1500 and reached["wall_s"] <= 900 else "not met"
        print(f"target gold >= {args.target}: reached at update {reached['update']} with {reached['judgments']} "
              f"judgments after {reached['wall_s']:.0f} s ({verdict}: <= 1,500 judgments, <= 15 minutes)")
    latencies = sorted(latency for rater in reports for latency in rater.post_latencies_s)
    if latencies:
        print(f"rater: POST median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
              f"p99 {latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000:.1f} ms")
    (out / "curve.json").write_text(json.dumps({"arguments": vars(args), "curve": curve}, indent=1) + "\n")
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, key, label in ((axes[0], "judgments", "judgments stored"), (axes[1], "wall_s", "wall time (s)")):
        axis.plot([point[key] for point in curve], [point["gold"] for point in curve], marker="o")
        axis.axhline(args.target, linestyle="--", color="grey")
        axis.set_xlabel(label)
    axes[0].set_ylabel("held-out gold VADER")
    figure.suptitle(f"online feedback: {args.config}, kinds {args.kinds}, noise {args.noise}")
    figure.tight_layout()
    figure.savefig(out / "curve.png", dpi=100)
    print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")


if __name__ == "__main__":
    main()
