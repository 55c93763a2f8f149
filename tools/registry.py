"""Build the tool list for one episode from settings: built-ins by name plus ``module:attribute`` extras.

Building only constructs tool objects (no files, folders or processes), so it
is cheap enough to do once per episode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from langchain_core.tools import BaseTool

from selftune.importing import import_object
from selftune.settings import ConfigError, ToolSettings
from selftune.tools.calculator import CalculatorTool
from selftune.tools.finish import FINISH_TOOL, FinishTool
from selftune.tools.memory_tools import MemorySaveTool, MemorySearchTool, MemoryStore
from selftune.tools.python_exec import PythonTool
from selftune.tools.workspace import ListFilesTool, ReadFileTool, WriteFileTool

__all__ = ["ToolContext", "ToolFactory", "BUILTIN_TOOLS", "build_tools", "load_extra_tool"]


@dataclass(frozen=True)
class ToolContext:
    """What the built-in tools of one episode are bound to."""

    workspace_dir: Path
    memory: MemoryStore | None = None  # None: the memory tools are left out
    episode_id: str | None = None
    settings: ToolSettings = field(default_factory=ToolSettings)


ToolFactory = Callable[[ToolContext], BaseTool | None]
"""Builds one built-in tool for a context, or returns None when the context cannot support it."""


def _workspace_kwargs(context: ToolContext) -> dict[str, object]:
    return {"root": context.workspace_dir, "max_file_bytes": context.settings.max_file_bytes}


_BUILTINS: dict[str, ToolFactory] = {
    "calculator": lambda context: CalculatorTool(),
    "read_file": lambda context: ReadFileTool(**_workspace_kwargs(context)),
    "write_file": lambda context: WriteFileTool(**_workspace_kwargs(context)),
    "list_files": lambda context: ListFilesTool(**_workspace_kwargs(context)),
    "python": lambda context: PythonTool(
        timeout_s=context.settings.python_timeout_s, memory_mb=context.settings.python_memory_mb
    ),
    "memory_search": lambda context: (
        MemorySearchTool(memory=context.memory) if context.memory is not None else None
    ),
    "memory_save": lambda context: (
        MemorySaveTool(memory=context.memory, episode_id=context.episode_id) if context.memory is not None else None
    ),
    FINISH_TOOL: lambda context: FinishTool(),
}

BUILTIN_TOOLS: tuple[str, ...] = tuple(_BUILTINS)


def load_extra_tool(spec: str) -> BaseTool:
    """Tool named by ``'module:attribute'``: a BaseTool instance, a BaseTool subclass or a zero-arg factory."""
    where = f"tools.extra entry {spec!r}"
    target = import_object(spec, where)
    if isinstance(target, BaseTool):
        return target
    if (isinstance(target, type) and not issubclass(target, BaseTool)) or not callable(target):
        raise ConfigError(f"{where}: expected a BaseTool, a BaseTool subclass or a factory, got {target!r}")
    try:
        tool = target()
    except Exception as error:
        raise ConfigError(f"{where}: calling it failed: {error}") from error
    if not isinstance(tool, BaseTool):
        raise ConfigError(f"{where}: calling it returned {type(tool).__name__}, not a BaseTool")
    return tool


def build_tools(context: ToolContext) -> list[BaseTool]:
    """Enabled built-ins in order, then extras; ``finish`` is added last when not listed."""
    tools: list[BaseTool] = []
    for name in context.settings.enabled:
        factory = _BUILTINS.get(name)
        if factory is None:
            raise ConfigError(f"tools.enabled: unknown tool {name!r}; valid names: {', '.join(BUILTIN_TOOLS)}")
        tool = factory(context)
        if tool is not None:
            tools.append(tool)
    tools.extend(load_extra_tool(spec) for spec in context.settings.extra)
    if FINISH_TOOL not in context.settings.enabled:
        tools.append(FinishTool())
    duplicates = sorted(name for name, count in Counter(tool.name for tool in tools).items() if count > 1)
    if duplicates:
        raise ConfigError(f"tools: more than one tool is named {', '.join(map(repr, duplicates))}")
    return tools
