"""The buttons under Slack replies (issue 21): Stop, Regenerate, 👍 and 👎, and /usage.

The pure part (blocks, values, payloads) on recorded-style payloads; then the app over
real HTTP: button presses are posted as Slack posts them (form-encoded `payload=<json>`,
signed), built by the fake from the message as it shows now, and answered privately
through the action's response_url.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from adapters.slack.buttons import (
    ALREADY_VOTED,
    REGENERATE,
    STOP,
    STOP_ENDED,
    STOP_NOT_YOURS,
    THANKS,
    VALUE_LIMIT,
    VOTE_DOWN,
    VOTE_UP,
    ReplyRef,
    final_actions,
    message_blocks,
    parse_press,
    stop_actions,
)
from adapters.slack.translate import MESSAGE_LIMIT, REFUSAL, reply_parts
from bot import metrics
from bot.engine import NOT_YOURS, STOPPED_MARK, TOO_LATE
from bot.messages import ConversationKey
from bot.store.memory import RedisMemory
from bot.usage import describe_usage
from tests.conftest import RedisServer
from tests.fake_slack import ANN, BOB, BOT_USER, CHANNEL, DM, Call, FakeSlack, blocks_of
from tests.scripted import ScriptedModel
from tests.test_adapters_scripts import GatedModel
from tests.test_slack import Factory, SlackBot

THREAD = "1732900000.000100"

# --- the pure part: blocks, values, payloads ---------------------------------------------------


def test_blocks_carry_the_text_and_the_buttons() -> None:
    ref = ReplyRef(CHANNEL, THREAD, THREAD)
    blocks = message_blocks("*Paris*", stop_actions(ref))
    # verbatim: Slack links and pings nothing in the text by itself (@here, #channel)
    section = {"type": "mrkdwn", "text": "*Paris*", "verbatim": True}
    assert blocks[0] == {"type": "section", "text": section}
    (stop,) = blocks[1]["elements"]
    assert (blocks[1]["type"], stop["type"], stop["action_id"]) == ("actions", "button", STOP)
    assert json.loads(stop["value"]) == {"c": CHANNEL, "t": THREAD, "m": THREAD}
    ended = final_actions(ReplyRef(DM, None, "1.2", True, ("3.4",), 2))
    assert [e["action_id"] for e in ended["elements"]] == [REGENERATE, VOTE_UP, VOTE_DOWN]
    assert json.loads(ended["elements"][0]["value"]) == {
        "c": DM, "t": None, "m": "1.2", "d": 1, "r": ["3.4"], "g": 2,
    }  # fmt: skip
    section = {
        "type": "section",
        "text": {"type": "mrkdwn", "text": "no buttons", "verbatim": True},
    }
    assert message_blocks("no buttons") == [section]


def test_a_reply_of_hundreds_of_messages_keeps_the_votes_within_the_value_limit() -> None:
    earlier = tuple(f"1732900{i:03d}.000100" for i in range(200))
    ended = final_actions(ReplyRef(CHANNEL, THREAD, THREAD, earlier=earlier))
    assert [e["action_id"] for e in ended["elements"]] == [VOTE_UP, VOTE_DOWN]
    assert all(len(e["value"]) <= VALUE_LIMIT for e in ended["elements"])
    assert json.loads(ended["elements"][0]["value"])["r"] == [earlier[0]]


def test_every_part_fits_a_section() -> None:
    parts = reply_parts("&<>" * 4000 + "\n\n" + "word " * 3000)  # escaping triples the first
    assert len(parts) > 4 and all(len(p) <= MESSAGE_LIMIT <= 3000 for p in parts)


def _payload(action_id: str = STOP, value: str | None = None, **extra: Any) -> dict[str, Any]:
    """A block_actions payload as Slack sends it (trimmed), for a button of the bot's."""
    fake = FakeSlack()
    fake.port = 1
    ref = ReplyRef(CHANNEL, THREAD, THREAD, earlier=("1700000001.000100",))
    actions = final_actions(ref) if action_id != STOP else stop_actions(ref)
    shown = {"channel": CHANNEL, "thread_ts": THREAD, "text": "Paris.",
             "blocks": message_blocks("Paris.", actions)}  # fmt: skip
    body = fake.press("1700000002.000100", action_id, BOB, shown=shown)
    if value is not None:
        body["actions"][0]["value"] = value
    return body | extra


