"""Vector memory at scale: batched against one-by-one ingest, and query latency with the local embedder.

Texts are seeded synthetic sentences (distinct, varied vocabulary). Ingest runs in batches up to
``size`` memories, then the same number of extra texts is written one call per text on a small
sample, side by side. Queries are fresh texts (so the embedding cache cannot help) and then the
same texts again (served from the cache); each latency includes embedding the query.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from selftune.memory.vector import VectorMemory

__all__ = ["run_memory_bench"]

_SUBJECTS = ["the build", "a user", "the calculator", "the report", "an adapter", "the daemon", "the planner",
             "a tool call", "the memory", "the scheduler", "a goal", "the tokenizer", "an episode", "the server"]
_VERBS = ["failed on", "returned", "needs", "cached", "rejected", "measured", "wrote", "skipped", "parsed", "saved"]
_OBJECTS = ["the config file", "a JSON list", "port 8765", "the held-out suite", "a stale lease", "the CSV export",
            "an empty answer", "the LoRA weights", "the chat page", "a timeout", "the weather API", "a prime number"]


def _texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} at step {rng.randrange(10**6)} "
            f"(note {index}, tag {rng.randrange(10**4):04d})" for index in range(count)]


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def run_memory_bench(size: int = 100_000, batch: int = 512, queries: int = 200, single_writes: int = 200) -> dict[str, Any]:
    """Ingest ``size`` memories in batches, compare with single writes, then time ``queries`` searches."""
    with tempfile.TemporaryDirectory(prefix="selftune-bench-memory-") as tmp:
        memory = VectorMemory(Path(tmp) / "chroma", collection="bench")
        memory.search("warm up the embedder", k=1)
        texts = _texts(size, seed=1)
        start = time.perf_counter()
        for offset in range(0, size, batch):
            memory.add(texts[offset:offset + batch], kind="observation")
        batched_s = time.perf_counter() - start

        singles = _texts(single_writes, seed=2)
        start = time.perf_counter()
        for text in singles:
            memory.add([text], kind="observation")
        single_s = time.perf_counter() - start

        probes = _texts(queries, seed=3)
        fresh, cached = [], []
        for latencies in (fresh, cached):
            for text in probes:
                start = time.perf_counter()
                hits = memory.search(text, k=5)
                latencies.append(1000 * (time.perf_counter() - start))
                assert len(hits) == 5
        count = memory.count()

    batched_rate = size / batched_s
    single_rate = single_writes / single_s
    return {
        "benchmark": "memory",
        "memories": count,
        "ingest": {
            "batched_per_s": round(batched_rate, 1),
            "batch_size": batch,
            "single_per_s": round(single_rate, 1),
            "batched_vs_single": round(batched_rate / single_rate, 2),
        },
        "query_ms": {
            "k": 5,
            "fresh_p50": round(_percentile(fresh, 50), 2),
            "fresh_p95": round(_percentile(fresh, 95), 2),
            "cached_p50": round(_percentile(cached, 50), 2),
            "cached_p95": round(_percentile(cached, 95), 2),
            "fresh_vs_cached_p95": round(_percentile(fresh, 95) / _percentile(cached, 95), 2),
        },
    }
