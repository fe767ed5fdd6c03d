"""Where the server's items come from: a completion source (a policy, followed as training saves it, or
the task's built-in grammar) and the pool that keeps items ready for raters.

The pool fills itself in a background thread: it samples prompts from the task's train split, asks the
source for two completions of each, and stores the items (one transaction per batch) before any rater
sees them. An item is ``pair`` (two completions, for a choice) with probability ``pair_fraction``, else
``single`` (the first completion, for thumbs, ratings and edits). Each rater holds at most one item at a
time: asking again (a page reload) returns the same item until it is judged.

Following a policy: training publishes its adapter as ``FEEDBACK_DIR/policy`` (written atomically, with
``policy_step.json``); :class:`PolicySource` checks it before each batch, loads a newer one, and the pool
drops the ready items of the old version, so raters see the latest policy's completions.
"""

from __future__ import annotations

import collections
import json
import random
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from rlfb.feedback.store import FeedbackStore, Item

POLICY_DIR = "policy"  # under a feedback directory: the adapter training published last
POLICY_STEP_FILE = "policy_step.json"  # in it: {"step": N}


class CompletionSource(Protocol):
    """Writes completions and says which policy wrote them."""

    def refresh(self) -> None:
        """Load a newer policy if one was published (sources that cannot change do nothing)."""

    @property
    def version(self) -> tuple[str, int | None]:
        """(version name, training update it was published at, or None)."""

    def complete(self, prompts: Sequence[str], num_samples: int) -> list[list[str]]:
        """``num_samples`` completions of each prompt."""


