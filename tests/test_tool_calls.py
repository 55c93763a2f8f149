"""Parsing and validating tool calls from model text."""

from __future__ import annotations

import pytest
from langchain_core.tools import tool

from selftune.agent.tool_calls import ToolCallError, parse_tool_calls, validate_tool_call
from selftune.agent.transcript import format_tool_call, to_prompt_messages
from selftune.memory.records import ChatMessage, ToolCall


@tool
def add(a: int, b: int = 1) -> int:
    """Add two integers."""
    return a + b


TOOLS = {"add": add}


@pytest.mark.parametrize(
    "text",
    [
        '{"tool": "add", "arguments": {"a": 2, "b": 3}}',
        'Sure! ```json\n{"tool": "add", "arguments": {"a": 2, "b": 3}}\n``` done',
        '{"name": "add", "parameters": {"a": 2, "b": 3}}',
        '{"tool": "add", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}',
        'junk { not json } then {"tool": "add", "arguments": {"a": 2, "b": 3}}',
    ],
)
def test_accepted_shapes(text):
    (call,) = parse_tool_calls(text)
    assert call.name == "add" and call.arguments == {"a": 2, "b": 3}


def test_several_calls_in_one_reply():
    calls = parse_tool_calls('[{"tool": "add", "arguments": {"a": 1}}, {"tool": "add", "arguments": {"a": 2}}]')
    assert [c.arguments["a"] for c in calls] == [1, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("the answer is 5", "no JSON tool call"),
        ('{"arguments": {"a": 1}}', 'no "tool" name'),
        ('{"tool": "add", "arguments": [1, 2]}', "must be a JSON object"),
        ("[]", "empty"),
    ],
)
def test_malformed_replies_raise_a_message_for_the_model(text, message):
    with pytest.raises(ToolCallError, match=message):
        parse_tool_calls(text)


def test_validation_fills_defaults_and_coerces():
    assert validate_tool_call(ToolCall(name="add", arguments={"a": "2"}), TOOLS) == {"a": 2, "b": 1}


def test_null_for_an_optional_argument_means_left_out_but_not_for_a_required_one():
    assert validate_tool_call(ToolCall(name="add", arguments={"a": 2, "b": None}), TOOLS) == {"a": 2, "b": 1}
    with pytest.raises(ToolCallError, match="invalid arguments for add: a"):
        validate_tool_call(ToolCall(name="add", arguments={"a": None}), TOOLS)


def test_validation_names_the_bad_argument():
    with pytest.raises(ToolCallError, match="a: .*"):
        validate_tool_call(ToolCall(name="add", arguments={"a": "two"}), TOOLS)
    with pytest.raises(ToolCallError, match="unknown tool 'mul'; available tools: add"):
        validate_tool_call(ToolCall(name="mul", arguments={}), TOOLS)


def test_transcript_renders_calls_and_observations_as_plain_turns():
    call = ToolCall(name="add", arguments={"a": 1})
    transcript = [
        ChatMessage(role="system", content="sys"),
        ChatMessage(role="user", content="goal"),
        ChatMessage(role="assistant", content="raw text", tool_calls=[call]),
        ChatMessage(role="tool", content="2", tool_call_id=call.id, name="add"),
        ChatMessage(role="user", content="again"),
    ]
    rendered = to_prompt_messages(transcript)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[2]["content"] == format_tool_call(call)
    assert rendered[3]["content"].startswith("Observation from add:\n2\n")
    assert rendered[3]["content"].endswith("\n\nagain")
    assert parse_tool_calls(rendered[2]["content"])[0].arguments == {"a": 1}
