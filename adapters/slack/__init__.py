"""The Slack adapter: `translate` (pure: events to messages, Markdown to mrkdwn,
splitting) and `client` (the Bolt app, in Socket Mode or over HTTP)."""
