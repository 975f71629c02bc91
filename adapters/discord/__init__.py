"""The Discord adapter: `translate` (pure: events to messages, replies to messages),
and the discord.py I/O: `connection` (the client and its lifecycle), `events`
(messages in, replies out), `commands` (slash commands), `context` (what they share)."""
