"""The agent loop's own cost per step: everything but the model, timed with an instant scripted model.

Each goal is a plan, a calculator call and a finish, through the real loop: prompt rendering,
parsing and validation, the real calculator and finish tools, the SQLite episode store (every
step committed) and, in the ``memory`` variant, Chroma recall and memory writes with the local
embedder. Model time is what the scripted model spends inside its own ``_generate``; the rest of
the wall time, divided by the tool-call steps, is the loop's overhead per step.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.outputs import ChatResult

from selftune.agent.loop import Agent
from selftune.bench.scripted import ScriptedChatModel
from selftune.memory.episodes import EpisodeStore
from selftune.memory.vector import VectorMemory
from selftune.settings import AgentSettings, ToolSettings
from selftune.tools.registry import ToolContext, build_tools

__all__ = ["run_loop_bench"]

PLAN = "1. Compute with the calculator.\n2. Finish."


class _TimedScript(ScriptedChatModel):
    """A scripted model that adds up the time spent inside itself."""

    model_seconds: float = 0.0

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        start = time.perf_counter()
        try:
            return super()._generate(*args, **kwargs)
        finally:
            self.model_seconds += time.perf_counter() - start


def _replies(a: int, b: int) -> list[str]:
    call = {"tool": "calculator", "arguments": {"expression": f"{a}*{b}"}}
    finish = {"tool": "finish", "arguments": {"answer": str(a * b)}}
    return [PLAN, json.dumps(call), json.dumps(finish)]


def _variant(root: Path, goals: int, with_memory: bool) -> dict[str, Any]:
    store = EpisodeStore(root / "episodes.sqlite3")
    memory = VectorMemory(root / "chroma") if with_memory else None
    tool_settings = ToolSettings(enabled=["calculator", "finish"])
    settings = AgentSettings(self_eval=False, memory_top_k=3 if with_memory else 0)

    def tools(episode_id: str):
        return build_tools(ToolContext(workspace_dir=root / "workspace", memory=memory, episode_id=episode_id,
                                       settings=tool_settings))

    agent = Agent(_TimedScript(replies=["warm-up"]), tools, store, settings, memory=memory)
    agent.model = _TimedScript(replies=_replies(2, 3))
    agent.run("warm-up: what is 2*3?")  # loads the embedder and compiles what loads lazily
    per_step: list[float] = []
    steps = 0
    for index in range(goals):
        model = _TimedScript(replies=_replies(index + 11, 7))
        agent.model = model
        start = time.perf_counter()
        result = agent.run(f"What is {index + 11}*7?")
        overhead = time.perf_counter() - start - model.model_seconds
        assert result.status == "done" and result.answer == str((index + 11) * 7), result
        steps += result.steps
        per_step.append(1000 * overhead / result.steps)
    store.close()
    return {
        "variant": "memory" if with_memory else "no-memory",
        "goals": goals,
        "tool_call_steps": steps,
        "overhead_ms_per_step_mean": round(statistics.fmean(per_step), 3),
        "overhead_ms_per_step_p95": round(statistics.quantiles(per_step, n=20)[-1], 3),
    }


def run_loop_bench(goals: int = 50) -> dict[str, Any]:
    """Loop overhead per tool-call step, without and with vector memory, side by side."""
    with tempfile.TemporaryDirectory(prefix="selftune-bench-loop-") as tmp:
        plain = _variant(Path(tmp) / "plain", goals, with_memory=False)
        with_memory = _variant(Path(tmp) / "memory", goals, with_memory=True)
    return {
        "benchmark": "loop",
        "variants": [plain, with_memory],
        "memory_cost_ratio": round(with_memory["overhead_ms_per_step_mean"] / plain["overhead_ms_per_step_mean"], 2),
    }
