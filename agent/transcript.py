"""The one mapping from stored transcripts to the messages a model sees.

The agent loop prompts the model with ``to_prompt_messages(transcript)`` and the
tuning data builder renders training examples with the same function, so a
tuned adapter is trained on exactly the format it will be prompted with.
Local chat templates differ in how (and whether) they accept the ``tool`` role
and ``tool_calls``, so both become plain text here: an assistant tool call is its
canonical JSON, and a tool result is a user turn that starts with ``Observation``.
"""

from __future__ import annotations

import json
from typing import Any

from selftune.memory.records import ChatMessage, ToolCall

__all__ = ["format_tool_call", "format_observation", "to_prompt_messages"]


def format_tool_call(call: ToolCall) -> str:
    """Canonical text of a tool call: compact JSON with the tool name first."""
    return json.dumps({"tool": call.name, "arguments": call.arguments}, ensure_ascii=False, separators=(", ", ": "))


def format_observation(tool_name: str, content: str) -> str:
    # The closing reminder is what gets small models to stop once they have the result.
    return f"Observation from {tool_name}:\n{content}\n\nIf this reaches the goal, call finish with the answer."


def to_prompt_messages(transcript: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat-template messages (role/content only) for a stored transcript."""
    rendered: list[dict[str, Any]] = []
    for message in transcript:
        if message.role == "assistant" and message.tool_calls:
            content = "\n".join(format_tool_call(call) for call in message.tool_calls)
        elif message.role == "tool":
            content = format_observation(message.name or "tool", message.content)
        else:
            content = message.content
        role = "user" if message.role == "tool" else message.role
        if rendered and rendered[-1]["role"] == role == "user":
            # Some templates reject two user turns in a row: merge them.
            rendered[-1]["content"] += "\n\n" + content
        else:
            rendered.append({"role": role, "content": content})
    return rendered
