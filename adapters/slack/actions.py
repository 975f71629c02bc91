"""The buttons under replies (block_actions): Stop, Regenerate, 👍 and 👎.

Each press is acknowledged at once (Slack wants it within 3 s), then checked like any
other entry point (the allow-lists) and answered privately (an ephemeral message
through the action's response_url) unless the reply itself shows the answer. State
is in the button's value and in the engine and memory, so a press works on any
replica and after a restart.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from adapters.slack.buttons import (
    ALREADY_VOTED,
    REGENERATE,
    STOP,
    STOP_ENDED,
    STOP_NOT_YOURS,
    THANKS,
    VERDICTS,
    Press,
    parse_press,
)
from adapters.slack.replies import Replies
from adapters.slack.translate import REFUSAL, escape
from bot.engine import COMMAND_FAILED
from bot.ratelimit import Verdict, rate_limit_note

log = logging.getLogger(__name__)


class ReplyButtons(Replies):
    """The button listeners (registered by action_id in SlackAdapter._register)."""

    async def on_button(self, ack: Any, body: dict[str, Any], respond: Any) -> None:
        await ack()  # within Slack's 3 s, before the engine or Redis
        press = parse_press(body)
        if press is None:
            log.debug("Ignoring an interaction that is not a button of a reply")
            return
        if not self.rules.allows(
            user=press.user, channel=press.ref.channel, is_direct=press.ref.is_direct
        ):
            await self._tell(respond, REFUSAL)
            return
        if press.action == STOP:
            await self._stop(press, respond)
        elif press.action == REGENERATE:
            team = body.get("team") or {}
            await self._regenerate(press, respond, str(team.get("id") or ""))
        else:
            await self._vote(press, respond)

    async def _tell(self, respond: Any, text: str) -> None:
        """A private answer to the presser, under the conversation."""
        await respond(text=text, response_type="ephemeral", replace_original=False)

    async def _stop(self, press: Press, respond: Any) -> None:
        """The asker only; the reply ends with the stopped mark (through its stream)."""
        conversation, asked = press.ref.conversation, press.ref.message_id
        live = self.engine.live(conversation, asked)
        if live is None:
            await self._tell(respond, STOP_ENDED)
        elif live.message.author_id != press.user:
            await self._tell(respond, STOP_NOT_YOURS)
        elif not self.engine.stop(conversation, asked):
            await self._tell(respond, STOP_ENDED)
        else:
            log.info("Stop pressed in %s (message %s)", conversation, asked)

    async def _regenerate(self, press: Press, respond: Any, team: str) -> None:
        """A new reply to the same message, by its asker, edited into the messages of
        the one it replaces; the engine refuses (privately) when it is too late."""
        if not self._inflight.accepting:
            await self._tell(respond, REFUSAL)
            return
        if self.limiter.check(press.user) is not Verdict.ALLOW:
            await self._tell(respond, rate_limit_note(self.limiter.retry_after(press.user)))
            return
        ref = press.ref
        again = replace(ref, earlier=(), generation=ref.generation + 1)
        try:
            stream = self.engine.regenerate(ref.conversation, ref.message_id, press.user)
            await self._inflight.track(
                self._write(stream, again, press.user, team, existing=press.reply_messages)
            )
        except Exception:
            log.exception("Regenerate failed in %s (message %s)", ref.conversation, ref.message_id)
            await self._tell(respond, COMMAND_FAILED)
            return
        reply = stream.reply
        if reply is not None and reply.refused:
            await self._tell(respond, escape(reply.text))

    async def _vote(self, press: Press, respond: Any) -> None:
        try:
            counted = await self.engine.feedback(
                press.ref.conversation, press.reply_id, press.user, VERDICTS[press.action]
            )
        except Exception:
            log.exception("Feedback failed in %s", press.ref.conversation)
            await self._tell(respond, COMMAND_FAILED)
            return
        await self._tell(respond, THANKS if counted else ALREADY_VOTED)
