"""The self-improvement benchmark on the real SmolLM2, shrunk to one tiny round: goals collected and
scored by the BFCL checker, a LoRA candidate trained, evaluated on every suite, gated, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selftune.bench.self_improvement import (
    HELDOUT,
    SPLIT_FILE,
    TRAIN_CATEGORIES,
    UNTRAINED_SUITES,
    Split,
    make_split,
    run_self_improvement,
)
from selftune.memory.episodes import EpisodeStore
from selftune.settings import load_settings


def test_committed_split_is_the_seeded_split_and_disjoint() -> None:
    committed = Split.model_validate_json(SPLIT_FILE.read_text())
    assert committed == make_split(committed.seed)
    for category in TRAIN_CATEGORIES:
        train, heldout = set(committed.train[category]), set(committed.heldout[category])
        assert len(train) == 40 and len(heldout) == 30 and not train & heldout


def test_one_tiny_round_collects_trains_evaluates_and_gates(model_cache: Path, tmp_path: Path) -> None:
    split = Split(seed=0, train={"simple_python": make_split(0).train["simple_python"][:2]},
                  heldout={"simple_python": make_split(0).heldout["simple_python"][:1]})
    settings = load_settings(
        data_dir=tmp_path / "data", model_cache=model_cache, model={"name": "smollm2-135m-instruct"},
        tuning={"max_steps": 1, "batch_size": 2, "min_score": 0.0, "lora_target_modules": ["q_proj", "v_proj"]})
    seen = []
    run = run_self_improvement(settings, rounds=1, attempts=2, eval_limit=1, split=split, work_dir=tmp_path / "work",
                               on_round=lambda r: seen.append(len(r.rounds)))
    assert seen == [1, 2]
    base, first = run.rounds
    suites = {f"{HELDOUT}:simple_python", HELDOUT, *UNTRAINED_SUITES}
    assert base.decision == "base" and set(base.active) == suites and base.reference_ce > 0
    assert first.attempts == 4 and 0 <= first.solved_attempts <= 4 and first.selected >= 1
    assert first.replayed >= 1  # general/abstention conversations mixed in
    assert first.decision in ("promoted", "rejected") and "held-out accuracy" in first.reason
    assert set(first.candidate) == suites and first.seconds.collect > 0 and first.seconds.train > 0
    expected_active = first.candidate if first.decision == "promoted" else base.active
    assert first.active == expected_active
    json.loads(run.model_dump_json())

    with EpisodeStore(tmp_path / "work" / "episodes.sqlite3") as store:
        episodes = store.scored(min_score=0.0)
    assert len(episodes) == 4 and all(e.origin == "bfcl-train" for e in episodes)
    assert all(e.rewards[0].source == "verifier" for e in episodes)
    assert not any(split.heldout["simple_python"][0] + ":" in e.goal for e in episodes)  # held-out never collected
    registry = json.loads((tmp_path / "work" / "adapters" / "registry.json").read_text())
    assert registry["versions"]["v0001"]["status"] == first.decision


def test_bench_self_improvement_rejects_an_unknown_method() -> None:
    from typer.testing import CliRunner

    from selftune.cli import app

    result = CliRunner().invoke(app, ["bench", "self-improvement", "--method", "prefix"])
    assert result.exit_code != 0 and "not offered" in result.output
