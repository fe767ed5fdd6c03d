"""Load on the feedback server: concurrent simulated raters, judgments lost or duplicated, latency, kill -9.

    python benchmarks/feedback.py --raters 20 --judgments 500 [--kill-after 10] [--think-s 1] [--train]

Starts ``rlfb feedback serve --grammar`` (completions from the built-in grammar, so the figure is the
server's and the store's, not a model's) on a fresh store, runs RATERS simulated raters in threads, each
making JUDGMENTS judgments through the HTTP API, and prints: judgments acknowledged, rows in the store,
lost (acknowledged but not stored), duplicated (stored twice for one request), and the median and p99
latency of ``POST /api/judgments`` and of ``GET /api/next``. Raters send as fast as the server answers
(a closed loop: on one core the latency is then mostly the queue of the other raters' requests), or wait
``--think-s`` seconds per judgment as a person does. ``--train`` runs ``rlfb train
configs/sentiment_online.yaml`` on the same store meanwhile (its reward model trained from the raters'
choices and retrained every 100 new ones, RL in between), stopped when the raters are done. With ``--kill-after S`` the server is killed with SIGKILL after S
seconds and started again on the same store; the raters retry what went unanswered (same request id).
Requires ``pip install 'rlfb[feedback]'``.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rlfb.feedback.simulated import RaterReport, SimulatedRater, free_port, start_grammar_server
from rlfb.feedback.store import FeedbackStore

ROOT = Path(__file__).resolve().parents[1]

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raters", type=int, default=20)
    parser.add_argument("--judgments", type=int, default=500, help="per rater")
    parser.add_argument("--kill-after", type=float, default=None, help="kill -9 the server after this many seconds")
    parser.add_argument("--think-s", type=float, default=0.0, help="each rater's seconds per judgment")
    parser.add_argument("--train", action="store_true", help="run an online training run on the store meanwhile")
    args = parser.parse_args()
    store_path = Path(tempfile.mkdtemp()) / "store.sqlite"
    store = FeedbackStore(store_path)
    tokens = [store.add_rater(f"sim{index}") for index in range(args.raters)]
    port = free_port()
    server = start_grammar_server(store_path, port)
    reports: list[RaterReport] = [RaterReport() for _ in tokens]
    failures: list[BaseException] = []

    def rate(index: int) -> None:
        try:
            reports[index] = SimulatedRater(f"http://127.0.0.1:{port}", tokens[index], seed=index, retry_for_s=120,
                                            think_s=args.think_s).run(args.judgments)
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    train = start_training(store_path.parent) if args.train else None
    started = time.perf_counter()
    threads = [threading.Thread(target=rate, args=(index,)) for index in range(args.raters)]
    for thread in threads:
        thread.start()
    if args.kill_after is not None:
        time.sleep(args.kill_after)
        server.send_signal(signal.SIGKILL)
        server.wait()
        print(f"killed the server (SIGKILL) after {args.kill_after:g} s with {FeedbackStore(store_path).count()} "
              "judgments stored; restarting it")
        server = start_grammar_server(store_path, port)
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    server_cpu_s = cpu_seconds(server.pid)
    raters_cpu_s = resource.getrusage(resource.RUSAGE_SELF)
    raters_cpu_s = raters_cpu_s.ru_utime + raters_cpu_s.ru_stime
    server.send_signal(signal.SIGTERM)
    server.wait()
    if train is not None:
        train.send_signal(signal.SIGINT)
        train.wait()
        log = (store_path.parent / "train.log").read_text(errors="replace")
        print(f"training meanwhile: {log.count('retrained the reward model')} reward-model retrainings, "
              f"{log.count('update ')} update lines (train.log in {store_path.parent})")
    if failures:
        raise SystemExit(f"{len(failures)} rater(s) failed: {failures[0]}")
    acknowledged = [judgment for report in reports for judgment in report.acknowledged]
    rows = list(FeedbackStore(store_path).judgments())
    stored_ids = {row.id for row in rows}
    lost = len(set(acknowledged) - stored_ids)
    duplicated = len(rows) - len({row.request_id for row in rows})
    print(f"{args.raters} raters x {args.judgments} judgments in {seconds:.1f} s: {len(acknowledged)} acknowledged, "
          f"{len(rows)} stored, {lost} lost, {duplicated} duplicated, "
          f"{sum(report.retries for report in reports)} retries; latency "
          f"POST /api/judgments {latency_summary([report.post_latencies_s for report in reports])}, "
          f"GET /api/next {latency_summary([report.next_latencies_s for report in reports])}")
    if args.kill_after is None:
        print(f"CPU per judgment (a GET and a POST): server {server_cpu_s / len(rows) * 1000:.2f} ms, raters (this "
              f"process: HTTP client, VADER) {raters_cpu_s / len(rows) * 1000:.2f} ms")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency_summary(per_rater: list[list[float]]) -> str:
    latencies = sorted(latency for rater in per_rater for latency in rater)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return f"median {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


def start_training(directory: Path) -> subprocess.Popen[bytes]:
    """``rlfb train configs/sentiment_online.yaml`` on the store in ``directory`` (pairwise, from choices)."""
    reward = f"[{{name: reward_model, kwargs: {{path: {directory / 'reward_model'}}}}}]"
    command = [sys.executable, "-m", "rlfb", "train", str(ROOT / "configs" / "sentiment_online.yaml"),
               "--set", f"feedback.dir={directory}", "--set", f"rewards={reward}", "--set", "budget.updates=100000",
               "--set", f"output_dir={directory / 'runs'}", "--set", "logging.progress_bar=false"]
    with (directory / "train.log").open("wb") as log:
        return subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                                stderr=subprocess.STDOUT)


if __name__ == "__main__":
    main()
