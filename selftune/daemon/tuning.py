"""Tuning rounds in a child process at lower priority, so a crash or OOM cannot take the daemon down.

The child (``python -m selftune.daemon.tuning``) loads the daemon's effective settings,
runs :func:`selftune.tuning.pipeline.run_tuning_round` and writes its outcome as JSON.
The registry it promotes into is shared: the daemon's workers switch to a promoted
adapter between goals. One round runs at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from selftune.daemon.journal import Journal, TuneRun
from selftune.daemon.metrics import DaemonMetrics
from selftune.memory.records import new_id

__all__ = ["TuneBusy", "TuneRunner", "main"]

log = logging.getLogger(__name__)


class TuneBusy(RuntimeError):
    """A tuning round is already running."""


class TuneRunner:
    """Starts and watches tuning child processes; records each run in the journal."""

    def __init__(self, config_path: Path, work_dir: Path, journal: Journal, metrics: DaemonMetrics,
                 nice: int = 10, on_finish: Callable[[TuneRun], None] | None = None) -> None:
        self.config_path = config_path
        self.work_dir = work_dir
        self.journal = journal
        self.metrics = metrics
        self.nice = nice
        self.on_finish = on_finish
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._current: TuneRun | None = None
        self._watcher: threading.Thread | None = None

    def running(self) -> TuneRun | None:
        with self._lock:
            return self._current

    def start(self, trigger: str, method: str | None = None) -> TuneRun:
        """Start a round; TuneBusy when one is running."""
        with self._lock:
            if self._current is not None:
                raise TuneBusy(f"tuning run {self._current.id} is still running")
            logs = self.work_dir / "tune-logs"
            logs.mkdir(parents=True, exist_ok=True)
            run_id = new_id("tune_")
            log_path, result_path = logs / f"{run_id}.log", logs / f"{run_id}.json"
            run = self.journal.start_tune(run_id, trigger, log_path)
            command = [sys.executable, "-m", "selftune.daemon.tuning", "--config", str(self.config_path),
                       "--result", str(result_path)]
            if method:
                command += ["--method", method]
            nice = self.nice
            with log_path.open("ab") as out:
                self._process = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,  # a Ctrl-C at the daemon's terminal is the daemon's to handle
                    preexec_fn=(lambda: os.nice(nice)) if nice else None,
                )
            self.journal.set_tune_pid(run.id, self._process.pid)
            self._current = self.journal.tune_run(run.id)
            self._watcher = threading.Thread(target=self._watch, args=(self._process, self._current, result_path),
                                             name="selftune-tune-watch", daemon=True)
            self._watcher.start()
            log.info("tuning run %s started (pid %d, trigger %s)", run.id, self._process.pid, trigger)
            return self._current

    def _watch(self, process: subprocess.Popen, run: TuneRun, result_path: Path) -> None:
        code = process.wait()
        outcome: dict = {}
        if result_path.is_file():
            try:
                outcome = json.loads(result_path.read_text())
            except ValueError:
                outcome = {}
        status = "done" if code == 0 and outcome else "failed"
        if status == "failed" and "reason" not in outcome:
            outcome["reason"] = f"the tuning process exited with code {code}; see {run.log_path}"
        finished = self.journal.finish_tune(run.id, status, code, outcome)
        self.metrics.tune_runs.labels(outcome.get("decision") or status).inc()
        log.info("tuning run %s %s: %s", run.id, outcome.get("decision") or status, outcome.get("reason"))
        with self._lock:
            self._current = None
            self._process = None
        if self.on_finish is not None:
            self.on_finish(finished)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a running round (it leaves the registry unchanged) and wait for its watcher."""
        with self._lock:
            process, watcher = self._process, self._watcher
        if process is not None and process.poll() is None:
            log.warning("stopping tuning child %d", process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        if watcher is not None:
            watcher.join(timeout)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: one tuning round; its outcome goes to ``--result`` as JSON."""
    parser = argparse.ArgumentParser(prog="python -m selftune.daemon.tuning")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--method", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind like Ctrl-C: nothing half-registered

    from selftune.runtime import Runtime
    from selftune.settings import load_settings
    from selftune.tuning.adapters import write_atomic
    from selftune.tuning.pipeline import run_tuning_round

    outcome = run_tuning_round(Runtime(load_settings(args.config)), method=args.method)
    result = {"decision": outcome.decision, "reason": outcome.reason, "version": outcome.version,
              "report_dir": str(outcome.report_dir) if outcome.report_dir else None}
    write_atomic(args.result, json.dumps(result).encode())
    log.info("tuning %s: %s", outcome.decision, outcome.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
