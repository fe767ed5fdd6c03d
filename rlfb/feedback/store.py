"""The feedback store: one SQLite file in WAL mode, one row per judgment.

Tables (``rlfb feedback stats`` summarizes them; docs/feedback.md has the schema with every column):

* ``judgments``: ``id, request_id, item_id, rater, created, policy_version, policy_step, prompt,
  completions (JSON list), kind, value (JSON object)``: the prompt and completions are copied in, so a row
  is a whole judgment on its own (an export needs no other table).
* ``items``: what the server showed: ``id, created, prompt, completions, policy_version, policy_step,
  mode`` (``single`` or ``pair``). A judgment names its item; the item's text, not the request's, is stored.
* ``raters``: ``name, token_sha256, created``: the sha256 of each rater's token, never the token.

Durability: every write is one transaction, committed before the server answers. In WAL mode a commit
appends the transaction to the ``-wal`` file with ``write()`` before it returns, so the operating system
holds it even if the process dies that instant: with the default ``synchronous=NORMAL`` an acknowledged
judgment survives kill -9 of the server (benchmarks/feedback.py --kill-after kills it under load) but
not a power cut or a kernel crash, since the WAL is fsynced only at checkpoints. ``synchronous=FULL``
fsyncs the WAL at every commit and survives those too, at about 7 ms a judgment on the reference machine. A judgment's ``request_id`` (the client's)
is unique: a client that retries after a lost answer gets the row it already made, not a second one.
Several processes may open the store at once (the server writes, ``rlfb train`` reads while it does).

Example:
    >>> import tempfile, os
    >>> store = FeedbackStore(os.path.join(tempfile.mkdtemp(), "feedback.sqlite"))
    >>> token = store.add_rater("ada")
    >>> store.rater_for_token(token), store.rater_for_token("guess")
    ('ada', None)
    >>> store.add_items([Item("i1", "The food was", [" great."], "base", 0, "single")])
    >>> judgment_id, created = store.add_judgment("i1", "ada", "binary", {"label": 1}, request_id="r1")
    >>> store.add_judgment("i1", "ada", "binary", {"label": 1}, request_id="r1") == (judgment_id, False)
    True
    >>> [(j.rater, j.kind, j.value, j.completions) for j in store.judgments()]
    [('ada', 'binary', {'label': 1}, [' great.'])]
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlfb.feedback.judgments import JudgmentError, check_name

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, created REAL NOT NULL, prompt TEXT NOT NULL, completions TEXT NOT NULL,
    policy_version TEXT NOT NULL, policy_step INTEGER, mode TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT UNIQUE, item_id TEXT, rater TEXT NOT NULL,
    created REAL NOT NULL, policy_version TEXT NOT NULL, policy_step INTEGER, prompt TEXT NOT NULL,
    completions TEXT NOT NULL, kind TEXT NOT NULL, value TEXT NOT NULL,
    UNIQUE (item_id, rater));
CREATE INDEX IF NOT EXISTS judgments_kind ON judgments (kind, id);
CREATE INDEX IF NOT EXISTS judgments_rater ON judgments (rater);
"""
IMPORTED_VERSION = "imported"  # the policy version of judgments read from a JSONL file


@dataclass(frozen=True)
class Item:
    """Something to judge: a prompt and one (``single``) or two (``pair``) completions of one policy."""

    id: str
    prompt: str
    completions: list[str]
    policy_version: str
    policy_step: int | None
    mode: str


