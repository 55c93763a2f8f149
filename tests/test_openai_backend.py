"""The OpenAI-compatible backend's native tool calling, through the real client over real HTTP.

The server is a small OpenAI-protocol endpoint on a loopback port that replies from a script
and records every request: it stands in for vLLM / llama.cpp / Ollama, which are not here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from selftune.agent.chat_models import build_chat_model
from selftune.agent.loop import Agent
from selftune.bfcl.harness import evaluate_category
from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import Verifier
from selftune.settings import AgentSettings, ModelSettings, ToolSettings
from selftune.tools.registry import ToolContext, build_tools


class OpenAIScript:
    """Replies for requests with tools (``tool_replies``, in order) and without (``text``)."""

    def __init__(self) -> None:
        self.tool_replies: list[dict[str, Any]] = []
        self.text = "1. Use the calculator.\n2. Finish."
        self.requests: list[dict[str, Any]] = []

    def reply(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        message = self.tool_replies.pop(0) if request.get("tools") else {"role": "assistant", "content": self.text}
        return {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": request["model"],
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57},
        }


def tool_calls(*calls: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for i, (name, args) in enumerate(calls)
    ]}


@pytest.fixture
def server() -> Iterator[tuple[str, OpenAIScript]]:
    script = OpenAIScript()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps(script.reply(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", script
    httpd.shutdown()
    httpd.server_close()


def chat_model(base_url: str):
    return build_chat_model(ModelSettings(name="openai:served-model", openai_base_url=base_url), Path("/nonexistent"))


def test_agent_loop_uses_native_tool_calls(server, tmp_path: Path) -> None:
    base_url, script = server
    script.tool_replies = [tool_calls(("calculator", {"expression": "17*23+4"})),
                           tool_calls(("finish", {"answer": "395"}))]
    tool_settings = ToolSettings(enabled=["calculator", "finish"])
    with EpisodeStore(tmp_path / "episodes.sqlite3") as store:
        agent = Agent(chat_model(base_url),
                      lambda episode_id: build_tools(ToolContext(workspace_dir=tmp_path / "ws", memory=None,
                                                                 episode_id=episode_id, settings=tool_settings)),
                      store, AgentSettings(self_eval=False))
        result = agent.run("What is 17*23+4?", verifier=Verifier(kind="number", expected="395"))
        episode = store.get(result.episode_id)

    assert (result.status, result.answer, result.steps) == ("done", "395", 2)
    plan_request, first_action, _ = script.requests
    assert "tools" not in plan_request  # the plan is free text
    offered = {tool["function"]["name"]: tool["function"] for tool in first_action["tools"]}
    assert set(offered) == {"calculator", "finish"}
    assert offered["calculator"]["parameters"]["required"] == ["expression"]
    assert first_action["tool_choice"] == "required" and first_action["parallel_tool_calls"] is False
    # The native call is logged in the shared text form, so training and parsing see one format.
    action = next(step for step in episode.steps if step.kind == "action")
    assert json.loads(action.message.content) == {"tool": "calculator", "arguments": {"expression": "17*23+4"}}
    assert action.message.tool_calls[0].name == "calculator" and action.tokens_out == 7
    assert any(step.message.content == "395" for step in episode.steps if step.kind == "observation")


def test_native_reply_without_a_call_is_an_error_observation(server, tmp_path: Path) -> None:
    base_url, script = server
    script.tool_replies = [{"role": "assistant", "content": "I think it is 395."},
                           tool_calls(("finish", {"answer": "395"}))]
    with EpisodeStore(tmp_path / "episodes.sqlite3") as store:
        agent = Agent(chat_model(base_url),
                      lambda episode_id: build_tools(ToolContext(
                          workspace_dir=tmp_path / "ws", memory=None, episode_id=episode_id,
                          settings=ToolSettings(enabled=["finish"]))),
                      store, AgentSettings(self_eval=False, plan=False))
        result = agent.run("What is 17*23+4?")
        episode = store.get(result.episode_id)

    assert (result.status, result.answer) == ("done", "395")
    failed = next(step for step in episode.steps if step.kind == "action")
    assert failed.message.content == "I think it is 395." and "no JSON tool call" in failed.error


def test_bfcl_harness_on_a_server_abstains_and_makes_parallel_calls(server) -> None:
    base_url, script = server
    script.tool_replies = [{"role": "assistant", "content": "No function can tell the weather."}]
    irrelevance = evaluate_category(chat_model(base_url), "irrelevance", limit=1)
    assert irrelevance.accuracy == 1.0 and irrelevance.parse_rate == 1.0
    assert script.requests[-1]["tool_choice"] == "auto"
    assert json.loads(irrelevance.records[0].raw)["tool"] == "none"

    # Parallel: replay the gold answer of the first sampled question as two native calls.
    from selftune.bfcl import gold_calls, load_category, tool_name

    question, answer = next(iter(load_category("parallel", limit=1)))
    gold = gold_calls(question, answer)
    script.tool_replies = [tool_calls(*[(tool_name(name), arguments) for name, arguments in gold])]
    parallel = evaluate_category(chat_model(base_url), "parallel", limit=1)
    assert script.requests[-1]["parallel_tool_calls"] is True
    assert len(json.loads(parallel.records[0].raw)) == len(gold) >= 2
    assert parallel.accuracy == 1.0, parallel.records[0].error
