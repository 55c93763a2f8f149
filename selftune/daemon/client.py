"""A small HTTP client of the daemon, used by ``selftune submit`` and ``selftune chat``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from selftune.daemon.auth import read_token
from selftune.daemon.server import endpoint_path, token_path
from selftune.settings import Settings

__all__ = ["ClientError", "DaemonClient", "Event"]

Event = tuple[int, str, dict[str, Any]]  # (sequence number, kind, data)
_TERMINAL = {"done", "failed", "cancelled"}


class ClientError(RuntimeError):
    """The daemon answered with an error (``status``) or could not be reached (status 0)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


class DaemonClient:
    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    @classmethod
    def discover(cls, settings: Settings) -> DaemonClient | None:
        """A client of the daemon serving ``settings``' data dir, or None when none is running."""
        try:
            endpoint = json.loads(endpoint_path(settings).read_text())
        except (OSError, ValueError):
            return None
        client = cls(endpoint["url"], read_token(token_path(settings)))
        try:
            client.health()
        except ClientError:
            client.close()
            return None
        return client

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ClientError(0, f"cannot reach the daemon at {self.base_url}: {error}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ClientError(response.status_code, detail if isinstance(detail, str) else json.dumps(detail))
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def submit(self, goal: str, verifier: dict[str, Any] | None = None, budget: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> str:
        body: dict[str, Any] = {"goal": goal}
        if verifier:
            body["verifier"] = verifier
        if budget:
            body["budget"] = budget
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/goals", json=body, headers=headers)["id"]

    def goal(self, goal_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/goals/{goal_id}")

    def cancel(self, goal_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/goals/{goal_id}/cancel")

    def feedback(self, episode_id: str, rating: str, note: str | None = None) -> dict[str, Any]:
        return self._request("POST", f"/v1/episodes/{episode_id}/feedback", json={"rating": rating, "note": note})

    def tune(self) -> dict[str, Any]:
        return self._request("POST", "/v1/tune")

    def latest_report(self) -> dict[str, Any]:
        return self._request("GET", "/v1/reports/latest")

    def events(self, goal_id: str, after: int = 0) -> Iterator[Event]:
        """The goal's events as they happen, until its final status; resumes after a dropped connection."""
        while True:
            try:
                with self._http.stream("GET", f"/v1/goals/{goal_id}/events", params={"after": after},
                                       timeout=httpx.Timeout(30.0, read=None)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ClientError(response.status_code, response.text)
                    seq, kind, data = 0, "message", ""
                    for line in response.iter_lines():
                        if line.startswith("id:"):
                            seq = int(line[3:].strip())
                        elif line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            data += line[5:].strip()
                        elif line == "" and data:
                            event = (seq, kind, json.loads(data))
                            after, kind, data = seq, "message", ""
                            yield event
                            if event[1] == "status" and event[2].get("status") in _TERMINAL:
                                return
            except httpx.HTTPError:
                time.sleep(1.0)  # the daemon restarted or the connection dropped: resume where we were
                continue
            if self.goal(goal_id)["status"] in _TERMINAL:
                return

    def wait(self, goal_id: str, timeout: float | None = None, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the goal is final; TimeoutError after ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.goal(goal_id)
            if record["status"] in _TERMINAL:
                return record
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"goal {goal_id} is still {record['status']} after {timeout}s")
            time.sleep(poll_s)
