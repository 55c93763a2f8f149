"""Scheduled jobs: self-tuning (cron and/or after K new scored episodes), activity reports, compaction.

An APScheduler 3 ``BackgroundScheduler`` keeps the jobs in a SQLAlchemy job store
(``<data_dir>/daemon/jobs.sqlite3``), so a job's next run time survives restarts: a run
missed while the daemon was down happens once when it is back (coalesced), if it is no
later than ``misfire_grace_seconds``. At start the stored jobs are brought in line with
the config: a job whose trigger is unchanged keeps its stored next run time, a changed one
is replaced, one no longer configured is removed. Jobs are stored by reference to
:func:`run_job`, which hands the call to the running daemon's :class:`DaemonScheduler`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from selftune.daemon.journal import Journal
from selftune.daemon.metrics import DaemonMetrics
from selftune.daemon.queue import GoalQueue
from selftune.daemon.tuning import TuneBusy, TuneRunner
from selftune.memory.records import utc_now
from selftune.runtime import Runtime

__all__ = ["JOB_IDS", "DaemonScheduler", "run_job", "cron_trigger"]

log = logging.getLogger(__name__)
JOB_IDS = ("tune-cron", "tune-after-episodes", "report", "compaction")
_BASELINE_KEY = "tune.scored_episodes_at_last_round"
_current: DaemonScheduler | None = None


def run_job(job_id: str) -> str:
    """What the job store calls; runs ``job_id`` on this process's daemon."""
    if _current is None:
        raise RuntimeError(f"job {job_id} fired with no daemon running")
    return _current.run(job_id)


def cron_trigger(expression: str, timezone: str | None) -> CronTrigger:
    """5 fields (crontab) or 6 with seconds first, as validated in the settings."""
    fields = expression.split()
    if len(fields) == 5:
        return CronTrigger.from_crontab(expression, timezone=timezone)
    names = ("second", "minute", "hour", "day", "month", "day_of_week")
    return CronTrigger(**dict(zip(names, fields)), timezone=timezone)


