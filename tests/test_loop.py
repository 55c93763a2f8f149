"""Agent loop logic with a scripted model, a real SQLite episode store and the real built-in tools."""

from __future__ import annotations

import json

import pytest
from langchain_core.tools import tool

from selftune.agent.loop import Agent, AgentResult, Budget, GoalError
from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import Verifier
from selftune.settings import AgentSettings, ToolSettings
from selftune.tools.registry import ToolContext, build_tools

from selftune.bench.scripted import ScriptedChatModel

PLAN = "1. Compute with the calculator.\n2. Finish."


def call(name: str, **arguments) -> str:
    return json.dumps({"tool": name, "arguments": arguments})


@pytest.fixture
def store(tmp_path):
    store = EpisodeStore(tmp_path / "episodes.sqlite3")
    yield store
    store.close()


def make_agent(tmp_path, store, replies, memory=None, extra_tools=(), **agent_settings) -> tuple[Agent, ScriptedChatModel]:
    model = ScriptedChatModel(replies=replies)
    settings = AgentSettings(self_eval=False, **agent_settings)
    tool_settings = ToolSettings(enabled=["calculator", "read_file", "write_file", "finish"])

    def tools(episode_id: str):
        built = build_tools(ToolContext(workspace_dir=tmp_path / "ws", memory=memory, episode_id=episode_id,
                                        settings=tool_settings))
        return built + list(extra_tools)

    return Agent(model, tools, store, settings, memory=memory), model


def test_calculator_goal_is_answered_and_logged(tmp_path, store):
    agent, model = make_agent(tmp_path, store, [PLAN, call("calculator", expression="17*23+4"), call("finish", answer="395")])
    result = agent.run("What is 17*23+4?", verifier=Verifier(kind="number", expected="395"))

    assert (result.status, result.answer, result.steps) == ("done", "395", 2)
    episode = store.get(result.episode_id)
    kinds = [step.kind for step in episode.steps]
    assert kinds == ["system", "goal", "plan", "instruction", "action", "observation", "action"]
    observation = episode.steps[5].message
    assert observation.role == "tool" and observation.content == "395"
    assert observation.tool_call_id == episode.steps[4].message.tool_calls[0].id
    assert episode.steps[4].model_id == "scripted" and episode.steps[4].tokens_out == 5
    assert {r.source: r.value for r in episode.rewards}["verifier"] == 1.0
    # The tool result is shown to the model on the next call.
    assert "Observation from calculator:\n395" in model.prompt_text(2)
    # Tool schemas are in the system prompt.
    assert '"expression"' in model.prompt_text(0)


def test_invalid_calls_become_error_observations_and_the_model_retries(tmp_path, store):
    replies = [
        PLAN,
        "The answer is probably 4.",                        # no JSON at all
        call("calculator", expr="2+2"),                     # wrong argument name
        call("search_web", query="2+2"),                    # unknown tool
        call("calculator", expression="2+2"),
        call("finish", answer="4"),
    ]
    agent, model = make_agent(tmp_path, store, replies)
    result = agent.run("What is 2+2?")

    assert result.status == "done" and result.answer == "4"
    episode = store.get(result.episode_id)
    errors = [step.error for step in episode.steps if step.kind == "action" and step.error]
    assert len(errors) == 3
    assert "no JSON tool call" in errors[0]
    assert "expression" in errors[1]
    assert "unknown tool 'search_web'" in errors[2] and "calculator" in errors[2]
    assert not any(step.trainable for step in episode.steps if step.error)
    assert "Error: invalid arguments for calculator" in model.prompt_text(3)


def test_repeated_call_is_refused_not_rerun(tmp_path, store):
    runs = []

    @tool
    def counter(text: str) -> str:
        """Count calls."""
        runs.append(text)
        return f"seen {text}"

    replies = [PLAN, call("counter", text="a"), call("counter", text="a"), call("finish", answer="done")]
    agent, model = make_agent(tmp_path, store, replies, extra_tools=[counter])
    result = agent.run("Count once.")

    assert runs == ["a"]
    episode = store.get(result.episode_id)
    actions = [s for s in episode.steps if s.kind == "action"]
    assert [a.trainable for a in actions] == [True, False, True]
    refusal = [s for s in episode.steps if s.kind == "observation"][1]
    assert refusal.message.content.startswith("Refused") and refusal.error == "repeated call"