def test_parse_a_press() -> None:
    press = parse_press(_payload(VOTE_UP))
    assert press is not None
    assert (press.action, press.user, press.message_ts) == (VOTE_UP, BOB, "1700000002.000100")
    assert press.ref.conversation == ConversationKey("slack", CHANNEL, THREAD)
    assert press.reply_messages == ("1700000001.000100", "1700000002.000100")
    assert press.reply_id == "1700000001.000100"
    value = ReplyRef(CHANNEL, THREAD, THREAD, generation=3).value()
    again = parse_press(_payload(REGENERATE, value))
    assert again is not None and again.reply_id == "1700000002.000100#3"


def test_anything_but_a_press_of_the_bots_buttons_is_ignored() -> None:
    other = _payload()
    other["actions"][0]["action_id"] = "someone_elses_button"
    elsewhere = _payload()
    elsewhere["container"]["channel_id"] = "C0ELSEWHERE"  # not the value's channel
    for body in (
        other,
        elsewhere,
        _payload(value="not json"),
        _payload(value='["a list"]'),
        _payload(value='{"c": "C0GENERAL1"}'),  # no message id
        _payload(value='{"c": "C0GENERAL1", "m": "1.2", "g": -1}'),
        _payload(value='{"c": "C0GENERAL1", "m": "1.2", "r": [1]}'),
        _payload(type="view_submission"),
        _payload(actions=[]),
        _payload(user="U0ANN00001"),
    ):
        assert parse_press(body) is None


# --- over HTTP ------------------------------------------------------------------------------


_shown_in_full: list[str] = []


async def press(
    bot: SlackBot, ts: str, action_id: str, user: str, *, shown: dict[str, Any] | None = None
) -> None:
    """`user` presses `action_id` on message `ts`: Slack posts the payload form-encoded,
    signed; the HTTP 200 is the ack."""
    body = bot.fake.press(ts, action_id, user, shown=shown)
    said = f"press      {action_id} by {user} on message {ts}"
    if not _shown_in_full:  # for the transcript: the first payload in full
        _shown_in_full.append(ts)
        said += ": payload=" + json.dumps(body, indent=2, ensure_ascii=False).replace(
            "\n", "\n           "
        )
    bot.sent.append((time.monotonic(), said))
    status, _ = await bot.post(
        urlencode({"payload": json.dumps(body)}),
        content_type="application/x-www-form-urlencoded",
    )
    assert status == 200


async def told(bot: SlackBot, count: int = 1) -> list[str]:
    """The private answers so far (at least `count`), each checked ephemeral."""
    calls = await bot.fake.wait_for(lambda c: c.method == "response_url", count)
    for call in calls:
        assert call.args["response_type"] == "ephemeral"
        assert not call.args.get("replace_original")  # a button's message stays as it is
    return [str(c.args["text"]) for c in calls]


def reply_ts(bot: SlackBot) -> list[str]:
    """The ts of the bot's messages in CHANNEL that are still there."""
    return [
        str(c.response["ts"])
        for c in bot.fake.of("chat.postMessage")
        if c.response
        and c.args.get("channel") == CHANNEL
        and c.response["ts"] not in bot.fake.deleted
    ]


async def answered(bot: SlackBot, **event: Any) -> str:
    """A mention in CHANNEL, answered in full: the reply's thread."""
    body = await bot.send("app_mention", **event)
    await bot.fake.wait_for(lambda c: c.method == "chat.postMessage")
    await bot.settle()
    return str(body["event"]["ts"])


