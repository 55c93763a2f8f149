"""A fast, deterministic chat model for daemon tests, loaded by the daemon as ``py:daemon_model:build``.

Unlike ScriptedChatModel it answers from the conversation, not a turn counter, so one
instance serves any number of goals: a plan, then (for "A*B" goals) a calculator call,
then ``finish``; "yes" to self-evaluation. ``SELFTUNE_TEST_MODEL_DELAY`` (seconds) makes
every call slow, so a test can kill or stop the daemon mid-goal. ``use_adapter`` records
the adapter it is switched to, like the local model's hot swap.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

_PRODUCT = re.compile(r"(\d+)\s*\*\s*(\d+)")
_OBSERVATION = re.compile(r"Observation from \w+:\n(.*?)\n\nIf this", re.DOTALL)


def _text(message: Any) -> tuple[str, str]:
    if isinstance(message, dict):
        return str(message.get("role", "")), str(message.get("content", ""))
    return str(getattr(message, "type", "")), str(message.content)


class DaemonTestModel(BaseChatModel):
    model_id: str = "daemon-test-model"
    adapter_version: str | None = None
    delay_s: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "daemon-test"

    def use_adapter(self, path: Path | None, version: str | None) -> None:
        self.adapter_version = version

    def _reply(self, messages: list[Any]) -> str:
        texts = [_text(m) for m in messages]
        last = texts[-1][1]
        if "Reply with one word: yes or no" in last:
            return "yes"
        goal_text = next((content for role, content in texts if content.startswith("Goal: ")), "")
        goal = goal_text.removeprefix("Goal: ").splitlines()[0] if goal_text else ""
        if not any(role in ("assistant", "ai") for role, _ in texts):
            return "Plan:\n1. Work it out.\n2. Finish."
        product = _PRODUCT.search(goal)
        observed = [found for _, content in texts for found in _OBSERVATION.findall(content)]
        if product and not observed:
            return json.dumps({"tool": "calculator", "arguments": {"expression": f"{product[1]}*{product[2]}"}})
        answer = observed[-1] if observed else f"echo: {goal}"
        return json.dumps({"tool": "finish", "arguments": {"answer": answer}})

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        if self.delay_s:
            time.sleep(self.delay_s)
        message = AIMessage(
            content=self._reply(messages),
            usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
            response_metadata={"model_id": self.model_id, "adapter_version": self.adapter_version, "latency_s": 0.001},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


def build() -> DaemonTestModel:
    return DaemonTestModel(delay_s=float(os.environ.get("SELFTUNE_TEST_MODEL_DELAY", "0")))
