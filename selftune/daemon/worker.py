"""Goal workers: claim a goal, run it on the agent, stream its steps as events, record the outcome.

Between goals a worker brings the model to the registry's active adapter (hot swap) and
records the switch; a switch waits until no goal is running, so one goal never sees two
adapters. Each step is checked for cancellation, a lost lease and shutdown. On shutdown
the running goal may finish within the grace period; after it, the goal is stopped at
its next step (its episode closes as ``cancelled``) and requeued.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from selftune.agent.loop import Agent, AgentResult, GoalError
from selftune.daemon.journal import Journal
from selftune.daemon.metrics import DaemonMetrics
from selftune.daemon.queue import GoalQueue, GoalRecord, Lease
from selftune.memory.records import Step
from selftune.runtime import Runtime
from selftune.settings import DaemonSettings

__all__ = ["GoalWorkers", "step_events"]

log = logging.getLogger(__name__)
_MAX_EVENT_TEXT = 4000
_IDLE_POLL_S = 0.5


def _clip(text: str, limit: int = _MAX_EVENT_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f" [+{len(text) - limit} characters]"


def step_events(step: Step) -> list[tuple[str, dict[str, Any]]]:
    """The stream events of one step: ``plan``, ``tool_call`` (one per call), ``observation`` or ``step``."""
    message = step.message
    base = {"index": step.index, "step_kind": step.kind}
    if step.kind == "plan":
        return [("plan", {**base, "content": _clip(message.content)})]
    if step.kind == "action" and message.tool_calls:
        return [("tool_call", {**base, "id": call.id, "name": call.name, "arguments": call.arguments})
                for call in message.tool_calls]
    if step.kind == "observation" and message.role == "tool":
        return [("observation", {**base, "name": message.name, "content": _clip(message.content), "error": step.error})]
    return [("step", {**base, "role": message.role, "content": _clip(message.content), "error": step.error})]


class GoalWorkers:
    """``settings.workers`` threads taking goals from ``queue`` for one daemon instance (``owner``)."""

    def __init__(self, runtime: Runtime, queue: GoalQueue, journal: Journal, settings: DaemonSettings,
                 owner: str, metrics: DaemonMetrics) -> None:
        self.runtime = runtime
        self.queue = queue
        self.journal = journal
        self.settings = settings
        self.owner = owner
        self.metrics = metrics
        self.ready = threading.Event()
        self.wake = threading.Event()
        self.warmup_error: str | None = None
        self._stopping = threading.Event()
        self._deadline = float("inf")
        self._threads: list[threading.Thread] = []
        self._leases: dict[str, str] = {}  # goal id -> lease token, for heartbeats and shutdown
        self._lost: set[str] = set()
        self._gate = threading.Condition()
        self._running = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        starter = threading.Thread(target=self._start, name="selftune-workers", daemon=True)
        starter.start()
        self._threads.append(starter)
        beat = threading.Thread(target=self._heartbeats, name="selftune-heartbeat", daemon=True)
        beat.start()

    def _start(self) -> None:
        try:
            self._warm_up()
        except Exception as error:  # goals will fail with the same error; the API stays up to say so
            log.exception("model warm-up failed")
            self.warmup_error = f"{type(error).__name__}: {error}"
        self.ready.set()
        self.metrics.ready.set(1)
        for index in range(self.settings.workers):
            thread = threading.Thread(target=self._loop, name=f"selftune-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _warm_up(self) -> None:
        """Load the model (at the active adapter) and the memory before the first goal."""
        import selftune.agent.local_chat  # noqa: F401 - generation imports it (and torch) on the first call

        _ = self.runtime.model, self.runtime.memory.count(), self.runtime.store
        serving = getattr(self.runtime.model, "adapter_version", None)
        log.info("serving %s with adapter %s", self.runtime.settings.model.name, serving or "base")

    def stop(self, grace_seconds: float) -> None:
        """Take no more goals; a running goal may finish within ``grace_seconds``, then it is requeued."""
        self._deadline = time.monotonic() + grace_seconds
        self._stopping.set()
        self.wake.set()

    def join(self, timeout: float) -> None:
        """Wait for the workers; goals still running afterwards are requeued (their worker's writes are fenced)."""
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        for goal_id, token in list(self._leases.items()):
            if self.queue.requeue(goal_id, token, "daemon stopped while the goal was running"):
                log.warning("requeued goal %s: still running at shutdown", goal_id)

    @property
    def serving_adapter(self) -> str | None:
        model = self.runtime.__dict__.get("model")  # not loaded yet: nothing is being served
        return getattr(model, "adapter_version", None) if model is not None else None

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            lease = self.queue.claim(self.owner)
            if lease is None:
                self._maybe_switch_adapter(idle=True)
                self.wake.wait(_IDLE_POLL_S)
                self.wake.clear()
                continue
            self._leases[lease.goal.id] = lease.token
            try:
                self._enter_goal()
                try:
                    self._run(lease)
                finally:
                    self._leave_goal()
            except Exception:  # a bug here must not kill the worker; the goal fails, the next one runs
                log.exception("goal %s crashed its worker", lease.goal.id)
                self.queue.finish(lease.goal.id, lease.token, "failed", error="internal error in the worker")
            finally:
                self._leases.pop(lease.goal.id, None)
                self._lost.discard(lease.goal.id)

    def _run(self, lease: Lease) -> None:
        goal, token = lease.goal, lease.token
        started = time.monotonic()
        episodes: list[str] = []

        def tools(episode_id: str):
            if not episodes:  # the loop creates the episode, then asks for its tools: learn its id here
                episodes.append(episode_id)
                self.queue.set_episode(goal.id, token, episode_id)
                self.queue.add_event(goal.id, "episode", {"episode_id": episode_id, "attempt": goal.attempts})
            return self.runtime.tools(episode_id)

        runtime = self.runtime
        agent = Agent(runtime.model, tools, runtime.store, runtime.settings.agent, memory=runtime.memory)
        run = agent.iter_run(goal.goal, verifier=goal.verifier, origin="api", budget=goal.budget)
        result: AgentResult | None = None
        interrupted: str | None = None
        try:
            for event in run:
                if isinstance(event, AgentResult):
                    result = event
                    break
                for kind, data in step_events(event):
                    self.queue.add_event(goal.id, kind, data)
                interrupted = self._interruption(goal)
                if interrupted:
                    break
        except GoalError as error:
            self._finish(goal, token, "failed", error=str(error), started=started)
            return
        finally:
            if interrupted:
                run.close()  # the loop closes its episode as cancelled
        if interrupted == "cancel":
            self._finish(goal, token, "cancelled", error="cancelled by request", started=started,
                         episode_status="cancelled")
        elif interrupted == "shutdown":
            if self.queue.requeue(goal.id, token, "daemon stopping: requeued"):
                log.info("goal %s requeued at shutdown", goal.id)
        elif interrupted == "lease":
            log.warning("goal %s: lease lost; another attempt owns it now", goal.id)
        elif result is not None:
            self.queue.add_event(goal.id, "answer", result.model_dump(
                mode="json", include={"answer", "status", "episode_id", "steps", "limit", "error", "wall_s",
                                      "tokens_in", "tokens_out", "rewards"}))
            status = "failed" if result.status == "failed" else "cancelled" if result.status == "cancelled" else "done"
            self._finish(goal, token, status, answer=result.answer, error=result.error, started=started,
                         episode_status=result.status)

    def _interruption(self, goal: GoalRecord) -> str | None:
        if goal.id in self._lost:
            return "lease"
        if self.queue.cancel_requested(goal.id):
            return "cancel"
        if self._stopping.is_set() and time.monotonic() >= self._deadline:
            return "shutdown"
        return None

    def _finish(self, goal: GoalRecord, token: str, status: str, *, started: float, answer: str | None = None,
                error: str | None = None, episode_status: str | None = None) -> None:
        if self.queue.finish(goal.id, token, status, answer=answer, error=error, episode_status=episode_status):
            self.metrics.finished.labels(status).inc()
            self.metrics.goal_seconds.observe(time.monotonic() - started)
        else:
            log.warning("goal %s: outcome %s not recorded, the lease was lost", goal.id, status)

    # -- adapter hot swap ----------------------------------------------------------------------

    def _enter_goal(self) -> None:
        with self._gate:
            self._maybe_switch_adapter(idle=False)
            self._running += 1

    def _leave_goal(self) -> None:
        with self._gate:
            self._running -= 1
            self._gate.notify_all()

    def _maybe_switch_adapter(self, idle: bool) -> None:
        """Switch to the registry's active adapter when it changed, once no goal is running."""
        model = self.runtime.__dict__.get("model")
        if model is None or not hasattr(model, "use_adapter"):
            return
        try:
            wanted = self.runtime.adapters.active_version()
        except Exception as error:  # an unreadable registry keeps the current adapter
            log.error("adapter registry unreadable, keeping the current adapter: %s", error)
            return
        current = getattr(model, "adapter_version", None)
        if wanted == current:
            return
        with self._gate:
            if idle and self._running:
                return  # a busy worker will switch before its next goal
            while self._running:
                self._gate.wait()
            before = getattr(model, "adapter_version", None)
            self.runtime.sync_adapter()
            after = getattr(model, "adapter_version", None)
            if after != before:
                log.info("adapter switched between goals: %s -> %s", before or "base", after or "base")
                self.journal.record_switch(before, after, "the registry's active adapter changed")
                self.metrics.adapter_switches.inc()

    # -- leases ----------------------------------------------------------------------------------

    def _heartbeats(self) -> None:
        while True:
            time.sleep(min(self.settings.heartbeat_seconds, self.settings.lease_seconds / 3))
            for goal_id, token in list(self._leases.items()):
                if not self.queue.heartbeat(goal_id, token) and goal_id in self._leases:
                    self._lost.add(goal_id)
            try:
                self.close_orphans(self.queue.requeue_expired(self.settings.max_attempts))
            except Exception:
                log.exception("requeueing expired leases failed")

    def close_orphans(self, goals: list[GoalRecord]) -> None:
        """Episodes of interrupted attempts end as ``failed`` instead of staying ``running`` forever."""
        store = self.runtime.store
        for goal in goals:
            if goal.episode_id is None:
                continue
            try:
                if store.get(goal.episode_id).status == "running":
                    store.finish_episode(goal.episode_id, "failed", None)
            except KeyError:
                pass