async def test_stop_mid_stream_keeps_the_partial_reply(slack_bot: Factory) -> None:
    model = GatedModel("Still writing this one, slowly and at length.")
    bot = await slack_bot(model)
    thread = str((await bot.send("app_mention"))["event"]["ts"])
    (first,) = await bot.posts()
    ts = str(first.response["ts"])
    assert list(bot.fake.buttons(ts)) == [STOP]  # while it is written: Stop only
    try:
        await press(bot, ts, STOP, ANN)
        await bot.fake.wait_for(
            lambda c: c.method == "chat.update" and "(stopped)" in c.args["text"]
        )
    finally:
        model.gate.set()
    await bot.settle()
    assert bot.fake.final_texts(CHANNEL) == ["Still writ" + STOPPED_MARK]
    assert list(bot.fake.buttons(ts)) == [REGENERATE, VOTE_UP, VOTE_DOWN]  # Stop is gone
    history = await bot.engine.memory.history(ConversationKey("slack", CHANNEL, thread))
    assert [(t.role, t.content) for t in history][-1] == ("assistant", "Still writ")
    assert not bot.fake.matching(lambda c: c.method == "response_url")  # the reply says it
    transcript("Stop mid-stream", bot)


async def test_stop_by_someone_else_is_refused_privately(slack_bot: Factory) -> None:
    model = GatedModel("Ann's answer, written to the end.")
    bot = await slack_bot(model)
    await bot.send("app_mention")
    (first,) = await bot.posts()
    ts = str(first.response["ts"])
    try:
        await press(bot, ts, STOP, BOB)
        assert await told(bot) == [STOP_NOT_YOURS]
    finally:
        model.gate.set()
    await bot.settle()
    assert bot.fake.final_texts(CHANNEL) == ["Ann's answer, written to the end."]
    await press(bot, ts, VOTE_UP, BOB)  # the reply has ended: the buttons of its end
    assert (await told(bot, 2))[1] == THANKS


async def test_regenerate_edits_the_messages_and_memory(slack_bot: Factory) -> None:
    answers = ["Long first answer. " * 200, "A second, shorter answer.", "A third one."]
    model = ScriptedModel(lambda _text: answers[len(model.inputs) - 1], chunk=500)
    bot = await slack_bot(model)
    thread = await answered(bot)
    first, last = reply_ts(bot)  # the first answer took two messages
    assert list(bot.fake.buttons(first)) == [] and REGENERATE in bot.fake.buttons(last)
    await press(bot, last, REGENERATE, ANN)
    await bot.fake.wait_for(lambda c: c.method == "chat.delete")
    await bot.settle()
    # Edited into the first message, the second deleted; no new message.
    assert bot.fake.final_texts(CHANNEL) == ["A second, shorter answer."]
    assert bot.fake.deleted == {last} and len(bot.fake.of("chat.postMessage")) == 2
    key = ConversationKey("slack", CHANNEL, thread)
    history = await bot.engine.memory.history(key)
    assert [t.content for t in history] == ["What is the capital of France?", answers[1]]
    value = json.loads(bot.fake.buttons(first)[REGENERATE]["value"])
    assert value["g"] == 1 and "r" not in value
    # Its own buttons regenerate it again.
    await press(bot, first, REGENERATE, ANN)
    await bot.fake.wait_for(lambda c: c.method == "chat.update" and c.args["text"] == answers[2])
    await bot.settle()
    assert [t.content for t in await bot.engine.memory.history(key)][-1] == answers[2]
    assert not bot.fake.matching(lambda c: c.method == "response_url")
    transcript("Regenerate: a reply of two messages rewritten into one", bot)


async def test_regenerate_is_refused_after_a_newer_message_and_to_others(
    slack_bot: Factory,
) -> None:
    model = ScriptedModel(lambda text: f"On {text[:12]}.")
    bot = await slack_bot(model)
    thread = await answered(bot)
    (earlier,) = reply_ts(bot)
    await bot.send("message", text="and Spain?", channel=CHANNEL, channel_type="channel",
                   thread_ts=thread)  # fmt: skip
    await bot.posts(2)
    await bot.settle()
    latest = reply_ts(bot)[1]
    edits = len(bot.fake.of("chat.update"))
    await press(bot, earlier, REGENERATE, ANN)
    assert await told(bot) == [TOO_LATE]
    await press(bot, latest, REGENERATE, BOB)  # the latest, but Ann asked
    assert await told(bot, 2) == [TOO_LATE, NOT_YOURS]
    await bot.settle()
    assert len(bot.fake.of("chat.update")) == edits  # no message touched
    assert len(model.inputs) == 2


