"""Per-user rate limit, shared by the platform adapters.

A sliding window of the last minute's messages per user. Past the limit the user is
told once (NOTIFY), then further messages are dropped (SILENT) until the window has
room again, so a flood costs neither model time nor a growing queue.

The table holds only users seen within about two windows: every `window` seconds,
users idle for a whole window are dropped, so a stream of new users cannot grow it
without bound.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum


class Verdict(Enum):
    ALLOW = "allow"
    NOTIFY = "notify"  # over the limit: tell the user, once
    SILENT = "silent"  # over the limit and already told


class RateLimiter:
    def __init__(
        self,
        per_minute: int,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.window = window
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._told: set[str] = set()
        self._swept = clock()

    def __len__(self) -> int:
        """Users currently tracked."""
        return len(self._seen)

    def check(self, user: str) -> Verdict:
        """Record a message from `user` and say whether to answer it."""
        if self.per_minute <= 0:
            return Verdict.ALLOW
        now = self._clock()
        if now - self._swept >= self.window:
            self.forget_idle()
        seen = self._seen.setdefault(user, deque())
        while seen and now - seen[0] >= self.window:
            seen.popleft()
        if len(seen) < self.per_minute:
            seen.append(now)
            self._told.discard(user)
            return Verdict.ALLOW
        if user in self._told:
            return Verdict.SILENT
        self._told.add(user)
        return Verdict.NOTIFY

    def retry_after(self, user: str) -> float:
        """Seconds until `user` may send again."""
        seen = self._seen.get(user)
        if not seen:
            return 0.0
        return max(0.0, self.window - (self._clock() - seen[0]))

    def forget_idle(self) -> None:
        """Drop users with no message in the window, so the table stays bounded."""
        now = self._clock()
        self._swept = now
        for user in [u for u, s in self._seen.items() if not s or now - s[-1] >= self.window]:
            del self._seen[user]
            self._told.discard(user)


def rate_limit_note(seconds: float) -> str:
    return (
        "You're sending messages faster than I can answer. "
        f"Please wait about {max(1, round(seconds))} s and try again."
    )
