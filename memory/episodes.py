"""Episode store: goals, transcripts and rewards in one SQLite file.

Steps commit one at a time, so a killed process loses at most the step being written;
its episode simply stays ``running``. One store object may be shared across threads
(a lock serializes use of its connection); several store objects or processes may open
the same file (WAL journal, busy timeout). Timestamps are ISO-8601 UTC strings.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO, get_args

from selftune.memory.records import (
    ChatMessage,
    Episode,
    EpisodeStatus,
    EpisodeSummary,
    Reward,
    RewardSource,
    Step,
    ToolCall,
    Verifier,
    combined_score,
    utc_now,
)

__all__ = ["EpisodeStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    id              TEXT PRIMARY KEY,
    goal            TEXT NOT NULL,
    status          TEXT NOT NULL,
    answer          TEXT,
    origin          TEXT NOT NULL,
    model_id        TEXT,
    adapter_version TEXT,
    verifier        TEXT,
    started_at      TEXT NOT NULL,
    finished_at     TEXT,
    wall_s          REAL
);
CREATE INDEX IF NOT EXISTS episodes_started_at ON episodes (started_at);

CREATE TABLE IF NOT EXISTS steps (
    episode_id      TEXT NOT NULL REFERENCES episodes (id) ON DELETE CASCADE,
    idx             INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    role            TEXT NOT NULL,
    content         TEXT NOT NULL,
    tool_calls      TEXT NOT NULL,
    tool_call_id    TEXT,
    name            TEXT,
    model_id        TEXT,
    adapter_version TEXT,
    tokens_in       INTEGER NOT NULL,
    tokens_out      INTEGER NOT NULL,
    latency_s       REAL NOT NULL,
    trainable       INTEGER NOT NULL,
    error           TEXT,
    created_at      TEXT NOT NULL,
    UNIQUE (episode_id, idx)
);

CREATE TABLE IF NOT EXISTS rewards (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    episode_id      TEXT NOT NULL REFERENCES episodes (id) ON DELETE CASCADE,
    source          TEXT NOT NULL,
    value           REAL NOT NULL,
    note            TEXT,
    created_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rewards_episode_id ON rewards (episode_id);
"""

_EPISODE_COLUMNS = (
    "id", "goal", "status", "answer", "origin", "model_id", "adapter_version",
    "verifier", "started_at", "finished_at", "wall_s",
)
_STEP_COLUMNS = (
    "episode_id", "idx", "kind", "role", "content", "tool_calls", "tool_call_id", "name", "model_id",
    "adapter_version", "tokens_in", "tokens_out", "latency_s", "trainable", "error", "created_at",
)
_REWARD_COLUMNS = ("episode_id", "source", "value", "note", "created_at")
_IN_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's variable limit
_ORDER = "ORDER BY started_at DESC, rowid DESC"


