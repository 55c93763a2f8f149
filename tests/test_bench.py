"""The bench commands run end to end and report side-by-side variants (small sizes; timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selftune.cli import app


def bench(*args: str) -> dict:
    result = CliRunner().invoke(app, ["bench", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_loop_reports_both_variants() -> None:
    result = bench("loop", "--goals", "3")
    plain, with_memory = result["variants"]
    assert (plain["variant"], with_memory["variant"]) == ("no-memory", "memory")
    assert plain["tool_call_steps"] == with_memory["tool_call_steps"] == 6  # a calculator call and a finish per goal
    assert 0 < plain["overhead_ms_per_step_mean"] and result["memory_cost_ratio"] > 0


def test_bench_memory_ingests_and_queries() -> None:
    result = bench("memory", "--size", "300", "--queries", "10")
    assert result["memories"] == 300 + 200  # batched ingest, then the single-write sample
    assert result["ingest"]["batched_per_s"] > 0 and result["ingest"]["batched_vs_single"] > 0
    assert 0 < result["query_ms"]["cached_p50"] and 0 < result["query_ms"]["fresh_p95"]


@pytest.mark.slow
def test_bench_inference_replays_recorded_steps(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFTUNE_MODEL_CACHE", str(model_cache))
    result = bench("inference", "--model", "smollm2-135m-instruct", "--steps", "4")
    assert result["steps"] == 4 and len(result["rows"]) == 4
    assert result["rows"][0]["kind"] == "text" and result["rows"][1]["kind"] == "tool call"  # plan, then an action
    assert result["prompt_tokens_reused"] > 0 and result["decode_tokens_per_s"] > 0
    variants = result["variants"]
    assert set(variants) == {"naive", "prefix_cache", "jump_forward", "lookup"}
    assert variants["naive"]["forward_passes"] == variants["prefix_cache"]["forward_passes"]
    assert variants["jump_forward"]["forward_passes"] < variants["naive"]["forward_passes"]  # forced tokens: no pass each
    assert result["selftune_variant"] == "lookup" and result["speedup"] == variants["lookup"]["speedup"]
    assert all(set(row["same_output"]) == {"prefix_cache", "jump_forward", "lookup"} for row in result["rows"])
