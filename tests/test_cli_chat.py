"""`selftune chat --local`: follow-ups carry earlier goals and answers, `+1` lands in the episode store."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from selftune.cli import app
from selftune.memory.episodes import EpisodeStore


def test_local_chat_carries_context_and_records_feedback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFTUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SELFTUNE_MODEL__NAME", "py:daemon_model:build")  # the fast model in tests/
    monkeypatch.setenv("SELFTUNE_AGENT__MEMORY_TOP_K", "0")
    result = CliRunner().invoke(app, ["chat", "--local"], input="What is 5*5?\n+1\nAnd what is 6*7?\n\n")
    assert result.exit_code == 0, result.output
    assert "answer 25" in result.output and result.output.count("goal> ") == 4  # two goals, a rating, the end

    with EpisodeStore(tmp_path / "data" / "episodes.sqlite3") as store:
        first, second = sorted(store.list(), key=lambda e: e.started_at)
        assert first.goal == "What is 5*5?"
        assert second.goal == "Earlier goal: What is 5*5?\nEarlier answer: 25\nFollow-up goal: And what is 6*7?"
        assert [(r.source, r.value) for r in store.get(first.id).rewards if r.source == "user"] == [("user", 1.0)]
