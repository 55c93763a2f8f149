"""Versioned adapter store: ``root/v0001``, ``root/v0002``, … plus ``root/registry.json``.

``registry.json`` holds every version's metadata, the active version (``None``
= the base model) and the history of activations. It is replaced atomically
(temp file, fsync, ``os.replace``) and every read-modify-write holds an
exclusive ``fcntl.flock`` on ``root/.registry.lock``, so concurrent writers in
several processes never lose each other's updates. A registry file that does
not parse raises :class:`RegistryError`; it is never silently reset.

Lifecycle: ``allocate`` → train into the path → ``register`` (candidate) →
``promote`` (activates it) or ``reject`` (final: it can never be used).
``rollback`` undoes activations one at a time, skipping versions rejected since;
``best`` and ``latest`` name the promoted versions to return to by score or by age.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from selftune.memory.records import utc_now

__all__ = [
    "AdapterStatus", "AdapterVersion", "Activation", "RegistryState", "RegistryError", "AdapterRegistry", "write_atomic",
]

AdapterStatus = Literal["candidate", "promoted", "rejected"]
_VERSION = re.compile(r"^v(\d{4,})$")


class RegistryError(RuntimeError):
    """An invalid registry operation or an unreadable registry file."""


class AdapterVersion(BaseModel):
    version: str
    created_at: datetime = Field(default_factory=utc_now)
    method: str
    base_model: str
    status: AdapterStatus = "candidate"
    metrics: dict[str, Any] = Field(default_factory=dict)
    note: str = ""
    reason: str | None = None  # why the current status was set
    trained_on: list[str] = Field(default_factory=list)  # ids of the stored episodes it was trained on
    fingerprint: str | None = None  # training_fingerprint of its examples, settings and starting point
    path: Path


class Activation(BaseModel):
    version: str | None  # None = base model
    at: datetime = Field(default_factory=utc_now)
    action: Literal["promote", "use", "rollback"]
    reason: str


class RegistryState(BaseModel):
    versions: dict[str, AdapterVersion] = Field(default_factory=dict)
    active: str | None = None
    history: list[Activation] = Field(default_factory=list)


def _activation_stack(state: RegistryState) -> list[str | None]:
    """Replay the history: promote/use push a version, rollback pops back to its target."""
    stack: list[str | None] = [None]
    for activation in state.history:
        if activation.action == "rollback":
            stack.pop()
            while len(stack) > 1 and stack[-1] != activation.version:
                stack.pop()
        else:
            stack.append(activation.version)
    return stack


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AdapterRegistry:
    """Adapter versions under ``root`` and which one (if any) the agent serves."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.file = self.root / "registry.json"
        self._lock_file = self.root / ".registry.lock"

    # -- storage ---------------------------------------------------------------
    def _read(self) -> RegistryState:
        if not self.file.exists():
            return RegistryState()
        try:
            return RegistryState.model_validate_json(self.file.read_bytes())
        except ValidationError as error:
            raise RegistryError(
                f"adapter registry {self.file} is corrupt ({error.errors()[0]['msg']}); "
                "fix or move it aside - it is not reset automatically"
            ) from error

    def _write(self, state: RegistryState) -> None:
        write_atomic(self.file, state.model_dump_json(indent=2).encode())

    @contextlib.contextmanager
    def _update(self) -> Iterator[RegistryState]:
        """Locked read-modify-write; the state is written back only if the block succeeds."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._lock_file, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            state = self._read()
            yield state
            self._write(state)

    @staticmethod
    def _entry(state: RegistryState, version: str) -> AdapterVersion:
        try:
            return state.versions[version]
        except KeyError:
            raise RegistryError(f"unknown adapter version {version!r}") from None

    # -- queries -----------------------------------------------------------------
    def list(self) -> list[AdapterVersion]:
        return sorted(self._read().versions.values(), key=lambda entry: entry.version)

    def get(self, version: str) -> AdapterVersion:
        return self._entry(self._read(), version)

    def active_version(self) -> str | None:
        return self._read().active

    def active_path(self) -> Path | None:
        """Directory of the active adapter, or None when the base model is active."""
        active = self._read().active
        return None if active is None else self.root / active

    def continuation_point(self, method: str) -> Path | None:
        """Directory of the active adapter when it was trained with ``method`` (a start for continued
        training); None when the base model is active or the active adapter is of another method."""
        state = self._read()
        if state.active is None or self._entry(state, state.active).method != method:
            return None
        return self.root / state.active

    def history(self) -> list[Activation]:
        return self._read().history

    def latest(self) -> AdapterVersion | None:
        """The newest promoted version (what the last successful round produced)."""
        promoted = [entry for entry in self.list() if entry.status == "promoted"]
        return promoted[-1] if promoted else None

    def best(self, metric: str = "heldout_after") -> AdapterVersion | None:
        """The promoted version with the highest ``metric`` (newest on ties); None when none has it."""
        scored = [entry for entry in self.list() if entry.status == "promoted" and metric in entry.metrics]
        return max(reversed(scored), key=lambda entry: float(entry.metrics[metric]), default=None)

    # -- changes -----------------------------------------------------------------
    def allocate(self) -> tuple[str, Path]:
        """Next free version id and its directory (not created; train into it, then ``register``)."""
        taken = set(self._read().versions)
        if self.root.is_dir():
            taken.update(path.name for path in self.root.iterdir())
        numbers = [int(match.group(1)) for name in taken if (match := _VERSION.match(name))]
        version = f"v{max(numbers, default=0) + 1:04d}"
        return version, self.root / version

    def register(self, entry: AdapterVersion) -> AdapterVersion:
        """Record a trained candidate whose directory ``root/<version>`` exists."""
        if entry.status != "candidate":
            raise RegistryError("register candidates; promote or reject them afterwards")
        if Path(entry.path).resolve() != (self.root / entry.version).resolve():
            raise RegistryError(f"adapter {entry.version} must live in {self.root / entry.version}, not {entry.path}")
        if not Path(entry.path).is_dir():
            raise RegistryError(f"adapter directory does not exist: {entry.path}")
        with self._update() as state:
            if entry.version in state.versions:
                raise RegistryError(f"adapter version {entry.version} is already registered")
            state.versions[entry.version] = entry
        return entry

    def promote(self, version: str, reason: str) -> AdapterVersion:
        """Mark ``version`` promoted and make it the active adapter."""
        with self._update() as state:
            entry = self._entry(state, version)
            if entry.status == "rejected":
                raise RegistryError(f"adapter {version} was rejected ({entry.reason}) and cannot be promoted")
            entry.status, entry.reason = "promoted", reason
            state.active = version
            state.history.append(Activation(version=version, action="promote", reason=reason))
        return entry

    def reject(self, version: str, reason: str) -> AdapterVersion:
        """Mark ``version`` rejected for good; the active version must be switched away from first."""
        with self._update() as state:
            entry = self._entry(state, version)
            if state.active == version:
                raise RegistryError(f"adapter {version} is active; use() another version or rollback() first")
            entry.status, entry.reason = "rejected", reason
        return entry

    def use(self, version: str | None, reason: str) -> None:
        """Activate a promoted version, or the base model with ``None``."""
        with self._update() as state:
            if version is not None:
                entry = self._entry(state, version)
                if entry.status != "promoted":
                    raise RegistryError(f"adapter {version} is {entry.status}; only promoted versions can be used")
            state.active = version
            state.history.append(Activation(version=version, action="use", reason=reason))

    def rollback(self, reason: str = "rollback") -> str | None:
        """Re-activate the version active before the current one (skipping since-rejected ones); returns it."""
        with self._update() as state:
            stack = _activation_stack(state)
            stack.pop()

            def usable(version: str | None) -> bool:
                return version != state.active and (version is None or state.versions[version].status == "promoted")

            while stack and not usable(stack[-1]):
                stack.pop()
            if not stack:
                raise RegistryError("nothing to roll back to: no earlier activation in the history")
            target = stack[-1]
            state.active = target
            state.history.append(Activation(version=target, action="rollback", reason=reason))
        return target
