"""The durable goal queue: one SQLite file (WAL) shared by the API, the workers and restarts.

A goal moves ``queued -> running -> done | failed | cancelled``. A worker claims a goal
with a lease (owner, random token, expiry) and renews it with heartbeats; every write a
worker makes afterwards is fenced by that token, so a worker that lost its lease can never
complete the goal a second time. Leases of a dead daemon are requeued when the next one
starts (``recover``), expired ones while it runs (``requeue_expired``). Every state change
is a timestamped row in ``transitions`` and a ``status`` event; the steps of a run are
``events`` too, numbered per goal, which is what the API streams.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from selftune.agent.loop import Budget
from selftune.memory.records import Verifier, new_id, utc_now

__all__ = [
    "GoalStatus", "TERMINAL", "GoalRequest", "Transition", "GoalRecord", "GoalEvent", "Lease",
    "IdempotencyConflict", "GoalQueue",
]

GoalStatus = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS goals (
    id               TEXT PRIMARY KEY,
    goal             TEXT NOT NULL,
    verifier         TEXT,
    budget           TEXT,
    idempotency_key  TEXT UNIQUE,
    status           TEXT NOT NULL,
    answer           TEXT,
    error            TEXT,
    episode_id       TEXT,
    episode_status   TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_token      TEXT,
    lease_expires    REAL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);
CREATE INDEX IF NOT EXISTS goals_status ON goals (status, created_at);
CREATE TABLE IF NOT EXISTS transitions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    goal_id     TEXT NOT NULL REFERENCES goals (id),
    from_status TEXT,
    to_status   TEXT NOT NULL,
    at          TEXT NOT NULL,
    note        TEXT
);
CREATE INDEX IF NOT EXISTS transitions_goal ON transitions (goal_id, id);
CREATE TABLE IF NOT EXISTS events (
    goal_id TEXT NOT NULL REFERENCES goals (id),
    seq     INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    data    TEXT NOT NULL,
    at      TEXT NOT NULL,
    PRIMARY KEY (goal_id, seq)
);
"""


class GoalRequest(BaseModel):
    """Body of ``POST /v1/goals``."""

    model_config = ConfigDict(extra="forbid")

    goal: str = Field(description="What the agent should achieve.")
    verifier: Verifier | None = Field(None, description="A check of the answer; it becomes a verifier reward.")
    budget: Budget | None = Field(None, description="Per-goal limits (max_steps, max_tokens, max_wall_seconds).")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200,
        description="Submitting the same key again returns the first goal instead of queueing another "
                    "(also accepted as the Idempotency-Key header).")


class Transition(BaseModel):
    from_status: GoalStatus | None
    to_status: GoalStatus
    at: datetime
    note: str | None = None


class GoalRecord(BaseModel):
    id: str
    goal: str
    verifier: Verifier | None = None
    budget: Budget | None = None
    idempotency_key: str | None = None
    status: GoalStatus
    answer: str | None = None
    error: str | None = None
    episode_id: str | None = None
    episode_status: str | None = Field(None, description="The agent's own outcome: done, limit, failed, cancelled.")
    attempts: int = 0
    cancel_requested: bool = False
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    transitions: list[Transition] = Field(default_factory=list)


class GoalEvent(BaseModel):
    goal_id: str
    seq: int
    kind: str
    data: dict[str, Any]
    at: datetime


class Lease(BaseModel):
    goal: GoalRecord
    token: str
    owner: str


class IdempotencyConflict(ValueError):
    """The idempotency key was used before for a different goal."""


def _now() -> str:
    return utc_now().isoformat(timespec="microseconds")


