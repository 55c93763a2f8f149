"""Replay against forgetting: each round's new episodes are mixed with earlier training data.

Two pools feed the replay share (``tuning.replay_ratio`` of the final mix):

* **earlier**: episodes that trained a promoted adapter before (recorded in the registry as
  ``trained_on``) and were not selected again this round;
* **general**: fixed conversations from ``tuning.replay_file`` (JSON lines, ``{"messages":
  [{"role", "content"}, ...]}``; every assistant turn is trained), general language and
  abstention ("no function fits") examples, so that tuning on agent episodes alone does not
  narrow the model (AgentTuning mixed 20% general data for this reason).

``tuning.replay_general_share`` splits the replay share between the two; when one pool is
short the other fills in. Sampling is seeded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import ChatMessage, Episode, Step
from selftune.tuning.adapters import AdapterRegistry

__all__ = ["ReplayMix", "earlier_training_data", "load_replay_file", "mix_replay"]

_KINDS = {"system": "system", "user": "instruction", "assistant": "answer"}


class _Conversation(BaseModel):
    messages: list[ChatMessage] = Field(min_length=2)


class ReplayMix(BaseModel):
    """How a round's training set was made up."""

    new: int
    earlier: int
    general: int
    ratio: float = Field(description="Configured replay share of the whole mix.")
    earlier_ids: list[str] = Field(default_factory=list)
    general_ids: list[str] = Field(default_factory=list)


def load_replay_file(path: Path) -> list[Episode]:
    """The conversations of a replay file as episodes whose assistant turns are trainable.

    Raises ValueError naming the file and line for a malformed line or a conversation without
    an assistant turn.
    """
    episodes = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            conversation = _Conversation.model_validate(json.loads(line))
        except (json.JSONDecodeError, ValidationError) as error:
            raise ValueError(f"{path}:{number}: not a replay conversation: {error}") from None
        roles = [message.role for message in conversation.messages]
        if "assistant" not in roles or "tool" in roles:
            raise ValueError(f"{path}:{number}: needs an assistant turn and only system/user/assistant roles")
        goal = next((m.content for m in conversation.messages if m.role == "user"), "")
        steps = [
            Step(index=index, kind=_KINDS[message.role], message=message, trainable=message.role == "assistant")
            for index, message in enumerate(conversation.messages)
        ]
        episodes.append(Episode(id=f"replay:{Path(path).name}:{number}", goal=goal, status="done",
                                origin="replay", score=1.0, steps=steps))
    return episodes


def mix_replay(
    new: list[Episode],
    earlier: list[Episode],
    general: list[Episode],
    ratio: float,
    general_share: float,
    seed: int = 0,
) -> tuple[list[Episode], ReplayMix]:
    """``new`` plus replayed episodes making up ``ratio`` of the result (as far as the pools allow)."""
    if not 0.0 <= ratio < 1.0 or not 0.0 <= general_share <= 1.0:
        raise ValueError("ratio must be in [0, 1) and general_share in [0, 1]")
    chosen = {episode.id for episode in new}
    earlier = [episode for episode in earlier if episode.id not in chosen]
    wanted = round(len(new) * ratio / (1.0 - ratio))
    n_general = min(round(wanted * general_share), len(general))
    n_earlier = min(wanted - n_general, len(earlier))
    n_general = min(wanted - n_earlier, len(general))  # general fills in for a short earlier pool
    rng = random.Random(seed)
    from_earlier = rng.sample(earlier, n_earlier)
    from_general = rng.sample(general, n_general)
    mix = ReplayMix(new=len(new), earlier=n_earlier, general=n_general, ratio=ratio,
                    earlier_ids=[e.id for e in from_earlier], general_ids=[e.id for e in from_general])
    return new + from_earlier + from_general, mix


def earlier_training_data(registry: AdapterRegistry, store: EpisodeStore) -> list[Episode]:
    """Stored episodes that trained a promoted adapter (the replay pool of earlier data)."""
    ids = dict.fromkeys(i for entry in registry.list() if entry.status == "promoted" for i in entry.trained_on)
    episodes = []
    for episode_id in ids:
        try:
            episodes.append(store.get(episode_id))
        except KeyError:  # deleted from the store since: nothing to replay
            continue
    return episodes
