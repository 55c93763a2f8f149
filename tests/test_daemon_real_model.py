"""The README's curl flow on the real SmolLM2 model: submit -> done -> events -> POST /v1/tune -> report -> hot swap."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from selftune.agent.loop import Agent
from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import Verifier
from selftune.settings import load_settings
from selftune.tools.registry import ToolContext, build_tools

from daemon_harness import DaemonProcess
from selftune.bench.scripted import ScriptedChatModel

SMOL = "smollm2-135m-instruct"


def _log_verified_episodes(data_dir) -> None:
    """Verified successes in the daemon's episode store (a 1-step SmolLM2 rarely finishes on its own)."""
    settings = load_settings(data_dir=data_dir)
    with EpisodeStore(settings.db_path) as store:
        for a, b in [(2, 3), (4, 5)]:
            model = ScriptedChatModel(model_id=SMOL, replies=[
                "Plan:\n1. Use the calculator.\n2. Finish.",
                json.dumps({"tool": "calculator", "arguments": {"expression": f"{a}*{b}"}}),
                json.dumps({"tool": "finish", "arguments": {"answer": str(a * b)}}),
            ])
            tools = lambda episode_id: build_tools(ToolContext(  # noqa: E731
                workspace_dir=settings.workspace_dir, memory=None, episode_id=episode_id, settings=settings.tools))
            agent = Agent(model, tools, store, settings.agent.model_copy(update={"self_eval": False}))
            result = agent.run(f"What is {a}*{b}? Use the calculator.", verifier=Verifier(kind="number", expected=str(a * b)))
            assert result.status == "done"


@pytest.mark.slow
def test_real_model_goal_events_tune_report_and_hot_swap(tmp_path, model_cache):
    heldout = tmp_path / "heldout.yaml"
    heldout.write_text(yaml.safe_dump({"goals": [
        {"goal": "What is 6*7? Use the calculator.", "verifier": {"kind": "number", "expected": "42"}}]}))
    daemon = DaemonProcess(tmp_path / "data", env={
        "SELFTUNE_MODEL__NAME": SMOL, "SELFTUNE_MODEL_CACHE": str(model_cache), "SELFTUNE_MODEL__MAX_NEW_TOKENS": "40",
        "SELFTUNE_AGENT__MAX_STEPS": "1", "SELFTUNE_AGENT__MAX_CALL_TOKENS": "32",
        "SELFTUNE_AGENT__PLAN_MAX_TOKENS": "16",
        "SELFTUNE_TUNING__MAX_STEPS": "1", "SELFTUNE_TUNING__BATCH_SIZE": "1", "SELFTUNE_TUNING__MIN_SCORE": "0.0",
        "SELFTUNE_TUNING__MAX_SEQ_LEN": "1536", "SELFTUNE_TUNING__HELDOUT_FILE": str(heldout),
        "SELFTUNE_TUNING__LORA_TARGET_MODULES": json.dumps(["q_proj", "v_proj"]),
        "SELFTUNE_TUNING__PROMOTE_MARGIN": "-1.0",  # promote whatever comes out: this test is about the plumbing
        "SELFTUNE_TUNING__REGRESSION_SUITES": "[]",
    }).start(timeout=300)
    try:
        goal_id = daemon.submit("What is 2+3? Use the calculator.", verifier={"kind": "number", "expected": "5"})
        events = daemon.events(goal_id)
        record = daemon.wait_for(goal_id, timeout=300)
        assert record["status"] in ("done", "failed") and record["episode_id"]
        kinds = {kind for _, kind, _ in events}
        assert {"status", "episode", "plan", "answer"} <= kinds

        _log_verified_episodes(daemon.data_dir)
        run = daemon.http.post("/v1/tune").json()
        end = time.monotonic() + 600
        while run["status"] == "running":
            assert time.monotonic() < end, daemon.log()[-3000:]
            time.sleep(1.0)
            run = daemon.http.get(f"/v1/tune/{run['id']}").json()
        assert run["status"] == "done" and run["decision"] == "promoted", run
        latest = daemon.http.get("/v1/reports/latest").json()
        assert latest["decision"] == "promoted" and latest["candidate_version"] == run["version"]
        assert latest["report"]["train"]["losses"]

        # The daemon switches to the promoted adapter between goals, without a restart.
        after = daemon.wait_for(daemon.submit("Say hello."), timeout=300)
        adapters = daemon.http.get("/v1/adapters").json()
        assert adapters["active"] == adapters["serving"] == run["version"]
        assert adapters["switches"][0]["to_version"] == run["version"]
        episode = daemon.http.get(f"/v1/goals/{after['id']}").json()
        assert episode["status"] in ("done", "failed")
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
