"""What is kept: conversation memory (Redis or in-process), the Redis connections,
Slack event dedupe, and forgetting a person in the store."""
