"""Helper module, no tests: extra tools that test_tools.py loads by 'module:attribute'."""

from __future__ import annotations

from langchain_core.tools import BaseTool, tool
from pydantic import BaseModel, Field

NOT_A_TOOL = 42


class NotATool:
    """A class that is not a BaseTool."""


class EchoInput(BaseModel):
    text: str = Field(description="Text to echo back.")


@tool("shout", args_schema=EchoInput)
def shout(text: str) -> str:
    """Return the text in upper case."""
    return text.upper()


class EchoTool(BaseTool):
    name: str = "echo"
    description: str = "Return the text unchanged."
    args_schema: type[BaseModel] = EchoInput

    def _run(self, text: str) -> str:
        return text


class _ReverseTool(EchoTool):
    name: str = "reverse"
    description: str = "Return the text reversed."

    def _run(self, text: str) -> str:
        return text[::-1]


def make_reverse_tool() -> BaseTool:
    return _ReverseTool()


def make_not_a_tool() -> str:
    return "not a tool"


def make_failing_tool() -> BaseTool:
    raise RuntimeError("factory exploded")


class _ClashTool(EchoTool):
    name: str = "calculator"


calculator_clash = _ClashTool()
