"""The goal-driven agent loop: plan, call tools, observe, finish.

``Agent.iter_run`` is a generator: it yields every :class:`Step` as soon as it
is stored (so callers can stream them) and finally one :class:`AgentResult`.
The transcript it builds is the same record the episode store keeps and the
tuning data is rendered from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

from selftune.agent.constrained import JSON_CALL_PREFIX
from selftune.agent.generation import describe_model, generate
from selftune.agent.prompts import render, tool_signature
from selftune.agent.rewards import episode_rewards
from selftune.agent.tool_calls import ToolCallError, parse_tool_calls, validate_tool_call
from selftune.agent.transcript import to_prompt_messages
from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import (
    ChatMessage, Episode, EpisodeStatus, Reward, Step, StepKind, ToolCall, Verifier, new_id, utc_now,
)
from selftune.settings import AgentSettings
from selftune.tools.finish import FINISH_TOOL
from selftune.tools.memory_tools import MemoryStore

__all__ = ["Agent", "AgentResult", "Budget", "GoalError"]

log = logging.getLogger(__name__)
PLAN_PREFIX = "Plan:\n1."


class GoalError(ValueError):
    """The goal itself is unusable (empty or too long); nothing was stored."""


class Budget(BaseModel):
    """Per-goal limits; unset fields fall back to the agent settings."""

    max_steps: int | None = Field(None, ge=1, le=100)
    max_tokens: int | None = Field(None, ge=16)
    max_wall_seconds: float | None = Field(None, gt=0)


class AgentResult(BaseModel):
    episode_id: str
    status: EpisodeStatus
    answer: str | None
    steps: int = Field(description="Tool-call steps taken.")
    limit: str | None = Field(None, description="Which budget stopped the run, when one did.")
    error: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    wall_s: float = 0.0
    rewards: list[Reward] = Field(default_factory=list)


class _Run:
    """Mutable state of one episode while it runs."""

    def __init__(self, episode: Episode, settings: AgentSettings, budget: Budget) -> None:
        self.episode = episode
        self.transcript: list[ChatMessage] = []
        self.steps_taken = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.started = time.monotonic()
        self.max_steps = budget.max_steps or settings.max_steps
        self.max_tokens = budget.max_tokens or settings.max_tokens
        self.max_wall = budget.max_wall_seconds or settings.max_wall_seconds
        self.seen_calls: dict[str, str] = {}
        self.observations: list[str] = []

    def limit_reached(self) -> str | None:
        if self.steps_taken >= self.max_steps:
            return "step"
        if self.tokens_out >= self.max_tokens:
            return "token"
        if time.monotonic() - self.started >= self.max_wall:
            return "time"
        return None


class Agent:
    """Runs goals with a chat model, tools and a vector memory, logging every step."""

    def __init__(
        self,
        model: BaseChatModel,
        tool_factory: Callable[[str], list[BaseTool]],
        store: EpisodeStore,
        settings: AgentSettings,
        memory: MemoryStore | None = None,
    ) -> None:
        self.model = model
        self.tool_factory = tool_factory
        self.store = store
        self.memory = memory
        self.settings = settings

    def run(self, goal: str, **kwargs: Any) -> AgentResult:
        """Run a goal to the end and return its result."""
        result = None
        for event in self.iter_run(goal, **kwargs):
            result = event
        assert isinstance(result, AgentResult)
        return result

    def iter_run(
        self,
        goal: str,
        verifier: Verifier | None = None,
        origin: str = "user",
        budget: Budget | None = None,
    ) -> Iterator[Step | AgentResult]:
        goal = self._checked_goal(goal)
        model_id, adapter_version = describe_model(self.model)
        episode = Episode(
            id=new_id("ep_"), goal=goal, status="running", origin=origin,
            model_id=model_id, adapter_version=adapter_version, verifier=verifier,
        )
        self.store.create_episode(episode)
        run = _Run(episode, self.settings, budget or Budget())
        status: EpisodeStatus = "failed"
        answer: str | None = None
        limit: str | None = None
        error: str | None = None
        try:
            tools = {tool.name: tool for tool in self.tool_factory(episode.id)}
            yield self._record(run, "system", ChatMessage(role="system", content=render(
                "system", tools=[tool_signature(tool) for tool in tools.values()])))
            yield self._record(run, "goal", ChatMessage(role="user", content=render(
                "goal", goal=goal, memories=self._recall(goal), plan=self.settings.plan)))
            if self.settings.plan:
                reply = self._call(run, self.settings.plan_max_tokens, prefix=PLAN_PREFIX)
                yield self._record(run, "plan", ChatMessage(role="assistant", content=str(reply.content).strip()),
                                   reply=reply, trainable=True)
                yield self._record(run, "instruction", ChatMessage(role="user", content=render("act")))
            while answer is None and (limit := run.limit_reached()) is None:
                for step in self._act(run, tools):
                    yield step
                    if step.kind == "action" and step.message.tool_calls:
                        answer = _finish_answer(step.message.tool_calls)
            if answer is not None:
                status = "done"
            else:
                status = "limit"
                yield self._record(run, "instruction", ChatMessage(role="user", content=render("limit", limit=limit)))
                for step in self._act(run, {FINISH_TOOL: tools[FINISH_TOOL]}, final=True):
                    yield step
                    if step.kind == "action" and step.message.tool_calls:
                        answer = _finish_answer(step.message.tool_calls)
                answer = answer or (run.observations[-1] if run.observations else None)
        except (KeyboardInterrupt, GeneratorExit):
            self._close(run, "cancelled", answer)
            raise
        except Exception as exc:  # a model or store failure ends the episode, it does not vanish
            log.exception("episode %s failed", episode.id)
            error = f"{type(exc).__name__}: {exc}"
        rewards = self._close(run, status if error is None else "failed", answer)
        yield AgentResult(
            episode_id=episode.id, status=status if error is None else "failed", answer=answer,
            steps=run.steps_taken, limit=limit if status == "limit" else None, error=error,
            tokens_in=run.tokens_in, tokens_out=run.tokens_out,
            wall_s=round(time.monotonic() - run.started, 3), rewards=rewards,
        )

    # -- one step -----------------------------------------------------------------------

    def _act(self, run: _Run, tools: dict[str, BaseTool], final: bool = False) -> Iterator[Step]:
        """Ask for a tool call, validate it, run it, and record what happened."""
        remaining = self.settings.max_call_tokens
        if not final:  # the forced final answer may overrun the goal's token budget by one call
            remaining = min(remaining, max(16, run.max_tokens - run.tokens_out))
        constrain = list(tools.values()) if self.settings.constrained_decoding else None
        reply = self._call(run, remaining, prefix=JSON_CALL_PREFIX, tools=constrain)
        run.steps_taken += 1
        raw = str(reply.content).strip()
        try:
            calls = parse_tool_calls(raw)
            arguments = [validate_tool_call(call, tools) for call in calls]
        except ToolCallError as exc:
            yield self._record(run, "action", ChatMessage(role="assistant", content=raw), reply=reply, error=str(exc))
            yield self._record(run, "observation", ChatMessage(role="user", content=render("error", error=str(exc))),
                               error=str(exc))
            return
        calls = [call.model_copy(update={"arguments": args}) for call, args in zip(calls, arguments)]
        keys = [_call_key(call) for call in calls]
        repeated = [call.name != FINISH_TOOL and key in run.seen_calls for call, key in zip(calls, keys)]
        yield self._record(run, "action", ChatMessage(role="assistant", content=raw, tool_calls=calls), reply=reply,
                           trainable=not any(repeated))
        for call, key, is_repeat in zip(calls, keys, repeated):
            if call.name == FINISH_TOOL:
                return
            if is_repeat:
                content, failure = render("repeat", name=call.name), "repeated call"
            else:
                content, failure = self._execute(tools[call.name], call)
                run.seen_calls[key] = content
                run.observations.append(content)
            yield self._record(run, "observation", ChatMessage(
                role="tool", content=content, tool_call_id=call.id, name=call.name), error=failure)

    def _execute(self, tool: BaseTool, call: ToolCall) -> tuple[str, str | None]:
        """Tool output (truncated) and the error text when it failed."""
        try:
            output = str(tool.invoke(call.arguments))
            failure = None
        except ToolException as exc:
            output = failure = f"Error: {exc}"
        except Exception as exc:  # a broken tool is the tool's problem, not the episode's
            log.warning("tool %s crashed: %s", call.name, exc)
            output = failure = f"Error: {call.name} failed: {type(exc).__name__}: {exc}"
        limit = self.settings.max_observation_chars
        if len(output) > limit:
            output = output[:limit] + f"\n[truncated {len(output) - limit} characters]"
        return output, failure

    def _call(
        self, run: _Run, max_tokens: int, prefix: str | None = None, tools: list[BaseTool] | None = None
    ) -> AIMessage:
        """Prompt the model with the transcript (head plus recent history)."""
        head = next((i + 1 for i, s in enumerate(run.episode.steps) if s.kind == "instruction"), 2)
        head = min(head, len(run.transcript))
        recent = run.transcript[head:][-self.settings.history_messages:]
        messages = to_prompt_messages(run.transcript[:head] + recent)
        reply = generate(self.model, messages, max_tokens=max_tokens, assistant_prefix=prefix, tools=tools)
        usage = reply.usage_metadata or {}
        run.tokens_in += usage.get("input_tokens", 0)
        run.tokens_out += usage.get("output_tokens", 0)
        return reply

    # -- records --------------------------------------------------------------------------

    def _record(
        self,
        run: _Run,
        kind: StepKind,
        message: ChatMessage,
        reply: AIMessage | None = None,
        trainable: bool = False,
        error: str | None = None,
    ) -> Step:
        step = Step(index=len(run.episode.steps), kind=kind, message=message, trainable=trainable, error=error)
        if reply is not None:
            usage = reply.usage_metadata or {}
            meta = reply.response_metadata or {}
            model_id, adapter_version = describe_model(self.model)
            step = step.model_copy(update={
                "model_id": meta.get("model_id", model_id),
                "adapter_version": meta.get("adapter_version", adapter_version),
                "tokens_in": usage.get("input_tokens", 0),
                "tokens_out": usage.get("output_tokens", 0),
                "latency_s": float(meta.get("latency_s", 0.0)),
            })
        self.store.append_step(run.episode.id, step)
        run.episode.steps.append(step)
        run.transcript.append(message)
        return step

    def _close(self, run: _Run, status: EpisodeStatus, answer: str | None) -> list[Reward]:
        """Finish the episode row, score it, and remember what was learned."""
        wall = time.monotonic() - run.started
        self.store.finish_episode(run.episode.id, status, answer, utc_now(), wall)
        if status == "cancelled":
            return []
        judge = self.model if self.settings.self_eval else None
        rewards = episode_rewards(run.episode.id, run.episode.goal, answer, status, run.steps_taken,
                                  run.max_steps, run.episode.verifier, judge)
        for reward in rewards:
            self.store.add_reward(reward)
        if run.episode.origin != "eval":  # held-out answers in memory would leak into later evaluations
            self._remember(run, answer)
        return rewards

    def _recall(self, goal: str) -> list[str]:
        if self.memory is None or self.settings.memory_top_k == 0:
            return []
        try:
            return [hit.text for hit in self.memory.search(goal, k=self.settings.memory_top_k)]
        except Exception as exc:  # memory is an aid: a broken store must not stop the goal
            log.warning("memory search failed: %s", exc)
            return []

    def _remember(self, run: _Run, answer: str | None) -> None:
        if self.memory is None:
            return
        try:
            if run.observations:
                self.memory.add(run.observations, kind="observation", episode_id=run.episode.id)
            if answer:
                summary = f"Goal: {run.episode.goal}\nAnswer: {answer}"
                self.memory.add([summary], kind="episode_summary", episode_id=run.episode.id)
        except Exception as exc:
            log.warning("memory write failed: %s", exc)

    def _checked_goal(self, goal: str) -> str:
        goal = goal.strip()
        if not goal:
            raise GoalError("the goal is empty")
        if len(goal) > self.settings.max_goal_chars:
            raise GoalError(f"the goal has {len(goal)} characters; the limit is {self.settings.max_goal_chars}")
        return goal


def _call_key(call: ToolCall) -> str:
    return call.name + json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)


def _finish_answer(calls: list[ToolCall]) -> str | None:
    for call in calls:
        if call.name == FINISH_TOOL:
            return str(call.arguments.get("answer", ""))
    return None
