"""Parse a model's reply into tool calls and validate them against the tools' schemas.

Every failure raises :class:`ToolCallError` with a message written for the model:
the loop shows it back as an observation so the model can correct itself.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from langchain_core.tools import BaseTool
from pydantic import BaseModel, ValidationError

from selftune.memory.records import ToolCall

__all__ = ["ToolCallError", "parse_tool_calls", "validate_tool_call", "without_empty_optionals"]

_NAME_KEYS = ("tool", "name", "function")
_ARGUMENT_KEYS = ("arguments", "args", "parameters", "input")


class ToolCallError(ValueError):
    """The model's reply is not a valid call of an offered tool."""


def _json_values(text: str) -> list[Any]:
    """Every top-level JSON object or array embedded in ``text``, in order."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        starts = [i for i in (text.find("{", position), text.find("[", position)) if i >= 0]
        if not starts:
            return values
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        values.append(value)
        position = end


def _to_call(value: Any) -> ToolCall:
    if not isinstance(value, dict):
        raise ToolCallError(f"expected a JSON object for a tool call, got {type(value).__name__}")
    name = next((value[key] for key in _NAME_KEYS if isinstance(value.get(key), str)), None)
    if name is None:
        raise ToolCallError('the tool call has no "tool" name: write {"tool": "<name>", "arguments": {...}}')
    arguments = next((value[key] for key in _ARGUMENT_KEYS if key in value), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ToolCallError(f'"arguments" of {name} must be a JSON object, got a string') from None
    if not isinstance(arguments, dict):
        raise ToolCallError(f'"arguments" of {name} must be a JSON object')
    return ToolCall(name=name, arguments=arguments)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls in a reply: one JSON object, a JSON list of them, or several objects in a row."""
    values = _json_values(text)
    if not values:
        raise ToolCallError('no JSON tool call found: reply with {"tool": "<name>", "arguments": {...}}')
    first = values[0]
    if isinstance(first, list):
        if not first:
            raise ToolCallError("the list of tool calls is empty")
        return [_to_call(item) for item in first]
    return [_to_call(value) for value in values if isinstance(value, dict)]


def without_empty_optionals(arguments: dict[str, Any], required: Collection[str]) -> dict[str, Any]:
    """``arguments`` without the ``null`` values of parameters outside ``required``: a model writes
    ``null`` for a parameter it means to leave out (the grammar admits it), so the call leaves it out."""
    return {name: value for name, value in arguments.items() if value is not None or name in required}


def validate_tool_call(call: ToolCall, tools: dict[str, BaseTool]) -> dict[str, Any]:
    """Arguments checked against the tool's pydantic schema (with defaults filled in); ``null`` for
    an optional parameter means left out (its default applies)."""
    tool = tools.get(call.name)
    if tool is None:
        raise ToolCallError(f"unknown tool {call.name!r}; available tools: {', '.join(sorted(tools))}")
    schema = tool.args_schema
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return call.arguments
    required = [name for name, field in schema.model_fields.items() if field.is_required()]
    arguments = without_empty_optionals(call.arguments, required)
    try:
        validated = schema.model_validate(arguments)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or 'arguments'}: {item['msg']}" for item in error.errors()
        )
        raise ToolCallError(f"invalid arguments for {call.name}: {problems}") from None
    return validated.model_dump(exclude_unset=False)