def _iso(moment: datetime) -> str:
    """ISO-8601 UTC with fixed microsecond precision (sorts as text); naive means UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _scored_where(origin_exclude: Collection[str]) -> tuple[str, tuple[str, ...]]:
    """SQL condition (and its parameters) for finished episodes with a reward, by origin."""
    excluded = tuple(sorted(origin_exclude))
    where = (
        f"status != 'running' AND origin NOT IN ({', '.join('?' * len(excluded))}) "
        "AND EXISTS (SELECT 1 FROM rewards WHERE rewards.episode_id = episodes.id)"
    )
    return where, excluded


def _step_row(episode_id: str, step: Step) -> tuple[Any, ...]:
    message = step.message
    return (
        episode_id, step.index, step.kind, message.role, message.content,
        json.dumps([call.model_dump() for call in message.tool_calls], ensure_ascii=False),
        message.tool_call_id, message.name, step.model_id, step.adapter_version,
        step.tokens_in, step.tokens_out, step.latency_s, int(step.trainable), step.error, _iso(step.created_at),
    )


def _reward_row(episode_id: str, reward: Reward) -> tuple[Any, ...]:
    return (episode_id, reward.source, reward.value, reward.note, _iso(reward.created_at))


def _step_from_row(row: sqlite3.Row) -> Step:
    message = ChatMessage(
        role=row["role"],
        content=row["content"],
        tool_calls=[ToolCall.model_validate(call) for call in json.loads(row["tool_calls"])],
        tool_call_id=row["tool_call_id"],
        name=row["name"],
    )
    return Step(
        index=row["idx"], kind=row["kind"], message=message, model_id=row["model_id"],
        adapter_version=row["adapter_version"], tokens_in=row["tokens_in"], tokens_out=row["tokens_out"],
        latency_s=row["latency_s"], trainable=bool(row["trainable"]), error=row["error"],
        created_at=row["created_at"],
    )


def _reward_from_row(row: sqlite3.Row) -> Reward:
    return Reward(
        episode_id=row["episode_id"], source=row["source"], value=row["value"],
        note=row["note"], created_at=row["created_at"],
    )


def _export_message(message: ChatMessage) -> dict[str, Any]:
    """OpenAI message with every key present (null when absent), so Arrow sees one schema."""
    return {"role": None, "content": None, "tool_calls": None, "tool_call_id": None, "name": None,
            **message.to_openai()}


class EpisodeStore:
    """Persistent episodes, steps and rewards; ``weights`` score episodes (default: 1.0 per source)."""

    def __init__(self, path: Path, weights: dict[str, float] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.weights = dict(weights) if weights is not None else dict.fromkeys(get_args(RewardSource), 1.0)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}; this selftune supports up to {SCHEMA_VERSION}"
            )
        if version < SCHEMA_VERSION:
            self._conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._conn:
            yield self._conn

    # -- writing ---------------------------------------------------------------------------

    def create_episode(self, summary: Episode) -> None:
        """Insert an episode; any steps and rewards it already carries are written too."""
        verifier = summary.verifier.model_dump_json() if summary.verifier else None
        row = (
            summary.id, summary.goal, summary.status, summary.answer, summary.origin, summary.model_id,
            summary.adapter_version, verifier, _iso(summary.started_at),
            _iso(summary.finished_at) if summary.finished_at else None, summary.wall_s,
        )
        with self._transaction() as conn:
            conn.execute(_insert("episodes", _EPISODE_COLUMNS), row)
            conn.executemany(_insert("steps", _STEP_COLUMNS), [_step_row(summary.id, s) for s in summary.steps])
            conn.executemany(
                _insert("rewards", _REWARD_COLUMNS), [_reward_row(summary.id, r) for r in summary.rewards]
            )

    def append_step(self, episode_id: str, step: Step) -> None:
        """Append one step and commit it. KeyError for an unknown episode, ValueError for a reused index."""
        with self._transaction() as conn:
            self._require(episode_id)
            try:
                conn.execute(_insert("steps", _STEP_COLUMNS), _step_row(episode_id, step))
            except sqlite3.IntegrityError as error:
                raise ValueError(f"episode {episode_id!r} already has a step {step.index}") from error

    def finish_episode(
        self,
        episode_id: str,
        status: EpisodeStatus,
        answer: str | None = None,
        finished_at: datetime | None = None,
        wall_s: float | None = None,
    ) -> None:
        """Record the outcome; ``finished_at`` defaults to now."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE episodes SET status = ?, answer = ?, finished_at = ?, wall_s = ? WHERE id = ?",
                (status, answer, _iso(finished_at or utc_now()), wall_s, episode_id),
            )
        if cursor.rowcount == 0:
            raise KeyError(f"unknown episode id {episode_id!r}")

    def add_reward(self, reward: Reward) -> None:
        """Attach a reward at any time; ``reward.episode_id`` may be a unique id prefix."""
        with self._transaction() as conn:
            episode_id = self._resolve(reward.episode_id)
            conn.execute(_insert("rewards", _REWARD_COLUMNS), _reward_row(episode_id, reward))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def get(self, episode_id: str) -> Episode:
        """The full episode by id or unique id prefix; KeyError when unknown or ambiguous."""
        with self._lock:
            return self._with_steps(self._load("id = ?", (self._resolve(episode_id),), limit=1))[0]

    def list(
        self, limit: int | None = 50, status: EpisodeStatus | None = None, origin: str | None = None
    ) -> builtins.list[EpisodeSummary]:
        """Episode headers, newest first, with ``score`` filled."""
        clauses, params = ["1"], []
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        if origin is not None:
            clauses.append("origin = ?")
            params.append(origin)
        with self._lock:
            episodes = self._load(" AND ".join(clauses), tuple(params), limit=limit)
        fields = set(EpisodeSummary.model_fields)
        return [EpisodeSummary(**e.model_dump(include=fields)) for e in episodes]

    def scored(self, min_score: float, origin_exclude: Collection[str] = frozenset({"eval"})) -> builtins.list[Episode]:
        """Finished (not ``running``) episodes scoring at least ``min_score``, best first, newest first on ties."""
        where, params = _scored_where(origin_exclude)
        with self._lock:
            headers = self._load(where, params, limit=None)
            chosen = self._with_steps([e for e in headers if e.score is not None and e.score >= min_score])
        return sorted(chosen, key=lambda e: -(e.score or 0.0))  # stable: newest first among equals

    def count_scored(self, origin_exclude: Collection[str] = frozenset({"eval"})) -> int:
        """How many finished episodes carry at least one reward (whatever their score)."""
        where, params = _scored_where(origin_exclude)
        with self._lock:
            return int(self._conn.execute(f"SELECT COUNT(*) FROM episodes WHERE {where}", params).fetchone()[0])

    def checkpoint(self) -> None:
        """Fold the write-ahead log back into the database file."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def export_jsonl(self, out: TextIO, min_score: float | None = None) -> int:
        """Write one chat-format JSON object per episode (optionally only those scoring >= ``min_score``)."""
        with self._lock:
            headers = self._load("1", (), limit=None)
            if min_score is not None:
                headers = [e for e in headers if e.score is not None and e.score >= min_score]
            episodes = self._with_steps(headers)
        for episode in reversed(episodes):  # oldest first
            record = {
                "messages": [_export_message(message) for message in episode.messages],
                "episode_id": episode.id,
                "goal": episode.goal,
                "answer": episode.answer,
                "status": episode.status,
                "origin": episode.origin,
                "score": episode.score,
                "rewards": [r.model_dump(mode="json", exclude={"episode_id"}) for r in episode.rewards],
                "model_id": episode.model_id,
                "adapter_version": episode.adapter_version,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return len(episodes)

    # -- internals (callers hold the lock) -----------------------------------------------------

    def _require(self, episode_id: str) -> None:
        if self._conn.execute("SELECT 1 FROM episodes WHERE id = ?", (episode_id,)).fetchone() is None:
            raise KeyError(f"unknown episode id {episode_id!r}")

    def _resolve(self, id_or_prefix: str) -> str:
        """The full id for an exact id or a unique prefix."""
        if self._conn.execute("SELECT 1 FROM episodes WHERE id = ?", (id_or_prefix,)).fetchone():
            return id_or_prefix
        matches = [] if not id_or_prefix else [
            row[0] for row in self._conn.execute(
                "SELECT id FROM episodes WHERE substr(id, 1, ?) = ? LIMIT 2", (len(id_or_prefix), id_or_prefix)
            )
        ]
        if not matches:
            raise KeyError(f"unknown episode id {id_or_prefix!r}")
        if len(matches) > 1:
            raise KeyError(f"episode id prefix {id_or_prefix!r} is ambiguous")
        return matches[0]

    def _load(self, where: str, params: tuple[Any, ...], limit: int | None) -> builtins.list[Episode]:
        """Scored episodes (without steps) matching ``where``, a fixed SQL condition over ``params``; newest first."""
        rows = self._conn.execute(
            f"SELECT * FROM episodes WHERE {where} {_ORDER} LIMIT ?", (*params, -1 if limit is None else limit)
        ).fetchall()
        ids = [row["id"] for row in rows]
        rewards = self._rewards_for(ids)
        episodes = []
        for row in rows:
            episode_rewards = rewards.get(row["id"], [])
            episodes.append(Episode(
                **{column: row[column] for column in _EPISODE_COLUMNS if column != "verifier"},
                verifier=Verifier.model_validate_json(row["verifier"]) if row["verifier"] else None,
                rewards=episode_rewards,
                score=combined_score(episode_rewards, self.weights),
            ))
        return episodes

    def _with_steps(self, episodes: builtins.list[Episode]) -> builtins.list[Episode]:
        steps = self._steps_for(e.id for e in episodes)
        return [e.model_copy(update={"steps": steps.get(e.id, [])}) for e in episodes]

    def _rows_for(self, sql: str, ids: Iterable[str]) -> Iterator[sqlite3.Row]:
        """Run ``sql`` (with an ``IN ({})`` slot) over ``ids`` in chunks."""
        ids = list(ids)
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start:start + _IN_CHUNK]
            yield from self._conn.execute(sql.format(", ".join("?" * len(chunk))), chunk)

    def _steps_for(self, ids: Iterable[str]) -> dict[str, builtins.list[Step]]:
        steps: dict[str, builtins.list[Step]] = {}
        for row in self._rows_for("SELECT * FROM steps WHERE episode_id IN ({}) ORDER BY episode_id, idx", ids):
            steps.setdefault(row["episode_id"], []).append(_step_from_row(row))
        return steps

    def _rewards_for(self, ids: Iterable[str]) -> dict[str, builtins.list[Reward]]:
        rewards: dict[str, builtins.list[Reward]] = {}
        for row in self._rows_for("SELECT * FROM rewards WHERE episode_id IN ({}) ORDER BY episode_id, id", ids):
            rewards.setdefault(row["episode_id"], []).append(_reward_from_row(row))
        return rewards
