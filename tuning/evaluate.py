"""Evaluate the running agent on a goal suite with verifiers."""

from __future__ import annotations

from selftune.agent.goals import GoalSpec
from selftune.agent.loop import Agent
from selftune.tuning.report import SuiteResult

__all__ = ["SuiteResult", "evaluate_goals"]


def evaluate_goals(agent: Agent, goals: list[GoalSpec], name: str = "heldout") -> SuiteResult:
    """Run every goal once (episodes stored with origin "eval", never trained on); accuracy by verifier."""
    passed, ids, seconds = 0, [], 0.0
    for spec in goals:
        result = agent.run(spec.goal, verifier=spec.verifier, origin="eval")
        ids.append(result.episode_id)
        seconds += result.wall_s
        if any(reward.source == "verifier" and reward.value == 1.0 for reward in result.rewards):
            passed += 1
    n = len(goals)
    return SuiteResult(name=name, accuracy=passed / n if n else 0.0, n=n, passed=passed, episode_ids=ids,
                       seconds=round(seconds, 2))
