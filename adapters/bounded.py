"""Bounded tables of recently seen ids, for the adapters' per-thread, per-channel and
per-user knowledge: the least recently used entry goes first past `capacity`, and an
entry older than its time to live counts as unknown (so a stale answer gets looked up
again).

`RecentMap` keeps a value per key (a person's display name), each entry with its own
time to live if need be (a failed look-up is kept for less long); `RecentSet` is the
same table with no values.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, cast

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RecentMap(Generic[K, V]):
    def __init__(
        self,
        capacity: int,
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        # key -> (when it expires, or None: never; value), least recently used first
        self._items: OrderedDict[K, tuple[float | None, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return self._live(key) is not None

    def get(self, key: K, default: V | None = None) -> V | None:
        """The key's value (now the most recently used), or `default` if unknown."""
        entry = self._live(key)
        return default if entry is None else entry[1]

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        """Remember `value` for `ttl` seconds (None: the table's own time to live)."""
        ttl = self.ttl if ttl is None else ttl
        self._items[key] = (None if ttl is None else self._clock() + ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        self._items.pop(key, None)

    def _live(self, key: object) -> tuple[float | None, V] | None:
        entry = self._items.get(cast(K, key))
        if entry is None:
            return None
        known = cast(K, key)
        if entry[0] is not None and self._clock() >= entry[0]:
            del self._items[known]
            return None
        self._items.move_to_end(known)
        return entry


class RecentSet(RecentMap[K, None]):
    """A RecentMap of keys alone: whether an id was seen lately."""

    def add(self, key: K) -> None:
        self.put(key, None)
