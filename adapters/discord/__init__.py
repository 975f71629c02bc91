"""The Discord adapter: `translate` and `buttons` (pure: events to messages, replies to
messages, the buttons under a reply and their custom_ids), and the discord.py I/O:
`connection` (the client and its lifecycle), `events` (messages in, replies out),
`controls` (the buttons shown and pressed), `commands` (slash commands), `context`
(what they share)."""
