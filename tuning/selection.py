"""Which logged episodes become training data, and why the others do not."""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import Episode
from selftune.settings import TuningSettings

__all__ = ["Selection", "select_episodes"]


class Selection(BaseModel):
    selected: list[Episode] = Field(default_factory=list)
    considered: int = 0
    skipped: dict[str, str] = Field(default_factory=dict, description="episode id -> reason")
    scores: list[float] = Field(default_factory=list, description="Scores of every considered episode.")


def _trajectory_key(episode: Episode) -> str:
    """Goal plus the sequence of calls: identical keys are duplicate trajectories."""
    calls = [
        [call.name, call.arguments]
        for step in episode.steps if step.trainable and step.kind == "action"
        for call in step.message.tool_calls
    ]
    return json.dumps([episode.goal.strip().lower(), calls], sort_keys=True)


def select_episodes(store: EpisodeStore, settings: TuningSettings) -> Selection:
    """Finished episodes scoring at least ``min_score``, best first, without duplicates, capped."""
    candidates = store.scored(min_score=0.0)
    selection = Selection(considered=len(candidates), scores=[e.score for e in candidates if e.score is not None])
    seen: set[str] = set()
    for episode in sorted(candidates, key=lambda e: (e.score or 0.0, e.started_at), reverse=True):
        key = _trajectory_key(episode)
        if episode.status != "done":
            reason = f"status {episode.status}"
        elif episode.score is None or episode.score < settings.min_score:
            reason = f"score {episode.score} below {settings.min_score}"
        elif not any(step.trainable for step in episode.steps):
            reason = "no valid assistant turn"
        elif key in seen:
            reason = "duplicate trajectory"
        elif len(selection.selected) >= settings.max_episodes:
            reason = f"over the cap of {settings.max_episodes}"
        else:
            seen.add(key)
            selection.selected.append(episode)
            continue
        selection.skipped[episode.id] = reason
    return selection
