"""Reuse of the key/value cache of earlier prompts that start the same way.

Agent steps share long prompt heads: the system text and tool schemas are the same for every
step and every goal, and within a goal each step's prompt extends the last one. A
:class:`PrefixCache` keeps the KV cache of a few recent sequences (prompt plus reply). A new
prompt takes the entry sharing the longest token prefix with it, cropped to that prefix, so
only the rest is prefilled; after generation the extended cache goes back in as that entry.

Reuse is exact by construction: keys and values of identical tokens at identical positions,
computed by the same weights. The owner clears the cache whenever the weights change (an
adapter switch); a changed tool set changes the prompt's tokens, so it only matches up to
where the prompts differ.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

__all__ = ["PrefixCache", "PrefixCacheStats"]


@dataclass
class PrefixCacheStats:
    calls: int = 0
    hits: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0


@dataclass(eq=False)  # entries are compared by identity
class _Entry:
    ids: torch.Tensor  # 1-D token ids whose keys/values ``cache`` holds (its first get_seq_length())
    cache: DynamicCache


@dataclass
class PrefixCache:
    """At most ``max_entries`` cached sequences; ``min_tokens`` is the shortest prefix worth reusing."""

    max_entries: int = 4
    min_tokens: int = 16
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _entries: list[_Entry] = field(default_factory=list)  # most recently used last
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, ids: torch.Tensor) -> DynamicCache:
        """A cache for generating after prompt ``ids`` (1-D): the best entry cropped to the shared
        prefix, removed from the cache (:meth:`put` returns it), or a fresh empty one."""
        with self._lock:
            self.stats.calls += 1
            best, shared = None, 0
            for entry in self._entries:
                length = _shared_prefix(entry.ids[: entry.cache.get_seq_length()], ids)
                if length > shared:
                    best, shared = entry, length
            shared = min(shared, ids.numel() - 1)  # the last prompt token is always run: it gives the logits
            if best is None or shared < self.min_tokens:
                self.stats.prefilled_tokens += ids.numel()
                return DynamicCache()
            self._entries.remove(best)
            best.cache.crop(shared - best.cache.get_seq_length())  # a negative count: tokens to drop
            self.stats.hits += 1
            self.stats.reused_tokens += shared
            self.stats.prefilled_tokens += ids.numel() - shared
            return best.cache

    def put(self, ids: torch.Tensor, cache: DynamicCache) -> None:
        """Keep ``cache``, which holds keys/values for a prefix of the 1-D ``ids``."""
        if self.max_entries <= 0 or cache.get_seq_length() < self.min_tokens:
            return
        with self._lock:
            self._entries.append(_Entry(ids=ids.detach().clone(), cache=cache))
            del self._entries[: -self.max_entries]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _shared_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n
