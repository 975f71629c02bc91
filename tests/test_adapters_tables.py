"""The adapters' in-process tables keyed by user, channel, thread or event stay
bounded: they shrink by expiry or least-recent use, with nobody calling a sweep."""

from __future__ import annotations

from adapters.bounded import RecentSet
from bot.store.dedupe import InProcessDedupe
from bot.streaming import EditPacer


def test_recent_set_drops_the_least_recently_used() -> None:
    known: RecentSet[int] = RecentSet(3)
    for thread in (1, 2, 3):
        known.add(thread)
    assert 1 in known  # used: now the most recent
    known.add(4)
    assert [t for t in (1, 2, 3, 4) if t in known] == [1, 3, 4]
    for thread in range(10_000):
        known.add(thread)
    assert len(known) == 3


def test_recent_set_forgets_after_its_ttl() -> None:
    now = [0.0]
    known: RecentSet[str] = RecentSet(10, ttl=60, clock=lambda: now[0])
    known.add("thread")
    now[0] = 59
    assert "thread" in known
    now[0] = 60
    assert "thread" not in known and len(known) == 0


async def test_in_process_dedupe_drops_expired_keys_as_it_goes() -> None:
    now = [0.0]
    dedupe = InProcessDedupe(ttl_seconds=600, clock=lambda: now[0])
    for i in range(5000):
        assert await dedupe.first(f"C1:{i}")
        now[0] += 1
    assert len(dedupe) == 600  # the last ten minutes' events, however many came before
    assert not await dedupe.first("C1:4999")
    now[0] += 600
    assert await dedupe.first("C1:4999")  # expired: a new event by now
    assert len(dedupe) == 1


def test_edit_pacer_keeps_only_recent_keys() -> None:
    pacer = EditPacer(0.0)  # every key is quiet at once
    for ts in range(5000):
        pacer.mark(f"1700000{ts:03d}.000100")
    assert len(pacer._last) <= 1001
