"""Evaluate the running agent on a goal suite with verifiers, and the model on BFCL regression suites."""

from __future__ import annotations

from typing import Any

from selftune.agent.goals import GoalSpec
from selftune.agent.loop import Agent
from selftune.settings import RegressionSuite
from selftune.tuning.report import SuiteResult

__all__ = ["SuiteResult", "evaluate_goals", "evaluate_regression_suites"]


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


def evaluate_regression_suites(chat: Any, suites: list[RegressionSuite], seed: int = 0) -> dict[str, SuiteResult]:
    """Constrained BFCL accuracy of ``chat`` (its active adapter) on each suite, keyed ``bfcl:<category>``."""
    from selftune.bfcl.harness import evaluate_category

    results = {}
    for suite in suites:
        result = evaluate_category(chat, suite.category, limit=suite.limit, seed=seed, constrained=True)
        name = f"bfcl:{suite.category}"
        results[name] = SuiteResult(name=name, accuracy=result.accuracy, n=result.n,
                                    passed=sum(record.valid for record in result.records),
                                    seconds=round(sum(record.latency_s for record in result.records), 2))
    return results
