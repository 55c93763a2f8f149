"""Episode store on real SQLite files: roundtrip, scoring, prefixes, export, crash safety, threads."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from selftune.memory.episodes import SCHEMA_VERSION, EpisodeStore
from selftune.memory.records import ChatMessage, Episode, EpisodeSummary, Reward, Step, ToolCall, Verifier

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "episodes.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[EpisodeStore]:
    with EpisodeStore(db) as opened:
        yield opened


def transcript() -> list[Step]:
    call = ToolCall(id="call_1", name="calculator", arguments={"expression": "6*7", "note": "héllo"})
    return [
        Step(index=0, kind="system", message=ChatMessage(role="system", content="You are an agent.")),
        Step(index=1, kind="goal", message=ChatMessage(role="user", content="What is 6*7?")),
        Step(
            index=2, kind="action", message=ChatMessage(role="assistant", content="", tool_calls=[call]),
            model_id="qwen-0.5b", adapter_version="v3", tokens_in=120, tokens_out=17, latency_s=0.25, trainable=True,
        ),
        Step(
            index=3, kind="observation",
            message=ChatMessage(role="tool", content="42", tool_call_id="call_1", name="calculator"),
        ),
        Step(
            index=4, kind="answer", message=ChatMessage(role="assistant", content="42"),
            model_id="qwen-0.5b", adapter_version="v3", tokens_in=150, tokens_out=3, latency_s=0.1,
            trainable=True, error="retried once",
        ),
    ]


def episode(id_: str, *, started: datetime = T0, origin: str = "user", status: str = "running", **fields) -> Episode:
    return Episode(id=id_, goal=f"goal of {id_}", status=status, origin=origin, started_at=started, **fields)


def finished(store: EpisodeStore, id_: str, *, rewards: dict[str, float], **fields) -> None:
    store.create_episode(episode(id_, **fields))
    for step in transcript():
        store.append_step(id_, step)
    store.finish_episode(id_, "done", answer="42", wall_s=1.5)
    for source, value in rewards.items():
        store.add_reward(Reward(episode_id=id_, source=source, value=value))


def test_roundtrip_preserves_steps_and_header(store: EpisodeStore) -> None:
    verifier = Verifier(kind="number", expected="42")
    store.create_episode(episode("ep_round", model_id="qwen-0.5b", adapter_version="v3", verifier=verifier))
    steps = transcript()
    for step in steps:
        store.append_step("ep_round", step)
    end = T0 + timedelta(seconds=2)
    store.finish_episode("ep_round", "done", answer="42", finished_at=end, wall_s=2.0)

    loaded = store.get("ep_round")
    assert loaded.steps == steps
    assert loaded.messages[2].tool_calls[0].arguments == {"expression": "6*7", "note": "héllo"}
    assert loaded.messages[3].tool_call_id == "call_1" and loaded.messages[3].name == "calculator"
    assert (loaded.steps[2].adapter_version, loaded.steps[2].tokens_in, loaded.steps[2].tokens_out) == ("v3", 120, 17)
    assert loaded.steps[4].error == "retried once" and loaded.steps[4].trainable
    assert (loaded.status, loaded.answer, loaded.wall_s) == ("done", "42", 2.0)
    assert (loaded.started_at, loaded.finished_at) == (T0, end)
    assert (loaded.model_id, loaded.adapter_version, loaded.verifier) == ("qwen-0.5b", "v3", verifier)
    assert loaded.rewards == [] and loaded.score is None


def test_create_writes_carried_steps_and_rewards(store: EpisodeStore) -> None:
    steps = transcript()
    rewards = [Reward(episode_id="ep_full", source="verifier", value=1.0, note="matched")]
    store.create_episode(episode("ep_full", status="done", steps=steps, rewards=rewards))
    loaded = store.get("ep_full")
    assert loaded.steps == steps
    assert loaded.rewards == rewards and loaded.score == 1.0


def test_timestamps_are_iso_utc_text(store: EpisodeStore, db: Path) -> None:
    plus_two = timezone(timedelta(hours=2))
    store.create_episode(episode("ep_tz", started=datetime(2025, 1, 1, 14, 0, tzinfo=plus_two)))
    store.append_step("ep_tz", Step(index=0, kind="goal", message=ChatMessage(role="user", content="hi"),
                                    created_at=datetime(2025, 1, 1, 12, 0)))
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT started_at FROM episodes").fetchone()[0] == "2025-01-01T12:00:00.000000+00:00"
    assert raw.execute("SELECT created_at FROM steps").fetchone()[0] == "2025-01-01T12:00:00.000000+00:00"
    raw.close()
    assert store.get("ep_tz").started_at == T0


def test_late_rewards_change_score(store: EpisodeStore) -> None:
    finished(store, "ep_late", rewards={})
    assert store.list()[0].score is None
    store.add_reward(Reward(episode_id="ep_late", source="verifier", value=1.0))
    assert store.get("ep_late").score == 1.0
    store.add_reward(Reward(episode_id="ep_late", source="user", value=0.0, note="wrong format"))
    assert store.list()[0].score == pytest.approx(0.5)
    assert [r.note for r in store.get("ep_late").rewards] == [None, "wrong format"]


def test_combined_score_weights(db: Path) -> None:
    with EpisodeStore(db, weights={"verifier": 3.0, "user": 1.0}) as weighted:
        finished(weighted, "ep_w", rewards={"verifier": 1.0, "user": 0.0, "self_eval": 0.0})
        assert weighted.get("ep_w").score == pytest.approx(0.75)  # self_eval has no weight
        weighted.add_reward(Reward(episode_id="ep_w", source="verifier", value=0.0))
        assert weighted.list()[0].score == pytest.approx((3 * 0.5 + 0.0) / 4)
    with EpisodeStore(db) as equal:
        assert equal.get("ep_w").score == pytest.approx((0.5 + 0.0 + 0.0) / 3)


def test_get_by_unique_prefix_and_unknown_ids(store: EpisodeStore) -> None:
    store.create_episode(episode("abc123"))
    store.create_episode(episode("abd456"))
    assert store.get("abc").id == "abc123"
    assert store.get("abd456").id == "abd456"
    with pytest.raises(KeyError, match="ambiguous"):
        store.get("ab")
    for unknown in ("zzz", "", "abc1234"):
        with pytest.raises(KeyError, match="unknown episode"):
            store.get(unknown)
    store.add_reward(Reward(episode_id="abd", source="user", value=1.0))
    assert store.get("abd456").score == 1.0
    with pytest.raises(KeyError, match="unknown episode id 'nope'"):
        store.add_reward(Reward(episode_id="nope", source="user", value=1.0))
    with pytest.raises(KeyError):
        store.append_step("nope", transcript()[0])
    with pytest.raises(KeyError):
        store.finish_episode("nope", "done")


def test_duplicate_step_index_is_rejected(store: EpisodeStore) -> None:
    store.create_episode(episode("ep_dup"))
    store.append_step("ep_dup", transcript()[0])
    with pytest.raises(ValueError, match="already has a step 0"):
        store.append_step("ep_dup", transcript()[0])
    assert len(store.get("ep_dup").steps) == 1


def test_list_newest_first_with_filters(store: EpisodeStore) -> None:
    store.create_episode(episode("ep_old", started=T0, origin="user", status="done"))
    store.create_episode(episode("ep_mid", started=T0 + timedelta(minutes=1), origin="eval", status="failed"))
    store.create_episode(episode("ep_new", started=T0 + timedelta(minutes=2), origin="user"))
    assert [e.id for e in store.list()] == ["ep_new", "ep_mid", "ep_old"]
    assert [e.id for e in store.list(limit=2)] == ["ep_new", "ep_mid"]
    assert [e.id for e in store.list(status="done")] == ["ep_old"]
    assert [e.id for e in store.list(origin="user")] == ["ep_new", "ep_old"]
    assert [e.id for e in store.list(origin="eval", status="running")] == []
    assert type(store.list()[0]) is EpisodeSummary


def test_scored_selects_full_finished_episodes(store: EpisodeStore) -> None:
    finished(store, "ep_best", rewards={"verifier": 1.0}, started=T0)
    finished(store, "ep_good", rewards={"verifier": 1.0, "user": 0.6}, started=T0 + timedelta(minutes=1))
    finished(store, "ep_bad", rewards={"verifier": 0.0})
    finished(store, "ep_eval", rewards={"verifier": 1.0}, origin="eval")
    finished(store, "ep_none", rewards={})
    store.create_episode(episode("ep_running"))
    store.add_reward(Reward(episode_id="ep_running", source="user", value=1.0))

    chosen = store.scored(min_score=0.7)
    assert [(e.id, e.score) for e in chosen] == [("ep_best", 1.0), ("ep_good", pytest.approx(0.8))]
    assert all(len(e.steps) == 5 and e.steps[2].message.tool_calls for e in chosen)
    assert {e.id for e in store.scored(0.7, origin_exclude=set())} == {"ep_best", "ep_good", "ep_eval"}
    assert {e.id for e in store.scored(0.0)} == {"ep_best", "ep_good", "ep_bad"}
    assert store.count_scored() == 3  # whatever the score; not running, not evaluation, not unrewarded
    assert store.count_scored(origin_exclude=set()) == 4


def test_checkpoint_empties_the_write_ahead_log(store: EpisodeStore, db: Path) -> None:
    finished(store, "ep_1", rewards={"verifier": 1.0})
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size > 0
    store.checkpoint()
    assert wal.stat().st_size == 0 and store.get("ep_1").score == 1.0


def test_export_loads_with_datasets(store: EpisodeStore, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    finished(store, "ep_tools", rewards={"verifier": 1.0}, model_id="qwen-0.5b", adapter_version="v3")
    store.create_episode(episode("ep_plain", started=T0 + timedelta(minutes=1)))
    store.append_step("ep_plain", Step(index=0, kind="goal", message=ChatMessage(role="user", content="hello")))
    store.finish_episode("ep_plain", "done", answer="hi")

    out = tmp_path / "export.jsonl"
    with out.open("w", encoding="utf-8") as handle:
        assert store.export_jsonl(handle) == 2
    data = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert data.num_rows == 2
    expected_columns = {
        "messages", "episode_id", "goal", "answer", "status", "score", "rewards", "model_id", "adapter_version",
    }
    assert expected_columns <= set(data.column_names)
    rows = {row["episode_id"]: row for row in data}
    tools = rows["ep_tools"]
    assert [m["role"] for m in tools["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    call = tools["messages"][2]["tool_calls"][0]
    assert (call["id"], call["type"], call["function"]["name"]) == ("call_1", "function", "calculator")
    assert json.loads(call["function"]["arguments"]) == {"expression": "6*7", "note": "héllo"}
    assert tools["messages"][3]["tool_call_id"] == "call_1" and tools["messages"][0]["tool_calls"] is None
    assert (tools["score"], tools["model_id"], tools["adapter_version"]) == (1.0, "qwen-0.5b", "v3")
    assert tools["rewards"][0]["source"] == "verifier"
    assert rows["ep_plain"]["score"] is None and rows["ep_plain"]["messages"][0]["content"] == "hello"

    with (tmp_path / "best.jsonl").open("w", encoding="utf-8") as handle:
        assert store.export_jsonl(handle, min_score=0.5) == 1
    best = [json.loads(line)["episode_id"] for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert best == ["ep_tools"]


def test_second_store_sees_committed_steps(store: EpisodeStore, db: Path) -> None:
    store.create_episode(episode("ep_live"))
    store.append_step("ep_live", transcript()[0])
    with EpisodeStore(db) as reader:
        assert len(reader.get("ep_live").steps) == 1
        store.append_step("ep_live", transcript()[1])
        assert [s.index for s in reader.get("ep_live").steps] == [0, 1]


def test_killed_process_keeps_committed_steps(db: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal
        from selftune.memory.episodes import EpisodeStore
        from selftune.memory.records import ChatMessage, Episode, Step
        store = EpisodeStore({str(db)!r})
        store.create_episode(Episode(id="ep_crash", goal="g", status="running"))
        for index in range(3):
            message = ChatMessage(role="user", content=str(index))
            store.append_step("ep_crash", Step(index=index, kind="goal", message=message))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    with EpisodeStore(db) as after:
        crashed = after.get("ep_crash")
    assert crashed.status == "running" and crashed.finished_at is None
    assert [s.message.content for s in crashed.steps] == ["0", "1", "2"]


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_threads_append_to_different_episodes(db: Path, shared: bool) -> None:
    main = EpisodeStore(db)
    ids = ["ep_t0", "ep_t1", "ep_t2"]
    for id_ in ids:
        main.create_episode(episode(id_))
    errors: list[BaseException] = []

    def work(id_: str) -> None:
        own = main if shared else EpisodeStore(db)
        try:
            for index in range(40):
                message = ChatMessage(role="tool", content=f"{id_}:{index}")
                own.append_step(id_, Step(index=index, kind="observation", message=message))
        except BaseException as error:  # surfaced to the test below
            errors.append(error)
        finally:
            if own is not main:
                own.close()

    threads = [threading.Thread(target=work, args=(id_,)) for id_ in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    for id_ in ids:
        assert [s.message.content for s in main.get(id_).steps] == [f"{id_}:{i}" for i in range(40)]
    main.close()


def test_schema_is_versioned_and_idempotent(db: Path) -> None:
    EpisodeStore(db).close()
    with EpisodeStore(db) as again:
        again.create_episode(episode("ep_v"))
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(RuntimeError, match="schema version"):
        EpisodeStore(db)


def test_foreign_keys_enforced(store: EpisodeStore, db: Path) -> None:
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with pytest.raises(sqlite3.IntegrityError):
        with store._conn:
            store._conn.execute(
                "INSERT INTO rewards (episode_id, source, value, created_at) VALUES ('ghost', 'user', 1, 'x')"
            )
