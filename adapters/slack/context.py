"""What the Slack adapter's handlers share: the Bolt app, the access rules, the engine,
and posting a short message."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError

from adapters.slack.names import UserNames
from adapters.slack.translate import (
    Rules,
    is_direct,
)
from bot.engine import Engine
from bot.inflight import InFlight
from bot.ratelimit import RateLimiter
from bot.settings import Settings
from bot.store.dedupe import Dedupe
from bot.streaming import EditPacer

log = logging.getLogger(__name__)


class SlackContext:
    """The state `SlackAdapter.__init__` sets up, and the handlers' common calls."""

    settings: Settings
    rules: Rules
    limiter: RateLimiter
    pacer: EditPacer
    dedupe: Dedupe
    native_streaming: bool
    app: AsyncApp
    names: UserNames
    _engine: Engine | None
    _inflight: InFlight

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "run() first"
        return self._engine

    def _event_allowed(self, event: Mapping[str, Any]) -> bool:
        return self.rules.allows(
            user=str(event.get("user", "")),
            channel=str(event.get("channel", "")),
            is_direct=is_direct(event),
        )

    async def _post_text(self, channel: str, thread: str | None, text: str) -> bool:
        """Post a short message; True if Slack took it (a refusal is logged)."""
        try:
            await self.app.client.chat_postMessage(channel=channel, thread_ts=thread, text=text)
        except SlackApiError as exc:
            log.warning(
                "Slack refused a message in channel %s: %s",
                channel,
                exc.response.get("error", exc.response.status_code),
            )
            return False
        return True
