"""Evaluate the running agent on a goal suite with verifiers, and the model on BFCL regression suites."""

from __future__ import annotations

from typing import Any

from selftune.agent.goals import GoalSpec
from selftune.agent.loop import Agent
from selftune.settings import RegressionSuite
from selftune.tuning.report import SuiteResult

__all__ = ["SuiteResult", "bfcl_suite", "evaluate_goals", "evaluate_regression_suites"]


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


def bfcl_suite(chat: Any, name: str, category: str, **options: Any) -> SuiteResult:
    """Constrained BFCL accuracy of ``chat`` (its active adapter) on ``category`` as the suite ``name``;
    ``options`` go to :func:`selftune.bfcl.harness.evaluate_category` (limit, seed, ids, exemplars)."""
    from selftune.bfcl.harness import evaluate_category

    result = evaluate_category(chat, category, constrained=True, **options)
    return SuiteResult(name=name, accuracy=result.accuracy, n=result.n,
                       passed=sum(record.valid for record in result.records),
                       seconds=round(sum(record.latency_s for record in result.records), 2))


def evaluate_regression_suites(chat: Any, suites: list[RegressionSuite], seed: int = 0) -> dict[str, SuiteResult]:
    """Each suite's accuracy under ``chat``'s active adapter, keyed ``bfcl:<category>``."""
    return {
        f"bfcl:{suite.category}": bfcl_suite(chat, f"bfcl:{suite.category}", suite.category, limit=suite.limit, seed=seed)
        for suite in suites
    }
