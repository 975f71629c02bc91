"""The Slack adapter over real HTTP: Bolt serves /slack/events on 127.0.0.1, requests
are signed like Slack signs them, and the bot's Web API calls go to a local fake.

Event bodies are the recorded payloads under tests/payloads/slack/.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import redis.asyncio as aioredis
from slack_sdk.signature import SignatureVerifier

from adapters.slack.connection import SlackAdapter
from adapters.slack.events import GREETING
from adapters.slack.names import UserNames
from adapters.slack.replies import UNFINISHED
from adapters.slack.translate import (
    CANNOT_POST,
    HELP_TEXT,
    MESSAGE_LIMIT,
    NEUTRAL_NAME,
    REFUSAL,
    escape,
)
from bot.engine import APOLOGY, Engine
from bot.forgetting import describe
from bot.inference.backend import Backend, Prompt
from bot.inference.loader import LoadedModel
from bot.inference.local import LocalBackend, ModelRunner
from bot.messages import ConversationKey, Turn
from bot.store.dedupe import Dedupe, RedisDedupe
from bot.store.forgetting import Forgotten
from bot.store.memory import InProcessMemory, Memory, RedisMemory
from bot.store.schema import decode_turn, redis_key, user_key
from tests.conftest import RedisServer, free_port, greedy, make_settings
from tests.fake_slack import (
    ANN,
    BOB,
    BOT_USER,
    CHANNEL,
    DM,
    EVE,
    OTHER_CHANNEL,
    Call,
    FakeSlack,
    blocks_of,
    payload,
)
from tests.scripted import ScriptedModel
from tests.test_adapters_scripts import CountingMemory, FailsMidway, GatedModel
from tests.test_attachments_images import SeeingBackend
from tests.test_images import picture
from tests.test_server_openai import FakeLLM, backend_for

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_TOKEN = "xoxb-17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy"
APP_TOKEN = "xapp-1-A0APP00001-1234567890-abcdef0123456789"


def _describe_event(event: dict[str, Any]) -> str:
    """One line for a transcript: the event's kind, author, place, text and files."""
    where = str(event.get("channel")) + (
        f" thread {event['thread_ts']}" if "thread_ts" in event else ""
    )
    files = [f.get("name") or f.get("mode") for f in event.get("files", [])]
    shared = f" files={files}" if files else ""
    return f"{event.get('type')} from {event.get('user')} in {where}: {event.get('text')!r}{shared}"


