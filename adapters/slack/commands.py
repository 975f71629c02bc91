"""Slack slash commands: /ask, /reset, /persona, /forget and /usage."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from slack_sdk.errors import SlackApiError

from adapters.slack.replies import Replies
from adapters.slack.translate import (
    CANNOT_POST,
    HELP_TEXT,
    NEUTRAL_NAME,
    PLATFORM,
    REFUSAL,
    command_place,
    command_text,
    escape,
)
from bot import forgetting, personas
from bot.engine import COMMAND_FAILED
from bot.messages import ConversationKey, Message
from bot.ratelimit import Verdict, rate_limit_note
from bot.usage import describe_usage

log = logging.getLogger(__name__)


class SlashCommands(Replies):
    """The slash commands' listeners."""

    # Each one acks first (Slack wants it within 3 s), before anything that can wait on
    # the engine, Redis or the Web API. Command text arrives HTML-escaped: read through
    # `command_text`, escaped once on the way out.

    async def _is_own_dm(self, command: Mapping[str, Any]) -> bool:
        """Whether a command typed in a 1:1 DM was typed in the DM with the bot: a DM
        between two people is a DM too, and the bot can neither read nor post there."""
        if command_place(command) != "dm":
            return False
        try:
            info = await self.app.client.conversations_info(
                channel=str(command.get("channel_id", ""))
            )
        except SlackApiError:
            return False  # channel_not_found: someone else's DM
        channel = info.get("channel") or {}
        return bool(channel.get("is_im")) and channel.get("user") == command.get("user_id")

    def _command_allowed(self, command: Mapping[str, Any], own_dm: bool) -> bool:
        return self._inflight.accepting and self.rules.allows(
            user=str(command.get("user_id", "")),
            channel=str(command.get("channel_id", "")),
            is_direct=own_dm,
        )

    async def on_ask(
        self, ack: Any, command: dict[str, Any], respond: Any, body: dict[str, Any]
    ) -> None:
        await ack()  # within Slack's 3 s, before any generation
        user = str(command.get("user_id", ""))
        channel = str(command.get("channel_id", ""))
        question = command_text(command)
        own_dm = await self._is_own_dm(command)
        if not self._command_allowed(command, own_dm):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        if command_place(command) == "dm" and not own_dm:
            await respond(text=CANNOT_POST["dm"], response_type="ephemeral")
            return
        if not question:
            await respond(text=escape(HELP_TEXT), response_type="ephemeral")
            return
        if self.limiter.check(user) is not Verdict.ALLOW:
            await respond(
                text=rate_limit_note(self.limiter.retry_after(user)), response_type="ephemeral"
            )
            return
        try:
            root = await self.app.client.chat_postMessage(
                channel=channel, text=f"<@{user}> asked: {escape(question)}"
            )
        except SlackApiError as exc:
            log.warning("Slack refused /ask in channel %s: %s", channel, exc.response.get("error"))
            place = command_place(command)
            await respond(text=CANNOT_POST[place], response_type="ephemeral")
            return
        thread = str(root["ts"])
        names = await self.names.of([user])
        message = Message(
            conversation=ConversationKey(PLATFORM, channel, thread),
            author_id=user,
            author_name=names.get(user) or NEUTRAL_NAME,
            text=question,
            message_id=thread,
            is_direct=own_dm,
        )
        await self._inflight.track(
            self._stream(channel, thread, message, user, str(body.get("team_id") or ""))
        )

    async def on_persona(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()
        if not self._command_allowed(command, await self._is_own_dm(command)):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        parsed = personas.parse(command_text(command))
        if parsed is None:
            await respond(text=escape(personas.USAGE), response_type="ephemeral")
            return
        action, text = parsed
        if action != "show" and str(command.get("user_id")) not in self.settings.slack_admins:
            await respond(
                text="Only the admins in SLACK_ADMINS can change the persona.",
                response_type="ephemeral",
            )
            return
        key = ConversationKey(PLATFORM, str(command.get("channel_id", "")))
        try:
            answer = await personas.run(self.engine, key, action, text)
        except Exception:
            log.exception("/persona failed in channel %s", key.channel)
            answer = COMMAND_FAILED
        await respond(text=escape(answer), response_type="ephemeral")

    async def on_forget(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        """Forget everything the person told the bot, in every Slack conversation.

        Not subject to the allow-lists, and typed anywhere (a channel, a DM, someone
        else's DM): someone no longer allowed may still have their data deleted, and
        it touches only theirs.
        """
        await ack()
        if not self._inflight.accepting:
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        user = str(command.get("user_id", ""))
        try:
            answer = forgetting.describe(await self.engine.forget_user(PLATFORM, user))
        except Exception:
            log.exception("/forget failed in channel %s", command.get("channel_id"))
            answer = COMMAND_FAILED
        await respond(text=answer, response_type="ephemeral")

    async def on_usage(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        """The person's own use of the bot today, and their daily limit: privately."""
        await ack()
        if not self._command_allowed(command, await self._is_own_dm(command)):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        user = str(command.get("user_id", ""))
        try:
            answer = describe_usage(await self.engine.usage(PLATFORM, user))
        except Exception:
            log.exception("/usage failed in channel %s", command.get("channel_id"))
            answer = COMMAND_FAILED
        await respond(text=answer, response_type="ephemeral")

    async def on_reset(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()
        channel = str(command.get("channel_id", ""))
        own_dm = await self._is_own_dm(command)
        if not self._command_allowed(command, own_dm):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        if own_dm:
            try:
                await self.engine.reset(ConversationKey(PLATFORM, channel))
                answer = "Done: I've forgotten our conversation."
            except Exception:
                log.exception("/reset failed in channel %s", channel)
                answer = COMMAND_FAILED
        elif command_place(command) == "dm":
            answer = CANNOT_POST["dm"]
        else:
            answer = (
                "In channels each thread is its own conversation: start a new thread "
                "to start afresh."
            )
        await respond(text=answer, response_type="ephemeral")