async def test_a_vote_counts_once_per_person(slack_bot: Factory, redis_server: RedisServer) -> None:
    bot = await slack_bot(ScriptedModel("Paris."), memory=RedisMemory(redis_server.url, 20, 3600))
    await answered(bot)
    (ts,) = reply_ts(bot)
    up, down = metrics.FEEDBACK.labels("slack", "up"), metrics.FEEDBACK.labels("slack", "down")
    before = up._value.get(), down._value.get()
    votes = ((ANN, VOTE_UP), (ANN, VOTE_UP), (ANN, VOTE_DOWN), (BOB, VOTE_UP))
    for count, (voter, button) in enumerate(votes, 1):
        await press(bot, ts, button, voter)
        await told(bot, count)  # one at a time: each answered before the next
    assert await told(bot, 4) == [THANKS, ALREADY_VOTED, THANKS, THANKS]
    assert (up._value.get() - before[0], down._value.get() - before[1]) == (2, 1)
    transcript("Votes", bot)


async def test_buttons_after_a_restart(slack_bot: Factory, redis_server: RedisServer) -> None:
    answers = iter(["Before the restart.", "After the restart."])
    model = ScriptedModel(lambda _text: next(answers))
    before = await slack_bot(model, memory=RedisMemory(redis_server.url, 20, 3600))
    thread = await answered(before)
    (ts,) = reply_ts(before)
    (post,) = before.fake.of("chat.postMessage")
    stale = {"channel": CHANNEL, "thread_ts": thread, "text": post.args["text"],
             "blocks": blocks_of(post.args)}  # fmt: skip
    before.stop.set()
    await asyncio.wait_for(before.task, 30)
    after = await slack_bot(model, memory=RedisMemory(redis_server.url, 20, 3600))
    # A Stop still showing (a client not refreshed, or a reply cut off by the restart).
    await press(after, ts, STOP, ANN, shown=stale)
    assert await told(after) == [STOP_ENDED]
    await press(after, ts, REGENERATE, ANN)  # the state is in the value and in Redis
    await after.fake.wait_for(lambda c: c.method == "chat.update" and "After" in c.args["text"])
    await after.settle()
    assert after.fake.final_texts(CHANNEL) == ["After the restart."]
    history = await after.engine.memory.history(ConversationKey("slack", CHANNEL, thread))
    assert [t.content for t in history][-1] == "After the restart."
    await press(after, ts, VOTE_DOWN, BOB)
    assert await told(after, 2) == [STOP_ENDED, THANKS]
    transcript("Buttons after a restart (a second bot on the same Redis)", after, before)


async def test_a_natively_streamed_reply_ends_with_the_buttons(slack_bot: Factory) -> None:
    answers = iter(["Streamed first.", "Written again."])
    model = ScriptedModel(lambda _text: next(answers))
    bot = await slack_bot(model, slack_native_streaming=True)
    thread = str((await bot.send("app_mention"))["event"]["ts"])
    (stop,) = await bot.fake.wait_for(lambda c: c.method == "chat.stopStream")
    await bot.settle()
    ts = str(stop.args["ts"])
    (actions,) = blocks_of(stop.args)  # at the bottom of the streamed text
    shown = {"channel": CHANNEL, "thread_ts": thread, "text": "Streamed first.",
             "blocks": [actions]}  # fmt: skip
    assert [e["action_id"] for e in actions["elements"]] == [REGENERATE, VOTE_UP, VOTE_DOWN]
    await press(bot, ts, REGENERATE, ANN, shown=shown)  # edited in place, by chat.update
    await bot.fake.wait_for(lambda c: c.method == "chat.update" and "again" in c.args["text"])
    await bot.settle()
    assert len(bot.fake.of("chat.startStream")) == 1 and not bot.fake.of("chat.postMessage")
    *_, update = bot.fake.of("chat.update")  # Stop while written, then the end's buttons
    assert update.args["ts"] == ts and update.args["text"] == "Written again."
    assert REGENERATE in {e["action_id"] for e in blocks_of(update.args)[1]["elements"]}


