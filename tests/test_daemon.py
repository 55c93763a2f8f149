"""The daemon on real parts: a real `selftune daemon` process on a loopback port, real SQLite, real HTTP.

The agent's model is the fast test model (`py:daemon_model:build`), slowed down where a
test must kill or stop the daemon in the middle of a goal.
"""

from __future__ import annotations

import json
import signal
import stat
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from selftune.agent.loop import Budget
from selftune.daemon.auth import RateLimiter, load_or_create_token
from selftune.daemon.queue import GoalQueue, GoalRequest, IdempotencyConflict
from selftune.memory.episodes import EpisodeStore
from selftune.settings import load_settings
from selftune.tuning.adapters import AdapterRegistry, AdapterVersion

from daemon_harness import DaemonProcess


def _store(data_dir: Path) -> EpisodeStore:
    return EpisodeStore(data_dir / "episodes.sqlite3", weights=dict(load_settings().rewards.weights))


def _episodes_for(data_dir: Path, goal: str) -> list:
    with _store(data_dir) as store:
        return [e for e in store.list(limit=None) if e.goal == goal]


def _transitions(record: dict) -> list[tuple[str | None, str]]:
    return [(t["from_status"], t["to_status"]) for t in record["transitions"]]


# -- the queue on its own ---------------------------------------------------------------------------


def test_queue_leases_fence_stale_workers_and_recovery_requeues(tmp_path):
    queue = GoalQueue(tmp_path / "q.sqlite3", lease_seconds=60)
    first, created = queue.submit(GoalRequest(goal="a", budget=Budget(max_steps=2)), idempotency_key="k1")
    again, created_again = queue.submit(GoalRequest(goal="a", budget=Budget(max_steps=2)), idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        queue.submit(GoalRequest(goal="b"), idempotency_key="k1")

    lease = queue.claim("dead-daemon")
    assert lease is not None and lease.goal.status == "running" and lease.goal.attempts == 1
    assert queue.claim("dead-daemon") is None  # nothing else queued

    # A new daemon requeues the dead one's lease; the stale worker can no longer finish it.
    recovered = queue.recover("new-daemon", max_attempts=3)
    assert [g.id for g in recovered] == [first.id] and queue.get(first.id).status == "queued"
    assert not queue.finish(first.id, lease.token, "done", answer="stale")
    assert not queue.heartbeat(first.id, lease.token)
    second = queue.claim("new-daemon")
    assert second.goal.attempts == 2 and queue.heartbeat(first.id, second.token)
    assert queue.finish(first.id, second.token, "done", answer="ok")
    assert not queue.finish(first.id, second.token, "done", answer="twice")
    record = queue.get(first.id)
    assert (record.status, record.answer) == ("done", "ok")
    assert [(t.from_status, t.to_status) for t in record.transitions] == [
        (None, "queued"), ("queued", "running"), ("running", "queued"), ("queued", "running"), ("running", "done")]
    assert all(t.at.tzinfo is not None for t in record.transitions)

    # Cancelling a queued goal is immediate; a goal interrupted too often fails instead of looping.
    queued, _ = queue.submit(GoalRequest(goal="c"))
    assert queue.cancel(queued.id).status == "cancelled"
    poison, _ = queue.submit(GoalRequest(goal="d"))
    for attempt in range(3):
        assert queue.claim(f"daemon-{attempt}").goal.id == poison.id
        queue.recover(f"daemon-{attempt + 1}", max_attempts=3)
    assert queue.get(poison.id).status == "failed" and "3 interrupted attempts" in queue.get(poison.id).error


def test_token_file_is_generated_once_with_0600(tmp_path, monkeypatch):
    monkeypatch.delenv("SELFTUNE_API_TOKEN", raising=False)
    path = tmp_path / "api_token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token
    monkeypatch.setenv("SELFTUNE_API_TOKEN", "from-env")
    assert load_or_create_token(path) == "from-env"


def test_rate_limiter_allows_a_burst_then_the_rate():
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.allow("a")[0] for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")[0]  # per client
    allowed, retry = limiter.allow("a")
    assert not allowed and 0 < retry <= 1.0


# -- one shared daemon for the API --------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    proc = DaemonProcess(tmp_path_factory.mktemp("daemon") / "data", env={
        "SELFTUNE_DAEMON__RATE_LIMIT_BURST": "1000", "SELFTUNE_DAEMON__MAX_BODY_BYTES": "4096",
        "SELFTUNE_AGENT__MAX_GOAL_CHARS": "500",
        # Two workers race for claims; no memory recall, so the bulk test measures the queue, not the embedder.
        "SELFTUNE_DAEMON__WORKERS": "2", "SELFTUNE_AGENT__MEMORY_TOP_K": "0"}).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def test_goal_completes_and_its_events_stream(daemon):
    goal_id = daemon.submit("What is 17*23? Use the calculator.", verifier={"kind": "number", "expected": "391"})
    events = daemon.events(goal_id)  # streams live until the final status
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "status" and kinds[-1] == "status"
    assert {"episode", "plan", "tool_call", "observation", "answer"} <= set(kinds)
    assert [seq for seq, _, _ in events] == sorted({seq for seq, _, _ in events})
    calls = [data["name"] for _, kind, data in events if kind == "tool_call"]
    assert calls == ["calculator", "finish"]
    answer = next(data for _, kind, data in events if kind == "answer")
    assert answer["answer"] == "391" and {r["source"] for r in answer["rewards"]} >= {"verifier", "efficiency"}

    record = daemon.goal(goal_id)
    assert (record["status"], record["answer"], record["episode_id"]) == ("done", "391", answer["episode_id"])
    assert _transitions(record) == [(None, "queued"), ("queued", "running"), ("running", "done")]
    assert record["started_at"] and record["finished_at"] >= record["started_at"]
    # Resuming after an event id replays only what came later.
    assert [seq for seq, _, _ in daemon.events(goal_id, after=events[-3][0])] == [e[0] for e in events[-2:]]


