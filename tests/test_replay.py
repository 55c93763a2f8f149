"""Replay mixing (tuning/replay.py): ratios, pools, the committed replay file, and its training labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from selftune.agent.models import prepare_model
from selftune.memory.records import ChatMessage, Episode, Step
from selftune.settings import TuningSettings
from selftune.tuning.dataset import IGNORE_INDEX, build_examples
from selftune.tuning.replay import load_replay_file, mix_replay


def _episodes(prefix: str, n: int) -> list[Episode]:
    return [
        Episode(id=f"{prefix}{i}", goal=f"goal {i}", status="done", score=1.0, steps=[
            Step(index=0, kind="goal", message=ChatMessage(role="user", content=f"goal {i}")),
            Step(index=1, kind="answer", message=ChatMessage(role="assistant", content="ok"), trainable=True),
        ])
        for i in range(n)
    ]


def test_replay_makes_up_the_configured_share_split_between_pools() -> None:
    new, earlier, general = _episodes("new", 8), _episodes("old", 10), _episodes("gen", 10)
    mixed, mix = mix_replay(new, earlier, general, ratio=0.2, general_share=0.5, seed=1)
    assert (mix.new, mix.earlier, mix.general) == (8, 1, 1)  # 2 of 10 replayed
    assert mixed[:8] == new and {e.id for e in mixed[8:]} == set(mix.earlier_ids + mix.general_ids)
    assert all(i.startswith("old") for i in mix.earlier_ids) and all(i.startswith("gen") for i in mix.general_ids)

    _, half = mix_replay(new, earlier, general, ratio=0.5, general_share=0.25, seed=1)
    assert (half.earlier, half.general) == (6, 2)  # 8 replayed for 8 new
    _, none = mix_replay(new, earlier, general, ratio=0.0, general_share=0.5)
    assert (none.earlier, none.general) == (0, 0)
    assert mix_replay(new, earlier, general, 0.2, 0.5, seed=1)[1] == mix  # seeded


def test_a_short_pool_is_filled_from_the_other_and_new_episodes_are_not_replayed() -> None:
    new, general = _episodes("new", 8), _episodes("gen", 10)
    _, only_general = mix_replay(new, [], general, ratio=0.5, general_share=0.0)
    assert (only_general.earlier, only_general.general) == (0, 8)
    _, short_general = mix_replay(new, _episodes("old", 10), general[:1], ratio=0.5, general_share=1.0)
    assert (short_general.earlier, short_general.general) == (7, 1)
    _, same = mix_replay(new, new[:4], [], ratio=0.5, general_share=0.0)
    assert same.earlier == 0  # already in this round's selection
    with pytest.raises(ValueError):
        mix_replay(new, [], general, ratio=1.0, general_share=0.5)


def test_committed_replay_file_has_general_and_abstention_conversations() -> None:
    episodes = load_replay_file(TuningSettings().replay_file)
    assert len(episodes) >= 20 and all(e.origin == "replay" and e.status == "done" for e in episodes)
    replies = [e.steps[-1].message.content for e in episodes]
    abstentions = [r for r in replies if r.startswith('{"tool": "none"')]
    assert len(abstentions) >= 10 and all(json.loads(r)["arguments"]["reason"] for r in abstentions)
    assert len(replies) - len(abstentions) >= 10  # plain general-language answers
    assert all(e.steps[-1].trainable and not any(s.trainable for s in e.steps[:-1]) for e in episodes)


def test_malformed_replay_lines_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "replay.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                   "not json\n")
    with pytest.raises(ValueError, match="replay.jsonl:2"):
        load_replay_file(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n')
    with pytest.raises(ValueError, match="replay.jsonl:1: needs an assistant turn"):
        load_replay_file(bad)


def test_replay_conversations_train_only_the_assistant_reply(model_cache: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(prepare_model("smollm2-135m-instruct", model_cache))
    episodes = load_replay_file(TuningSettings().replay_file)
    examples = build_examples(episodes, tokenizer, max_seq_len=2048)
    assert len(examples) == len(episodes)
    for episode, example in zip(episodes, examples, strict=True):
        trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                                    if label != IGNORE_INDEX])
        assert episode.steps[-1].message.content in trained
        assert episode.goal not in trained
