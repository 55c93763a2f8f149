"""A chat model that replies from a script and records every prompt: isolates loop logic in tests and benchmarks."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field


class ScriptedChatModel(BaseChatModel):
    """Replies with ``replies`` in order (the last one repeats); a reply that is an Exception is raised."""

    replies: list[Any]
    prompts: list[list[BaseMessage]] = Field(default_factory=list)
    model_id: str = "scripted"
    adapter_version: str | None = None

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        turn = len(self.prompts)
        self.prompts.append(list(messages))
        reply = self.replies[min(turn, len(self.replies) - 1)]
        if isinstance(reply, Exception):
            raise reply
        message = AIMessage(
            content=reply,
            usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
            response_metadata={"model_id": self.model_id, "adapter_version": self.adapter_version, "latency_s": 0.01},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def prompt_text(self, turn: int) -> str:
        return "\n".join(str(message.content) for message in self.prompts[turn])
