"""Run a real ``selftune daemon`` process on a loopback port for tests, and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

TESTS_DIR = Path(__file__).resolve().parent
TEST_MODEL = "py:daemon_model:build"
TERMINAL = {"done", "failed", "cancelled"}


class DaemonProcess:
    """``selftune daemon --port 0`` on ``data_dir`` with the fast test model unless ``env`` says otherwise."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, delay_s: float = 0.0) -> None:
        self.data_dir = Path(data_dir)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
            "SELFTUNE_DATA_DIR": str(self.data_dir),
            "SELFTUNE_MODEL__NAME": TEST_MODEL,
            "SELFTUNE_TEST_MODEL_DELAY": str(delay_s),
            "SELFTUNE_DAEMON__HEARTBEAT_SECONDS": "1",
            **(env or {}),
        }
        if "SELFTUNE_API_TOKEN" not in (env or {}):  # the token file is what these tests exercise by default
            self.env.pop("SELFTUNE_API_TOKEN", None)
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.token = ""
        self.http: httpx.Client | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-daemon.log"

    def start(self, timeout: float = 120.0) -> DaemonProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        endpoint = self.data_dir / "daemon" / "endpoint.json"
        endpoint.unlink(missing_ok=True)
        selftune = Path(sys.executable).with_name("selftune")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([str(selftune), "daemon", "--host", "127.0.0.1", "--port", "0"],
                                        env=self.env, cwd=self.data_dir.parent, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            try:
                info = json.loads(endpoint.read_text())
                if info["pid"] == self.process.pid:
                    self.url = info["url"]
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError(f"daemon did not start:\n{self.log()}")
        self.token = self.env.get("SELFTUNE_API_TOKEN") or (self.data_dir / "api_token").read_text().strip()
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30.0)
        while time.monotonic() < end and not self.http.get("/healthz").json()["ready"]:
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- stopping --------------------------------------------------------------------------
    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self.http is not None:
            self.http.close()
        return code

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return self.wait()

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait()

    # -- API helpers -------------------------------------------------------------------------
    def submit(self, goal: str, **body: Any) -> str:
        assert self.http is not None
        response = self.http.post("/v1/goals", json={"goal": goal, **body})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def goal(self, goal_id: str) -> dict[str, Any]:
        assert self.http is not None
        response = self.http.get(f"/v1/goals/{goal_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(self, goal_id: str, statuses: set[str] = TERMINAL, timeout: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            record = self.goal(goal_id)
            if record["status"] in statuses:
                return record
            if time.monotonic() > end:
                raise TimeoutError(f"goal {goal_id} still {record['status']}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def wait_for_event(self, goal_id: str, kind: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while kind not in {e[1] for e in self.events(goal_id, until_end=False)}:
            if time.monotonic() > end:
                raise TimeoutError(f"no {kind} event for {goal_id}")
            time.sleep(0.05)

    def events(self, goal_id: str, until_end: bool = True, after: int = 0) -> list[tuple[int, str, dict[str, Any]]]:
        """The goal's SSE events (until its final status, or what is there now)."""
        if not until_end:
            import sqlite3

            conn = sqlite3.connect(self.data_dir / "daemon" / "daemon.sqlite3")
            try:
                rows = conn.execute("SELECT seq, kind, data FROM events WHERE goal_id = ? ORDER BY seq",
                                    (goal_id,)).fetchall()
            finally:
                conn.close()
            return [(seq, kind, json.loads(data)) for seq, kind, data in rows]
        return read_sse(self.http, f"/v1/goals/{goal_id}/events", after)


def read_sse(http: httpx.Client, path: str, after: int = 0) -> list[tuple[int, str, dict[str, Any]]]:
    events, seq, kind, data = [], 0, "message", ""
    with http.stream("GET", path, params={"after": after}, timeout=httpx.Timeout(60.0)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("id:"):
                seq = int(line[3:])
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data:
                events.append((seq, kind, json.loads(data)))
                kind, data = "message", ""
    return events
