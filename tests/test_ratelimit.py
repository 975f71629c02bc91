from __future__ import annotations

from bot.ratelimit import RateLimiter, Verdict, rate_limit_note


def test_limit_notifies_once_then_silent_then_recovers() -> None:
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.check("ann") for _ in range(3)] == [Verdict.ALLOW] * 3
    assert limiter.check("ann") == Verdict.NOTIFY
    assert limiter.check("ann") == Verdict.SILENT
    assert limiter.check("bob") == Verdict.ALLOW  # per user
    assert 59 < limiter.retry_after("ann") <= 60
    now[0] = 60.0
    assert limiter.check("ann") == Verdict.ALLOW
    assert [limiter.check("ann") for _ in range(3)][-1] == Verdict.NOTIFY
    now[0] = 500.0
    limiter.forget_idle()
    assert limiter._seen == {}
    assert "wait about 60 s" in rate_limit_note(59.6)


def test_zero_means_no_limit() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.check("x") == Verdict.ALLOW for _ in range(1000))


def test_the_table_shrinks_without_anyone_calling_forget_idle() -> None:
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    for i in range(1000):  # a stream of users, each seen once
        limiter.check(f"user{i}")
        now[0] += 0.5
    # Only users seen within about two windows are kept.
    assert len(limiter) <= 2 * 60 / 0.5 + 1
    now[0] += 120
    limiter.check("latecomer")
    assert len(limiter) == 1
