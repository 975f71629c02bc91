"""A bounded set of recently seen ids, for the adapters' per-thread and per-channel
knowledge: the least recently used id goes first past `capacity`, and an id older
than `ttl` seconds counts as unknown (so a stale answer gets looked up again)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, cast

K = TypeVar("K", bound=Hashable)


class RecentSet(Generic[K]):
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
        self._items: OrderedDict[K, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        if key not in self._items:
            return False
        known = cast(K, key)
        if self.ttl is not None and self._clock() - self._items[known] >= self.ttl:
            del self._items[known]
            return False
        self._items.move_to_end(known)
        return True

    def add(self, key: K) -> None:
        self._items[key] = self._clock()
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        self._items.pop(key, None)