def test_token_required_everywhere_but_healthz(daemon):
    anonymous = httpx.Client(base_url=daemon.url)
    wrong = httpx.Client(base_url=daemon.url, headers={"Authorization": "Bearer not-the-token"})
    for client in (anonymous, wrong):
        for method, path in [("GET", "/v1/goals"), ("POST", "/v1/goals"), ("GET", "/metrics"),
                             ("GET", "/openapi.json"), ("GET", "/v1/reports/latest"), ("POST", "/v1/tune"),
                             ("GET", "/v1/goals/x/events"), ("POST", "/v1/adapters/base/activate")]:
            response = client.request(method, path, json={"goal": "sneaky"} if method == "POST" else None)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert anonymous.get("/healthz").json() == {"status": "ok", "ready": True, "accepting": True}
    assert "sneaky" not in {g["goal"] for g in daemon.http.get("/v1/goals").json()}


def test_bad_requests_get_clear_4xx_and_queue_nothing(daemon):
    before = daemon.http.get("/v1/goals", params={"limit": 1000}).json()
    post = daemon.http.post
    big = post("/v1/goals", json={"goal": "x" * 5000})
    assert big.status_code == 413 and "4096 bytes" in big.json()["detail"]
    chunked = post("/v1/goals", content=iter([b'{"goal": "', b"y" * 5000, b'"}']),
                   headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    malformed = post("/v1/goals", content=b'{"goal": "unterminated', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 422 and malformed.json()["detail"][0]["type"] == "json_invalid"
    assert post("/v1/goals", json={"goal": "ok", "priority": 9}).status_code == 422  # unknown field
    assert post("/v1/goals", json={"budget": {"max_steps": 2}}).status_code == 422  # no goal
    assert post("/v1/goals", json={"goal": "ok", "budget": {"max_steps": 0}}).status_code == 422
    empty = post("/v1/goals", json={"goal": "   "})
    assert empty.status_code == 422 and empty.json()["detail"] == "the goal is empty"
    long = post("/v1/goals", json={"goal": "z" * 600})
    assert long.status_code == 422 and "the limit is 500" in long.json()["detail"]
    assert daemon.http.get("/v1/goals/g_nope").status_code == 404
    assert daemon.http.get("/v1/goals/g_nope/events").status_code == 404
    assert daemon.http.post("/v1/episodes/ep_nope/feedback", json={"rating": "+1"}).status_code == 404
    assert daemon.http.get("/v1/goals", params={"limit": 1000}).json() == before


def test_idempotency_key_returns_the_first_goal(daemon):
    first = daemon.http.post("/v1/goals", json={"goal": "echo once"}, headers={"Idempotency-Key": "abc-1"})
    again = daemon.http.post("/v1/goals", json={"goal": "echo once"}, headers={"Idempotency-Key": "abc-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"] and again.json()["created"] is False
    other = daemon.http.post("/v1/goals", json={"goal": "echo twice"}, headers={"Idempotency-Key": "abc-1"})
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    daemon.wait_for(first.json()["id"])
    assert len(_episodes_for(daemon.data_dir, "echo once")) == 1


def test_feedback_lands_in_the_episode_store(daemon):
    record = daemon.wait_for(daemon.submit("Say hi."))
    episode_id = record["episode_id"]
    rated = daemon.http.post(f"/v1/episodes/{episode_id}/feedback", json={"rating": "-1", "note": "too terse"})
    assert rated.status_code == 200, rated.text
    assert daemon.http.post(f"/v1/episodes/{episode_id}/feedback", json={"rating": "meh"}).status_code == 422
    with _store(daemon.data_dir) as store:
        episode = store.get(episode_id)
    assert [(r.value, r.note) for r in episode.rewards if r.source == "user"] == [(0.0, "too terse")]
    assert rated.json()["score"] == pytest.approx(episode.score)


def test_200_goals_with_a_fast_model_all_finish_exactly_once(daemon):
    goals = [f"Item {i}: echo this back." for i in range(200)]
    ids = [daemon.submit(goal, idempotency_key=f"bulk-{i}") for i, goal in enumerate(goals)]
    assert len(set(ids)) == 200
    end = time.monotonic() + 300
    while True:
        records = daemon.http.get("/v1/goals", params={"limit": 1000}).json()
        mine = {r["id"]: r for r in records if r["id"] in set(ids)}
        if all(r["status"] == "done" for r in mine.values()) and len(mine) == 200:
            break
        assert time.monotonic() < end, Counter(r["status"] for r in mine.values())
        time.sleep(0.5)
    for goal_id, goal in zip(ids, goals):
        record = daemon.goal(goal_id)
        assert record["attempts"] == 1 and record["answer"] == f"echo: {goal}"
        assert [to for _, to in _transitions(record)].count("done") == 1
    with _store(daemon.data_dir) as store:
        per_goal = Counter(e.goal for e in store.list(limit=None) if e.goal in set(goals))
    assert per_goal == Counter({goal: 1 for goal in goals})
    metrics = daemon.http.get("/metrics").text
    assert 'selftune_goals{status="done"}' in metrics and "selftune_goals_submitted_total" in metrics


def test_adapter_hot_swap_between_goals_is_recorded(daemon):
    registry = AdapterRegistry(daemon.data_dir / "adapters" / "py_daemon_model_build")
    version, path = registry.allocate()
    path.mkdir(parents=True)
    registry.register(AdapterVersion(version=version, method="lora", base_model="py:daemon_model:build", path=path))
    assert daemon.http.post(f"/v1/adapters/{version}/activate").status_code == 409  # a candidate is not usable
    registry.promote(version, "test: promoted by hand")

    record = daemon.wait_for(daemon.submit("Which adapter answers?"))
    with _store(daemon.data_dir) as store:
        assert store.get(record["episode_id"]).adapter_version == version
    adapters = daemon.http.get("/v1/adapters").json()
    assert adapters["active"] == adapters["serving"] == version
    assert (adapters["switches"][0]["from_version"], adapters["switches"][0]["to_version"]) == (None, version)

    assert daemon.http.post("/v1/adapters/base/activate").json()["active"] is None
    assert daemon.http.post("/v1/adapters/v9999/activate").status_code == 404
    record = daemon.wait_for(daemon.submit("And now?"))
    with _store(daemon.data_dir) as store:
        assert store.get(record["episode_id"]).adapter_version is None
    assert daemon.http.get("/v1/adapters").json()["switches"][0]["to_version"] is None


def test_tune_runs_in_a_child_and_its_report_is_served(daemon):
    assert daemon.http.get("/v1/reports/latest").status_code in (200, 404)
    started = daemon.http.post("/v1/tune")
    assert started.status_code == 202, started.text
    run = started.json()
    assert run["status"] == "running" and run["pid"] != daemon.process.pid
    end = time.monotonic() + 180
    while run["status"] == "running":
        assert time.monotonic() < end, daemon.log()[-3000:]
        time.sleep(0.5)
        run = daemon.http.get(f"/v1/tune/{run['id']}").json()
    assert run["status"] == "done" and run["exit_code"] == 0, run
    latest = daemon.http.get("/v1/reports/latest").json()
    assert latest["id"] == Path(run["report_dir"]).name and latest["decision"] == run["decision"]
    assert latest["report"]["model_id"] == "py:daemon_model:build"
    assert latest["id"] in {r["id"] for r in daemon.http.get("/v1/reports").json()}
    html = daemon.http.get(latest["html_url"])
    assert html.status_code == 200 and "<html" in html.text.lower()
    assert 'selftune_tune_runs_total{outcome="skipped"}' in daemon.http.get("/metrics").text


def test_openapi_and_chat_page_are_served(daemon):
    spec = daemon.http.get("/openapi.json").json()
    for path in ["/v1/goals", "/v1/goals/{goal_id}", "/v1/goals/{goal_id}/events", "/v1/goals/{goal_id}/cancel",
                 "/v1/episodes/{episode_id}/feedback", "/v1/adapters", "/v1/adapters/{version}/activate",
                 "/v1/tune", "/v1/reports", "/v1/reports/latest", "/healthz", "/metrics"]:
        assert path in spec["paths"], path
    page = httpx.get(daemon.url + "/")
    assert page.status_code == 200 and "/v1/goals" in page.text and "feedback" in page.text


# -- crashes, signals, restarts --------------------------------------------------------------------


def test_kill9_mid_goal_then_restart_completes_it_exactly_once(tmp_path):
    data = tmp_path / "data"
    slow = DaemonProcess(data, delay_s=1.0).start()
    goal = "What is 6*7? Use the calculator."
    goal_id = slow.submit(goal)
    slow.wait_for_event(goal_id, "plan")
    assert slow.goal(goal_id)["status"] == "running"
    slow.kill9()

    fresh = DaemonProcess(data).start()
    try:
        record = fresh.wait_for(goal_id)
        events = fresh.events(goal_id)
    finally:
        assert fresh.stop() == 0
    assert (record["status"], record["answer"], record["attempts"]) == ("done", "42", 2)
    assert _transitions(record) == [(None, "queued"), ("queued", "running"), ("running", "queued"),
                                    ("queued", "running"), ("running", "done")]
    assert "stopped daemon" in record["transitions"][2]["note"]
    assert [kind for _, kind, _ in events].count("answer") == 1
    episodes = _episodes_for(data, goal)
    assert sorted(e.status for e in episodes) == ["done", "failed"]  # the killed attempt is closed, not left running
    assert next(e for e in episodes if e.status == "done").id == record["episode_id"]


def test_sigterm_finishes_or_requeues_the_running_goal_and_exits_0(tmp_path):
    data = tmp_path / "data"
    # With time to finish: the running goal completes, the queued one stays queued, exit 0.
    patient = DaemonProcess(data, delay_s=0.7, env={"SELFTUNE_DAEMON__SHUTDOWN_GRACE_SECONDS": "60"}).start()
    first, second = patient.submit("echo first"), patient.submit("echo second")
    patient.wait_for_event(first, "plan")
    patient.signal(signal.SIGTERM)
    assert patient.wait() == 0, patient.log()
    queue = GoalQueue(data / "daemon" / "daemon.sqlite3")
    assert queue.get(first).status == "done" and queue.get(second).status == "queued"

    # Without grace: the running goal is stopped at its next step and requeued; its episode is cancelled.
    hasty = DaemonProcess(data, delay_s=0.7, env={"SELFTUNE_DAEMON__SHUTDOWN_GRACE_SECONDS": "0"}).start()
    hasty.wait_for_event(second, "plan")
    hasty.signal(signal.SIGTERM)
    assert hasty.wait() == 0, hasty.log()
    record = queue.get(second)
    assert record.status == "queued" and record.transitions[-1].note == "daemon stopping: requeued"
    assert [e.status for e in _episodes_for(data, "echo second")] == ["cancelled"]
    assert not (data / "daemon" / "endpoint.json").exists()

    again = DaemonProcess(data).start()
    try:
        done = again.wait_for(second)
    finally:
        assert again.stop() == 0
    assert done["status"] == "done" and done["answer"] == "echo: echo second"
    assert [t["to_status"] for t in done["transitions"]].count("done") == 1
    assert sorted(e.status for e in _episodes_for(data, "echo second")) == ["cancelled", "done"]


def test_second_daemon_on_the_same_data_dir_is_refused(tmp_path):
    first = DaemonProcess(tmp_path / "data").start()
    try:
        second = DaemonProcess(tmp_path / "data")
        with pytest.raises(RuntimeError, match="another selftune daemon"):
            second.start()
        assert second.process.returncode == 2
    finally:
        assert first.stop() == 0


def test_scheduled_jobs_persist_across_restart_and_missed_runs_catch_up(tmp_path):
    data = tmp_path / "data"
    env = {"SELFTUNE_DAEMON__COMPACTION_CRON": "0 0 1 1 *", "SELFTUNE_DAEMON__TIMEZONE": "UTC",
           "SELFTUNE_DAEMON__TUNE_AFTER_EPISODES": "2", "SELFTUNE_DAEMON__TUNE_CHECK_SECONDS": "1"}
    first = DaemonProcess(data, env=env).start()
    jobs = {job["id"]: job for job in first.http.get("/v1/jobs").json()["jobs"]}
    assert set(jobs) == {"compaction", "tune-after-episodes"}
    next_year = datetime(datetime.now(timezone.utc).year + 1, 1, 1, tzinfo=timezone.utc)
    assert datetime.fromisoformat(jobs["compaction"]["next_run_time"]) == next_year

    # Tuning after K new scored episodes: two goals, and a round starts on its own.
    for goal in ("echo one", "echo two"):
        first.wait_for(first.submit(goal))
    end = time.monotonic() + 30
    while not first.http.get("/v1/tune").json():
        assert time.monotonic() < end, first.log()[-3000:]
        time.sleep(0.2)
    assert first.http.get("/v1/tune").json()[0]["trigger"] == "2 new scored episodes"
    assert first.stop() == 0

    # While the daemon is down the compaction comes due (moved into the past through APScheduler's own API).
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    due = datetime.now(timezone.utc) - timedelta(seconds=5)
    store = SQLAlchemyJobStore(url=f"sqlite:///{data}/daemon/jobs.sqlite3")
    store.start(BackgroundScheduler(timezone="UTC"), "default")  # the store only; no scheduler thread runs
    job = store.lookup_job("compaction")
    assert job is not None and job.next_run_time == next_year  # it is in the job store, not only in memory
    job.next_run_time = due
    store.update_job(job)
    store.shutdown()

    second = DaemonProcess(data, env=env).start()
    try:
        end = time.monotonic() + 30
        while not [r for r in second.http.get("/v1/jobs").json()["runs"] if r["job_id"] == "compaction"]:
            assert time.monotonic() < end, second.log()[-3000:]
            time.sleep(0.2)
        payload = second.http.get("/v1/jobs").json()
    finally:
        assert second.stop() == 0
    runs = [r for r in payload["runs"] if r["job_id"] == "compaction"]
    assert len(runs) == 1 and runs[0]["outcome"] == "ok" and "duplicate memories" in runs[0]["detail"]
    assert abs(datetime.fromisoformat(runs[0]["scheduled_at"]) - due) < timedelta(seconds=1)
    jobs = {job["id"]: job for job in payload["jobs"]}
    assert datetime.fromisoformat(jobs["compaction"]["next_run_time"]) == next_year


def test_cancel_a_running_goal(tmp_path):
    slow = DaemonProcess(tmp_path / "data", delay_s=0.7).start()
    try:
        goal_id = slow.submit("echo cancel me")
        queued = slow.submit("echo cancel me before I start")
        slow.wait_for_event(goal_id, "plan")
        assert slow.http.post(f"/v1/goals/{queued}/cancel").json()["status"] == "cancelled"
        assert slow.http.post(f"/v1/goals/{goal_id}/cancel").json()["cancel_requested"] is True
        record = slow.wait_for(goal_id)
        assert record["status"] == "cancelled" and record["episode_status"] == "cancelled"
        assert slow.goal(queued)["status"] == "cancelled" and slow.goal(queued)["episode_id"] is None
        assert slow.http.post(f"/v1/goals/{goal_id}/cancel").status_code == 200  # idempotent
        done = slow.wait_for(slow.submit("echo after"))
        assert slow.http.post(f"/v1/goals/{done['id']}/cancel").status_code == 409
    finally:
        assert slow.stop() == 0
    assert [e.status for e in _episodes_for(tmp_path / "data", "echo cancel me")] == ["cancelled"]


def test_cli_submit_wait_uses_the_running_daemon(daemon):
    import subprocess
    import sys

    env = {**daemon.env, "SELFTUNE_DATA_DIR": str(daemon.data_dir)}
    selftune = Path(sys.executable).with_name("selftune")
    done = subprocess.run([str(selftune), "submit", "--wait", "--json", "What is 3*4?"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=daemon.data_dir.parent)
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["status"], result["answer"]) == ("done", "12")
    chat = subprocess.run([str(selftune), "chat"], input="What is 5*5?\n+1\n\n", env=env, capture_output=True,
                          text=True, timeout=120, cwd=daemon.data_dir.parent)
    assert chat.returncode == 0, chat.stderr
    assert "connected to the daemon" in chat.stdout and "25" in chat.stdout and "recorded +1" in chat.stdout
    nowhere = subprocess.run([str(selftune), "submit", "echo"], env={**env, "SELFTUNE_DATA_DIR": str(daemon.data_dir.parent / "none")},
                             capture_output=True, text=True, timeout=120)
    assert nowhere.returncode == 2 and "no daemon is running" in nowhere.stdout + nowhere.stderr
