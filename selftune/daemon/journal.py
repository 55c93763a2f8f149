"""What the daemon did besides goals: adapter switches, tuning runs, scheduled job runs, small state.

Rows live in the queue's SQLite file (own tables, own connection); timestamps are ISO-8601 UTC.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from selftune.memory.records import utc_now

__all__ = ["AdapterSwitch", "TuneRun", "JobRun", "Journal"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapter_switches (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT NOT NULL,
    from_version TEXT,
    to_version   TEXT,
    reason       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tune_runs (
    id          TEXT PRIMARY KEY,
    trigger     TEXT NOT NULL,
    status      TEXT NOT NULL,
    pid         INTEGER,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    exit_code   INTEGER,
    decision    TEXT,
    reason      TEXT,
    version     TEXT,
    report_dir  TEXT,
    log_path    TEXT
);
CREATE TABLE IF NOT EXISTS job_runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id       TEXT NOT NULL,
    scheduled_at TEXT,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    outcome      TEXT,
    detail       TEXT
);
CREATE TABLE IF NOT EXISTS state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

TuneStatus = Literal["running", "done", "failed"]


class AdapterSwitch(BaseModel):
    at: datetime
    from_version: str | None
    to_version: str | None
    reason: str


class TuneRun(BaseModel):
    id: str
    trigger: str
    status: TuneStatus
    pid: int | None = None
    started_at: datetime
    finished_at: datetime | None = None
    exit_code: int | None = None
    decision: str | None = None
    reason: str | None = None
    version: str | None = None
    report_dir: str | None = None
    log_path: str | None = None


class JobRun(BaseModel):
    job_id: str
    scheduled_at: datetime | None
    started_at: datetime
    finished_at: datetime | None = None
    outcome: str | None = None
    detail: str | None = None


def _now() -> str:
    return utc_now().isoformat(timespec="microseconds")


class Journal:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(Path(path), check_same_thread=False, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        with self._lock, self._conn:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        with self._lock, self._conn:
            return self._conn.execute(sql, params).lastrowid or 0

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- adapter switches ---------------------------------------------------------------------
    def record_switch(self, from_version: str | None, to_version: str | None, reason: str) -> None:
        self._write("INSERT INTO adapter_switches (at, from_version, to_version, reason) VALUES (?, ?, ?, ?)",
                    (_now(), from_version, to_version, reason))

    def switches(self, limit: int = 50) -> list[AdapterSwitch]:
        rows = self._rows("SELECT * FROM adapter_switches ORDER BY id DESC LIMIT ?", (limit,))
        return [AdapterSwitch(**{k: row[k] for k in ("at", "from_version", "to_version", "reason")}) for row in rows]

    # -- tuning runs -------------------------------------------------------------------------------
    def start_tune(self, run_id: str, trigger: str, log_path: Path) -> TuneRun:
        self._write("INSERT INTO tune_runs (id, trigger, status, started_at, log_path) VALUES (?, ?, 'running', ?, ?)",
                    (run_id, trigger, _now(), str(log_path)))
        return self.tune_run(run_id)

    def set_tune_pid(self, run_id: str, pid: int) -> None:
        self._write("UPDATE tune_runs SET pid = ? WHERE id = ?", (pid, run_id))

    def finish_tune(self, run_id: str, status: TuneStatus, exit_code: int | None, outcome: dict[str, Any]) -> TuneRun:
        self._write(
            "UPDATE tune_runs SET status = ?, exit_code = ?, finished_at = ?, decision = ?, reason = ?, version = ?, "
            "report_dir = ? WHERE id = ?",
            (status, exit_code, _now(), outcome.get("decision"), outcome.get("reason"), outcome.get("version"),
             outcome.get("report_dir"), run_id),
        )
        return self.tune_run(run_id)

    def tune_run(self, run_id: str) -> TuneRun:
        rows = self._rows("SELECT * FROM tune_runs WHERE id = ?", (run_id,))
        if not rows:
            raise KeyError(f"unknown tuning run {run_id!r}")
        return TuneRun(**dict(rows[0]))

    def tune_runs(self, limit: int = 50) -> list[TuneRun]:
        return [TuneRun(**dict(row)) for row in self._rows(
            "SELECT * FROM tune_runs ORDER BY started_at DESC LIMIT ?", (limit,))]

    def abandon_running_tunes(self) -> int:
        """On start: runs a previous daemon left 'running' died with it."""
        with self._lock, self._conn:
            return self._conn.execute(
                "UPDATE tune_runs SET status = 'failed', reason = 'the daemon stopped during the run', finished_at = ? "
                "WHERE status = 'running'", (_now(),)).rowcount

    # -- scheduled job runs ------------------------------------------------------------------------
    def start_job(self, job_id: str, scheduled_at: datetime | None) -> int:
        return self._write("INSERT INTO job_runs (job_id, scheduled_at, started_at) VALUES (?, ?, ?)",
                           (job_id, scheduled_at.isoformat() if scheduled_at else None, _now()))

    def finish_job(self, run_id: int, outcome: str, detail: str | None) -> None:
        self._write("UPDATE job_runs SET finished_at = ?, outcome = ?, detail = ? WHERE id = ?",
                    (_now(), outcome, detail, run_id))

    def job_runs(self, job_id: str | None = None, limit: int = 50) -> list[JobRun]:
        where, params = ("WHERE job_id = ?", (job_id,)) if job_id else ("", ())
        rows = self._rows(f"SELECT * FROM job_runs {where} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [JobRun(**{k: row[k] for k in JobRun.model_fields}) for row in rows]

    # -- small state ------------------------------------------------------------------------------
    def get_state(self, key: str, default: str | None = None) -> str | None:
        rows = self._rows("SELECT value FROM state WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_state(self, key: str, value: str) -> None:
        self._write("INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value))

    def checkpoint(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
