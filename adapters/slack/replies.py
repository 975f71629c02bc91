"""Writing a reply in Slack as it is generated: chat.postMessage then paced
chat.update, or Slack's native streaming API for AI apps; with its buttons (Stop while
it is written, then Regenerate and the votes), and a regenerated reply edited into the
messages of the one it replaces."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.buttons import ReplyRef, final_actions, message_blocks, stop_actions
from adapters.slack.context import SlackContext
from adapters.slack.translate import (
    MESSAGE_LIMIT,
    escape,
    reply_parts,
)
from bot.engine import ReplyStream
from bot.messages import Message
from bot.streaming import EditPacer, GrowingReply, play

log = logging.getLogger(__name__)

UNFINISHED = "Sorry, I couldn't finish that reply."

Actions = dict[str, Any] | None


class SlackReply(GrowingReply[str]):
    """The messages of one reply (by ts) and their buttons: Stop on the first while
    the stream runs; once it has ended, Regenerate and the votes on the last, for a
    reply that was written (not an apology). `existing`: the messages of the reply
    this one replaces (Regenerate), edited in place. A refused regeneration or a
    silent reply (past the daily limit) shows nothing."""

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        pacer: EditPacer,
        stream: ReplyStream,
        ref: ReplyRef,
        existing: Sequence[str] = (),
    ) -> None:
        super().__init__(
            self._render_parts,
            self._post_part,
            self._edit_part,
            pacer,
            lambda ts: ts,
            retract=self._retract_part,
        )
        self._client = client
        self._channel = channel
        self._stream = stream
        self._ref = ref
        self._ended = False
        self._count = 0  # messages in the latest render
        self._sent: dict[str, Actions] = {}  # each message's buttons as last sent
        self.posted = list(existing)
        self.shown = [""] * len(existing)  # no part is "": each is written once

    def _render_parts(self, text: str) -> list[str]:
        parts = reply_parts(text)
        self._count = len(parts)
        return parts

    def _actions(self, index: int) -> Actions:
        reply = self._stream.reply
        if not self._ended:
            # The engine's reply is known early only for a whole answer (busy, a note):
            # nothing to stop then.
            return stop_actions(self._ref) if index == 0 and reply is None else None
        if reply is not None and reply.ok and index == self._count - 1:
            return final_actions(replace(self._ref, earlier=tuple(self.posted[:index])))
        return None

    async def show(self, text: str, *, final: bool = False) -> None:
        if final:
            self._ended = True
            parts = self._render_parts(text)
            for index, ts in enumerate(self.posted[: len(parts)]):
                if ts not in self._sent or self._sent[ts] != self._actions(index):
                    self.shown[index] = ""  # its buttons change: edited, same text or not
        await super().show(text, final=final)

    async def _post_part(self, index: int, part: str) -> str:
        actions = self._actions(index)
        response = await self._client.chat_postMessage(
            channel=self._channel,
            thread_ts=self._ref.thread,
            text=part,
            blocks=message_blocks(part, actions),
            unfurl_links=False,
        )
        ts = str(response["ts"])
        self._sent[ts] = actions
        return ts

    async def _edit_part(self, ts: str, part: str) -> object:
        actions = self._actions(self.posted.index(ts))
        response = await self._client.chat_update(
            channel=self._channel, ts=ts, text=part, blocks=message_blocks(part, actions)
        )
        self._sent[ts] = actions
        return response

    async def _retract_part(self, ts: str) -> object:
        self._sent.pop(ts, None)
        return await self._client.chat_delete(channel=self._channel, ts=ts)


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
        ref = ReplyRef(channel, thread, message.message_id, message.is_direct)
        return await self._write(self.engine.stream(message), ref, user, team)

    async def _write(
        self,
        stream: ReplyStream,
        ref: ReplyRef,
        user: str = "",
        team: str = "",
        existing: Sequence[str] = (),
    ) -> bool:
        """Show `stream` in `ref`'s conversation: new messages, or the `existing` ones of
        the reply it replaces edited. True if anything was posted."""
        channel, thread = ref.channel, ref.thread
        reply = SlackReply(self.app.client, channel, self.pacer, stream, ref, existing)
        native: list[object] = []
        try:
            if self.native_streaming and thread is not None and not existing:
                await self._stream_natively(stream, ref, user, team, native)
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

    async def _stream_natively(
        self,
        stream: ReplyStream,
        ref: ReplyRef,
        user: str,
        team: str,
        started: list[object],
    ) -> None:
        """Slack's streaming API for AI apps (chat.startStream/appendStream/stopStream).

        The text is escaped like mrkdwn, so model output can form no mention; past the
        length limit the reply goes on in a new streamed message. A stream takes no
        buttons while it runs (no Stop); its last message gets Regenerate and the
        votes when it stops.
        """
        client = self.app.client
        assert ref.thread is not None
        streamed = 0
        streamer = None
        earlier: list[str] = []
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
                        earlier.append(str(streamer.ts))
                    streamer = await client.chat_stream(
                        channel=ref.channel,
                        thread_ts=ref.thread,
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
            done = stream.reply
            if done is not None and done.ok:
                buttons = final_actions(replace(ref, earlier=tuple(earlier)))
                await streamer.stop(blocks=[buttons])
            else:
                await streamer.stop()