class GrammarSource:
    """Completions from the built-in grammar of the sentiment task: no model, for demos and load tests."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def refresh(self) -> None:
        pass

    @property
    def version(self) -> tuple[str, int | None]:
        return "grammar", None

    def complete(self, prompts: Sequence[str], num_samples: int) -> list[list[str]]:
        from rlfb.rewards.feedback import sentiment_completion

        return [[sentiment_completion(self.rng, prompt) for _ in range(num_samples)] for prompt in prompts]


class PolicySource:
    """Completions of a policy; with ``follow``, the adapter in that directory, reloaded when it changes.

    Args:
        policy: a :class:`rlfb.models.policy.Policy` (base model + LoRA adapter).
        sampling: a :class:`rlfb.models.sampler.SamplingConfig`.
        version: the name of the policy as loaded (``base``, ``step_120``, ...).
        step: its training update, if known.
        follow: a published adapter directory (see the module docstring) to reload from.
        max_prompt_tokens: the prompt window, as in training.
        seed: seeds the sampling (each batch draws the next seed).
    """

    def __init__(self, policy: Any, sampling: Any, version: str = "base", step: int | None = 0,
                 follow: str | Path | None = None, max_prompt_tokens: int | None = None, seed: int = 0) -> None:
        self.policy = policy
        self.sampling = sampling
        self._version = (version, step)
        self.follow = Path(follow) if follow is not None else None
        self.max_prompt_tokens = max_prompt_tokens
        self.rng = random.Random(seed)

    @property
    def version(self) -> tuple[str, int | None]:
        return self._version

    def refresh(self) -> None:
        if self.follow is None:
            return
        step = published_step(self.follow)
        if step is None or step == self._version[1]:
            return
        self.policy.load_adapter(self.follow)
        self._version = (f"step_{step}", step)

    def complete(self, prompts: Sequence[str], num_samples: int) -> list[list[str]]:
        from rlfb.evaluation import sample_completions

        return sample_completions(self.policy, list(prompts), self.sampling, seed=self.rng.randrange(2**31),
                                  num_samples=num_samples, max_prompt_tokens=self.max_prompt_tokens)


def published_step(directory: Path) -> int | None:
    """The training update of the adapter published in ``directory``, or None if there is none yet."""
    try:
        return int(json.loads((directory / POLICY_STEP_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def publish_policy(policy: Any, feedback_dir: str | Path, step: int) -> Path:
    """Write the policy's adapter as the feedback directory's latest (atomically: a server never reads half)."""
    from rlfb.checkpoint import save_atomically

    def write(directory: Path) -> None:
        policy.save(directory)
        (directory / POLICY_STEP_FILE).write_text(json.dumps({"step": step}) + "\n")

    return save_atomically(Path(feedback_dir) / POLICY_DIR, write)


class ItemPool:
    """Items ready to be judged, refilled in the background from ``source``; see the module docstring.

    Args:
        store: where items are stored before they are shown.
        source: writes the completions.
        prompts: the prompts to draw from (a task's train split).
        pair_fraction: share of items with two completions (for choice judgments).
        capacity: items kept ready.
        batch_size: prompts per call of the source.
        seed: seeds the prompt and mode draws.
    """

    def __init__(self, store: FeedbackStore, source: CompletionSource, prompts: Sequence[str],
                 pair_fraction: float = 0.5, capacity: int = 64, batch_size: int = 16, seed: int = 0) -> None:
        if not prompts:
            raise ValueError("the item pool needs at least one prompt")
        self.store = store
        self.source = source
        self.prompts = list(prompts)
        self.pair_fraction = pair_fraction
        self.capacity = capacity
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self._ready: collections.deque[Item] = collections.deque()
        self._held: dict[str, Item] = {}  # rater -> the item they are judging
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        version, _ = source.version
        self._ready.extend(item for item in store.unjudged_items(capacity) if item.policy_version == version)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._fill, name="rlfb-feedback-items", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def version(self) -> tuple[str, int | None]:
        return self.source.version

    def fill_once(self) -> int:
        """Load a newer policy if one was published, then make and store one batch of items; returns how
        many (0 when the pool has fewer than ``batch_size`` free places and holds some items).

        Filling waits for a whole batch of room: topping up one item per judgment made a generation call
        and a store transaction per judgment, in a thread competing with the requests for the GIL.
        """
        previous = self.source.version
        self.source.refresh()
        version, step = self.source.version
        with self._condition:
            if (version, step) != previous:
                self._ready.clear()  # the old policy's items: raters see the latest policy from now on
            room = self.capacity - len(self._ready)
        if room < min(self.batch_size, self.capacity) and self._ready:
            return 0
        prompts = [self.rng.choice(self.prompts) for _ in range(min(room, self.batch_size))]
        completions = self.source.complete(prompts, 2)
        items = []
        for prompt, (first, second) in zip(prompts, completions, strict=True):
            pair = self.rng.random() < self.pair_fraction
            items.append(Item(uuid.uuid4().hex, prompt, [first, second] if pair else [first], version, step,
                              "pair" if pair else "single"))
        self.store.add_items(items)
        with self._condition:
            self._ready.extend(items)
            self._condition.notify_all()
        return len(items)

    def _fill(self) -> None:
        try:
            while not self._stopping:
                if self.fill_once() == 0:
                    with self._condition:  # woken when a rater takes an item; a newer policy is looked for anyway
                        self._condition.wait(timeout=2.0)
        except BaseException as error:  # a broken source: /api/next reports it instead of hanging
            with self._condition:
                self.error = error
                self._condition.notify_all()

    def next_for(self, rater: str, wait_s: float = 10.0) -> Item | None:
        """The item ``rater`` holds, or a fresh one; None if none is ready within ``wait_s``."""
        with self._condition:
            held = self._held.get(rater)
            if held is not None:
                return held
            if not self._ready:
                self._condition.wait_for(lambda: bool(self._ready) or self.error is not None, timeout=wait_s)
            if self.error is not None:
                raise RuntimeError(f"the completion source failed: {self.error}") from self.error
            if not self._ready:
                return None
            item = self._held[rater] = self._ready.popleft()
            if self.capacity - len(self._ready) >= self.batch_size:
                self._condition.notify_all()  # room for a batch: wake the filler
            return item

    def judged(self, rater: str, item_id: str) -> None:
        """``rater`` judged ``item_id``: they get a fresh item next."""
        with self._condition:
            held = self._held.get(rater)
            if held is not None and held.id == item_id:
                del self._held[rater]
