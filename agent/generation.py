"""One call into any chat model with a token cap and, optionally, the tools it must call.

Every backend answers a tool call in the same text form, ``{"tool": ..., "arguments": ...}``
(a JSON list for several calls), so parsing, validation and the transcript are one path: the
local backend decodes that text under a grammar; a backend with native tool calling (an
OpenAI-compatible server) is asked through its ``tools`` API and its calls are written back
in that form.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Sequence

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage

from selftune.agent.constrained import NO_CALL_TOOL, openai_functions

__all__ = ["generate", "describe_model"]


def generate(
    model: BaseChatModel,
    messages: Sequence[Any],
    max_tokens: int,
    assistant_prefix: str | None = None,
    tools: Sequence[Any] | None = None,
    allow_no_call: bool = False,
    max_calls: int = 1,
    temperature: float | None = None,
) -> AIMessage:
    """Invoke ``model``.

    ``tools`` (LangChain tools or OpenAI function dicts) restrict the reply to calls of those
    tools: by grammar on the local backend (where ``assistant_prefix`` starts the reply), by
    the server's native tool calling elsewhere. ``allow_no_call`` admits the no-call answer
    (:data:`NO_CALL_TOOL`), ``max_calls`` above 1 a list of calls. A backend without native
    tool calling gets the prompt alone.
    """
    from selftune.agent.local_chat import LocalChatModel  # the local backend pulls in torch

    options: dict[str, Any] = {} if temperature is None else {"temperature": temperature}
    if isinstance(model, LocalChatModel):
        options["max_new_tokens"] = max_tokens
        if assistant_prefix:
            options["assistant_prefix"] = assistant_prefix
        if tools:
            options.update(tools=list(tools), allow_no_call=allow_no_call, max_calls=max_calls)
        return _ai_message(model.invoke(list(messages), **options))
    options["max_tokens"] = max_tokens
    if tools:
        native = _with_native_tools(model, tools, allow_no_call, max_calls)
        if native is not None:
            return _as_call_text(_ai_message(native.invoke(list(messages), **options)), allow_no_call)
    return _ai_message(model.invoke(list(messages), **options))


def _with_native_tools(model: BaseChatModel, tools: Sequence[Any], allow_no_call: bool, max_calls: int) -> Any:
    """``model`` bound to ``tools`` through its tool-calling API, or None when it has none."""
    functions = [{"type": "function", "function": function} for function in openai_functions(tools)]
    options: dict[str, Any] = {"tool_choice": "auto" if allow_no_call else "required"}
    if "parallel_tool_calls" in inspect.signature(model.bind_tools).parameters:
        options["parallel_tool_calls"] = max_calls > 1
    try:
        return model.bind_tools(functions, **options)
    except NotImplementedError:
        return None


def _as_call_text(reply: AIMessage, allow_no_call: bool) -> AIMessage:
    """The reply's native tool calls rewritten as the text form every backend shares.

    No call at all becomes the no-call answer (with the reply's text as the reason) when it is
    allowed; otherwise the text stays as it is, and parsing reports that no call was made.
    """
    calls = [{"tool": call["name"], "arguments": call["args"]} for call in reply.tool_calls]
    if calls:
        text = json.dumps(calls[0] if len(calls) == 1 else calls)
    elif allow_no_call:
        text = json.dumps({"tool": NO_CALL_TOOL, "arguments": {"reason": str(reply.content)}})
    else:
        text = str(reply.content)
    return AIMessage(content=text, usage_metadata=reply.usage_metadata, response_metadata=reply.response_metadata)


def _ai_message(reply: Any) -> AIMessage:
    assert isinstance(reply, AIMessage)
    return reply


def describe_model(model: BaseChatModel) -> tuple[str, str | None]:
    """(model id, active adapter version) of a chat model."""
    model_id = getattr(model, "model_id", None) or getattr(model, "model_name", None) or type(model).__name__
    return str(model_id), getattr(model, "adapter_version", None)
