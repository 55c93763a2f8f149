"""The daemon process: instance lock, recovery, workers, scheduler, uvicorn, and a clean stop.

Start: take the data dir's instance lock, requeue goals a dead daemon left running (their
episodes end ``failed``), start the scheduler and the workers, serve the API (uvicorn in a
thread), and write ``<data_dir>/daemon/endpoint.json`` for clients. SIGTERM or SIGINT:
stop taking goals, let the running one finish within ``shutdown_grace_seconds`` or requeue
it, stop the scheduler and any tuning child, stop the server, flush the stores, exit 0.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
import yaml

from selftune.daemon.api import create_app
from selftune.daemon.auth import RateLimiter, load_or_create_token
from selftune.daemon.journal import Journal
from selftune.daemon.metrics import DaemonMetrics
from selftune.daemon.queue import GoalQueue
from selftune.daemon.scheduler import DaemonScheduler
from selftune.daemon.tuning import TuneRunner
from selftune.daemon.worker import GoalWorkers
from selftune.memory.records import utc_now
from selftune.runtime import Runtime
from selftune.settings import Settings

__all__ = ["DaemonError", "InstanceLock", "Daemon", "token_path", "endpoint_path"]

log = logging.getLogger(__name__)


class DaemonError(RuntimeError):
    """The daemon cannot start (another one holds the data dir, the port is taken)."""


def token_path(settings: Settings) -> Path:
    return settings.data_dir / "api_token"


def endpoint_path(settings: Settings) -> Path:
    return settings.daemon_dir / "endpoint.json"


class InstanceLock:
    """An exclusive ``flock`` on ``<data_dir>/daemon/daemon.lock``; the kernel drops it when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DaemonError(f"another selftune daemon (pid {holder}) is serving {self.path.parent.parent}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class Daemon:
    """One data dir's daemon; :meth:`serve` runs until a signal (or :meth:`request_stop`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime = Runtime(settings)
        daemon_dir = settings.daemon_dir
        daemon_dir.mkdir(parents=True, exist_ok=True)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lock = InstanceLock(daemon_dir / "daemon.lock")
        self.accepting = False
        self.stopping = threading.Event()
        self.token = ""
        self.queue: GoalQueue
        self.journal: Journal
        self.metrics: DaemonMetrics
        self.workers: GoalWorkers
        self.tuner: TuneRunner
        self.scheduler: DaemonScheduler
        self.rate = RateLimiter(settings.daemon.rate_limit_per_minute, settings.daemon.rate_limit_burst)
        self.url = ""

    def _open(self) -> None:
        """Everything that touches the data dir; only once the instance lock is held."""
        settings, daemon_dir = self.settings, self.settings.daemon_dir
        self.token = load_or_create_token(token_path(settings))
        self.queue = GoalQueue(daemon_dir / "daemon.sqlite3", settings.daemon.lease_seconds)
        self.journal = Journal(daemon_dir / "daemon.sqlite3")
        self.metrics = DaemonMetrics(self.queue.counts)
        self.workers = GoalWorkers(self.runtime, self.queue, self.journal, settings.daemon, self.owner, self.metrics)
        config_path = daemon_dir / "settings.yaml"  # what the tuning child loads: this daemon's effective settings
        config_path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
        self.tuner = TuneRunner(config_path, daemon_dir, self.journal, self.metrics, nice=settings.daemon.tune_nice,
                                on_finish=lambda run: self.workers.wake.set())
        self.scheduler = DaemonScheduler(self.runtime, self.queue, self.journal, self.tuner, self.metrics)

    def request_stop(self, *_: object) -> None:
        if not self.stopping.is_set():
            log.info("stopping: no new goals; the running one may finish or is requeued")
        self.stopping.set()

    def serve(self, host: str | None = None, port: int | None = None) -> int:
        """Run until stopped; returns the exit code (0 after a clean stop)."""
        self.lock.acquire()
        try:
            return self._serve(host or self.settings.daemon.host, self.settings.daemon.port if port is None else port)
        finally:
            self.lock.release()

    def _serve(self, host: str, port: int) -> int:
        self._open()
        recovered = self.queue.recover(self.owner, self.settings.daemon.max_attempts)
        if recovered:
            log.warning("requeued %d goals left running by a stopped daemon", len(recovered))
            self.workers.close_orphans(recovered)
        self.journal.abandon_running_tunes()
        self.scheduler.start()
        self.workers.start()

        server = uvicorn.Server(uvicorn.Config(
            create_app(self), host=host, port=port, log_level="warning", lifespan="off",
            timeout_graceful_shutdown=5, access_log=False))
        thread = threading.Thread(target=server.run, name="selftune-http", daemon=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                self._close_stores()
                raise DaemonError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)")
            time.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"
        endpoint = {"url": self.url, "host": host, "port": bound[1], "pid": os.getpid(),
                    "started_at": utc_now().isoformat()}
        endpoint_path(self.settings).write_text(json.dumps(endpoint))
        self.accepting = True
        print(f"selftune daemon listening on {self.url} (pid {os.getpid()}); "
              f"API token in {token_path(self.settings)}; chat: {self.url}/", file=sys.stderr, flush=True)

        while not self.stopping.wait(0.5):
            if not thread.is_alive():
                log.error("the HTTP server stopped unexpectedly")
                self.stopping.set()
        return self._shutdown(server, thread)

    def _shutdown(self, server: uvicorn.Server, thread: threading.Thread) -> int:
        grace = self.settings.daemon.shutdown_grace_seconds
        self.accepting = False
        self.workers.stop(grace)
        self.scheduler.shutdown()
        self.tuner.stop()
        self.workers.join(grace + self.settings.daemon.lease_seconds)
        server.should_exit = True
        thread.join(10)
        endpoint_path(self.settings).unlink(missing_ok=True)
        self._close_stores()
        log.info("stopped cleanly")
        print("selftune daemon stopped", file=sys.stderr, flush=True)
        return 0

    def _close_stores(self) -> None:
        self.queue.checkpoint()
        self.journal.checkpoint()
        self.queue.close()
        self.journal.close()
        if "store" in self.runtime.__dict__:
            self.runtime.store.close()
