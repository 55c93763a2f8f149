"""Long-term semantic memory: texts with a kind, searched by meaning (Chroma, cosine space)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import chromadb
from chromadb.config import Settings as ChromaSettings
from pydantic import BaseModel

from selftune.memory.embeddings import DEFAULT_EMBEDDING_MODEL, LocalSentenceTransformerEmbedding
from selftune.memory.records import new_id, utc_now

__all__ = ["MemoryHit", "VectorMemory"]


class MemoryHit(BaseModel):
    id: str
    text: str
    kind: str
    episode_id: str | None = None
    distance: float
    created_at: datetime


class VectorMemory:
    """A persistent Chroma collection of memories (kinds: observation, fact, episode_summary)."""

    def __init__(
        self,
        path: Path,
        collection: str = "memories",
        embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    ) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._client = chromadb.PersistentClient(
            path=str(path), settings=ChromaSettings(anonymized_telemetry=False)
        )
        self._collection = self._client.get_or_create_collection(
            name=collection,
            embedding_function=LocalSentenceTransformerEmbedding(embedding_model),
            configuration={"hnsw": {"space": "cosine"}},
        )
        persisted = (self._collection.configuration_json.get("embedding_function") or {}).get("config", {})
        if persisted.get("model", embedding_model) != embedding_model:
            raise ValueError(
                f"collection {collection!r} in {path} was embedded with {persisted['model']!r}, not "
                f"{embedding_model!r}; use another collection name to switch embedding models"
            )

    def add(
        self,
        texts: list[str],
        kind: str,
        episode_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> list[str]:
        """Store the non-empty ``texts`` in one batch; returns their ids."""
        documents = [text for text in texts if text and text.strip()]
        if not documents:
            return []
        base = {key: value for key, value in (metadata or {}).items() if value is not None}
        base.update(kind=kind, created_at=utc_now().isoformat())
        if episode_id is not None:
            base["episode_id"] = episode_id
        ids = [new_id("mem_") for _ in documents]
        self._collection.add(ids=ids, documents=documents, metadatas=[dict(base) for _ in documents])
        return ids

    def search(self, query: str, k: int = 3, kind: str | None = None) -> list[MemoryHit]:
        """The ``k`` memories closest in meaning to ``query``, closest first, optionally of one kind."""
        if k <= 0 or not query.strip():
            return []
        result = self._collection.query(  # fewer than k stored: Chroma returns what there is
            query_texts=[query],
            n_results=k,
            where={"kind": kind} if kind else None,
            include=["documents", "metadatas", "distances"],
        )
        rows = zip(result["ids"][0], result["documents"][0], result["metadatas"][0], result["distances"][0])
        return [
            MemoryHit(
                id=id_,
                text=text,
                kind=str(meta["kind"]),
                episode_id=meta.get("episode_id"),
                distance=distance,
                created_at=meta["created_at"],
            )
            for id_, text, meta, distance in rows
        ]

    def count(self) -> int:
        return self._collection.count()

    def remove_duplicates(self, page: int = 1000) -> int:
        """Delete memories whose kind and text repeat an older one; returns how many went."""
        oldest: dict[tuple[str, str], tuple[str, str]] = {}  # (kind, text) -> (created_at, id)
        duplicates: list[str] = []
        offset = 0
        while (rows := self._collection.get(include=["documents", "metadatas"], limit=page, offset=offset))["ids"]:
            for id_, text, meta in zip(rows["ids"], rows["documents"], rows["metadatas"]):
                key, created = (str(meta.get("kind")), text or ""), str(meta.get("created_at", ""))
                kept = oldest.setdefault(key, (created, id_))
                if kept[1] == id_:
                    continue
                if created < kept[0]:
                    duplicates.append(kept[1])
                    oldest[key] = (created, id_)
                else:
                    duplicates.append(id_)
            offset += page
        for start in range(0, len(duplicates), 500):
            self._collection.delete(ids=duplicates[start:start + 500])
        return len(duplicates)
