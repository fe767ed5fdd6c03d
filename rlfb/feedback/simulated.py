"""A simulated rater: a client of the feedback HTTP API that judges with VADER plus noise.

For tests, benchmarks and demos, it does what a person on the page does: ``GET /api/next``, judge,
``POST /api/judgments``, again. Its judgments follow the sentiment task's gold (VADER's compound score
``c`` of the completion, Hutto & Gilbert 2014), and with probability ``noise`` each is replaced by a
random one (as ``rlfb feedback synthesize`` corrupts its labels):

* binary: 1 if ``c > 0``;
* rating: ``c`` mapped linearly from [-1, 1] to the server's scale, rounded to a whole number;
* choice: the completion with the higher ``c`` (a tie is a coin flip);
* edit: the completion with every word VADER rates negative replaced by a positive adjective of the
  built-in grammar (a noisy edit returns the text unchanged).

A request the server did not answer (connection refused, reset, timeout) is sent again with the same
``request_id``, so a judgment is stored once however often it is retried.

Example (with a server running and a token from ``rlfb feedback add-rater``)::

    report = SimulatedRater("http://127.0.0.1:8000", token, noise=0.1, seed=0).run(100)
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlfb.feedback.judgments import RATER_KINDS

_WORD = re.compile(r"[A-Za-z']+")


@dataclass
class RaterReport:
    """What one simulated rater did: the judgments acknowledged, each request's latency, the retries."""

    acknowledged: list[int] = field(default_factory=list)  # judgment ids the server answered with
    post_latencies_s: list[float] = field(default_factory=list)
    next_latencies_s: list[float] = field(default_factory=list)
    retries: int = 0
    duplicates: int = 0  # answers saying the request_id was stored before (a retry of a lost answer)


