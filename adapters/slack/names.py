"""People's display names, from Slack's users.info, cached and bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.bounded import RecentMap
from adapters.slack.translate import (
    NEUTRAL_NAME,
    user_name,
)

log = logging.getLogger(__name__)

# Display names: kept an hour (a renamed person is seen by then), a failed look-up a
# minute (so that a missing users:read scope or an outage costs one call a minute per
# person, and names come back soon after it ends).
NAMES_KEPT = 10_000
NAMES_SECONDS = 3600.0
FAILED_NAME_SECONDS = 60.0
NAME_LOOKUP_SECONDS = 5.0  # a reply never waits longer than this for a name


NAME_LOOKUPS_AT_ONCE = 8


class UserNames:
    """People's display names by Slack user id, from users.info, in a bounded cache.

    Concurrent messages from one person share one look-up. A failed look-up gives no
    name (the translation then says NEUTRAL_NAME) and is retried after a minute; the
    first failure is a warning, later ones are debug lines.
    """

    def __init__(
        self,
        client: AsyncWebClient,
        *,
        capacity: int = NAMES_KEPT,
        ttl: float = NAMES_SECONDS,
        failed_ttl: float = FAILED_NAME_SECONDS,
        timeout: float = NAME_LOOKUP_SECONDS,
    ) -> None:
        self.client = client
        self.failed_ttl = failed_ttl
        self.timeout = timeout
        self._cache: RecentMap[str, str] = RecentMap(capacity, ttl)  # "": failed
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._warned = False
        self._slots = asyncio.Semaphore(NAME_LOOKUPS_AT_ONCE)  # Slack rate-limits users.info

    async def of(self, user_ids: Iterable[str]) -> dict[str, str]:
        """The names known of `user_ids` (those that could not be looked up left out)."""
        wanted = sorted({u for u in user_ids if u})
        found = await asyncio.gather(*map(self.name, wanted))
        return {user: name for user, name in zip(wanted, found, strict=True) if name}

    async def name(self, user_id: str) -> str:
        """The person's display name, or "" if Slack would not say."""
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached
        pending = self._pending.get(user_id)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up(user_id))
            self._pending[user_id] = pending
            pending.add_done_callback(lambda _: self._pending.pop(user_id, None))
        # Shielded: one waiter cancelled (its reply stopped) leaves the others' look-up.
        return await asyncio.shield(pending)

    async def _look_up(self, user_id: str) -> str:
        try:
            async with self._slots:
                response = await asyncio.wait_for(
                    self.client.users_info(user=user_id), self.timeout
                )
            name = user_name(response.get("user") or {})
            why = "no name in its answer"
        except SlackApiError as exc:
            name, why = "", str(exc.response.get("error", exc.response.status_code))
        except Exception as exc:  # a timeout, the network: a name never costs the reply
            name, why = "", type(exc).__name__
        if name:
            self._cache.put(user_id, name)
            return name
        self._cache.put(user_id, "", ttl=self.failed_ttl)
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(
            level,
            "Slack users.info failed (%s): people are named %r to the model until it "
            "works (is the users:read scope granted?)",
            why,
            NEUTRAL_NAME,
        )
        return ""
