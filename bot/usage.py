"""Per-person daily token allowances (USER_DAILY_TOKENS): what a person has used
today, what they are told past the limit and on /usage.

A day is a UTC day. What counts: the prompt's tokens read for the person's message
(history included, as a server bills them) and the reply's tokens. The counters live
in the conversation store (`bot.store.memory`): across replicas with Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class Usage:
    """A person's use today, their limit (0: none) and when the day ends."""

    used: int
    limit: int
    resets_at: datetime

    @property
    def exhausted(self) -> bool:
        return self.limit > 0 and self.used >= self.limit


def today(now: datetime | None = None) -> tuple[str, datetime]:
    """The UTC day's key (ISO date) and the moment it ends."""
    now = now or datetime.now(UTC)
    start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start.date().isoformat(), start + timedelta(days=1)


def _until(resets_at: datetime, now: datetime | None = None) -> str:
    left = max(0, int((resets_at - (now or datetime.now(UTC))).total_seconds()))
    hours, minutes = divmod(left // 60, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{max(minutes, 1)} min"


def limit_note(usage: Usage, now: datetime | None = None) -> str:
    """Said once a day, when a person's message meets a spent allowance."""
    return (
        f"You've used today's allowance of {usage.limit:,} tokens. I'll answer again "
        f"after {usage.resets_at:%H:%M} UTC (in {_until(usage.resets_at, now)}); "
        "until then I'll stay quiet."
    )


def describe_usage(usage: Usage, now: datetime | None = None) -> str:
    """The private answer to /usage."""
    if usage.limit == 0:
        return "There is no daily limit here, so nothing is counted."
    left = max(0, usage.limit - usage.used)
    return (
        f"Today you've used {usage.used:,} of your {usage.limit:,} tokens "
        f"({left:,} left); the count starts again at {usage.resets_at:%H:%M} UTC "
        f"(in {_until(usage.resets_at, now)})."
    )
