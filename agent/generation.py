"""One call into any chat model with a token cap, whatever the backend names it."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool

__all__ = ["generate", "describe_model"]


def generate(
    model: BaseChatModel,
    messages: list[dict[str, Any]],
    max_tokens: int,
    assistant_prefix: str | None = None,
    tools: list[BaseTool] | None = None,
) -> AIMessage:
    """Invoke ``model``. On the local backend ``assistant_prefix`` starts the reply and ``tools``
    constrains it by grammar to one valid call of those tools."""
    from selftune.agent.local_chat import LocalChatModel  # the local backend pulls in torch

    if isinstance(model, LocalChatModel):
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens}
        if assistant_prefix:
            kwargs["assistant_prefix"] = assistant_prefix
        if tools:
            kwargs["tools"] = tools
    else:
        kwargs = {"max_tokens": max_tokens}
    reply = model.invoke(messages, **kwargs)
    assert isinstance(reply, AIMessage)
    return reply


def describe_model(model: BaseChatModel) -> tuple[str, str | None]:
    """(model id, active adapter version) of a chat model."""
    model_id = getattr(model, "model_id", None) or getattr(model, "model_name", None) or type(model).__name__
    return str(model_id), getattr(model, "adapter_version", None)
