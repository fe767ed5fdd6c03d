"""Load on the feedback server: concurrent simulated raters, judgments lost or duplicated, latency, kill -9.

    python benchmarks/feedback.py --raters 20 --judgments 500 [--kill-after 10]

Starts ``rlfb feedback serve --grammar`` (completions from the built-in grammar, so the figure is the
server's and the store's, not a model's) on a fresh store, runs RATERS simulated raters in threads, each
making JUDGMENTS judgments through the HTTP API, and prints: judgments acknowledged, rows in the store,
lost (acknowledged but not stored), duplicated (stored twice for one request), and the median and p99
latency of ``POST /api/judgments``. With ``--kill-after S`` the server is killed with SIGKILL after S
seconds and started again on the same store; the raters retry what went unanswered (same request id).
Requires ``pip install 'rlfb[feedback]'``.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from rlfb.feedback.simulated import RaterReport, SimulatedRater, free_port, start_grammar_server
from rlfb.feedback.store import FeedbackStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raters", type=int, default=20)
    parser.add_argument("--judgments", type=int, default=500, help="per rater")
    parser.add_argument("--kill-after", type=float, default=None, help="kill -9 the server after this many seconds")
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
            reports[index] = SimulatedRater(f"http://127.0.0.1:{port}", tokens[index], seed=index,
                                            retry_for_s=120).run(args.judgments)
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

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
    server.send_signal(signal.SIGTERM)
    server.wait()
    if failures:
        raise SystemExit(f"{len(failures)} rater(s) failed: {failures[0]}")
    acknowledged = [judgment for report in reports for judgment in report.acknowledged]
    rows = list(FeedbackStore(store_path).judgments())
    stored_ids = {row.id for row in rows}
    lost = len(set(acknowledged) - stored_ids)
    duplicated = len(rows) - len({row.request_id for row in rows})
    latencies = sorted(latency for report in reports for latency in report.post_latencies_s)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"{args.raters} raters x {args.judgments} judgments in {seconds:.1f} s: {len(acknowledged)} acknowledged, "
          f"{len(rows)} stored, {lost} lost, {duplicated} duplicated, "
          f"{sum(report.retries for report in reports)} retries; POST /api/judgments latency median "
          f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")


if __name__ == "__main__":
    main()