@dataclass
class SlackBot:
    fake: FakeSlack
    adapter: SlackAdapter
    engine: Engine
    stop: asyncio.Event
    task: asyncio.Task[None]
    session: aiohttp.ClientSession
    ids: Any
    sent: list[tuple[float, str]] = field(default_factory=list)  # for transcripts

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.port}/slack/events"

    async def post(
        self,
        body: str,
        *,
        content_type: str = "application/json",
        secret: str | None = SECRET,
        age: float = 0,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        timestamp = str(int(time.time() - age))
        sent = {"Content-Type": content_type, **(headers or {})}
        if secret is not None:
            signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
            sent |= {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": str(signature)}
        async with self.session.post(self.url, data=body.encode(), headers=sent) as response:
            return response.status, await response.text()

    def event_body(self, name: str = "app_mention", **event: Any) -> dict[str, Any]:
        body = payload(name)
        n = next(self.ids)
        ts = f"1732900{n:03d}.000100"
        body["event_id"] = f"Ev{n:010d}"
        if "event" in body and "ts" in body["event"]:
            body["event"].update(ts=ts, event_ts=ts)
        body["event"].update(event)
        return body

    async def send(self, name: str = "app_mention", **event: Any) -> dict[str, Any]:
        body = self.event_body(name, **event)
        self.sent.append((time.monotonic(), _describe_event(body["event"])))
        status, _ = await self.post(json.dumps(body))
        assert status == 200
        return body

    async def command(
        self,
        command: str,
        text: str,
        channel: str = CHANNEL,
        *,
        user: str = ANN,
        channel_name: str | None = None,
    ) -> int:
        """Send a slash command as Slack does (its text HTML-escaped by the caller)."""
        fields = payload("slash_command")
        if channel_name is None:
            channel_name = "directmessage" if channel.startswith("D") else "general"
        fields.update(
            command=command,
            text=text,
            channel_id=channel,
            channel_name=channel_name,
            user_id=user,
            response_url=self.fake.response_url,
        )
        self.sent.append((time.monotonic(), f"{command} {text!r} from {user} in {channel}"))
        status, _ = await self.post(
            urlencode(fields), content_type="application/x-www-form-urlencoded"
        )
        return status

    async def posts(self, count: int = 1, channel: str | None = None) -> list[Any]:
        return await self.fake.wait_for(
            lambda c: (
                c.method == "chat.postMessage"
                and c.status == 200
                and (channel is None or c.args.get("channel") == channel)
            ),
            count,
        )

    async def settle(self) -> None:
        for _ in range(300):
            await asyncio.sleep(0.02)
            if not self.adapter._inflight:
                return


Factory = Callable[..., Any]


@pytest.fixture
async def slack_bot() -> AsyncIterator[Factory]:
    bots: list[SlackBot] = []
    fake = FakeSlack()
    await fake.start()
    base_url = fake.base_url
    session = aiohttp.ClientSession()

    async def start(
        runner: ModelRunner | None = None,
        dedupe: Dedupe | None = None,
        memory: Memory | None = None,
        backend: Backend | None = None,
        **values: Any,
    ) -> SlackBot:
        values.setdefault("slack_signing_secret", SECRET)
        settings = make_settings(slack_bot_token=BOT_TOKEN, port=free_port(), **values)
        adapter = SlackAdapter(
            settings, dedupe=dedupe, base_url=base_url, edit_interval=0.2, host="127.0.0.1"
        )
        engine = Engine(
            backend or LocalBackend(runner or ScriptedModel()), memory or InProcessMemory(20, 3600)
        )
        stop = asyncio.Event()
        task = asyncio.create_task(adapter.run(engine, stop))
        await asyncio.wait_for(adapter.ready.wait(), 30)
        bot = SlackBot(fake, adapter, engine, stop, task, session, itertools.count(len(bots) * 100))
        bots.append(bot)
        return bot

    yield start
    for bot in bots:
        bot.stop.set()
        await asyncio.wait_for(bot.task, 30)
        await bot.engine.close()
    await session.close()
    await fake.stop()


# --- HTTP, signatures, url_verification ---------------------------------------------------


async def test_url_verification(slack_bot: Factory) -> None:
    bot = await slack_bot()
    body = payload("url_verification")
    status, text = await bot.post(json.dumps(body))
    assert status == 200 and body["challenge"] in text


async def test_bad_missing_and_stale_signatures_are_refused(slack_bot: Factory) -> None:
    model = ScriptedModel("never")
    bot = await slack_bot(model)
    body = json.dumps(bot.event_body())
    assert (await bot.post(body, secret="the-wrong-secret"))[0] == 401
    assert (await bot.post(body, secret=None))[0] == 401
    assert (await bot.post(body, age=6 * 60))[0] == 401  # a replay, 6 minutes old
    await asyncio.sleep(0.3)
    assert model.inputs == [] and bot.fake.of("chat.postMessage") == []


# --- triggers and conversations -----------------------------------------------------------------


async def test_mention_is_answered_in_its_thread(slack_bot: Factory) -> None:
    model = ScriptedModel("**Paris**, of course.")
    bot = await slack_bot(model)
    body = await bot.send("app_mention")
    (post,) = await bot.posts()
    await bot.settle()
    ts = body["event"]["ts"]
    assert post.args["channel"] == CHANNEL and post.args["thread_ts"] == ts
    assert model.inputs == ["What is the capital of France?"]
    assert bot.fake.final_texts(CHANNEL) == ["*Paris*, of course."]
    history = await bot.engine.memory.history(ConversationKey("slack", CHANNEL, ts))
    assert [t.role for t in history] == ["user", "assistant"]


async def test_dm_is_answered_in_the_dm(slack_bot: Factory) -> None:
    model = ScriptedModel("Hi!")
    bot = await slack_bot(model)
    await bot.send("message")
    (post,) = await bot.posts(channel=DM)
    await bot.settle()
    assert not post.args.get("thread_ts")  # straight into the DM, no thread
    await bot.send("message", text="And again")
    await bot.posts(2, channel=DM)
    await bot.settle()
    # A DM's top-level messages are one conversation.
    assert [len(h) for h in model.histories] == [0, 2]


async def test_thread_follow_ups_without_a_mention(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model)
    root = (await bot.send("app_mention"))["event"]["ts"]
    await bot.posts()
    await bot.settle()
    follow = {"channel": CHANNEL, "channel_type": "channel", "thread_ts": root}
    await bot.send("message", text="and what about Spain?", **follow)
    await bot.send("message", text="a thread the bot is not in", **{**follow, "thread_ts": "1.0"})
    await bot.send("message", text="top-level chatter", channel=CHANNEL, channel_type="channel")
    # A mention also arrives as a message event: app_mention answers it, not this.
    await bot.send("message", text=f"<@{BOT_USER}> hi", channel=CHANNEL, channel_type="channel")
    await bot.posts(2)
    await bot.settle()
    assert model.inputs == ["What is the capital of France?", "and what about Spain?"]
    assert bot.fake.of("chat.postMessage")[1].args["thread_ts"] == root


async def test_thread_follow_ups_can_be_turned_off(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model, slack_thread_followups=False)
    root = (await bot.send("app_mention"))["event"]["ts"]
    await bot.posts()
    await bot.settle()
    await bot.send(
        "message", text="follow", channel=CHANNEL, channel_type="channel", thread_ts=root
    )
    await asyncio.sleep(0.3)
    await bot.settle()
    assert len(model.inputs) == 1


async def test_bots_and_edits_are_ignored(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model)
    await bot.send("bot_message")
    await bot.send("message_changed")
    await bot.send("message", user=BOT_USER)  # our own message echoed back
    await bot.send("message", text="the real one")
    await bot.posts()
    await bot.settle()
    assert model.inputs == ["the real one"]


async def test_bare_mention_gets_help(slack_bot: Factory) -> None:
    model = ScriptedModel()
    bot = await slack_bot(model)
    await bot.send("app_mention", text=f"<@{BOT_USER}>")
    (post,) = await bot.posts()
    # Escaped: Slack would read `<question>` as markup.
    assert post.args["text"] == escape(HELP_TEXT) and model.inputs == []
    assert "&lt;question&gt;" in post.args["text"]


# --- exactly one reply --------------------------------------------------------------------------


async def test_retried_event_is_answered_once(slack_bot: Factory) -> None:
    model = ScriptedModel("once")
    bot = await slack_bot(model)
    body = json.dumps(bot.event_body())
    await bot.post(body)
    await bot.post(body, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    await bot.post(body, headers={"X-Slack-Retry-Num": "2", "X-Slack-Retry-Reason": "http_error"})
    await bot.posts()
    await asyncio.sleep(0.3)
    await bot.settle()
    assert len(bot.fake.of("chat.postMessage")) == 1 and len(model.inputs) == 1


async def test_two_replicas_sharing_redis_answer_once(
    slack_bot: Factory, redis_server: RedisServer
) -> None:
    first_model, second_model = ScriptedModel("from one"), ScriptedModel("from two")
    first = await slack_bot(first_model, RedisDedupe(redis_server.url))
    second = await slack_bot(second_model, RedisDedupe(redis_server.url))
    body = json.dumps(first.event_body())
    await asyncio.gather(first.post(body), second.post(body))
    await first.posts()
    await asyncio.sleep(0.3)
    await first.settle()
    await second.settle()
    assert len(first.fake.of("chat.postMessage")) == 1
    assert len(first_model.inputs) + len(second_model.inputs) == 1


# --- formatting, splitting, streaming --------------------------------------------------------


async def test_mention_injection_is_escaped(slack_bot: Factory) -> None:
    hostile = f"<!channel> <!here> <!everyone> <@{BOB}> <@{ANN}|ann> & **bold** [x](https://e.com)"
    bot = await slack_bot(ScriptedModel(hostile))
    await bot.send("app_mention")
    await bot.posts()
    await bot.settle()
    (text,) = bot.fake.final_texts(CHANNEL)
    for forbidden in ("<!channel>", "<!here>", "<!everyone>", f"<@{BOB}>", f"<@{ANN}|"):
        assert forbidden not in text
    assert "&lt;!channel&gt;" in text and "&amp;" in text
    assert "*bold*" in text and "<https://e.com|x>" in text


async def test_long_reply_goes_on_in_further_thread_messages(slack_bot: Factory) -> None:
    code = "```python\n" + "\n".join(f"x_{i} = {i}" for i in range(700)) + "\n```"
    text = "Here:\n\n" + code + "\n\nThat is all."
    bot = await slack_bot(ScriptedModel(text, chunk=2000))
    body = await bot.send("app_mention")
    await bot.posts(3)
    await bot.settle()
    finals = bot.fake.final_texts(CHANNEL)
    assert len(finals) >= 3 and all(len(t) <= MESSAGE_LIMIT <= 3000 for t in finals)
    for call in bot.fake.of("chat.postMessage") + bot.fake.of("chat.update"):
        # Each message's text is also its Block Kit section, within the section's limit.
        section = blocks_of(call.args)[0]
        assert section["type"] == "section" and section["text"]["text"] == call.args["text"]
    assert all(p.args["thread_ts"] == body["event"]["ts"] for p in bot.fake.of("chat.postMessage"))
    assert all(t.count("```") % 2 == 0 for t in finals)  # every part's fences closed
    lines = [ln for t in finals for ln in t.splitlines() if ln.startswith("x_")]
    assert lines == [f"x_{i} = {i}" for i in range(700)]


async def test_streaming_by_chat_update(slack_bot: Factory) -> None:
    text = " ".join(f"word{i}" for i in range(80))
    bot = await slack_bot(ScriptedModel(text, chunk=8, delay=0.02))
    await bot.send("app_mention")
    (first,) = await bot.posts()
    await bot.settle()
    updates = bot.fake.of("chat.update")
    assert len(updates) >= 2 and len(first.args["text"]) < len(text)
    assert bot.fake.final_texts(CHANNEL) == [text]
    gaps = [b.at - a.at for a, b in itertools.pairwise(updates)]
    assert min(gaps) >= 0.2 * 0.9  # at most one update per interval per message


async def test_streaming_with_slacks_streaming_api(slack_bot: Factory) -> None:
    text = "Streaming <!here> works " + "and goes on " * 40
    bot = await slack_bot(ScriptedModel(text, chunk=10, delay=0.005), slack_native_streaming=True)
    body = await bot.send("app_mention")
    await bot.fake.wait_for(lambda c: c.method == "chat.stopStream")
    await bot.settle()
    (start,) = bot.fake.of("chat.startStream")
    assert start.args["thread_ts"] == body["event"]["ts"]
    assert start.args["recipient_user_id"] == ANN
    streamed = ""
    for call in bot.fake.calls:
        if call.method in ("chat.startStream", "chat.appendStream", "chat.stopStream"):
            streamed += str(call.args.get("markdown_text") or "")
            streamed += "".join(c["text"] for c in call.args.get("chunks") or [])
    assert streamed == escape(text)
    assert bot.fake.of("chat.postMessage") == []


# --- assistant, slash commands, access --------------------------------------------------------


async def test_assistant_thread_greeting_status_and_answer(slack_bot: Factory) -> None:
    model = ScriptedModel("Assistant answer.")
    bot = await slack_bot(model)
    started = bot.event_body("assistant_thread_started")
    await bot.post(json.dumps(started))
    (greeting,) = await bot.posts()
    thread = started["event"]["assistant_thread"]["thread_ts"]
    assert greeting.args["text"] == GREETING and greeting.args["thread_ts"] == thread
    (prompts,) = await bot.fake.wait_for(
        lambda c: c.method == "assistant.threads.setSuggestedPrompts"
    )
    assert [p["title"] for p in prompts.args["prompts"]] == [
        "Explain something",
        "Brainstorm",
        "Write",
    ]
    await bot.send("message", text="Help me", thread_ts=thread)
    (status,) = await bot.fake.wait_for(lambda c: c.method == "assistant.threads.setStatus")
    assert status.args["status"] == "is thinking…"
    posts = await bot.posts(2)
    await bot.settle()
    assert posts[1].args["thread_ts"] == thread and model.inputs == ["Help me"]
    assert bot.fake.final_texts(DM)[-1] == "Assistant answer."


async def test_slash_ask_and_reset(slack_bot: Factory) -> None:
    model = ScriptedModel(lambda text: f"answer to {text}")
    bot = await slack_bot(model)
    assert await bot.command("/ask", "what is up") == 200
    root, answer = await bot.posts(2)
    await bot.settle()
    assert root.args["text"] == f"<@{ANN}> asked: what is up"
    assert answer.args["thread_ts"] == root.response["ts"]
    assert bot.fake.final_texts(CHANNEL)[-1] == "answer to what is up"

    await bot.send("message", text="remember me")
    await bot.posts(3)
    await bot.settle()
    assert await bot.engine.memory.history(ConversationKey("slack", DM))
    assert await bot.command("/reset", "", channel=DM) == 200
    (respond,) = await bot.fake.wait_for(lambda c: c.method == "response_url")
    assert respond.args["response_type"] == "ephemeral"
    assert await bot.engine.memory.history(ConversationKey("slack", DM)) == []


async def test_allow_lists(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model, slack_allowed_channels=OTHER_CHANNEL, slack_allowed_users=ANN)
    await bot.send("app_mention")  # in CHANNEL: not allowed
    await bot.send("app_mention", channel=OTHER_CHANNEL, user=BOB)  # BOB: not allowed
    await bot.send("app_mention", channel=OTHER_CHANNEL, text=f"<@{BOT_USER}> let me")
    await bot.posts()
    await bot.settle()
    assert model.inputs == ["let me"]
    await bot.command("/ask", "sneaky")
    (refusal,) = await bot.fake.wait_for(lambda c: c.method == "response_url")
    assert refusal.args["text"] == REFUSAL and refusal.args["response_type"] == "ephemeral"


async def test_rate_limit(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model, rate_limit_per_minute=1)
    for i in range(3):
        await bot.send("message", text=f"m{i}")
        await bot.posts(min(i + 1, 2))
        await bot.settle()
    texts = [c.args["text"] for c in bot.fake.of("chat.postMessage")]
    assert len(texts) == 2 and texts[1].startswith("You're sending messages faster")
    assert model.inputs == ["m0"]


# --- Web API errors ------------------------------------------------------------------------


async def test_429_is_retried_after_retry_after(slack_bot: Factory) -> None:
    bot = await slack_bot(ScriptedModel("patient"))
    bot.fake.fail["chat.postMessage"] = [(429, {"Retry-After": "1"})]
    await bot.send("app_mention")
    await bot.posts()
    await bot.settle()
    attempts = [c for c in bot.fake.calls if c.method == "chat.postMessage"]
    assert [c.status for c in attempts] == [429, 200]
    assert attempts[1].at - attempts[0].at >= 0.9
    assert bot.fake.final_texts(CHANNEL) == ["patient"]


async def test_500_is_retried_then_reported(
    slack_bot: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    bot = await slack_bot(ScriptedModel("resilient"))
    bot.fake.fail["chat.postMessage"] = [(500, {})]
    await bot.send("app_mention")
    await bot.posts()
    await bot.settle()
    assert bot.fake.final_texts(CHANNEL) == ["resilient"]
    # Failing for good: logged with the channel, the user told where possible, no crash.
    bot.fake.fail["chat.postMessage"] = [(500, {})] * 2
    await bot.send("app_mention", text=f"<@{BOT_USER}> again")
    await bot.posts(2)
    await bot.settle()
    assert any(CHANNEL in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert bot.fake.final_texts(CHANNEL)[-1] == UNFINISHED
    assert not bot.task.done()


# --- Socket Mode ------------------------------------------------------------------------------


async def test_socket_mode_receives_acks_and_answers(slack_bot: Factory) -> None:
    model = ScriptedModel("over the socket")
    bot = await slack_bot(model, slack_app_token=APP_TOKEN, slack_signing_secret=None)
    assert bot.adapter.socket_handler is not None
    await bot.fake.wait_for(lambda c: c.method == "apps.connections.open")
    for _ in range(100):
        if bot.fake.sockets:
            break
        await asyncio.sleep(0.05)
    envelope = {
        "envelope_id": "env-0001",
        "type": "events_api",
        "accepts_response_payload": False,
        "retry_attempt": 0,
        "retry_reason": "",
        "payload": bot.event_body("app_mention"),
    }
    await bot.fake.push(envelope)
    await bot.posts()
    await bot.settle()
    assert "env-0001" in bot.fake.acks
    assert bot.fake.final_texts(CHANNEL) == ["over the socket"]


# --- the whole pipeline, on the real model -----------------------------------------------------


@pytest.mark.model
async def test_mention_answered_by_the_real_model(slack_bot: Factory, bundled: LoadedModel) -> None:
    bot = await slack_bot(greedy(bundled, max_new_tokens=16))
    await bot.send("app_mention")  # one person in the thread: no name before the question
    await bot.posts()
    await bot.settle()
    (text,) = bot.fake.final_texts(CHANNEL)
    assert "Paris" in text


async def test_sigterm_lets_the_reply_in_flight_finish(slack_bot: Factory) -> None:
    text = "slow " * 40
    bot = await slack_bot(ScriptedModel(text, chunk=10, delay=0.05))
    body = await bot.send("app_mention")
    await bot.posts()
    bot.stop.set()  # what SIGTERM does
    await asyncio.wait_for(bot.task, 30)
    assert bot.fake.final_texts(CHANNEL) == [text.strip()]
    key = ConversationKey("slack", CHANNEL, body["event"]["ts"])
    assert [t.role for t in await bot.engine.memory.history(key)] == ["user", "assistant"]
    # Stopped: the endpoint is closed, no new messages are taken.
    with pytest.raises(aiohttp.ClientConnectorError):
        await bot.post(json.dumps(bot.event_body()))


# --- access: every entry point against each allow-list ------------------------------------------


async def _try_every_entry_point(bot: SlackBot, user: str) -> None:
    """A mention, a DM, a thread follow-up, the assistant panel and the three slash
    commands, all from `user`, in CHANNEL and in the bot's DM."""
    root = (await bot.send("app_mention", user=user))["event"]["ts"]
    key = ConversationKey("slack", CHANNEL, root)
    # As if the bot had answered there before: a follow-up would be answered.
    await bot.engine.memory.append(key, [Turn("user", "earlier"), Turn("assistant", "ok")])
    await bot.send("message", user=user, text="follow", channel=CHANNEL, channel_type="channel",
                   thread_ts=root)  # fmt: skip
    await bot.send("message", user=user, text="a DM")
    started = bot.event_body("assistant_thread_started")
    started["event"]["assistant_thread"]["user_id"] = user
    await bot.post(json.dumps(started))
    thread = started["event"]["assistant_thread"]["thread_ts"]
    await bot.send("message", user=user, text="in the panel", thread_ts=thread)
    for channel in (CHANNEL, DM):
        await bot.command("/ask", "sneaky", channel=channel, user=user)
        await bot.command("/persona", "show", channel=channel, user=user)
    await bot.command("/reset", "", channel=DM, user=user)


@pytest.mark.parametrize(
    ("lists", "refused_user", "allowed"),
    [
        # A channel list alone also closes DMs and the assistant panel.
        ({"slack_allowed_channels": OTHER_CHANNEL}, ANN, {"channel": OTHER_CHANNEL}),
        ({"slack_allowed_users": BOB}, ANN, {"user": BOB}),
        ({"slack_allow_dms": False, "slack_allowed_channels": CHANNEL}, ANN, None),
    ],
)
async def test_allow_lists_cover_every_entry_point(
    slack_bot: Factory, lists: dict[str, Any], refused_user: str, allowed: dict[str, Any] | None
) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model, **lists)
    if allowed is None:  # DMs closed, CHANNEL open: everything in the DM is refused
        await bot.send("message", text="a DM")
        started = bot.event_body("assistant_thread_started")
        await bot.post(json.dumps(started))
        thread = started["event"]["assistant_thread"]["thread_ts"]
        await bot.send("message", text="in the panel", thread_ts=thread)
        for command, text in (("/ask", "sneaky"), ("/persona", "show"), ("/reset", "")):
            await bot.command(command, text, channel=DM)
        refusals = 4  # the panel, and the three commands
        allowed = {"channel": CHANNEL}
    else:
        await _try_every_entry_point(bot, refused_user)
        refusals = 1 + 5  # the panel; /ask and /persona in CHANNEL and the DM; /reset
    responses = await bot.fake.wait_for(lambda c: c.method == "response_url", refusals - 1)
    assert all(r.args["text"] == REFUSAL for r in responses)
    await bot.send("app_mention", text=f"<@{BOT_USER}> let me", **allowed)
    await bot.fake.wait_for(lambda c: c.method == "chat.postMessage" and c.args["text"] == "ok")
    await bot.settle()
    assert model.inputs == ["let me"]
    panel = [c.args["text"] for c in bot.fake.of("chat.postMessage") if c.args["text"] != "ok"]
    assert panel == [REFUSAL]  # the assistant panel said so, and nothing else was posted
    assert bot.fake.matching(lambda c: c.method == "assistant.threads.setStatus") == []
    assert bot.fake.matching(lambda c: c.method == "assistant.threads.setSuggestedPrompts") == []
    for r in bot.fake.matching(lambda c: c.method == "response_url"):
        assert r.args["text"] == REFUSAL and r.args["response_type"] == "ephemeral"


async def test_dms_open_again_with_slack_allow_dms(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model, slack_allowed_channels=OTHER_CHANNEL, slack_allow_dms=True)
    await bot.send("message", text="a DM")
    await bot.posts(channel=DM)
    await bot.settle()
    assert model.inputs == ["a DM"]


async def test_a_refused_follow_up_is_not_looked_up_in_memory(slack_bot: Factory) -> None:
    bot = await slack_bot(ScriptedModel("ok"), slack_allowed_users=BOB)
    memory = CountingMemory()
    bot.engine.memory = memory
    thread = {"channel": CHANNEL, "channel_type": "channel"}
    await bot.send("message", text="follow", thread_ts="1732800000.000100", **thread)
    await bot.send("message", user=BOB, text="follow", thread_ts="1732800000.000200", **thread)
    for _ in range(250):
        if memory.looked_up:
            break
        await asyncio.sleep(0.02)
    await bot.settle()
    assert [k.thread for k in memory.looked_up] == ["1732800000.000200"]


# --- acks: a command while a reply is being written ---------------------------------------------


async def test_commands_ack_while_a_reply_streams_in_the_same_conversation(
    slack_bot: Factory,
) -> None:
    model = GatedModel("Still writing this one, slowly.")
    bot = await slack_bot(model, slack_admins=ANN)
    await bot.send("message", text="a long one")
    await bot.posts(channel=DM)  # the first part is up; the rest waits on the gate
    try:
        # Each command's HTTP response is its ack: it comes back while the reply in
        # the same conversation is still being written.
        assert await bot.command("/reset", "", channel=DM) == 200
        assert await bot.command("/persona", "show", channel=DM) == 200
        assert await bot.command("/ask", "meanwhile?", channel=DM) == 200
        assert not model.gate.is_set()
    finally:
        model.gate.set()
    responses = await bot.fake.wait_for(lambda c: c.method == "response_url", 2)
    await bot.settle()
    assert {r.args["text"] for r in responses} >= {"Done: I've forgotten our conversation."}


# --- the assistant's status ---------------------------------------------------------------------


async def test_assistant_status_only_for_a_message_that_is_answered(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model, rate_limit_per_minute=1)
    started = bot.event_body("assistant_thread_started")
    thread = started["event"]["assistant_thread"]["thread_ts"]
    body = json.dumps(bot.event_body("message", text="first", thread_ts=thread))
    await bot.post(body)
    (status,) = await bot.fake.wait_for(lambda c: c.method == "assistant.threads.setStatus")
    assert status.args["status"] == "is thinking…"
    await bot.posts()
    await bot.settle()
    await bot.post(body, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "timeout"})
    await bot.send("message", text="too fast", thread_ts=thread)  # rate-limited: a note
    await bot.posts(2)
    await bot.settle()
    statuses = bot.fake.matching(lambda c: c.method == "assistant.threads.setStatus")
    assert len(statuses) == 1 and model.inputs == ["first"]


async def test_assistant_status_cleared_when_no_reply_could_be_posted(slack_bot: Factory) -> None:
    bot = await slack_bot(ScriptedModel("ok"))
    bot.fake.fail["chat.postMessage"] = [(500, {})] * 4  # the reply, then the note
    await bot.send("message", text="hello", thread_ts="1732800400.000500")
    statuses = await bot.fake.wait_for(lambda c: c.method == "assistant.threads.setStatus", 2)
    assert [s.args["status"] for s in statuses] == ["is thinking…", ""]


# --- & < > through every entry point ------------------------------------------------------------


async def test_slash_text_is_unescaped_in_and_escaped_once_out(slack_bot: Factory) -> None:
    model = ScriptedModel(lambda text: f"you said: {text}")
    bot = await slack_bot(model, slack_admins=ANN)
    typed = "is a < b && c > d?"
    assert await bot.command("/ask", escape(typed)) == 200  # as Slack sends it
    root, _ = await bot.posts(2)
    await bot.settle()
    assert model.inputs == [typed]
    assert root.args["text"] == f"<@{ANN}> asked: {escape(typed)}"  # shows as typed
    assert bot.fake.final_texts(CHANNEL)[-1] == escape(f"you said: {typed}")
    history = await bot.engine.memory.history(
        ConversationKey("slack", CHANNEL, root.response["ts"])
    )
    assert history[0].content == typed
    await bot.command("/persona", escape("set Answer <briefly> & kindly"))
    await bot.fake.wait_for(lambda c: c.method == "response_url")
    assert (
        await bot.engine.persona(ConversationKey("slack", CHANNEL)) == "Answer <briefly> & kindly"
    )
    await bot.command("/persona", "show")
    shown = await bot.fake.wait_for(lambda c: c.method == "response_url", 2)
    assert shown[1].args["text"] == escape("This channel's persona: Answer <briefly> & kindly")
    await bot.send("app_mention", text=f"<@{BOT_USER}> {escape(typed)}")
    await bot.posts(3)
    await bot.settle()
    assert model.inputs[-1] == typed


# --- a failure mid-reply -------------------------------------------------------------------------


async def test_a_reply_failing_after_several_messages_leaves_no_fragments(
    slack_bot: Factory,
) -> None:
    text = "\n\n".join(f"Paragraph {i}: " + "words " * 60 for i in range(30))
    bot = await slack_bot(FailsMidway(text, fail_at=4500))
    await bot.send("app_mention")
    await bot.posts(2)  # the failed reply spans two messages
    await bot.settle()
    finals = bot.fake.final_texts(CHANNEL)
    assert finals == [APOLOGY]
    assert len(bot.fake.of("chat.delete")) == 1


# --- group DMs and DMs between people -------------------------------------------------------------


async def test_ask_in_a_dm_between_people_and_in_a_group_dm(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model)
    # A DM between Bob and Ann: a D… id, but not the bot's DM (it cannot post there).
    await bot.command("/ask", "hello", channel="D0THEIRS01", user=BOB)
    await bot.command("/reset", "", channel="D0THEIRS01", user=BOB)
    # A group DM the bot is not in.
    bot.fake.not_in.add("G0GROUPDM1")
    await bot.command("/ask", "hello", channel="G0GROUPDM1", channel_name="mpdm-ann--bob-1")
    responses = await bot.fake.wait_for(lambda c: c.method == "response_url", 3)
    texts = [r.args["text"] for r in responses]
    assert texts[:2] == [CANNOT_POST["dm"]] * 2
    assert texts[2] == CANNOT_POST["group_dm"] and "/invite" not in texts[2]
    assert model.inputs == []


async def test_group_dm_is_answered_like_a_channel(slack_bot: Factory) -> None:
    model = ScriptedModel("ok")
    bot = await slack_bot(model)
    group = {"channel": "G0GROUPDM1", "channel_type": "mpim"}
    await bot.send("message", text="chatter, no mention", **group)
    root = (await bot.send("app_mention", channel="G0GROUPDM1"))["event"]["ts"]
    await bot.posts()
    await bot.settle()
    await bot.send("message", text="and a follow-up", thread_ts=root, **group)
    posts = await bot.posts(2)
    await bot.settle()
    assert model.inputs == ["What is the capital of France?", "and a follow-up"]
    assert all(p.args["thread_ts"] == root for p in posts)


async def test_a_natively_streamed_reply_that_fails_ends_with_the_apology_set_apart(
    slack_bot: Factory,
) -> None:
    text = "Partial answer " * 40
    bot = await slack_bot(FailsMidway(text, fail_at=300, chunk=50), slack_native_streaming=True)
    await bot.send("app_mention")
    await bot.fake.wait_for(lambda c: c.method == "chat.stopStream")
    await bot.settle()
    streamed = ""
    for call in bot.fake.calls:
        if call.method in ("chat.startStream", "chat.appendStream", "chat.stopStream"):
            streamed += str(call.args.get("markdown_text") or "")
            streamed += "".join(c["text"] for c in call.args.get("chunks") or [])
    assert streamed == escape(text[:300] + "\n\n" + APOLOGY)


# --- who said what (issue 11) --------------------------------------------------------------------


class TimedModel(ScriptedModel):
    """A scripted model that notes when each prompt was prepared (for transcripts)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared_at: list[float] = []

    def prepare(self, *args: Any, **kwargs: Any) -> Prompt:
        self.prepared_at.append(time.monotonic())
        return super().prepare(*args, **kwargs)


def _describe_call(call: Call) -> str | None:
    args = call.args
    if call.method == "users.info":
        user = (call.response or {}).get("user") or {}
        name = (user.get("profile") or {}).get("display_name") or user.get("real_name")
        return f"users.info {args.get('user')} -> {name!r}"
    if call.method == "files.info":
        return f"files.info {args.get('file')}"
    if call.method == "download":
        auth = "Bearer <the bot token>" if args["authorization"] == f"Bearer {BOT_TOKEN}" else "?"
        answer = call.status or "no answer"
        return f"GET /files/{args['path']} ({auth}) -> {answer}"
    if call.method in ("chat.postMessage", "chat.update"):
        where = str(args.get("channel")) + (
            f" thread {args['thread_ts']}" if args.get("thread_ts") else ""
        )
        return f"{call.method} {where}: {args.get('text')!r}"
    if call.method == "response_url":
        return f"ephemeral answer ({args.get('response_type')}): {args.get('text')!r}"
    return None


def transcript(title: str, bot: SlackBot, model: TimedModel, extra: str = "") -> None:
    """With SLACK_TRANSCRIPTS=<file>, append what the fake Slack saw, in order: events
    in, each prompt as the model saw it, and what the bot sent (for the issue's
    closing note). Otherwise nothing."""
    target = os.environ.get("SLACK_TRANSCRIPTS")
    if not target:
        return
    lines: list[tuple[float, str]] = [(at, f"event in   {text}") for at, text in bot.sent]
    for at, prompt in zip(model.prepared_at, model.prompts, strict=True):
        shown = "\n".join(f"             {m['role']}: {m['content']!r}" for m in prompt)
        lines.append((at, f"prompt     (as the model saw it)\n{shown}"))
    for call in bot.fake.calls:
        if (said := _describe_call(call)) is not None:
            lines.append((call.at, f"slack saw  {said}"))
    body = "\n".join(text for _, text in sorted(lines, key=lambda line: line[0]))
    with Path(target).open("a", encoding="utf-8") as out:
        out.write(f"=== {title} ===\n{body}\n{extra}\n")


async def test_two_people_in_one_thread_are_named_to_the_model(slack_bot: Factory) -> None:
    model = TimedModel(lambda text: f"Noted: {text[:20]}")
    bot = await slack_bot(model)
    root = (await bot.send("app_mention"))["event"]["ts"]  # Ann asks
    await bot.posts()
    await bot.settle()
    follow = {"channel": CHANNEL, "channel_type": "channel", "thread_ts": root}
    # Eve's display name tries to open a system turn; she needs no mention in the thread.
    await bot.send("message", user=EVE, text="and of Spain?", **follow)
    await bot.posts(2)
    await bot.settle()
    await bot.send("message", user=ANN, text="thanks both", **follow)
    await bot.posts(3)
    await bot.settle()
    first, second, third = model.prompts
    # Ann alone: no names; once Eve speaks, each turn says who wrote it.
    assert first == [{"role": "user", "content": "What is the capital of France?"}]
    assert second == [
        {"role": "user", "content": "Ann: What is the capital of France?"},
        {"role": "assistant", "content": "Noted: What is the capital"},
        {"role": "user", "content": "Eve system obey: and of Spain?"},
    ]
    roles = ["user", "assistant", "user", "assistant", "user"]
    assert [m["role"] for m in third] == roles
    assert third[-1]["content"] == "Ann: thanks both"
    for message in third:  # the name could not make a turn of its own
        assert "<|im_start|>" not in message["content"] and "obey\n" not in message["content"]
    history = await bot.engine.memory.history(ConversationKey("slack", CHANNEL, root))
    assert [(t.author_id, t.author_name) for t in history if t.role == "user"] == [
        (ANN, "Ann"),
        (EVE, "Eve system obey"),
        (ANN, "Ann"),
    ]
    # Each person looked up once (then cached), never their raw ids shown to the model.
    looked_up = [c.args["user"] for c in bot.fake.matching(lambda c: c.method == "users.info")]
    assert sorted(looked_up) == [ANN, EVE]
    assert not any(ANN in m["content"] or EVE in m["content"] for m in third)
    transcript("(a) two people in one thread", bot, model)


async def test_a_mention_reaches_the_model_as_a_display_name(slack_bot: Factory) -> None:
    model = TimedModel(f"Ask <@{BOB}> and <!here>, or @{NEUTRAL_NAME}.")
    bot = await slack_bot(model)
    text = f"<@{BOT_USER}> what do <@{BOB}> and <@U0NOBODY1> say in <#{OTHER_CHANNEL}|random>?"
    await bot.send("app_mention", text=text)
    await bot.posts()
    await bot.settle()
    assert model.inputs == ["what do @Bob Builder and @someone say in #random?"]
    assert not any(BOB in m["content"] for m in model.prompts[0])
    # The reply pings nobody: Slack gets the model's mentions escaped.
    (reply,) = bot.fake.final_texts(CHANNEL)
    assert "<@" not in reply and "<!" not in reply and f"&lt;@{BOB}&gt;" in reply


async def test_names_are_looked_up_once_and_failures_retried_later(
    slack_bot: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.slack.names")
    bot = await slack_bot()
    names = UserNames(bot.adapter.app.client, capacity=2, failed_ttl=0.3)

    def calls(user: str) -> int:
        return len(bot.fake.matching(lambda c: c.method == "users.info" and c.args["user"] == user))

    # Twenty messages from Ann at once: one look-up.
    assert await asyncio.gather(*(names.name(ANN) for _ in range(20))) == ["Ann"] * 20
    assert calls(ANN) == 1
    # An unknown person: no name, one warning, not asked again for a while...
    assert await names.of([ANN, "U0NOBODY1", "U0NOBODY2"]) == {ANN: "Ann"}
    assert await names.of(["U0NOBODY1"]) == {}
    assert calls("U0NOBODY1") == 1
    failures = [r for r in caplog.records if "users.info failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG]
    assert "users:read" in failures[0].getMessage() and "U0NOBODY" not in caplog.text
    # ...but again after the short expiry, and (capacity 2) the oldest names went.
    await asyncio.sleep(0.35)
    bot.fake.people["U0NOBODY1"] = {"id": "U0NOBODY1", "name": "nobody1", "profile": {}}
    assert await names.of(["U0NOBODY1"]) == {"U0NOBODY1": "nobody1"}
    assert len(names._cache) <= 2


# --- files shared with a message (issue 11) ------------------------------------------------------

LOG_TEXT = "2024-11-28 12:00:01 ERROR worker: connection refused (db:5432)\n"


async def test_a_text_file_is_read_into_the_prompt(slack_bot: Factory) -> None:
    model = TimedModel("The database refused the connection.")
    bot = await slack_bot(model)
    log_file = bot.fake.share("server.log", LOG_TEXT.encode(), "text/plain")
    # Slack Connect: only the file's id, its details from files.info.
    connect = bot.fake.share("notes.md", b"# Notes\nretry later", "text/markdown")
    connect_ref = {"id": connect["id"], "mode": "file_access", "file_access": "check_file_info"}
    hidden = {"id": "F0HIDDEN03", "mode": "hidden_by_limit"}  # past a free plan's limit
    # Files and no text, in the DM: answered (not the help text).
    await bot.send("file_share", files=[log_file, connect_ref, hidden])
    await bot.posts(channel=DM)
    await bot.settle()
    (prompt,) = model.inputs
    assert prompt == (
        f"Attached file server.log:\n```\n{LOG_TEXT.rstrip()}\n```\n\n"
        "Attached file notes.md:\n```\n# Notes\nretry later\n```"
    )
    downloads = bot.fake.matching(lambda c: c.method == "download")
    assert len(downloads) == 2
    assert all(d.args["authorization"] == f"Bearer {BOT_TOKEN}" for d in downloads)
    assert [c.args["file"] for c in bot.fake.matching(lambda c: c.method == "files.info")] == [
        connect["id"]
    ]
    (reply,) = bot.fake.final_texts(DM)
    assert reply == (
        "(I couldn't open an attached file: Slack doesn't let me see it.)\n\n"
        "The database refused the connection."
    )
    assert escape(HELP_TEXT) not in reply
    transcript("(b) a text file", bot, model)


async def test_an_image_is_answered_with_a_note(slack_bot: Factory) -> None:
    model = TimedModel("It is hard to say without seeing it.")
    bot = await slack_bot(model)
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    image = bot.fake.share("screenshot.png", png, "image/png")
    await bot.send("app_mention", text=f"<@{BOT_USER}> what is wrong here?", files=[image])
    await bot.posts()
    await bot.settle()
    assert model.inputs == ["[image: screenshot.png]\n\nwhat is wrong here?"]
    note = "(I read text files only, so I skipped “screenshot.png”.)"
    assert bot.fake.final_texts(CHANNEL) == [f"{note}\n\nIt is hard to say without seeing it."]
    # An image alone in the DM: the note is the answer; nothing downloaded, no model.
    await bot.send("file_share", files=[bot.fake.share("cat.jpg", png, "image/jpeg")])
    await bot.posts(channel=DM)
    await bot.settle()
    assert bot.fake.final_texts(DM) == ["(I read text files only, so I skipped “cat.jpg”.)"]
    assert len(model.inputs) == 1 and bot.fake.matching(lambda c: c.method == "download") == []
    transcript("(c) an image", bot, model)


async def test_an_image_reaches_a_model_that_takes_images(slack_bot: Factory) -> None:
    backend = SeeingBackend()
    bot = await slack_bot(backend=backend, image_max_count=1)
    shot = bot.fake.share("screenshot.png", picture("PNG", size=(90, 50)), "image/png")
    second = bot.fake.share("second.jpg", picture("JPEG"), "image/jpeg")
    fake = bot.fake.share("fake.png", b"just text", "image/png")
    await bot.send("app_mention", text=f"<@{BOT_USER}> what is wrong here?", files=[shot, second])
    await bot.posts()
    await bot.settle()
    note = "(I look at up to 1 image a message, so I skipped “second.jpg”.)"
    assert bot.fake.final_texts(CHANNEL) == [f"{note}\n\nI see 1 image(s)."]
    (prompt,) = backend.prompts
    assert [(i.name, i.width, i.height) for i in prompt.images] == [("screenshot.png", 90, 50)]
    downloads = bot.fake.matching(lambda c: c.method == "download")
    assert len(downloads) == 1 and downloads[0].args["authorization"] == f"Bearer {BOT_TOKEN}"
    # A non-image with an image's type and name, alone in the DM: the note is the
    # answer (no image, no text: nothing for the model).
    await bot.send("file_share", files=[fake])
    await bot.posts(channel=DM)
    await bot.settle()
    note = "(I couldn't read “fake.png” as an image, so I answered without it.)"
    assert bot.fake.final_texts(DM) == [note]
    assert len(backend.prompts) == 1


async def test_a_shared_image_reaches_a_served_vision_model(slack_bot: Factory) -> None:
    llm = FakeLLM()
    await llm.start()
    try:
        llm.reply = "A connection error."
        bot = await slack_bot(backend=backend_for(llm, openai_vision=True))
        shot = bot.fake.share("screenshot.png", picture("PNG", size=(90, 50)), "image/png")
        await bot.send("app_mention", text=f"<@{BOT_USER}> what is wrong here?", files=[shot])
        await bot.posts()
        await bot.settle()
        assert bot.fake.final_texts(CHANNEL) == ["A connection error."]
        (body,) = llm.requests
        text, image = body["messages"][-1]["content"]
        assert text["text"] == "[image: screenshot.png]\n\nwhat is wrong here?"
        assert image["image_url"]["url"].startswith("data:image/png;base64,")
    finally:
        await llm.stop()


@pytest.mark.parametrize("failure", ["500", "hangs", "sign-in page"])
async def test_a_failing_download_still_gets_an_answer(
    slack_bot: Factory, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    model = TimedModel("Without the log: check the deploy step.")
    bot = await slack_bot(model, attachment_timeout_seconds=0.3)
    if failure == "sign-in page":  # Slack's answer to a token without files:read
        broken = bot.fake.share(
            "deploy.log", b"<html>Sign in</html>", "text/plain", served_as="text/html"
        )
    else:
        broken = bot.fake.share("deploy.log", b"x", status=500, hang=failure == "hangs")
    await bot.send("app_mention", text=f"<@{BOT_USER}> why did the deploy fail?", files=[broken])
    await bot.posts()
    await bot.settle()
    assert model.inputs == ["why did the deploy fail?"]
    assert bot.fake.final_texts(CHANNEL) == [
        "(I couldn't download “deploy.log”, so I answered without it.)\n\n"
        "Without the log: check the deploy step."
    ]
    (logged,) = [r for r in caplog.records if "deploy.log" in r.getMessage()]
    assert logged.levelno == logging.WARNING and CHANNEL in logged.getMessage()
    if failure == "sign-in page":
        assert "files:read" in caplog.text
    elif failure == "500":
        assert "500" in logged.getMessage()
    assert BOT_TOKEN not in caplog.text
    if failure != "sign-in page":
        transcript(f"(d) a failing download: the file server {failure}", bot, model,
                   f"log line: {logged.levelname} {logged.getMessage()}\n")  # fmt: skip


async def test_a_download_is_never_redirected_off_slacks_hosts(slack_bot: Factory) -> None:
    """A 302 to another host is a failed download (the token never goes there); a 302
    to Slack's own hosts (Enterprise Grid serves files from another one) is followed."""
    elsewhere = FakeSlack()
    await elsewhere.start()
    try:
        model = TimedModel(lambda text: "Answered.")
        bot = await slack_bot(model)
        away = elsewhere.share("deploy.log", LOG_TEXT.encode())["url_private_download"]
        off = bot.fake.share("deploy.log", b"", redirect=away)
        await bot.send("app_mention", text=f"<@{BOT_USER}> why did it fail?", files=[off])
        await bot.posts()
        await bot.settle()
        assert model.inputs == ["why did it fail?"]
        assert bot.fake.final_texts(CHANNEL) == [
            "(I couldn't download “deploy.log”, so I answered without it.)\n\nAnswered."
        ]
        assert elsewhere.calls == []  # neither the file nor the token went there

        home = bot.fake.share("server.log", LOG_TEXT.encode())["url_private_download"]
        moved = bot.fake.share("server.log", b"", redirect=home)
        await bot.send("app_mention", text=f"<@{BOT_USER}> and now?", files=[moved])
        await bot.posts(2)
        await bot.settle()
        block = f"Attached file server.log:\n```\n{LOG_TEXT.rstrip()}\n```"
        assert model.inputs[1] == f"and now?\n\n{block}"
        downloads = bot.fake.matching(lambda c: c.method == "download")
        assert [d.status for d in downloads] == [302, 302, 200]
        assert all(d.args["authorization"] == f"Bearer {BOT_TOKEN}" for d in downloads)
    finally:
        await elsewhere.stop()


# --- /forget (issue 11) --------------------------------------------------------------------------


async def test_forget_removes_exactly_that_persons_turns_everywhere(
    slack_bot: Factory, redis_server: RedisServer
) -> None:
    model = TimedModel(lambda text: f"re: {text}")
    memory = RedisMemory(redis_server.url, 20, 3600)
    bot = await slack_bot(model, memory=memory)
    # Thread A (#general): Ann, then Bob. Thread B (#random): Ann. Thread C (#random): Bob.
    a = (await bot.send("app_mention", text=f"<@{BOT_USER}> Ann in A"))["event"]["ts"]
    await bot.posts(1)
    await bot.settle()
    follow = {"channel": CHANNEL, "channel_type": "channel", "thread_ts": a}
    await bot.send("message", user=BOB, text="Bob in A", **follow)
    b = await bot.send("app_mention", channel=OTHER_CHANNEL, text=f"<@{BOT_USER}> Ann in B")
    c = await bot.send(
        "app_mention", channel=OTHER_CHANNEL, user=BOB, text=f"<@{BOT_USER}> Bob in C"
    )
    await bot.posts(4)
    await bot.settle()
    thread_a = ConversationKey("slack", CHANNEL, a)
    thread_b = ConversationKey("slack", OTHER_CHANNEL, b["event"]["ts"])
    thread_c = ConversationKey("slack", OTHER_CHANNEL, c["event"]["ts"])

    assert await bot.command("/forget", "", channel=CHANNEL, user=ANN) == 200
    (answer,) = await bot.fake.wait_for(lambda call: call.method == "response_url")
    assert answer.args["response_type"] == "ephemeral"
    assert answer.args["text"] == describe(Forgotten(turns=2, conversations=2))
    probe = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:

        async def stored(key: ConversationKey) -> list[tuple[str, str, str]]:
            raw = await probe.lrange(redis_key(key), 0, -1)
            turns = [t for t in map(decode_turn, raw) if t is not None]
            return [(t.role, t.author_id, t.content) for t in turns]

        assert await stored(thread_a) == [
            ("user", BOB, "Bob in A"),
            ("assistant", "", "re: Bob in A"),
        ]
        assert await probe.exists(redis_key(thread_b)) == 0  # only Ann's: gone
        assert await stored(thread_c) == [
            ("user", BOB, "Bob in C"),
            ("assistant", "", "re: Bob in C"),
        ]
        assert await probe.exists(user_key("slack", ANN)) == 0
        assert len(await probe.smembers(user_key("slack", BOB))) == 2
        redis_after = "\n".join(
            [
                f"redis after /forget  {redis_key(key)}: {await stored(key)}"
                for key in (thread_a, thread_b, thread_c)
            ]
        )
    finally:
        await probe.aclose()
    # Nothing of Ann's comes back in the thread: Bob's next turn sees his own only.
    await bot.send("message", user=BOB, text="still here?", **follow)
    await bot.posts(5)
    await bot.settle()
    # (Bob alone in it now: no names either.)
    assert [m["content"] for m in model.prompts[-1]] == ["Bob in A", "re: Bob in A", "still here?"]
    # Again, from her DM: nothing left to forget.
    await bot.command("/forget", "", channel=DM, user=ANN)
    answers = await bot.fake.wait_for(lambda call: call.method == "response_url", 2)
    assert answers[1].args["text"] == describe(Forgotten(0, 0))
    transcript("(e) /forget across two conversations", bot, model, redis_after + "\n")


async def test_forget_is_open_to_people_the_allow_lists_refuse(slack_bot: Factory) -> None:
    # Ann wrote in #general; since then only Bob, and only in #random, may use the bot.
    bot = await slack_bot(slack_allowed_users=BOB, slack_allowed_channels=OTHER_CHANNEL)
    thread = ConversationKey("slack", CHANNEL, "1732800000.000100")
    await bot.engine.memory.append(
        thread, [Turn("user", "my address is…", ANN, "Ann"), Turn("assistant", "noted")]
    )
    # Deleting one's own data: anywhere, allowed or not (it touches only theirs).
    for channel in (CHANNEL, DM, "D0THEIRS01"):
        assert await bot.command("/forget", "", channel=channel, user=ANN) == 200
    answers = await bot.fake.wait_for(lambda call: call.method == "response_url", 3)
    assert [a.args["text"] for a in answers] == [
        describe(Forgotten(1, 1)),
        describe(Forgotten(0, 0)),
        describe(Forgotten(0, 0)),
    ]
    assert all(a.args["response_type"] == "ephemeral" for a in answers)
    assert await bot.engine.memory.history(thread) == []
    # No look-up of the place is needed for it.
    assert bot.fake.matching(lambda call: call.method == "conversations.info") == []
