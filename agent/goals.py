"""Goal files: YAML lists of goals with optional verifiers (demo goals, held-out sets)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selftune.memory.records import Verifier

__all__ = ["GoalSpec", "load_goals"]


class GoalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    goal: str = Field(min_length=1)
    verifier: Verifier | None = None


class _GoalFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    goals: list[GoalSpec]


def load_goals(path: Path) -> list[GoalSpec]:
    """Read and validate a goal file; errors name the file and the bad entry."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return _GoalFile.model_validate(raw).goals
    except FileNotFoundError:
        raise ValueError(f"goal file not found: {path}") from None
    except (yaml.YAMLError, ValidationError) as error:
        raise ValueError(f"invalid goal file {path}: {error}") from None