@dataclass(frozen=True)
class Judgment:
    """One row of the ``judgments`` table."""

    id: int
    request_id: str | None
    item_id: str | None
    rater: str
    created: float
    policy_version: str
    policy_step: int | None
    prompt: str
    completions: list[str]
    kind: str
    value: dict[str, Any]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class FeedbackStore:
    """The SQLite store at ``path`` (created with its tables if missing); safe to share between threads.

    Args:
        path: the database file.
        synchronous: SQLite's ``synchronous`` setting: ``NORMAL`` (default) survives kill -9 of the
            process but not a power cut; ``FULL`` fsyncs every commit and survives both.
    """

    def __init__(self, path: str | Path, synchronous: str = "NORMAL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)  # each statement its own transaction; all idempotent
        with self._transaction() as connection:
            connection.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = self._connection().execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if int(version) != SCHEMA_VERSION:
            raise JudgmentError(f"{self.path} has store schema {version}; this rlfb reads {SCHEMA_VERSION}", 500)

    # ------------------------------------------------------------------------------ connections
    def _connection(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared between threads)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={self.synchronous}")
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
        return connection

    class _Transaction:
        def __init__(self, connection: sqlite3.Connection) -> None:
            self.connection = connection

        def __enter__(self) -> sqlite3.Connection:
            self.connection.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
            return self.connection

        def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
            self.connection.execute("COMMIT" if kind is None else "ROLLBACK")

    def _transaction(self) -> FeedbackStore._Transaction:
        return self._Transaction(self._connection())

    def close(self) -> None:
        """Close this thread's connection."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    # ------------------------------------------------------------------------------ raters
    def add_rater(self, name: str, replace: bool = False) -> str:
        """Create rater ``name`` and return their new token (shown once: only its hash is kept).

        Raises:
            JudgmentError: a bad name, or a rater of that name exists and ``replace`` is False.
        """
        check_name(name)
        token = secrets.token_urlsafe(24)
        with self._transaction() as connection:
            exists = connection.execute("SELECT 1 FROM raters WHERE name = ?", (name,)).fetchone()
            if exists and not replace:
                raise JudgmentError(f"rater {name!r} exists; pass --replace to give them a new token "
                                    "(the old one stops working)", 409)
            connection.execute("INSERT OR REPLACE INTO raters VALUES (?, ?, ?)", (name, hash_token(token), time.time()))
        return token

    def rater_for_token(self, token: str) -> str | None:
        """The rater whose token this is, or None."""
        row = self._connection().execute("SELECT name FROM raters WHERE token_sha256 = ?",
                                         (hash_token(token),)).fetchone()
        return None if row is None else str(row[0])

    def raters(self) -> list[str]:
        return [row[0] for row in self._connection().execute("SELECT name FROM raters ORDER BY name")]

    # ------------------------------------------------------------------------------ items
    def add_items(self, items: Iterable[Item]) -> None:
        """Store items the server will show (one transaction for all of them)."""
        now = time.time()
        rows = [(item.id, now, item.prompt, json.dumps(item.completions), item.policy_version, item.policy_step,
                 item.mode) for item in items]
        with self._transaction() as connection:
            connection.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def item(self, item_id: str) -> Item | None:
        row = self._connection().execute("SELECT id, prompt, completions, policy_version, policy_step, mode "
                                         "FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            return None
        return Item(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])

    def unjudged_items(self, limit: int) -> list[Item]:
        """Items no one has judged yet, oldest first (a restarted server shows them again)."""
        rows = self._connection().execute(
            "SELECT id, prompt, completions, policy_version, policy_step, mode FROM items WHERE id NOT IN "
            "(SELECT item_id FROM judgments WHERE item_id IS NOT NULL) ORDER BY created LIMIT ?", (limit,))
        return [Item(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5]) for row in rows]

    # ------------------------------------------------------------------------------ judgments
    def add_judgment(self, item_id: str, rater: str, kind: str, value: dict[str, Any],
                     request_id: str | None = None) -> tuple[int, bool]:
        """Store one judgment of an item (its prompt, completions and policy version are the item's).

        Returns:
            ``(judgment id, created)``: ``created`` is False when ``request_id`` was stored before (a
            retried request), and the id is that row's.

        Raises:
            JudgmentError: 404 for an unknown item, 409 when this rater judged the item already.
        """
        with self._transaction() as connection:
            if request_id is not None:
                row = connection.execute("SELECT id, item_id, rater FROM judgments WHERE request_id = ?",
                                         (request_id,)).fetchone()
                if row is not None:
                    if (row[1], row[2]) != (item_id, rater):
                        raise JudgmentError(f"request_id {request_id!r} was used for another judgment", 409)
                    return int(row[0]), False
            item = connection.execute("SELECT prompt, completions, policy_version, policy_step FROM items "
                                      "WHERE id = ?", (item_id,)).fetchone()
            if item is None:
                raise JudgmentError(f"unknown item {item_id!r}; ask GET /api/next for one", 404)
            if connection.execute("SELECT 1 FROM judgments WHERE item_id = ? AND rater = ?",
                                  (item_id, rater)).fetchone():
                raise JudgmentError(f"rater {rater!r} has judged item {item_id!r} already", 409)
            cursor = connection.execute(
                "INSERT INTO judgments (request_id, item_id, rater, created, policy_version, policy_step, prompt, "
                "completions, kind, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, item_id, rater, time.time(), item[2], item[3], item[0], item[1], kind,
                 json.dumps(value, ensure_ascii=False)))
            return int(cursor.lastrowid or 0), True

    def import_judgments(self, rows: Sequence[tuple[str, list[str], str, dict[str, Any]]], rater: str) -> int:
        """Store ``(prompt, completions, kind, value)`` rows read from a file, as one transaction."""
        check_name(rater)
        now = time.time()
        records = [(rater, now, IMPORTED_VERSION, prompt, json.dumps(completions, ensure_ascii=False), kind,
                    json.dumps(value, ensure_ascii=False)) for prompt, completions, kind, value in rows]
        with self._transaction() as connection:
            connection.executemany(
                "INSERT INTO judgments (rater, created, policy_version, prompt, completions, kind, value) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", records)
        return len(records)

    def judgments(self, kinds: Sequence[str] | None = None, after_id: int = 0) -> Iterator[Judgment]:
        """Judgments in the order they were stored, of ``kinds`` (all by default), with ids above ``after_id``."""
        query = ("SELECT id, request_id, item_id, rater, created, policy_version, policy_step, prompt, completions, "
                 "kind, value FROM judgments WHERE id > ?")
        parameters: list[Any] = [after_id]
        if kinds is not None:
            query += f" AND kind IN ({', '.join('?' for _ in kinds)})"
            parameters += list(kinds)
        for row in self._connection().execute(query + " ORDER BY id", parameters).fetchall():
            yield Judgment(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], json.loads(row[8]),
                           row[9], json.loads(row[10]))

    def count(self, rater: str | None = None) -> int:
        """How many judgments (of ``rater``, or of everyone)."""
        if rater is None:
            return int(self._connection().execute("SELECT COUNT(*) FROM judgments").fetchone()[0])
        return int(self._connection().execute("SELECT COUNT(*) FROM judgments WHERE rater = ?",
                                              (rater,)).fetchone()[0])

    def stats(self) -> dict[str, Any]:
        """Counts by kind, by rater and by policy version, and the time span of the judgments."""
        connection = self._connection()

        def grouped(column: str) -> dict[str, int]:
            rows = connection.execute(f"SELECT {column}, COUNT(*) FROM judgments GROUP BY {column} ORDER BY {column}")
            return {str(key): int(count) for key, count in rows}

        first, last = connection.execute("SELECT MIN(created), MAX(created) FROM judgments").fetchone()
        items = int(connection.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        return {"judgments": self.count(), "items": items, "raters": len(self.raters()),
                "by_kind": grouped("kind"), "by_rater": grouped("rater"),
                "by_policy_version": grouped("policy_version"), "first": first, "last": last}
