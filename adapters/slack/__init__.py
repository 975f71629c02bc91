"""The Slack adapter: `translate` (pure: events to messages, Markdown to mrkdwn,
splitting), and the Bolt I/O: `connection` (the app, in Socket Mode or over HTTP),
`events` (messages in), `replies` (streamed out), `commands` (slash commands),
`buttons` (pure: the reply buttons' blocks and payloads), `actions` (their handlers),
`files` (shared files), `names` (display names) and `context` (what they share)."""
