"""The /persona command, shared by the adapters: a channel's own system prompt.

`/persona set <text>`, `/persona show`, `/persona clear`. Who may set and clear it is
each platform's decision (Discord: Manage Channels; Slack: SLACK_ADMINS).
"""

from __future__ import annotations

from typing import Literal

from bot.engine import PERSONA_MAX_CHARS, Engine
from bot.messages import ConversationKey

Action = Literal["set", "show", "clear"]
USAGE = (
    "Usage: `/persona set <text>` gives this channel its own system prompt "
    f"(up to {PERSONA_MAX_CHARS:,} characters), `/persona show` shows it, "
    "`/persona clear` goes back to the default."
)
NOT_ALLOWED = "Only channel managers can change this channel's persona."


def parse(text: str) -> tuple[Action, str] | None:
    """`set <text>`, `show` or `clear`; None for anything else."""
    word, _, argument = text.strip().partition(" ")
    word, argument = word.lower(), argument.strip()
    if word == "set" and argument:
        return "set", argument
    if word == "show" and not argument:
        return "show", ""
    if word == "clear" and not argument:
        return "clear", ""
    return None


async def run(engine: Engine, conversation: ConversationKey, action: Action, text: str) -> str:
    """Carry out a persona command; returns what to tell the user."""
    if action == "show":
        persona = await engine.persona(conversation)
        return (
            f"This channel's persona: {persona}"
            if persona
            else "This channel uses the default persona."
        )
    if action == "clear":
        await engine.set_persona(conversation, None)
        return "Persona cleared: back to the default."
    try:
        await engine.set_persona(conversation, text)
    except ValueError as error:
        return f"Sorry: {error}."
    return "Persona set for this channel."
