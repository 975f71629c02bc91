"""Writing a reply in Slack as it is generated: chat.postMessage then paced
chat.update, or Slack's native streaming API for AI apps."""

from __future__ import annotations

import logging
from typing import Any

from slack_sdk.errors import SlackApiError

from adapters.slack.context import SlackContext
from adapters.slack.translate import (
    MESSAGE_LIMIT,
    escape,
    reply_parts,
)
from bot.engine import ReplyStream
from bot.messages import Message
from bot.streaming import GrowingReply, play

log = logging.getLogger(__name__)

UNFINISHED = "Sorry, I couldn't finish that reply."


class Replies(SlackContext):
    """Streaming replies into a channel or thread."""

    async def _set_status(self, set_status: Any, status: str) -> None:
        try:
            await set_status(status)
        except SlackApiError as exc:
            log.warning("Slack refused an assistant status: %s", exc.response.get("error"))

    async def _stream(
        self, channel: str, thread: str | None, message: Message, user: str, team: str
    ) -> bool:
        """Write the reply to `message`; True if anything was posted."""
        stream = self.engine.stream(message)
        reply = self._growing_reply(channel, thread)
        native: list[object] = []
        try:
            if self.native_streaming and thread is not None:
                await self._stream_natively(stream, channel, thread, user, team, native)
            else:
                await play(stream, reply)
        except SlackApiError as exc:
            log.warning(
                "Slack refused a reply in channel %s: %s",
                channel,
                exc.response.get("error", exc.response.status_code),
            )
            await stream.aclose()
            # What was posted stays, followed by a note saying it was cut short.
            return await self._post_text(channel, thread, UNFINISHED) or bool(
                reply.posted or native
            )
        return bool(reply.posted or native)

    def _growing_reply(self, channel: str, thread: str | None) -> GrowingReply[str]:
        """chat.postMessage for each part, then chat.update, paced per message."""
        client = self.app.client

        async def post(_index: int, part: str) -> str:
            response = await client.chat_postMessage(
                channel=channel, thread_ts=thread, text=part, unfurl_links=False
            )
            return str(response["ts"])

        async def edit(ts: str, part: str) -> object:
            return await client.chat_update(channel=channel, ts=ts, text=part)

        async def retract(ts: str) -> object:
            return await client.chat_delete(channel=channel, ts=ts)

        return GrowingReply(reply_parts, post, edit, self.pacer, lambda ts: ts, retract=retract)

    async def _stream_natively(
        self,
        stream: ReplyStream,
        channel: str,
        thread: str,
        user: str,
        team: str,
        started: list[object],
    ) -> None:
        """Slack's streaming API for AI apps (chat.startStream/appendStream/stopStream).

        The text is escaped like mrkdwn, so model output can form no mention; past the
        length limit the reply goes on in a new streamed message.
        """
        client = self.app.client
        streamed = 0
        streamer = None
        try:
            async for chunk in stream:
                failed = stream.reply is not None and not stream.reply.ok
                if failed and streamer is not None and not chunk.startswith("\n"):
                    # Streamed text cannot be taken back: keep it, and set the apology
                    # apart so that it reads as the note that the answer was cut off.
                    chunk = "\n\n" + chunk
                if streamer is None or streamed + len(chunk) > MESSAGE_LIMIT:
                    if streamer is not None:
                        await streamer.stop()
                    streamer = await client.chat_stream(
                        channel=channel,
                        thread_ts=thread,
                        recipient_user_id=user,
                        recipient_team_id=team or None,
                        buffer_size=64,
                    )
                    started.append(streamer)
                    streamed = 0
                await streamer.append(markdown_text=escape(chunk))
                streamed += len(chunk)
        finally:
            await stream.aclose()
        if streamer is not None:
            await streamer.stop()
