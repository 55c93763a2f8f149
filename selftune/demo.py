"""`selftune demo`: goals on the default model, one tuning round, a report."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from selftune.agent.goals import load_goals
from selftune.runtime import Runtime

__all__ = ["run_demo"]


def run_demo(runtime: Runtime, goals_file: Path, console: Console) -> None:
    from selftune.tuning.pipeline import run_tuning_round

    settings = runtime.settings
    goals = load_goals(goals_file)
    console.rule(f"selftune demo · model {settings.model.name}")
    started = time.monotonic()
    agent = runtime.agent()
    for number, spec in enumerate(goals, 1):
        result = agent.run(spec.goal, verifier=spec.verifier, origin="demo")
        mark = "✓" if any(r.source == "verifier" and r.value == 1.0 for r in result.rewards) else "✗"
        console.print(f"{mark} [{number}/{len(goals)}] {spec.goal}\n    → {result.answer!r} "
                      f"({result.status}, {result.steps} steps, {result.wall_s:.1f}s)", highlight=False)
    console.rule("tuning round")
    outcome = run_tuning_round(runtime)
    console.print(f"{outcome.decision}: {outcome.reason}")
    console.rule("where everything went")
    console.print(f"episodes (SQLite)  {settings.db_path.resolve()}  ({len(runtime.store.list(limit=10_000))} episodes)")
    console.print(f"vector memory      {settings.chroma_dir.resolve()}  ({runtime.memory.count()} memories)")
    console.print(f"adapters           {runtime.adapters.root.resolve()}  (active: {runtime.adapters.active_version() or 'base'})")
    if outcome.report_dir:
        console.print(f"report             {(outcome.report_dir / 'report.html').resolve()}")
    console.print(f"total time         {time.monotonic() - started:.0f}s")