async def test_buttons_go_through_the_allow_lists(slack_bot: Factory) -> None:
    model = ScriptedModel("For Ann only.")
    bot = await slack_bot(model, slack_allowed_users=ANN)
    await answered(bot)
    (ts,) = reply_ts(bot)
    (post,) = bot.fake.of("chat.postMessage")
    streaming = {"channel": CHANNEL, "thread_ts": post.args["thread_ts"],
                 "text": post.args["text"], "blocks": blocks_of(post.args)}  # fmt: skip
    await press(bot, ts, VOTE_UP, BOB)
    await press(bot, ts, REGENERATE, BOB)
    await press(bot, ts, STOP, BOB, shown=streaming)
    assert await told(bot, 3) == [REFUSAL] * 3
    assert len(model.inputs) == 1 and len(bot.fake.of("chat.update")) <= 1


async def test_usage_and_a_silent_reply(slack_bot: Factory) -> None:
    bot = await slack_bot(ScriptedModel("A reply of some length, to count."))
    bot.engine.daily_tokens = 1000
    await answered(bot)
    assert await bot.command("/usage", "") == 200
    (text,) = await told(bot)
    usage = await bot.engine.usage("slack", ANN)
    assert usage.used > 0 and text.split(" (in ")[0] == describe_usage(usage).split(" (in ")[0]
    # Past the allowance: one note, then nothing at all.
    bot.engine.daily_tokens = usage.used
    await bot.send("app_mention", text=f"<@{BOT_USER}> more?")
    await bot.posts(2)
    await bot.send("app_mention", text=f"<@{BOT_USER}> and more?")
    await asyncio.sleep(0.3)
    await bot.settle()
    assert len(bot.fake.of("chat.postMessage")) == 2
    assert "allowance" in bot.fake.final_texts(CHANNEL)[1]


# --- the transcript for the closing note -------------------------------------------------


def _describe(call: Call) -> str | None:
    args = call.args
    if call.method in ("chat.postMessage", "chat.update"):
        buttons = [
            f"{e['action_id']} value={e['value']}"
            for b in blocks_of(args)
            if b["type"] == "actions"
            for e in b["elements"]
        ]
        where = (
            f"ts {args['ts']}"
            if call.method == "chat.update"
            else f"thread {args.get('thread_ts')}"
        )
        shown = f"{call.method} {where}: text={str(args.get('text'))[:60]!r}"
        return shown + (f"\n             buttons: {'; '.join(buttons)}" if buttons else "")
    if call.method == "chat.delete":
        return f"chat.delete ts {args['ts']}"
    if call.method == "response_url":
        return f"ephemeral ({args['response_type']}): {args['text']!r}"
    return None


def transcript(title: str, bot: SlackBot, earlier: SlackBot | None = None) -> None:
    """With SLACK_BUTTONS_TRANSCRIPT=<file>, append what was sent in (to `earlier`, then
    to `bot`) and what the fake Slack saw, in order. Otherwise nothing."""
    target = os.environ.get("SLACK_BUTTONS_TRANSCRIPT")
    if not target:
        return
    sent = [*(earlier.sent if earlier else []), *bot.sent]
    lines = [(at, f"in         {text}") for at, text in sent]
    lines += [(c.at, f"slack saw  {said}") for c in bot.fake.calls if (said := _describe(c))]
    body = "\n".join(text for _, text in sorted(lines, key=lambda line: line[0]))
    with Path(target).open("a", encoding="utf-8") as out:
        out.write(f"### {title}\n\n```\n{body}\n```\n\n")
