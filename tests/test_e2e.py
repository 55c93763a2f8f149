"""The whole loop on real parts: SmolLM2, Chroma, SQLite, PEFT training, the registry, reports, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selftune.agent.local_chat import DECODING_FILE, AdapterDecoding
from selftune.agent.models import resolve_dtype
from selftune.agent.loop import Agent
from selftune.memory.records import Verifier
from selftune.runtime import Runtime
from selftune.settings import PROJECT_ROOT, load_settings
from selftune.tuning import pipeline
from selftune.tuning.adapters import AdapterVersion
from selftune.tuning.calibration import BIAS_GRID
from selftune.tuning.pipeline import run_tuning_round
from selftune.tuning.report import REPORT_SECTIONS

from selftune.bench.scripted import ScriptedChatModel

SMOL = "smollm2-135m-instruct"
PROBE = "The capital of France is"


def call(name: str, **arguments) -> str:
    return json.dumps({"tool": name, "arguments": arguments})


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, model_cache) -> Runtime:
    root = tmp_path_factory.mktemp("e2e")
    heldout = root / "heldout.yaml"
    heldout.write_text(yaml.safe_dump({"goals": [
        {"goal": "What is 6*7? Use the calculator.", "verifier": {"kind": "number", "expected": "42"}},
    ]}))
    settings = load_settings(
        data_dir=root / "data",
        model_cache=model_cache,
        model={"name": SMOL, "max_new_tokens": 40},
        agent={"max_steps": 2, "plan_max_tokens": 16, "memory_top_k": 2, "max_call_tokens": 48},
        tuning={"max_steps": 2, "batch_size": 2, "max_seq_len": 1536, "heldout_file": heldout,
                "lora_target_modules": ["q_proj", "v_proj"], "min_score": 0.7,
                "regression_suites": [{"category": "irrelevance", "limit": 2}]},
    )
    return Runtime(settings)


def test_goal_runs_through_real_model_tools_memory_and_store(runtime):
    before = runtime.memory.count()
    result = runtime.agent().run("What is 2+3? Use the calculator.", verifier=Verifier(kind="number", expected="5"))

    assert result.status in ("done", "limit")
    episode = runtime.store.get(result.episode_id)
    generated = [step for step in episode.steps if step.tokens_out]
    assert generated and all(step.model_id == SMOL and step.latency_s > 0 for step in generated)
    assert all(step.tokens_in > 0 for step in generated)
    assert {reward.source for reward in episode.rewards} >= {"verifier", "efficiency"}
    # Constrained decoding: even the 135M model's every tool call parses and validates.
    actions = [step for step in episode.steps if step.kind == "action"]
    assert actions and all(step.message.tool_calls and step.error is None for step in actions)
    if result.answer:
        assert runtime.memory.count() > before
        hits = runtime.memory.search("What is 2+3?", k=1, kind="episode_summary")
        assert hits and hits[0].episode_id == result.episode_id


def _log_good_episodes(runtime: Runtime) -> None:
    """Verified successes written through the real store; the scripted model stands in for a skilled policy."""
    for a, b in [(2, 3), (4, 5), (7, 8)]:
        model = ScriptedChatModel(replies=[
            "Plan:\n1. Use the calculator.\n2. Finish.",
            call("calculator", expression=f"{a}*{b}"),
            call("finish", answer=str(a * b)),
        ], model_id=SMOL)
        agent = Agent(model, runtime.tools, runtime.store, runtime.settings.agent.model_copy(update={"self_eval": False}),
                      memory=runtime.memory)
        result = agent.run(f"What is {a}*{b}? Use the calculator.", verifier=Verifier(kind="number", expected=str(a * b)))
        assert result.status == "done"


def test_interrupted_tuning_leaves_registry_and_model_unchanged(runtime, monkeypatch):
    _log_good_episodes(runtime)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tuning_round(runtime)
    assert runtime.adapters.list() == [] and runtime.adapters.active_version() is None
    assert runtime.model.adapter_version is None


def test_tuning_round_trains_gates_registers_and_reports(runtime):
    chat = runtime.model
    base_logits = chat.next_token_logits(PROBE)

    outcome = run_tuning_round(runtime, method="lora")

    assert outcome.decision in ("promoted", "rejected")
    entry = runtime.adapters.get(outcome.version)
    assert entry.status == outcome.decision and entry.metrics["examples"] >= 3
    expected_active = outcome.version if outcome.decision == "promoted" else None
    assert runtime.adapters.active_version() == expected_active
    assert chat.adapter_version == expected_active
    # Evaluation episodes are logged but never become training data.
    assert all(e.origin != "eval" for e in runtime.store.scored(min_score=0.0))
    # Report with every section and embedded plots.
    markdown = (outcome.report_dir / "report.md").read_text()
    assert all(section in markdown for section in REPORT_SECTIONS)
    assert "data:image/png;base64" in (outcome.report_dir / "report.html").read_text()
    report = json.loads((outcome.report_dir / "report.json").read_text())
    assert report["train"]["losses"] and report["eval_after"]["heldout"]["n"] == 1
    # The machine and the dtype the adapter trained in, as this runtime loaded the model.
    assert report["hardware"]["cores"] == os.cpu_count() and report["train"]["dtype"] == resolve_dtype("auto")
    # Regression suite (BFCL abstention) measured on both sides and named in the decision.
    assert report["eval_before"]["bfcl:irrelevance"]["n"] == report["eval_after"]["bfcl:irrelevance"]["n"] == 2
    assert "bfcl:irrelevance" in outcome.reason and "bfcl:irrelevance_after" in entry.metrics
    assert entry.metrics["bfcl:irrelevance_base"] == entry.metrics["bfcl:irrelevance_before"]  # no adapter yet
    # Replay: general/abstention conversations mixed in; the registry records the stored episodes trained on.
    assert report["replay"]["general"] >= 1 and report["replay"]["new"] == report["episodes_selected"]
    assert sorted(entry.trained_on) == sorted(report["chosen"]) and "Replayed general" in markdown
    # Forgetting is watched on the reference text: both sides measured, and named in the decision.
    assert 0.5 < report["reference_ce_before"] < 10 and report["reference_ce_after"] != report["reference_ce_before"]
    assert "reference cross-entropy" in outcome.reason and "cross-entropy (forgetting): base" in markdown
    # The bound is measured from the base weights (here also the active model: no adapter yet).
    assert report["reference_ce_base"] == pytest.approx(report["reference_ce_before"], abs=1e-4)
    assert f"reference cross-entropy {report['reference_ce_base']:.3f} -> " in outcome.reason

    # The adapter changes the model; reloading it gives the same logits; base comes back exactly.
    chat.use_adapter(entry.path, entry.version)
    adapted = chat.next_token_logits(PROBE)
    chat.use_adapter(None, None)
    assert (chat.next_token_logits(PROBE) == base_logits).all()
    chat.use_adapter(entry.path, entry.version)
    assert (chat.next_token_logits(PROBE) == adapted).all()
    assert not (adapted == base_logits).all()
    runtime.sync_adapter()


def test_a_round_with_nothing_new_to_train_on_is_skipped_unless_forced(runtime, monkeypatch):
    """Training is deterministic: the same examples, settings and active adapter would rebuild a
    registered version, so such a round stops before evaluating anything."""
    monkeypatch.setattr(pipeline, "gate", lambda *args, **kwargs: ("rejected", "test: rejected"))
    first = run_tuning_round(runtime, method="lora")
    assert first.decision == "rejected"
    versions, active = runtime.adapters.list(), runtime.adapters.active_version()

    again = run_tuning_round(runtime, method="lora")

    assert again.decision == "skipped" and f"{first.version} (rejected)" in again.reason
    assert "nothing new to train on" in again.reason
    assert runtime.adapters.list() == versions and runtime.adapters.active_version() == active
    assert json.loads((again.report_dir / "report.json").read_text())["decision"] == "skipped"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # reached training: the round was not skipped

    monkeypatch.setattr(pipeline, "train_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tuning_round(runtime, method="lora", force=True)
    monkeypatch.setattr(runtime.settings.tuning, "max_steps", runtime.settings.tuning.max_steps + 1)
    with pytest.raises(KeyboardInterrupt):
        run_tuning_round(runtime, method="lora")  # other settings: other training
    assert runtime.adapters.list() == versions

    trained_on = []

    def capture(model, tokenizer, examples, *args, **kwargs):
        trained_on.extend(examples)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_adapter", capture)
    monkeypatch.setattr(runtime.settings.tuning, "anchor_file", PROJECT_ROOT / "configs" / "anchor.txt")
    with pytest.raises(KeyboardInterrupt):
        run_tuning_round(runtime, method="lora")
    anchors = [example for example in trained_on if example.anchor]
    assert len(anchors) == 8 and len(trained_on) > len(anchors)  # the episodes plus every passage of prose


def test_forgetting_is_bounded_from_the_base_model_while_an_adapter_is_active(runtime, monkeypatch):
    """With an adapter active, the gate's reference bound starts from the base weights' cross-entropy,
    not the active adapter's, so drift cannot add up over promotions. The candidate also gets its
    no-call bias here, calibrated against the active adapter and the base weights."""
    first = runtime.adapters.list()[0]
    version, out_dir = runtime.adapters.allocate()
    shutil.copytree(first.path, out_dir)
    runtime.adapters.register(AdapterVersion(version=version, method=first.method, base_model=first.base_model,
                                             path=out_dir))
    runtime.adapters.promote(version, "test: an active adapter")
    runtime.sync_adapter()
    monkeypatch.setattr(runtime.settings.tuning, "no_call_calibration", 2)

    outcome = run_tuning_round(runtime, method="lora")

    report = json.loads((outcome.report_dir / "report.json").read_text())
    calibration = report["calibration"]
    assert calibration["abstain_questions"] == calibration["call_questions"] == 2
    assert calibration["refused"] >= calibration["target"] or calibration["bias"] == max(BIAS_GRID)
    candidate = runtime.adapters.get(outcome.version)
    saved = AdapterDecoding.model_validate_json((candidate.path / DECODING_FILE).read_text())
    assert saved.no_call_bias == calibration["bias"] == candidate.metrics["no_call_bias"]
    assert "No-call bias (evaluated with it)" in (outcome.report_dir / "report.md").read_text()
    assert report["reference_ce_base"] != pytest.approx(report["reference_ce_before"], abs=1e-4)
    assert f"reference cross-entropy {report['reference_ce_base']:.3f} -> " in outcome.reason
    # Regression suites are measured on the base weights too: losses cannot add up over promotions.
    assert "bfcl:irrelevance_base" in runtime.adapters.get(outcome.version).metrics


def _cli(runtime: Runtime, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SELFTUNE_DATA_DIR": str(runtime.settings.data_dir),
           "SELFTUNE_MODEL_CACHE": str(runtime.settings.model_cache), "SELFTUNE_MODEL__NAME": SMOL,
           "SELFTUNE_AGENT__MAX_STEPS": "1", "SELFTUNE_AGENT__MAX_CALL_TOKENS": "32",
           "SELFTUNE_AGENT__PLAN_MAX_TOKENS": "16"}
    selftune = Path(sys.executable).with_name("selftune")
    return subprocess.run([str(selftune), *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_run_json_feedback_export_and_report(runtime, tmp_path):
    done = _cli(runtime, "run", "--json", "Say hello.")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) >= {"answer", "status", "episode_id", "steps"}

    rated = _cli(runtime, "feedback", result["episode_id"], "-1", "--note", "not helpful")
    assert rated.returncode == 0, rated.stderr
    episode = runtime.store.get(result["episode_id"])
    assert [(r.source, r.value, r.note) for r in episode.rewards if r.source == "user"] == [("user", 0.0, "not helpful")]

    out = tmp_path / "episodes.jsonl"
    exported = _cli(runtime, "episodes", "export", "--format", "jsonl", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["episode_id"] in {row["episode_id"] for row in rows}
    assert all(row["messages"][0]["role"] == "system" for row in rows)

    latest = _cli(runtime, "report")
    assert latest.returncode == 0 and latest.stdout.strip().endswith("report.html")
    assert Path(latest.stdout.strip()).is_file()


def test_cli_names_a_bad_config_key(runtime, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("agent:\n  max_stepz: 3\n")
    failed = _cli(runtime, "--config", str(config), "episodes", "list")
    assert failed.returncode == 2
    assert "agent.max_stepz" in failed.stdout + failed.stderr


def test_cli_unknown_episode_is_a_clear_error(runtime):
    failed = _cli(runtime, "feedback", "ep_doesnotexist", "+1")
    assert failed.returncode == 2 and "ep_doesnotexist" in failed.stdout + failed.stderr