class DaemonScheduler:
    def __init__(self, runtime: Runtime, queue: GoalQueue, journal: Journal, tuner: TuneRunner,
                 metrics: DaemonMetrics) -> None:
        self.runtime = runtime
        self.settings = runtime.settings.daemon
        self.queue = queue
        self.journal = journal
        self.tuner = tuner
        self.metrics = metrics
        self.store_path = runtime.settings.daemon_dir / "jobs.sqlite3"
        self._scheduler: BackgroundScheduler | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        global _current
        _current = self
        if self.journal.get_state(_BASELINE_KEY) is None:  # episodes older than the daemon are not "new"
            self.journal.set_state(_BASELINE_KEY, str(self.runtime.store.count_scored()))
        self.store_path.parent.mkdir(parents=True, exist_ok=True)
        scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{self.store_path}")},
            executors={"default": ThreadPoolExecutor(2)},
            job_defaults={"coalesce": True, "misfire_grace_time": self.settings.misfire_grace_seconds,
                          "max_instances": 1},
            timezone=self.settings.timezone or None,
        )
        scheduler.add_listener(self._on_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        scheduler.start(paused=True)
        self._scheduler = scheduler
        self._sync_jobs()
        scheduler.resume()

    def shutdown(self) -> None:
        global _current
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        _current = None

    def _configured(self) -> dict[str, BaseTrigger]:
        s, tz = self.settings, self.settings.timezone
        triggers: dict[str, BaseTrigger] = {}
        if s.tune_cron:
            triggers["tune-cron"] = cron_trigger(s.tune_cron, tz)
        if s.tune_after_episodes:
            triggers["tune-after-episodes"] = IntervalTrigger(seconds=s.tune_check_seconds, timezone=tz)
        if s.report_cron:
            triggers["report"] = cron_trigger(s.report_cron, tz)
        if s.compaction_cron:
            triggers["compaction"] = cron_trigger(s.compaction_cron, tz)
        return triggers

    def _sync_jobs(self) -> None:
        assert self._scheduler is not None
        wanted = self._configured()
        for job_id in JOB_IDS:
            existing = self._scheduler.get_job(job_id)
            trigger = wanted.get(job_id)
            if trigger is None:
                if existing is not None:
                    existing.remove()
                    log.info("scheduled job %s removed (no longer configured)", job_id)
                continue
            if existing is not None and str(existing.trigger) == str(trigger):
                log.info("scheduled job %s kept; next run %s", job_id, existing.next_run_time)
                continue
            self._scheduler.add_job(run_job, trigger, args=[job_id], id=job_id, name=job_id, replace_existing=True)
            log.info("scheduled job %s: %s", job_id, trigger)

    def jobs(self) -> list[dict[str, Any]]:
        if self._scheduler is None:
            return []
        return [{"id": job.id, "trigger": str(job.trigger),
                 "next_run_time": job.next_run_time.isoformat() if job.next_run_time else None}
                for job in self._scheduler.get_jobs()]

    def _on_event(self, event: JobExecutionEvent) -> None:
        outcome = {EVENT_JOB_EXECUTED: "ok", EVENT_JOB_ERROR: "error", EVENT_JOB_MISSED: "missed"}[event.code]
        detail = repr(event.exception) if event.exception else event.retval
        run_id = self.journal.start_job(event.job_id, event.scheduled_run_time)
        self.journal.finish_job(run_id, outcome, None if detail is None else str(detail))
        self.metrics.job_runs.labels(event.job_id, outcome).inc()
        if outcome != "ok":
            log.warning("scheduled job %s %s: %s", event.job_id, outcome, detail)

    # -- the jobs ---------------------------------------------------------------------------------

    def run(self, job_id: str) -> str:
        if job_id == "tune-cron":
            return self.start_tune("cron")
        if job_id == "tune-after-episodes":
            return self._tune_if_enough_new_episodes()
        if job_id == "report":
            return self.write_activity_report()
        if job_id == "compaction":
            return self.compact()
        raise ValueError(f"unknown job {job_id!r}")

    def start_tune(self, trigger: str, method: str | None = None) -> str:
        """Start a round now (any trigger); the new-episode count restarts from here."""
        count = self.runtime.store.count_scored()
        run = self.tuner.start(trigger, method)  # TuneBusy propagates to the API; jobs report it below
        self.journal.set_state(_BASELINE_KEY, str(count))
        return f"started {run.id}"

    def _tune_if_enough_new_episodes(self) -> str:
        count = self.runtime.store.count_scored()
        baseline = int(self.journal.get_state(_BASELINE_KEY, "0") or 0)
        needed = self.settings.tune_after_episodes or 0
        if count - baseline < needed:
            return f"{count - baseline} new scored episodes of {needed}"
        try:
            return self.start_tune(f"{count - baseline} new scored episodes")
        except TuneBusy as busy:
            return f"not started: {busy}"

    def write_activity_report(self) -> str:
        """What the daemon did since the previous activity report: ``<daemon dir>/activity/<time>.json`` and ``.md``."""
        now = utc_now()
        since_text = self.journal.get_state("report.last_at")
        since = datetime.fromisoformat(since_text) if since_text else None
        recent = [g for g in self.queue.list(limit=10_000) if since is None or g.created_at > since]
        episodes = [e for e in self.runtime.store.list(limit=1000) if since is None or e.started_at > since]
        scores = [e.score for e in episodes if e.score is not None]
        report = {
            "created_at": now.isoformat(), "since": since_text,
            "goals_submitted": len(recent), "goals_by_status": dict(Counter(g.status for g in recent)),
            "queue_now": self.queue.counts(), "episodes": len(episodes),
            "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
            "active_adapter": self.runtime.adapters.active_version(),
            "adapter_switches": [s.model_dump(mode="json") for s in self.journal.switches()
                                 if since is None or s.at > since],
            "tune_runs": [r.model_dump(mode="json") for r in self.journal.tune_runs() if since is None or r.started_at > since],
        }
        out = self.runtime.settings.daemon_dir / "activity"
        out.mkdir(parents=True, exist_ok=True)
        stem = out / now.strftime("%Y%m%dT%H%M%SZ")
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        lines = [f"# selftune activity {now:%Y-%m-%d %H:%M} UTC", "", f"Since: {since_text or 'the start'}", "",
                 f"- goals submitted: {report['goals_submitted']} {report['goals_by_status']}",
                 f"- episodes: {report['episodes']}, mean score {report['mean_score']}",
                 f"- active adapter: {report['active_adapter'] or 'base'}",
                 f"- adapter switches: {len(report['adapter_switches'])}, tuning runs: {len(report['tune_runs'])}"]
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        self.journal.set_state("report.last_at", now.isoformat())
        return str(stem.with_suffix(".json"))

    def compact(self) -> str:
        """Drop duplicate memories (same kind and text, oldest kept), old step events; checkpoint SQLite."""
        started = time.monotonic()
        removed = self.runtime.memory.remove_duplicates()
        cutoff = utc_now() - timedelta(days=self.settings.events_retention_days)
        pruned = self.queue.prune_events(cutoff)
        self.queue.checkpoint()
        self.journal.checkpoint()
        self.runtime.store.checkpoint()
        return f"removed {removed} duplicate memories, {pruned} old events ({time.monotonic() - started:.1f}s)"
