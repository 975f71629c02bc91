"""Slack messages in: mentions, DMs, thread follow-ups and the assistant panel, each
checked (access, once only, rate limit) and answered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from slack_bolt.context.async_context import AsyncBoltContext

from adapters.slack.files import SharedFiles
from adapters.slack.replies import Replies
from adapters.slack.translate import (
    HELP_TEXT,
    REFUSAL,
    Trigger,
    conversation_key,
    escape,
    is_direct,
    is_empty,
    is_person_writing,
    mentioned_users,
    mentions,
    reply_thread,
    to_message,
)
from bot.ratelimit import Verdict, rate_limit_note

log = logging.getLogger(__name__)

GREETING = "Hi! Ask me anything: I answer here, and remember this thread."
SUGGESTED_PROMPTS = [
    {"title": "Explain something", "message": "Explain how a rainbow forms, briefly."},
    {"title": "Brainstorm", "message": "Give me three names for a friendly robot."},
    {"title": "Write", "message": "Write a two-line poem about Mondays."},
]
THINKING = "is thinking…"


class MessageEvents(Replies, SharedFiles):
    """The event listeners, and answering one message."""

    async def on_mention(
        self, event: dict[str, Any], context: AsyncBoltContext, body: dict[str, Any]
    ) -> None:
        bot_user = context.bot_user_id or ""
        if is_person_writing(event, bot_user):
            await self._inflight.track(self._answer(event, body, bot_user, Trigger.MENTION))

    async def on_message(
        self, event: dict[str, Any], context: AsyncBoltContext, body: dict[str, Any]
    ) -> None:
        bot_user = context.bot_user_id or ""
        if not is_person_writing(event, bot_user):
            return
        if is_direct(event):
            why = Trigger.DIRECT
        elif mentions(event, bot_user):
            return  # the app_mention event for this message answers it
        elif event.get("thread_ts") and self.rules.thread_followups:
            # A follow-up in a thread the bot has answered in: its memory says so, in
            # any replica and after a restart. Looked up only for a message the bot
            # may answer.
            if not self._event_allowed(event):
                return
            if not await self.engine.memory.history(conversation_key(event)):
                return
            why = Trigger.THREAD
        else:
            return
        await self._inflight.track(self._answer(event, body, bot_user, why))

    async def on_assistant_thread_started(
        self, event: dict[str, Any], say: Any, set_suggested_prompts: Any
    ) -> None:
        thread = event.get("assistant_thread") or {}
        allowed = self.rules.allows(
            user=str(thread.get("user_id", "")),
            channel=str(thread.get("channel_id", "")),
            is_direct=True,  # the assistant panel is a DM with the bot
        )
        if not allowed:
            await say(REFUSAL)
            return
        await say(GREETING)
        await set_suggested_prompts(prompts=SUGGESTED_PROMPTS)

    async def on_assistant_message(
        self,
        event: dict[str, Any],
        context: AsyncBoltContext,
        body: dict[str, Any],
        set_status: Any,
    ) -> None:
        bot_user = context.bot_user_id or ""
        if not is_person_writing(event, bot_user):
            return
        await self._inflight.track(
            self._answer(event, body, bot_user, Trigger.ASSISTANT, set_status)
        )

    async def _answer(
        self,
        event: Mapping[str, Any],
        body: Mapping[str, Any],
        bot_user: str,
        why: Trigger,
        set_status: Any = None,
    ) -> None:
        """Answer one message: access, once only, rate limit, then the reply. The
        assistant's "is thinking…" shows only once the message will be answered."""
        channel = str(event.get("channel", ""))
        user = str(event.get("user", ""))
        thread = reply_thread(event)
        if not self._inflight.accepting:
            return
        if not self._event_allowed(event):
            log.debug("Ignoring a %s from %s in %s: not allowed", why, user, channel)
            return
        # One answer per message, whatever the retries and replicas.
        if not await self.dedupe.first(f"{channel}:{event.get('ts')}"):
            log.debug(
                "Already answered %s:%s (event %s)", channel, event.get("ts"), body.get("event_id")
            )
            return
        verdict = self.limiter.check(user)
        if verdict is not Verdict.ALLOW:
            if verdict is Verdict.NOTIFY:
                note = rate_limit_note(self.limiter.retry_after(user))
                await self._post_text(channel, thread, note)
            return
        if is_empty(event, bot_user):
            await self._post_text(channel, thread, escape(HELP_TEXT))  # `<question>`: text
            return
        if set_status is not None:
            await self._set_status(set_status, THINKING)
        # Names and files only now, for a message that will be answered.
        names, attached = await asyncio.gather(
            self.names.of([user, *mentioned_users(event.get("text") or "", bot_user)]),
            self._read_files(event, channel),
        )
        message = to_message(event, bot_user, names, attached)
        posted = await self._stream(channel, thread, message, user, str(body.get("team_id") or ""))
        if set_status is not None and not posted:
            # A reply clears the status; with none posted it would stay for good.
            await self._set_status(set_status, "")
