"""Rewards an episode earns when it ends: verifier, self-evaluation, efficiency.

User feedback arrives later as its own reward row. How the sources combine into
one score is :func:`selftune.memory.records.combined_score` with the weights in
``rewards.weights``.
"""

from __future__ import annotations

import logging
import re

from langchain_core.language_models import BaseChatModel

from selftune.agent.generation import generate
from selftune.agent.prompts import render
from selftune.memory.records import EpisodeStatus, Reward, Verifier

__all__ = ["self_evaluate", "episode_rewards", "efficiency"]

log = logging.getLogger(__name__)
_VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def self_evaluate(model: BaseChatModel, goal: str, answer: str) -> float | None:
    """1.0 when the model judges the answer right, 0.0 when wrong, None when it gives no verdict."""
    prompt = [{"role": "user", "content": render("self_eval", goal=goal, answer=answer)}]
    try:
        reply = generate(model, prompt, max_tokens=4)
    except Exception as error:  # a judge failure must not lose the episode
        log.warning("self-evaluation failed: %s", error)
        return None
    match = _VERDICT.search(str(reply.content))
    if match is None:
        return None
    return 1.0 if match.group(1).lower() == "yes" else 0.0


def efficiency(status: EpisodeStatus, steps_taken: int, max_steps: int) -> float:
    """1.0 for a one-step finish, falling linearly with steps; 0.0 unless the goal finished."""
    if status != "done":
        return 0.0
    return max(0.0, 1.0 - (max(steps_taken, 1) - 1) / max_steps)


def episode_rewards(
    episode_id: str,
    goal: str,
    answer: str | None,
    status: EpisodeStatus,
    steps_taken: int,
    max_steps: int,
    verifier: Verifier | None,
    judge: BaseChatModel | None,
) -> list[Reward]:
    """Rewards known when an episode ends. ``judge`` enables self-evaluation when there is no verifier."""
    rewards = [Reward(episode_id=episode_id, source="efficiency", value=efficiency(status, steps_taken, max_steps))]
    if verifier is not None:
        passed = status in ("done", "limit") and verifier.check(answer)
        note = f"{verifier.kind} {verifier.expected!r}"
        rewards.append(Reward(episode_id=episode_id, source="verifier", value=1.0 if passed else 0.0, note=note))
    elif judge is not None and answer:
        verdict = self_evaluate(judge, goal, answer)
        if verdict is not None:
            rewards.append(Reward(episode_id=episode_id, source="self_eval", value=verdict))
    return rewards
