"""The API's guards: the bearer token, a request-body cap and a per-client rate limit on writes."""

from __future__ import annotations

import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "TOKEN_ENV", "load_or_create_token", "read_token", "token_matches", "BearerAuth", "BodyLimit", "RateLimiter",
]

TOKEN_ENV = "SELFTUNE_API_TOKEN"


def read_token(token_file: Path) -> str | None:
    """The token a client should send: ``SELFTUNE_API_TOKEN`` when set, else the daemon's token file."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    try:
        return token_file.read_text().strip() or None
    except OSError:
        return None


def load_or_create_token(token_file: Path) -> str:
    """``SELFTUNE_API_TOKEN`` when set; else the token in ``token_file``, generated (mode 0600) on first start."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    token_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        token = token_file.read_text().strip()
        if token:
            os.chmod(token_file, 0o600)
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.chmod(token_file, 0o600)  # O_CREAT's mode is masked by the umask; make it exact
    return token


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time comparison)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """ASGI middleware: 401 for a missing or wrong token on every path but ``open_paths``.

    It runs before routing and body parsing, so an unauthenticated request learns nothing
    (not even whether its body would have been valid)."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.token = token
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if token_matches(header, self.token):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "missing or wrong bearer token"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the app reads any of it.

    A declared Content-Length is checked up front; a chunked body is read up to the limit
    and handed to the app from memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = f"request body is larger than {self.max_bytes} bytes"
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await _send_json(send, 413, too_large)
                return
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _send_json(send, 413, too_large)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RateLimiter:
    """Token bucket per client: ``burst`` requests at once, refilled at ``per_minute``."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return True, 0.0
            self._buckets[client] = (tokens, now)
            return False, (1.0 - tokens) / self.rate