def test_step_limit_asks_for_a_final_answer(tmp_path, store):
    replies = [PLAN] + [call("calculator", expression=f"{i}+1") for i in range(2)] + [call("finish", answer="best guess")]
    agent, model = make_agent(tmp_path, store, replies, max_steps=2)
    result = agent.run("Keep computing.")

    assert result.status == "limit" and result.limit == "step"
    assert result.answer == "best guess"
    assert "reached the step limit" in model.prompt_text(3)
    assert store.get(result.episode_id).status == "limit"


def test_step_limit_falls_back_to_last_observation(tmp_path, store):
    replies = [PLAN, call("calculator", expression="6*7"), "no idea"]
    agent, _ = make_agent(tmp_path, store, replies, max_steps=1)
    result = agent.run("Compute 6*7.")
    assert result.status == "limit" and result.answer == "42"


def test_per_goal_budget_overrides_settings(tmp_path, store):
    replies = [PLAN] + [call("calculator", expression=f"{i}*2") for i in range(10)]
    agent, _ = make_agent(tmp_path, store, replies, max_steps=8)
    result = agent.run("Loop.", budget=Budget(max_steps=3))
    assert result.steps == 4  # three steps and the forced final call


def test_model_failure_marks_episode_failed(tmp_path, store):
    agent, _ = make_agent(tmp_path, store, [PLAN, ConnectionError("server down")])
    result = agent.run("Anything.")
    assert result.status == "failed" and "server down" in result.error
    assert store.get(result.episode_id).status == "failed"


@pytest.mark.parametrize("goal", ["", "   ", "x" * 5000])
def test_unusable_goal_is_refused_before_anything_is_stored(tmp_path, store, goal):
    agent, _ = make_agent(tmp_path, store, [PLAN])
    with pytest.raises(GoalError):
        agent.run(goal)
    assert store.list() == []


def test_tool_exception_is_an_observation(tmp_path, store):
    replies = [PLAN, call("calculator", expression="1/0"), call("finish", answer="undefined")]
    agent, model = make_agent(tmp_path, store, replies)
    result = agent.run("Divide by zero.")
    assert result.status == "done"
    observation = [s for s in store.get(result.episode_id).steps if s.kind == "observation"][0]
    assert observation.error and observation.message.content.startswith("Error:")


def test_iter_run_streams_steps_then_result(tmp_path, store):
    agent, _ = make_agent(tmp_path, store, [PLAN, call("finish", answer="hi")])
    events = list(agent.iter_run("Say hi."))
    assert isinstance(events[-1], AgentResult)
    assert [e.index for e in events[:-1]] == list(range(len(events) - 1))


class RecordingMemory:
    """Collects what the loop stores; isolates the loop's memory policy."""

    def __init__(self) -> None:
        self.added: list[tuple[str, list[str]]] = []

    def search(self, query, k=3, kind=None):
        return []

    def add(self, texts, kind, episode_id=None, metadata=None):
        self.added.append((kind, list(texts)))
        return [f"m{i}" for i in range(len(texts))]


@pytest.mark.parametrize(("origin", "remembered"), [("user", True), ("eval", False)])
def test_evaluation_episodes_leave_no_memories(tmp_path, store, origin, remembered):
    memory = RecordingMemory()
    replies = [PLAN, call("calculator", expression="6*7"), call("finish", answer="42")]
    agent, _ = make_agent(tmp_path, store, replies, memory=memory)
    agent.run("What is 6*7?", origin=origin)
    kinds = {kind for kind, _ in memory.added}
    assert (kinds == {"observation", "episode_summary"}) is remembered
    assert bool(memory.added) is remembered