class SimulatedRater:
    """Judges items of a feedback server by VADER with noise (see the module docstring).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        token: a rater token.
        noise: probability that a judgment is random instead of VADER's, in [0, 1].
        seed: seeds the noise and the choice of kind.
        kinds: the kinds this rater gives (among those each item takes); default: any the item takes.
        client: an ``httpx.Client`` to send with (a FastAPI ``TestClient`` in tests); default: a new one.
        retry_for_s: how long to keep retrying a request the server did not answer.
        think_s: seconds between receiving an item and sending its judgment (a person reads first); 0 for
            a rater as fast as the server.
    """

    def __init__(self, url: str, token: str, noise: float = 0.1, seed: int = 0,
                 kinds: Sequence[str] | None = None, client: Any = None, retry_for_s: float = 30.0,
                 think_s: float = 0.0) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        if kinds is not None and any(kind not in RATER_KINDS for kind in kinds):
            raise ValueError(f"kinds {list(kinds)}: expected some of {', '.join(RATER_KINDS)}")
        if client is None:
            import httpx

            client = httpx.Client(timeout=30.0)
        self.client = client
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.noise = noise
        self.rng = random.Random(seed)
        self.kinds = tuple(kinds) if kinds is not None else RATER_KINDS
        self.retry_for_s = retry_for_s
        if think_s < 0:
            raise ValueError(f"think_s must be at least 0, got {think_s}")
        self.think_s = think_s
        self._positive = _positive_words()

    # --------------------------------------------------------------------------------- judging
    def judge(self, item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The (kind, value) this rater gives ``item`` (a ``GET /api/next`` answer)."""
        from rlfb.rewards.builtin import vader_compound

        kinds = [kind for kind in item["kinds"] if kind in self.kinds]
        if not kinds:
            raise ValueError(f"item takes {item['kinds']}, this rater gives only {list(self.kinds)}")
        kind = self.rng.choice(kinds)
        noisy = self.rng.random() < self.noise
        completions = item["completions"]
        if kind == "choice":
            first, second = (vader_compound(text) for text in completions)
            better = self.rng.randrange(2) if noisy or first == second else int(second > first)
            return kind, {"chosen": better}
        compound = vader_compound(completions[0])
        if kind == "binary":
            return kind, {"label": self.rng.randrange(2) if noisy else int(compound > 0)}
        if kind == "rating":
            low, high = item["scale"]
            rating = self.rng.uniform(low, high) if noisy else low + (compound + 1.0) / 2.0 * (high - low)
            return kind, {"rating": min(high, max(low, round(rating)))}
        return kind, {"text": completions[0] if noisy else self.improve(completions[0])}

    def improve(self, text: str) -> str:
        """``text`` with each word VADER rates negative replaced by a positive adjective."""
        from rlfb.rewards.feedback import _vader_lexicon

        lexicon = _vader_lexicon()

        def replace(match: re.Match[str]) -> str:
            word = match.group()
            return self.rng.choice(self._positive) if lexicon.get(word.lower(), 0.0) < 0 else word

        return _WORD.sub(replace, text)

    # --------------------------------------------------------------------------------- the loop
    def run(self, judgments: int, stop: threading.Event | None = None) -> RaterReport:
        """Judge ``judgments`` items (fewer if ``stop`` is set first); returns what was acknowledged and how
        long each request took."""
        report = RaterReport()
        while len(report.acknowledged) < judgments and not (stop is not None and stop.is_set()):
            started = time.perf_counter()
            response = self._send(report, "GET", "/api/next")
            if response.status_code == 503:  # no item ready yet
                time.sleep(0.2)
                continue
            _raise_for_error(response)
            report.next_latencies_s.append(time.perf_counter() - started)
            item = response.json()
            kind, value = self.judge(item)
            if self.think_s:
                time.sleep(self.think_s)
            body = {"item_id": item["item_id"], "kind": kind, "value": value, "request_id": uuid.uuid4().hex}
            started = time.perf_counter()
            response = self._send(report, "POST", "/api/judgments", body)
            _raise_for_error(response)
            report.post_latencies_s.append(time.perf_counter() - started)
            answer = response.json()
            report.acknowledged.append(int(answer["id"]))
            report.duplicates += bool(answer["duplicate"])
        return report

    def _send(self, report: RaterReport, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        deadline = time.monotonic() + self.retry_for_s
        while True:
            try:
                return self.client.request(method, self.url + path, headers=self.headers, json=body)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                report.retries += 1
                time.sleep(0.1)


def _raise_for_error(response: Any) -> None:
    if response.status_code >= 400:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise RuntimeError(f"the feedback server answered {response.status_code}: {message}")


def _positive_words() -> list[str]:
    from rlfb.models import corpus

    return list(corpus.ADJECTIVES["positive"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_grammar_server(store_path: str | Path, port: int, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """``rlfb feedback serve --grammar`` on ``store_path`` in a subprocess, returned once ``/api/health``
    answers (for tests, benchmarks and demos of the simulated rater); see :func:`start_server`."""
    return start_server(["--grammar", "--store", str(store_path)], Path(f"{store_path}.server.log"), port, timeout_s)


def start_server(serve_arguments: Sequence[str], log_path: str | Path, port: int,
                 timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """``rlfb feedback serve SERVE_ARGUMENTS --port PORT`` in a subprocess, returned once ``/api/health``
    answers.

    The server's output goes to ``log_path`` (a pipe nobody reads would block a long run).

    Raises:
        RuntimeError: The server exited, or did not answer within ``timeout_s`` (then it is killed).
    """
    import httpx

    log_path = Path(log_path)
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # this rlfb
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "rlfb", "feedback", "serve", *serve_arguments, "--port",
                                    str(port)], env=environment, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1.0).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
        if process.poll() is not None:
            raise RuntimeError(f"the feedback server exited: {log_path.read_text(errors='replace')[-2000:]}")
    process.kill()
    raise RuntimeError(f"the feedback server did not answer within {timeout_s:g} s")
