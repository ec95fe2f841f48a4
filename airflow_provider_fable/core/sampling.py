"""Seeded, streaming samples spread over a whole source, in bounded memory.

A pilot of "the first 200 rows" sees whatever the source happens to put first (the oldest
tickets, one customer, one day); a review of "the first rows loaded" sees the first batch. Both
must be spread over the whole set. Selection here is *bottom-k by a keyed hash*: every item gets
a pseudo-random priority from ``blake2b(seed, key)`` and the k smallest win. That is

- uniform over the source (the hash is independent of position),
- streaming with memory for k items only (a bounded heap),
- deterministic and order-independent: the same seed picks the same ids whatever order a SQL
  query returns them in, so a pilot can be reproduced, and the submit and the load can agree on
  which records a QA sample will draw from without talking to each other.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def priority(seed: int | str, key: Any) -> int:
    """Pseudo-random 64-bit priority of ``key`` under ``seed`` (stable across processes).

    The blake2b of ``f"{seed}\x1f{key}"``: the seed's part is hashed once per seed and copied
    (half the cost of a fresh hasher: the submit asks twice per record, ~2 s per million).
    """
    hasher = _seeded(seed).copy()
    hasher.update(format(key, "").encode("utf-8", "surrogatepass"))
    return int.from_bytes(hasher.digest(), "big")


@lru_cache(maxsize=64)
def _seeded(seed: int | str) -> Any:
    return hashlib.blake2b(f"{seed}\x1f".encode("utf-8", "surrogatepass"), digest_size=8)


class BottomK(Generic[T]):
    """Keeps the ``k`` items with the smallest priority seen so far (a max-heap of size k)."""

    def __init__(self, k: int, seed: int | str = 0) -> None:
        if k < 0:
            raise ValueError(f"sample size must be >= 0, got {k}")
        self.k = k
        self.seed = seed
        self.seen = 0
        self._heap: list[tuple[int, int, T]] = []  # (-priority, position, item)

    def offer(self, key: Any, item: T) -> None:
        position = self.seen
        self.seen += 1
        if not self.k:
            return
        entry = (-priority(self.seed, key), position, item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry[0] > self._heap[0][0]:
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list[T]:
        """The chosen items in source order."""
        return [item for _, _, item in sorted(self._heap, key=lambda e: e[1])]

    def keys_by_priority(self) -> list[tuple[int, T]]:
        """(priority, item) pairs, lowest priority first."""
        return sorted(((-p, item) for p, _, item in self._heap), key=lambda e: e[0])

    def __len__(self) -> int:
        return len(self._heap)


def sample(
    items: Iterable[T], k: int, *, seed: int | str = 0, key: Callable[[T], Any]
) -> tuple[list[T], int]:
    """The seeded sample of ``k`` items (source order) and how many items the source had."""
    chooser: BottomK[T] = BottomK(k, seed)
    for item in items:
        chooser.offer(key(item), item)
    return chooser.items(), chooser.seen
