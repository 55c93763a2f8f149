"""Which episodes become training data (tuning.selection) over a real SQLite episode store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import ChatMessage, Episode, Reward, Step, ToolCall
from selftune.settings import TuningSettings
from selftune.tuning.selection import select_episodes

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


@pytest.fixture
def store(tmp_path: Path):
    with EpisodeStore(tmp_path / "episodes.sqlite3", weights={"verifier": 1.0}) as store:
        yield store


def add(store: EpisodeStore, id_: str, goal: str, score: float, minute: int, expression: str = "1+1",
        status: str = "done", name: str = "calculator") -> None:
    call = ToolCall(name=name, arguments={"expression": expression})
    steps = [Step(index=0, kind="goal", message=ChatMessage(role="user", content=goal)),
             Step(index=1, kind="action", trainable=True,
                  message=ChatMessage(role="assistant", content="{}", tool_calls=[call]))]
    store.create_episode(Episode(id=id_, goal=goal, status=status, started_at=T0 + timedelta(minutes=minute),
                                 steps=steps, rewards=[Reward(episode_id=id_, source="verifier", value=score)]))


def test_sometimes_solved_goals_come_first_and_each_goal_is_capped(store: EpisodeStore) -> None:
    for i in range(4):  # an easy goal: solved every time, distinct trajectories
        add(store, f"easy{i}", "What is 1+1?", 1.0, i, expression=f"1+1+{i}*0")
    add(store, "hard_ok", "What is 17*23?", 0.9, 10, expression="17*23")
    add(store, "hard_fail", "What is 17*23?", 0.0, 11, expression="17*22")
    add(store, "hard_dup", "what is  17*23?", 0.9, 12, expression="17*23")  # same goal, same calls

    selection = select_episodes(store, TuningSettings(max_per_goal=2, max_episodes=3, min_score=0.7))

    # The newest of two identical trajectories is kept.
    assert [e.id for e in selection.selected] == ["hard_dup", "easy3", "easy2"]
    assert selection.chosen["hard_dup"] == "score 0.90; goal solved in 2 of 3 attempts"
    assert selection.chosen["easy3"] == "score 1.00; goal solved in 4 of 4 attempts"
    assert selection.skipped == {
        "hard_ok": "duplicate trajectory",
        "hard_fail": "score 0.0 below 0.7",
        "easy1": "its goal already has 2 selected episodes",
        "easy0": "its goal already has 2 selected episodes",
    }
    assert selection.considered == 7


def test_no_call_answers_are_capped_at_their_share_lowest_ranked_first(store: EpisodeStore) -> None:
    for i in range(3):
        add(store, f"call{i}", f"goal {i}", 1.0, i)
    for i in range(4):
        add(store, f"none{i}", f"unrelated {i}", 1.0 - i / 100, 10 + i, name="none")

    selection = select_episodes(store, TuningSettings(max_abstention_share=0.4))  # 2 per 3 calls

    assert {e.id for e in selection.selected} == {"call0", "call1", "call2", "none0", "none1"}
    assert selection.skipped == {f"none{i}": "no-call answers are capped at 40% of the selection" for i in (2, 3)}
    assert set(selection.chosen) == {e.id for e in selection.selected}
    assert len(select_episodes(store, TuningSettings(max_abstention_share=1.0)).selected) == 7
    assert {e.id for e in select_episodes(store, TuningSettings(max_abstention_share=0.0)).selected} == {
        "call0", "call1", "call2"}


def test_no_call_answers_are_oversampled_up_to_their_floor(store: EpisodeStore) -> None:
    for i in range(6):
        add(store, f"call{i}", f"goal {i}", 1.0, i)
    add(store, "none0", "unrelated 0", 1.0, 10, name="none")
    add(store, "none1", "unrelated 1", 0.9, 11, name="none")

    selection = select_episodes(store, TuningSettings(min_abstention_share=0.5))  # 6 refusals for 6 calls

    assert len(selection.selected) == 8 and selection.abstentions == 2
    assert [e.id for e in selection.oversampled] == ["none0", "none1", "none0", "none1"]
    training = selection.training_episodes()
    assert sum(e.id.startswith("none") for e in training) == 6 and len(training) == 12
    assert not select_episodes(store, TuningSettings()).oversampled  # off by default
    copies = select_episodes(store, TuningSettings(min_abstention_share=0.9, max_abstention_share=1.0)).oversampled
    assert len(copies) == 6  # 54 wanted, but each refusal is used at most 4 times


def test_no_call_answers_paired_with_a_call_of_the_same_request_are_kept_and_repeated_first(
        store: EpisodeStore) -> None:
    for i in range(2):
        add(store, f"call{i}", f"goal {i}", 1.0, i)
    add(store, "unpaired", "unrelated 0", 1.0, 10, name="none")  # ranked first: newest of the best scores
    add(store, "paired", "Goal  1", 0.9, 11, name="none")  # the same request as call1, other tools offered

    capped = select_episodes(store, TuningSettings(max_abstention_share=0.34))  # 1 refusal per 2 calls
    assert {e.id for e in capped.selected} == {"call0", "call1", "paired"}
    assert capped.skipped == {"unpaired": "no-call answers are capped at 34% of the selection"}

    floor = select_episodes(store, TuningSettings(min_abstention_share=0.6, max_abstention_share=0.6))
    assert [e.id for e in floor.oversampled] == ["paired"]  # 3 refusals for 2 calls: the pair repeats


def test_abstention_floor_above_the_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="min_abstention_share 0.7 exceeds max_abstention_share 0.6"):
        TuningSettings(min_abstention_share=0.7)


def test_total_cap_and_unfinished_episodes(store: EpisodeStore) -> None:
    add(store, "a", "goal a", 1.0, 0)
    add(store, "b", "goal b", 0.8, 1)
    add(store, "limit", "goal c", 1.0, 2, status="limit")
    selection = select_episodes(store, TuningSettings(max_episodes=1))
    assert [e.id for e in selection.selected] == ["a"]
    assert selection.skipped == {"limit": "status limit", "b": "over the cap of 1"}


def test_gate_promotes_only_with_accuracy_and_without_forgetting() -> None:
    from selftune.tuning.pipeline import gate
    from selftune.tuning.report import SuiteResult

    before, better = SuiteResult(name="heldout", accuracy=0.5, n=4), SuiteResult(name="heldout", accuracy=0.75, n=4)
    decision, reason = gate(before, better, 0.0, 2.00, 2.06, 0.05)
    assert decision == "rejected" and reason.startswith("forgetting: reference cross-entropy 2.000 -> 2.060 (+0.060 nats")
    decision, reason = gate(before, better, 0.0, 2.00, 2.05, 0.05)  # exactly at the bound
    assert decision == "promoted" and reason.endswith("reference cross-entropy 2.000 -> 2.050 (+0.050 nats, tolerance 0.050)")
    decision, reason = gate(better, before, 0.0, 2.00, 1.90, 0.05)
    assert decision == "rejected" and reason.startswith("held-out accuracy 0.75 -> 0.50")
    assert gate(before, better, 0.5, 2.00, 2.00, 0.05)[0] == "rejected"  # the margin is not reached


def test_gate_rejects_a_regression_beyond_its_tolerance() -> None:
    from selftune.tuning.pipeline import gate
    from selftune.tuning.report import SuiteResult

    before, better = SuiteResult(name="heldout", accuracy=0.5, n=4), SuiteResult(name="heldout", accuracy=0.75, n=4)
    abstain = SuiteResult(name="bfcl:irrelevance", accuracy=0.9, n=10)
    one_less = SuiteResult(name="bfcl:irrelevance", accuracy=0.8, n=10)
    two_less = SuiteResult(name="bfcl:irrelevance", accuracy=0.7, n=10)
    calls = SuiteResult(name="bfcl:simple_python", accuracy=0.6, n=10)

    decision, reason = gate(before, better, 0.0, 2.0, 2.0, 0.05, [(abstain, one_less, 0.1), (calls, calls, 0.1)])
    assert decision == "promoted" and "bfcl:irrelevance 0.90 -> 0.80 (n=10, tolerance 0.10)" in reason
    decision, reason = gate(before, better, 0.0, 2.0, 2.0, 0.05, [(calls, calls, 0.1), (abstain, two_less, 0.1)])
    assert decision == "rejected"
    assert reason.startswith("regression: bfcl:irrelevance 0.90 -> 0.70 (n=10, tolerance 0.10); held-out accuracy")
    assert "bfcl:simple_python 0.60 -> 0.60" in reason
    assert gate(before, better, 0.0, 2.0, 2.0, 0.05, [(abstain, two_less, 0.25)])[0] == "promoted"


def test_regressions_are_measured_against_the_better_of_active_and_base() -> None:
    from selftune.tuning.pipeline import gate, regression_baseline
    from selftune.tuning.report import SuiteResult

    before, better = SuiteResult(name="heldout", accuracy=0.5, n=4), SuiteResult(name="heldout", accuracy=0.75, n=4)
    base = SuiteResult(name="irrelevance", accuracy=0.96, n=50)
    active = SuiteResult(name="irrelevance", accuracy=0.94, n=50)  # promoted 2 points down, at the bound
    candidate = SuiteResult(name="irrelevance", accuracy=0.92, n=50)  # 2 more: 4 from the start

    assert gate(before, better, 0.0, 2.0, 2.0, 0.05, [(active, candidate, 0.02)])[0] == "promoted"
    decision, reason = gate(before, better, 0.0, 2.0, 2.0, 0.05,
                            [(regression_baseline(active, base), candidate, 0.02)])
    assert decision == "rejected" and reason.startswith("regression: irrelevance (base) 0.96 -> 0.92")
    gained = SuiteResult(name="irrelevance", accuracy=1.0, n=50)
    assert regression_baseline(gained, base) is gained  # gains of the active adapter are kept too


def test_regression_suites_are_validated_bfcl_categories() -> None:
    from pydantic import ValidationError

    from selftune.settings import RegressionSuite

    assert [s.category for s in TuningSettings().regression_suites] == ["irrelevance", "simple_python"]
    with pytest.raises(ValidationError, match="unsupported BFCL category 'irrelevant'"):
        TuningSettings(regression_suites=[{"category": "irrelevant"}])
    with pytest.raises(ValidationError):
        RegressionSuite(category="irrelevance", tolerance=1.5)
