"""Which logged episodes become training data, and why the others do not."""

from __future__ import annotations

import json
import math

from pydantic import BaseModel, Field

from selftune.agent.constrained import NO_CALL_TOOL
from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import Episode
from selftune.settings import TuningSettings

__all__ = ["Selection", "select_episodes"]

MAX_ABSTENTION_COPIES = 4  # oversampling repeats one no-call episode at most this often (more memorises it)


class Selection(BaseModel):
    selected: list[Episode] = Field(default_factory=list)
    considered: int = 0
    chosen: dict[str, str] = Field(default_factory=dict, description="episode id -> why it was chosen")
    skipped: dict[str, str] = Field(default_factory=dict, description="episode id -> reason")
    scores: list[float] = Field(default_factory=list, description="Scores of every considered episode.")
    abstentions: int = Field(0, description="Selected episodes that are no-call answers.")
    oversampled: list[Episode] = Field(
        default_factory=list, description="Extra copies of selected no-call episodes (tuning.min_abstention_share).")

    def training_episodes(self) -> list[Episode]:
        """The selected episodes plus the oversampled copies: what one round trains on before replay."""
        return self.selected + self.oversampled


def _goal_key(episode: Episode) -> str:
    return " ".join(episode.goal.lower().split())


def _trajectory_key(episode: Episode) -> str:
    """Goal plus the sequence of calls: identical keys are duplicate trajectories."""
    calls = [
        [call.name, call.arguments]
        for step in episode.steps if step.trainable and step.kind == "action"
        for call in step.message.tool_calls
    ]
    return json.dumps([_goal_key(episode), calls], sort_keys=True)


def _abstains(episode: Episode) -> bool:
    """Whether every trained call of the episode is the no-call answer (no offered tool fitted)."""
    names = [call.name for step in episode.steps if step.trainable and step.kind == "action"
             for call in step.message.tool_calls]
    return bool(names) and all(name == NO_CALL_TOOL for name in names)


def _request_key(episode: Episode) -> str:
    """The user's request (the goal step's text), whatever tools were offered with it."""
    text = next((step.message.content for step in episode.steps if step.kind == "goal"), episode.goal)
    return " ".join(text.lower().split())


def _abstentions_paired_first(selection: Selection) -> list[Episode]:
    """Selected no-call episodes, those whose request also has a selected call first (in rank order).

    Such a pair (the same request answered with a call when a fitting tool is offered, with the no-call
    answer when none is) leaves only the offered tools to tell the answers apart: the model learns to
    read them. A refusal of a request never seen with a call can be learned from the request alone,
    which teaches a prior over requests instead of abstention."""
    abstaining = [episode for episode in selection.selected if _abstains(episode)]
    called = {_request_key(episode) for episode in selection.selected if not _abstains(episode)}
    return sorted(abstaining, key=lambda episode: _request_key(episode) not in called)


def _cap_abstentions(selection: Selection, share: float) -> None:
    """Drop no-call episodes, unpaired and lowest-ranked first, until they are at most ``share`` of the
    selection."""
    abstaining = _abstentions_paired_first(selection)
    calls = len(selection.selected) - len(abstaining)
    allowed = len(abstaining) if share >= 1.0 else math.floor(share / (1.0 - share) * calls + 1e-9)
    for episode in abstaining[allowed:]:
        selection.selected.remove(episode)
        del selection.chosen[episode.id]
        selection.skipped[episode.id] = f"no-call answers are capped at {share:.0%} of the selection"


def _oversample_abstentions(selection: Selection, share: float) -> None:
    """Repeat selected no-call episodes, paired and best-ranked first, until they make up ``share`` of
    the training episodes (each at most ``MAX_ABSTENTION_COPIES`` times in all). Calls gain in number
    from round to round while refusals of the same goals repeat themselves; without a floor the
    refusal share shrinks and the model unlearns abstaining."""
    abstaining = _abstentions_paired_first(selection)
    selection.abstentions = len(abstaining)
    if not abstaining or share <= 0.0:
        return
    calls = len(selection.selected) - len(abstaining)
    wanted = min(math.ceil(share / (1.0 - share) * calls - 1e-9), MAX_ABSTENTION_COPIES * len(abstaining))
    selection.oversampled = [abstaining[i % len(abstaining)] for i in range(max(0, wanted - len(abstaining)))]


def select_episodes(store: EpisodeStore, settings: TuningSettings) -> Selection:
    """Finished episodes scoring at least ``min_score``, without duplicate trajectories, at most
    ``max_per_goal`` per goal and ``max_episodes`` in all, and no-call answers (abstentions) at
    most ``max_abstention_share`` of them; below ``min_abstention_share`` they are oversampled.
    Both keep no-call answers paired with a call of the same request first.

    Goals the model solves only sometimes come first (they teach the most), then the rest;
    within each, best score first, newest first on ties.
    """
    candidates = store.scored(min_score=0.0)
    selection = Selection(considered=len(candidates), scores=[e.score for e in candidates if e.score is not None])

    def solved(episode: Episode) -> bool:
        return episode.status == "done" and (episode.score or 0.0) >= settings.min_score

    attempts: dict[str, list[bool]] = {}
    for episode in candidates:
        attempts.setdefault(_goal_key(episode), []).append(solved(episode))

    def sometimes(episode: Episode) -> bool:
        outcomes = attempts[_goal_key(episode)]
        return 0 < sum(outcomes) < len(outcomes)

    seen: set[str] = set()
    per_goal: dict[str, int] = {}
    ranked = sorted(candidates, key=lambda e: (sometimes(e), e.score or 0.0, e.started_at), reverse=True)
    for episode in ranked:
        goal, key = _goal_key(episode), _trajectory_key(episode)
        if episode.status != "done":
            reason = f"status {episode.status}"
        elif episode.score is None or episode.score < settings.min_score:
            reason = f"score {episode.score} below {settings.min_score}"
        elif not any(step.trainable for step in episode.steps):
            reason = "no valid assistant turn"
        elif key in seen:
            reason = "duplicate trajectory"
        elif per_goal.get(goal, 0) >= settings.max_per_goal:
            reason = f"its goal already has {settings.max_per_goal} selected episodes"
        elif len(selection.selected) >= settings.max_episodes:
            reason = f"over the cap of {settings.max_episodes}"
        else:
            seen.add(key)
            per_goal[goal] = per_goal.get(goal, 0) + 1
            selection.selected.append(episode)
            outcomes = attempts[goal]
            selection.chosen[episode.id] = (
                f"score {episode.score:.2f}; goal solved in {sum(outcomes)} of {len(outcomes)} attempts")
            continue
        selection.skipped[episode.id] = reason
    _cap_abstentions(selection, settings.max_abstention_share)
    _oversample_abstentions(selection, settings.min_abstention_share)
    return selection
