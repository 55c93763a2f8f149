"""``memory_search`` and ``memory_save``: the agent's view of long-term vector memory.

The tools depend only on the :class:`MemoryStore` protocol below, which the
Chroma-backed store in ``selftune.memory.vector`` satisfies; tests use fakes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

__all__ = [
    "MemoryMatch", "MemoryStore", "MemorySearchInput", "MemorySaveInput",
    "MemorySearchTool", "MemorySaveTool", "FACT_KIND", "MAX_MEMORY_CHARS", "MAX_SEARCH_K",
]

FACT_KIND = "fact"
MAX_MEMORY_CHARS = 2000
MAX_SEARCH_K = 20


class MemoryMatch(Protocol):
    """One search result: the stored text, its kind, source episode and distance (lower is closer)."""

    @property
    def text(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def episode_id(self) -> str | None: ...

    @property
    def distance(self) -> float: ...


@runtime_checkable
class MemoryStore(Protocol):
    """What the memory tools need from a vector memory."""

    def search(self, query: str, k: int = 3, kind: str | None = None) -> list[MemoryMatch]: ...

    def add(
        self,
        texts: list[str],
        kind: str,
        episode_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> list[str]: ...


class MemorySearchInput(BaseModel):
    query: str = Field(min_length=1, description="What to look for, in plain words.")
    k: int = Field(3, ge=1, le=MAX_SEARCH_K, description="How many memories to return.")


class MemorySaveInput(BaseModel):
    text: str = Field(
        min_length=1,
        max_length=MAX_MEMORY_CHARS,
        description="A short, self-contained fact worth remembering for later tasks.",
    )


class MemorySearchTool(BaseTool):
    """Search long-term memory."""

    name: str = "memory_search"
    description: str = "Search long-term memory for facts and past experiences related to a query."
    args_schema: type[BaseModel] = MemorySearchInput
    memory: MemoryStore

    def _run(self, query: str, k: int = 3) -> str:
        if not query.strip():
            raise ToolException("query is empty")
        hits = self.memory.search(query.strip(), k=k)
        if not hits:
            return "no matching memories"
        return "\n".join(
            f"{number}. [{hit.kind}, distance {hit.distance:.2f}] {hit.text}"
            for number, hit in enumerate(hits, start=1)
        )


class MemorySaveTool(BaseTool):
    """Save a fact to long-term memory."""

    name: str = "memory_save"
    description: str = "Save a fact to long-term memory so it can be found in later tasks."
    args_schema: type[BaseModel] = MemorySaveInput
    memory: MemoryStore
    episode_id: str | None = None

    def _run(self, text: str) -> str:
        if not text.strip():
            raise ToolException("text is empty")
        self.memory.add([text.strip()], kind=FACT_KIND, episode_id=self.episode_id)
        return "saved to memory"
