"""``finish``: the tool the model calls to end an episode with its final answer."""

from __future__ import annotations

from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field

__all__ = ["FINISH_TOOL", "FinishInput", "FinishTool"]

FINISH_TOOL = "finish"


class FinishInput(BaseModel):
    answer: str = Field(description="The final answer to the user's goal, complete and self-contained.")


class FinishTool(BaseTool):
    """Return the final answer unchanged; the agent loop ends the episode when it sees this tool."""

    name: str = FINISH_TOOL
    description: str = "Give the final answer and end the task. Call this once the goal is done."
    args_schema: type[BaseModel] = FinishInput

    def _run(self, answer: str) -> str:
        return answer
