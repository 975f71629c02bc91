"""The Discord adapter: `translate` (pure: events to messages, replies to messages)
and `client` (the discord.py connection)."""