class GoalQueue:
    """Goals, transitions and events in ``path``; safe across threads and processes."""

    def __init__(self, path: Path, lease_seconds: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            self._conn.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front, so claims never race."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- submission and reading ---------------------------------------------------------

    def submit(self, request: GoalRequest, idempotency_key: str | None = None) -> tuple[GoalRecord, bool]:
        """Queue a goal; returns it and whether it is new (False: the key was seen with the same goal)."""
        key = idempotency_key or request.idempotency_key
        verifier = request.verifier.model_dump_json() if request.verifier else None
        budget = request.budget.model_dump_json(exclude_none=True) if request.budget else None
        with self._tx() as conn:
            if key is not None:
                row = conn.execute("SELECT * FROM goals WHERE idempotency_key = ?", (key,)).fetchone()
                if row is not None:
                    if (row["goal"], row["verifier"], row["budget"]) != (request.goal, verifier, budget):
                        raise IdempotencyConflict(f"idempotency key {key!r} was used for a different goal ({row['id']})")
                    return self._record(row), False
            goal_id, now = new_id("g_"), _now()
            conn.execute(
                "INSERT INTO goals (id, goal, verifier, budget, idempotency_key, status, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                (goal_id, request.goal, verifier, budget, key, now, now),
            )
            self._log(conn, goal_id, None, "queued", now, "submitted")
        return self.get(goal_id), True

    def get(self, goal_id: str) -> GoalRecord:
        """The goal with its transitions; KeyError when unknown."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM goals WHERE id = ?", (goal_id,)).fetchone()
            if row is None:
                raise KeyError(f"unknown goal id {goal_id!r}")
            transitions = [
                Transition(from_status=t["from_status"], to_status=t["to_status"], at=t["at"], note=t["note"])
                for t in self._conn.execute("SELECT * FROM transitions WHERE goal_id = ? ORDER BY id", (goal_id,))
            ]
        return self._record(row, transitions)

    def list(self, limit: int = 50, status: GoalStatus | None = None) -> list[GoalRecord]:
        """Newest first, without transitions."""
        where, params = ("WHERE status = ?", (status,)) if status else ("", ())
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM goals {where} ORDER BY created_at DESC, rowid DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [self._record(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """Goals per status (every status present, zero when none)."""
        counts = dict.fromkeys(("queued", "running", "done", "failed", "cancelled"), 0)
        with self._lock:
            for row in self._conn.execute("SELECT status, COUNT(*) FROM goals GROUP BY status"):
                counts[row[0]] = row[1]
        return counts

    # -- the worker's side ------------------------------------------------------------------

    def claim(self, owner: str) -> Lease | None:
        """Lease the oldest queued goal to ``owner``; None when the queue is empty."""
        token, now = secrets.token_hex(8), _now()
        with self._tx() as conn:
            row = conn.execute(
                "SELECT id FROM goals WHERE status = 'queued' ORDER BY created_at, rowid LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE goals SET status = 'running', lease_owner = ?, lease_token = ?, lease_expires = ?, "
                "attempts = attempts + 1, started_at = COALESCE(started_at, ?), updated_at = ? WHERE id = ?",
                (owner, token, time.time() + self.lease_seconds, now, now, row["id"]),
            )
            attempt = conn.execute("SELECT attempts FROM goals WHERE id = ?", (row["id"],)).fetchone()[0]
            self._log(conn, row["id"], "queued", "running", now, f"attempt {attempt} by {owner}")
        return Lease(goal=self.get(row["id"]), token=token, owner=owner)

    def heartbeat(self, goal_id: str, token: str) -> bool:
        """Extend the lease; False when it is no longer held (requeued or finished elsewhere)."""
        with self._tx() as conn:
            return self._leased_update(conn, goal_id, token, "lease_expires = ?", (time.time() + self.lease_seconds,))

    def set_episode(self, goal_id: str, token: str, episode_id: str) -> bool:
        with self._tx() as conn:
            return self._leased_update(conn, goal_id, token, "episode_id = ?, updated_at = ?", (episode_id, _now()))

    def finish(
        self,
        goal_id: str,
        token: str,
        status: GoalStatus,
        answer: str | None = None,
        error: str | None = None,
        episode_status: str | None = None,
    ) -> bool:
        """Record the outcome if ``token`` still holds the lease; False (and no change) otherwise."""
        if status not in TERMINAL:
            raise ValueError(f"finish needs a final status, not {status!r}")
        now = _now()
        with self._tx() as conn:
            done = self._leased_update(
                conn, goal_id, token, "status = ?, answer = ?, error = ?, episode_status = ?, finished_at = ?, "
                "updated_at = ?, lease_token = NULL, lease_expires = NULL",
                (status, answer, error, episode_status, now, now))
            if done:
                self._log(conn, goal_id, "running", status, now, error)
        return done

    def requeue(self, goal_id: str, token: str, note: str) -> bool:
        """Give a running goal back (shutdown); the interrupted attempt does not count against it."""
        now = _now()
        with self._tx() as conn:
            done = self._leased_update(
                conn, goal_id, token, "status = 'queued', attempts = MAX(attempts - 1, 0), lease_owner = NULL, "
                "lease_token = NULL, lease_expires = NULL, updated_at = ?", (now,))
            if done:
                self._log(conn, goal_id, "running", "queued", now, note)
        return done

    def cancel_requested(self, goal_id: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT cancel_requested FROM goals WHERE id = ?", (goal_id,)).fetchone()
        return bool(row and row[0])

    # -- cancellation and recovery ----------------------------------------------------------

    def cancel(self, goal_id: str) -> GoalRecord:
        """A queued goal is cancelled now; a running one at its next step; a finished one is left as it is."""
        now = _now()
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM goals WHERE id = ?", (goal_id,)).fetchone()
            if row is None:
                raise KeyError(f"unknown goal id {goal_id!r}")
            if row["status"] == "queued":
                conn.execute(
                    "UPDATE goals SET status = 'cancelled', cancel_requested = 1, finished_at = ?, updated_at = ? "
                    "WHERE id = ?", (now, now, goal_id))
                self._log(conn, goal_id, "queued", "cancelled", now, "cancelled before it started")
            elif row["status"] == "running":
                conn.execute("UPDATE goals SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, goal_id))
        return self.get(goal_id)

    def recover(self, owner: str, max_attempts: int) -> list[GoalRecord]:
        """On start: requeue goals still leased by a dead daemon (any owner but ``owner``).

        Only one daemon serves a data dir (an instance lock), so such leases are abandoned.
        Returns the goals touched, whose ``episode_id`` names the interrupted episode."""
        return self._requeue_where("status = 'running' AND (lease_owner IS NULL OR lease_owner != ?)", (owner,),
                                   max_attempts, "lease of a stopped daemon")

    def requeue_expired(self, max_attempts: int) -> list[GoalRecord]:
        """Requeue running goals whose lease ran out (their worker stopped renewing it)."""
        return self._requeue_where("status = 'running' AND lease_expires < ?", (time.time(),),
                                   max_attempts, "lease expired")

    def _requeue_where(self, where: str, params: tuple[Any, ...], max_attempts: int, why: str) -> list[GoalRecord]:
        now = _now()
        with self._tx() as conn:
            rows = conn.execute(f"SELECT id, attempts FROM goals WHERE {where}", params).fetchall()
            for row in rows:
                if row["attempts"] >= max_attempts:
                    error = f"{why}; gave up after {row['attempts']} interrupted attempts"
                    conn.execute(
                        "UPDATE goals SET status = 'failed', error = ?, finished_at = ?, updated_at = ?, "
                        "lease_token = NULL, lease_expires = NULL WHERE id = ?", (error, now, now, row["id"]))
                    self._log(conn, row["id"], "running", "failed", now, error)
                else:
                    conn.execute(
                        "UPDATE goals SET status = 'queued', lease_owner = NULL, lease_token = NULL, "
                        "lease_expires = NULL, updated_at = ? WHERE id = ?", (now, row["id"]))
                    self._log(conn, row["id"], "running", "queued", now, f"{why}: requeued")
        return [self.get(row["id"]) for row in rows]

    # -- events ---------------------------------------------------------------------------------

    def add_event(self, goal_id: str, kind: str, data: dict[str, Any]) -> int:
        """Append an event to the goal's stream; returns its sequence number."""
        with self._tx() as conn:
            return self._event(conn, goal_id, kind, data, _now())

    def events(self, goal_id: str, after: int = 0, limit: int = 500) -> list[GoalEvent]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM events WHERE goal_id = ? AND seq > ? ORDER BY seq LIMIT ?", (goal_id, after, limit)
            ).fetchall()
        return [GoalEvent(goal_id=r["goal_id"], seq=r["seq"], kind=r["kind"], data=json.loads(r["data"]), at=r["at"])
                for r in rows]

    def prune_events(self, finished_before: datetime) -> int:
        """Drop the step events of goals finished before ``finished_before`` (status rows stay)."""
        with self._tx() as conn:
            cursor = conn.execute(
                "DELETE FROM events WHERE kind != 'status' AND goal_id IN "
                "(SELECT id FROM goals WHERE finished_at IS NOT NULL AND finished_at < ?)",
                (finished_before.isoformat(timespec="microseconds"),),
            )
        return cursor.rowcount

    def checkpoint(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- internals (callers hold the lock or a transaction) ---------------------------------------

    @staticmethod
    def _leased_update(conn: sqlite3.Connection, goal_id: str, token: str, assignments: str,
                       params: tuple[Any, ...]) -> bool:
        """``UPDATE goals SET <assignments>`` only while ``token`` holds the running goal's lease."""
        cursor = conn.execute(
            f"UPDATE goals SET {assignments} WHERE id = ? AND lease_token = ? AND status = 'running'",
            (*params, goal_id, token),
        )
        return cursor.rowcount == 1

    def _log(self, conn: sqlite3.Connection, goal_id: str, old: str | None, new: str, at: str, note: str | None) -> None:
        conn.execute("INSERT INTO transitions (goal_id, from_status, to_status, at, note) VALUES (?, ?, ?, ?, ?)",
                     (goal_id, old, new, at, note))
        self._event(conn, goal_id, "status", {"status": new, "note": note}, at)

    @staticmethod
    def _event(conn: sqlite3.Connection, goal_id: str, kind: str, data: dict[str, Any], at: str) -> int:
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE goal_id = ?", (goal_id,)).fetchone()[0]
        conn.execute("INSERT INTO events (goal_id, seq, kind, data, at) VALUES (?, ?, ?, ?, ?)",
                     (goal_id, seq, kind, json.dumps(data, ensure_ascii=False, default=str), at))
        return seq

    @staticmethod
    def _record(row: sqlite3.Row, transitions: list[Transition] | None = None) -> GoalRecord:
        return GoalRecord(
            id=row["id"], goal=row["goal"],
            verifier=Verifier.model_validate_json(row["verifier"]) if row["verifier"] else None,
            budget=Budget.model_validate_json(row["budget"]) if row["budget"] else None,
            idempotency_key=row["idempotency_key"], status=row["status"], answer=row["answer"], error=row["error"],
            episode_id=row["episode_id"], episode_status=row["episode_status"], attempts=row["attempts"],
            cancel_requested=bool(row["cancel_requested"]), created_at=row["created_at"],
            updated_at=row["updated_at"], started_at=row["started_at"], finished_at=row["finished_at"],
            transitions=transitions or [],
        )
