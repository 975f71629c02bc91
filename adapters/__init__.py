"""Platform adapters: each turns one platform's events into `bot.messages.Message`.

`configured(settings)` lists the adapters whose credentials are set; that is what
`python -m bot` starts. The console adapter is started explicitly
(`python -m bot console`).
"""

from __future__ import annotations

from bot.app import Adapter
from bot.settings import Settings


def configured(settings: Settings) -> list[Adapter]:
    """The platform adapters whose credentials are in the configuration."""
    adapters: list[Adapter] = []
    if settings.discord_token:
        from adapters.discord.connection import DiscordAdapter

        adapters.append(DiscordAdapter(settings))
    if settings.slack_bot_token:
        from adapters.slack.connection import SlackAdapter
        from bot.store.dedupe import open_dedupe

        adapters.append(SlackAdapter(settings, dedupe=open_dedupe(settings)))
    return adapters
