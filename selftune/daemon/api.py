"""The HTTP API (FastAPI): goals, their event streams, feedback, adapters, tuning, reports, health, metrics.

Everything but ``/healthz`` and the chat page's static shell (``/``, which holds no data)
needs ``Authorization: Bearer <token>``. Write requests are rate-limited per client and
bodies are capped; bad input gets a 4xx that says what is wrong, and nothing is queued.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selftune.daemon.auth import BearerAuth, BodyLimit
from selftune.daemon.journal import AdapterSwitch, TuneRun
from selftune.daemon.queue import TERMINAL, GoalRecord, GoalRequest, GoalStatus, IdempotencyConflict
from selftune.daemon.tuning import TuneBusy
from selftune.settings import TuningMethod
from selftune.tuning.adapters import RegistryError

if TYPE_CHECKING:
    from selftune.daemon.server import Daemon

__all__ = ["create_app", "FeedbackRequest", "TuneRequest"]

STATIC_DIR = Path(__file__).parent / "static"
_SSE_POLL_S = 0.2
_SSE_PING_S = 15.0
OPEN_PATHS = frozenset({"/healthz", "/"})  # liveness, and the chat page's static shell (no data in it)
_BEARER = HTTPBearer(auto_error=False, description="The daemon's API token (<data dir>/api_token).")


class SubmitResponse(BaseModel):
    id: str
    status: GoalStatus
    created: bool = Field(description="False when the idempotency key returned an earlier goal.")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rating: Literal["+1", "-1", "1", "up", "down"] | Literal[1, -1] = Field(description="+1 (thumbs up) or -1.")
    note: str | None = Field(None, max_length=2000)


class FeedbackResponse(BaseModel):
    episode_id: str
    score: float | None
    rewards: list[dict[str, Any]]


class TuneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: TuningMethod | None = None


class AdaptersResponse(BaseModel):
    active: str | None = Field(description="The registry's active version (None = base weights).")
    serving: str | None = Field(description="The adapter the daemon's model runs now; it follows `active` between goals.")
    versions: list[dict[str, Any]]
    switches: list[AdapterSwitch]


class _RequestMetrics:
    """ASGI middleware counting requests by method, route template and status code."""

    def __init__(self, app: ASGIApp, daemon: Daemon) -> None:
        self.app = app
        self.daemon = daemon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.daemon.metrics.requests.labels(scope["method"], route, str(status)).inc()


def _report_summary(report_dir: Path) -> dict[str, Any]:
    data = json.loads((report_dir / "report.json").read_text())
    return {"id": report_dir.name, "created_at": data.get("created_at"), "decision": data.get("decision"),
            "reason": data.get("reason"), "method": data.get("method"), "model_id": data.get("model_id"),
            "candidate_version": data.get("candidate_version"), "previous_version": data.get("previous_version"),
            "episodes_selected": data.get("episodes_selected"),
            "html_url": f"/v1/reports/{report_dir.name}/html"}


def create_app(daemon: Daemon) -> FastAPI:
    settings = daemon.settings
    def rate_limited(request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        allowed, retry = daemon.rate.allow(client)
        if not allowed:
            raise HTTPException(429, f"too many requests; retry in {retry:.1f}s",
                                headers={"Retry-After": str(max(1, round(retry)))})

    app = FastAPI(title="selftune daemon", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description=__doc__)
    documented = [Depends(_BEARER)]  # declares the scheme in the OpenAPI; BearerAuth enforces it
    api = APIRouter(prefix="/v1", dependencies=documented)
    writes = [Depends(rate_limited)]

    # -- open routes ----------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz", tags=["daemon"])
    def healthz() -> dict[str, Any]:
        """Liveness: ``ready`` once the model is loaded, ``accepting`` while goals are taken."""
        return {"status": "ok", "ready": daemon.workers.ready.is_set(), "accepting": daemon.accepting}

    @app.get("/metrics", tags=["daemon"], dependencies=documented)
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(daemon.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", tags=["daemon"], dependencies=documented)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    # -- goals ----------------------------------------------------------------------------------

    @api.post("/goals", status_code=202, response_model=SubmitResponse, dependencies=writes, tags=["goals"])
    def submit(body: GoalRequest, response: Response,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> SubmitResponse:
        """Queue a goal. Same idempotency key and goal again: the first goal's id (200)."""
        if not daemon.accepting:
            raise HTTPException(503, "the daemon is shutting down and takes no new goals")
        goal = body.goal.strip()
        limit = settings.agent.max_goal_chars
        if not goal:
            raise HTTPException(422, "the goal is empty")
        if len(goal) > limit:
            raise HTTPException(422, f"the goal has {len(goal)} characters; the limit is {limit}")
        try:
            record, created = daemon.queue.submit(body.model_copy(update={"goal": goal}), idempotency_key)
        except IdempotencyConflict as conflict:
            raise HTTPException(409, str(conflict)) from None
        if created:
            daemon.metrics.submitted.inc()
            daemon.workers.wake.set()
        else:
            response.status_code = 200
        return SubmitResponse(id=record.id, status=record.status, created=created)

    @api.get("/goals", response_model=list[GoalRecord], tags=["goals"])
    def list_goals(limit: Annotated[int, Query(ge=1, le=1000)] = 50, status: GoalStatus | None = None) -> list[GoalRecord]:
        """Newest first."""
        return daemon.queue.list(limit=limit, status=status)

    def _goal(goal_id: str) -> GoalRecord:
        try:
            return daemon.queue.get(goal_id)
        except KeyError:
            raise HTTPException(404, f"unknown goal id {goal_id!r}") from None

    @api.get("/goals/{goal_id}", response_model=GoalRecord, tags=["goals"])
    def get_goal(goal_id: str) -> GoalRecord:
        """Status (queued, running, done, failed, cancelled), answer and every state change."""
        return _goal(goal_id)

    @api.get("/goals/{goal_id}/events", tags=["goals"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def goal_events(request: Request, goal_id: str,
                          after: Annotated[int, Query(ge=0, description="Only events after this sequence number.")] = 0,
                          last_event_id: Annotated[int | None, Header()] = None) -> StreamingResponse:
        """Server-Sent Events: ``status``, ``episode``, ``plan``, ``tool_call``, ``observation``, ``step``,
        ``answer``; the stream ends after the final status. Reconnect with Last-Event-ID to resume."""
        await run_in_threadpool(_goal, goal_id)
        start = max(after, last_event_id or 0)

        async def stream():
            seen, pinged = start, time.monotonic()
            while True:
                # Read the status before the events: once it is final, every event is in this read.
                final = (await run_in_threadpool(_goal, goal_id)).status in TERMINAL
                events = await run_in_threadpool(daemon.queue.events, goal_id, seen)
                for event in events:
                    seen = event.seq
                    payload = json.dumps({**event.data, "at": event.at.isoformat()}, ensure_ascii=False)
                    yield f"id: {event.seq}\nevent: {event.kind}\ndata: {payload}\n\n"
                    if event.kind == "status" and event.data.get("status") in TERMINAL:
                        return
                if events:
                    continue
                if final or daemon.stopping.is_set() or await request.is_disconnected():
                    return  # (final: the client asked to start after the final event)
                if time.monotonic() - pinged > _SSE_PING_S:
                    pinged = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(_SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/goals/{goal_id}/cancel", response_model=GoalRecord, dependencies=writes, tags=["goals"])
    def cancel_goal(goal_id: str) -> GoalRecord:
        """Queued: cancelled now. Running: stopped at its next step. Finished: 409."""
        record = _goal(goal_id)
        if record.status in TERMINAL and record.status != "cancelled":
            raise HTTPException(409, f"goal {goal_id} already finished ({record.status})")
        return daemon.queue.cancel(goal_id)

    # -- feedback -------------------------------------------------------------------------------

    @api.post("/episodes/{episode_id}/feedback", response_model=FeedbackResponse, dependencies=writes,
              tags=["episodes"])
    def feedback(episode_id: str, body: FeedbackRequest) -> FeedbackResponse:
        """A user reward (+1 -> 1.0, -1 -> 0.0) on an episode; it changes the episode's score for tuning."""
        try:
            episode = daemon.runtime.record_feedback(episode_id, str(body.rating), body.note)
        except KeyError as error:
            raise HTTPException(404, error.args[0] if error.args else "unknown episode") from None
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        return FeedbackResponse(episode_id=episode.id, score=episode.score,
                                rewards=[r.model_dump(mode="json") for r in episode.rewards])

    # -- adapters and tuning -------------------------------------------------------------------

    @api.get("/adapters", response_model=AdaptersResponse, tags=["adapters"])
    def adapters() -> AdaptersResponse:
        registry = daemon.runtime.adapters
        return AdaptersResponse(active=registry.active_version(), serving=daemon.workers.serving_adapter,
                                versions=[e.model_dump(mode="json") for e in registry.list()],
                                switches=daemon.journal.switches())

    @api.post("/adapters/{version}/activate", dependencies=writes, tags=["adapters"])
    def activate(version: str) -> dict[str, Any]:
        """Make a promoted version (or ``base``) active; the daemon switches to it between goals."""
        registry = daemon.runtime.adapters
        target = None if version == "base" else version
        if target is not None and target not in {e.version for e in registry.list()}:
            raise HTTPException(404, f"unknown adapter version {version!r}")
        try:
            registry.use(target, reason="POST /v1/adapters/{version}/activate")
        except RegistryError as error:
            raise HTTPException(409, str(error)) from None
        daemon.workers.wake.set()
        return {"active": target, "serving": daemon.workers.serving_adapter}

    @api.post("/tune", status_code=202, response_model=TuneRun, dependencies=writes, tags=["tuning"])
    def tune(body: TuneRequest | None = None) -> TuneRun:
        """Start a tuning round in a child process; its report appears under /v1/reports when it ends."""
        try:
            daemon.scheduler.start_tune("api", body.method if body else None)
        except TuneBusy as busy:
            raise HTTPException(409, str(busy)) from None
        run = daemon.tuner.running()
        if run is None:  # it already finished: return the newest record
            return daemon.journal.tune_runs(limit=1)[0]
        return run

    @api.get("/tune", response_model=list[TuneRun], tags=["tuning"])
    def tune_runs(limit: Annotated[int, Query(ge=1, le=500)] = 20) -> list[TuneRun]:
        return daemon.journal.tune_runs(limit)

    @api.get("/tune/{run_id}", response_model=TuneRun, tags=["tuning"])
    def tune_run(run_id: str) -> TuneRun:
        try:
            return daemon.journal.tune_run(run_id)
        except KeyError:
            raise HTTPException(404, f"unknown tuning run {run_id!r}") from None

    @api.get("/jobs", tags=["daemon"])
    def jobs() -> dict[str, Any]:
        """Scheduled jobs with their next run time, and recent runs."""
        return {"jobs": daemon.scheduler.jobs(),
                "runs": [r.model_dump(mode="json") for r in daemon.journal.job_runs(limit=50)]}

    # -- reports -----------------------------------------------------------------------------------

    def _report_dirs() -> list[Path]:
        root = settings.reports_dir
        return [path.parent for path in root.glob("*/report.json")] if root.is_dir() else []

    @api.get("/reports", tags=["reports"])
    def reports() -> list[dict[str, Any]]:
        """Retraining reports, newest first."""
        summaries = [_report_summary(d) for d in _report_dirs()]
        return sorted(summaries, key=lambda s: s["created_at"] or "", reverse=True)

    @api.get("/reports/latest", tags=["reports"])
    def latest() -> dict[str, Any]:
        """The newest retraining report: its summary and the full report."""
        from selftune.tuning.report import latest_report

        directory = latest_report(settings.reports_dir)
        if directory is None:
            raise HTTPException(404, "no retraining report yet: POST /v1/tune")
        return {**_report_summary(directory), "report": json.loads((directory / "report.json").read_text())}

    def _report_dir(report_id: str) -> Path:
        match = {d.name: d for d in _report_dirs()}.get(report_id)
        if match is None:
            raise HTTPException(404, f"unknown report {report_id!r}")
        return match

    @api.get("/reports/{report_id}", tags=["reports"])
    def report(report_id: str) -> dict[str, Any]:
        directory = _report_dir(report_id)
        return {**_report_summary(directory), "report": json.loads((directory / "report.json").read_text())}

    @api.get("/reports/{report_id}/html", response_class=HTMLResponse, tags=["reports"])
    def report_html(report_id: str) -> HTMLResponse:
        """The self-contained HTML report (plots embedded)."""
        return HTMLResponse((_report_dir(report_id) / "report.html").read_text())

    app.include_router(api)
    app.add_middleware(BodyLimit, max_bytes=settings.daemon.max_body_bytes)
    app.add_middleware(BearerAuth, token=daemon.token, open_paths=OPEN_PATHS)
    app.add_middleware(_RequestMetrics, daemon=daemon)
    return app
