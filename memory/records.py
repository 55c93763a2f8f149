"""Typed records that cross module boundaries: messages, steps, rewards, episodes.

The agent loop produces them, the episode store persists them, tuning reads them.
Messages follow the OpenAI chat format (``tool_calls`` on assistant messages,
``tool_call_id`` on tool messages) so exports load directly into SFT trainers.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "ChatMessage", "ToolCall", "Step", "StepKind", "Reward", "RewardSource",
    "Verifier", "Episode", "EpisodeStatus", "EpisodeSummary", "utc_now", "new_id",
    "combined_score",
]

RewardSource = Literal["verifier", "self_eval", "user", "efficiency"]
StepKind = Literal["system", "goal", "plan", "instruction", "action", "observation", "answer"]
EpisodeStatus = Literal["running", "done", "limit", "failed", "cancelled"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:12]


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: new_id("call_"))
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """OpenAI chat-completions message dict."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class Step(BaseModel):
    """One message of an episode's transcript plus how it was produced."""

    index: int
    kind: StepKind
    message: ChatMessage
    model_id: str | None = None
    adapter_version: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    trainable: bool = Field(False, description="An assistant turn that parsed and validated: a target for tuning.")
    error: str | None = None
    created_at: datetime = Field(default_factory=utc_now)


class Reward(BaseModel):
    episode_id: str
    source: RewardSource
    value: float = Field(ge=0.0, le=1.0)
    note: str | None = None
    created_at: datetime = Field(default_factory=utc_now)


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


class Verifier(BaseModel):
    """A check of the final answer: ``exact``, ``contains`` (case-insensitive), ``number`` or ``regex``."""

    kind: Literal["exact", "contains", "number", "regex"] = "contains"
    expected: str
    tolerance: float = Field(1e-6, ge=0.0)

    def check(self, answer: str | None) -> bool:
        text = (answer or "").strip()
        if self.kind == "exact":
            return text == self.expected.strip()
        if self.kind == "contains":
            return self.expected.strip().lower() in text.lower()
        if self.kind == "regex":
            return re.search(self.expected, text) is not None
        target = float(self.expected)
        for match in _NUMBER.findall(text):
            value = float(match.replace(",", ""))
            if math.isclose(value, target, rel_tol=self.tolerance, abs_tol=self.tolerance):
                return True
        return False


def combined_score(rewards: list[Reward], weights: dict[str, float]) -> float | None:
    """Weighted mean over sources of each source's mean value; None when nothing weighted is present."""
    by_source: dict[str, list[float]] = {}
    for reward in rewards:
        by_source.setdefault(reward.source, []).append(reward.value)
    total = weight_sum = 0.0
    for source, values in by_source.items():
        weight = weights.get(source, 0.0)
        if weight > 0:
            total += weight * sum(values) / len(values)
            weight_sum += weight
    return total / weight_sum if weight_sum else None


class EpisodeSummary(BaseModel):
    id: str
    goal: str
    status: EpisodeStatus
    answer: str | None = None
    origin: str = "user"
    model_id: str | None = None
    adapter_version: str | None = None
    started_at: datetime = Field(default_factory=utc_now)
    finished_at: datetime | None = None
    wall_s: float | None = None
    score: float | None = None


class Episode(EpisodeSummary):
    verifier: Verifier | None = None
    steps: list[Step] = Field(default_factory=list)
    rewards: list[Reward] = Field(default_factory=list)

    @property
    def messages(self) -> list[ChatMessage]:
        return [step.message for step in self.steps]
