"""The buttons under a Discord reply (Stop, Regenerate, 👍, 👎) and /usage, through
discord.py against the fake Discord: the components the bot posts, the component
interactions (type 3) Discord sends when someone presses one, and the answers and
edits that follow, read off the wire. Memory is a real Redis where it matters."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

from adapters.discord.buttons import (
    CUSTOM_ID_LIMIT,
    ENDED,
    NOT_YOURS_TO_STOP,
    THANKS,
    UNCHANGED,
    Action,
    ButtonRef,
    ended_buttons,
    parse,
    streaming_buttons,
)
from adapters.discord.translate import REFUSAL
from bot.engine import NOT_YOURS, STOPPED_MARK, TOO_LATE
from bot.messages import ConversationKey, Turn
from bot.store.memory import RedisMemory
from bot.usage import describe_usage
from tests.conftest import RedisServer
from tests.fake_discord import ANN, BOB, BOT_ID, EVE, GENERAL, THREAD, Call
from tests.scripted import ScriptedModel
from tests.test_discord import Factory, Harness

MANAGE_MESSAGES = 1 << 13
EPHEMERAL = 64
BIG = "9" * 20  # the longest snowflake

# --- custom_ids and layout (pure)


@pytest.mark.parametrize("thread", [None, BIG])
@pytest.mark.parametrize("action", list(Action))
def test_custom_ids_round_trip_within_discords_limit(action: Action, thread: str | None) -> None:
    key = ConversationKey("discord", BIG, thread)
    ref = ButtonRef(action, key, BIG, "" if action is Action.STOP else BIG)
    custom_id = ref.custom_id()
    assert len(custom_id) <= CUSTOM_ID_LIMIT
    assert re.fullmatch(r"chatbot:[a-z]+:[0-9]+:([0-9]+|-):[0-9]+(:[0-9]+)?", custom_id)
    assert parse(custom_id) == ref


@pytest.mark.parametrize(
    "custom_id",
    [
        "",
        "other:stop:1:-:2",
        "chatbot:stop:1:-:2:3",  # Stop names no reply
        "chatbot:regen:1:-:2",  # the others do
        "chatbot:up:1:-:two:3",
        "chatbot:down:1:-:2:3:4",
        f"chatbot:up:1:-:2:{'1' * 21}",
        "chatbot:reset:1:-:2:3",
    ],
)
def test_foreign_or_malformed_custom_ids_are_not_ours(custom_id: str) -> None:
    assert parse(custom_id) is None


def test_ids_that_are_not_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        ButtonRef(Action.UP, ConversationKey("discord", "general chat"), "1", "2").custom_id()


def test_layout_stop_while_written_then_regenerate_and_votes() -> None:
    key = ConversationKey("discord", GENERAL, THREAD)
    (stop,) = streaming_buttons(key, "61")
    assert (stop.label, stop.style, stop.custom_id) == (
        "Stop",
        "danger",
        f"chatbot:stop:{GENERAL}:{THREAD}:61",
    )
    regen, up, down = ended_buttons(key, "61", "90")
    assert regen.label == "Regenerate"
    assert (up.emoji, down.emoji, up.label, down.label) == ("👍", "👎", None, None)
    assert [b.custom_id for b in (regen, up, down)] == [
        f"chatbot:{a}:{GENERAL}:{THREAD}:61:90" for a in ("regen", "up", "down")
    ]


# --- through discord.py


class Buttons:
    """Pressing buttons on a bot's messages, as people do in the Discord client."""

    def __init__(self, bot: Harness, first_id: int = 7100000000000000001) -> None:
        self.bot = bot
        self.ids = itertools.count(first_id)

    async def ask(self, text: str, *, author: str = ANN, count: int = 1) -> tuple[str, list[str]]:
        """Ask the bot; once its reply has ended: the asking message's id and the
        ids of the reply's messages (`count` of them)."""
        before = len(self.bot.fake.sent())
        message_id = await self.bot.say(f"<@{BOT_ID}> {text}", author=author)
        posts = await self.bot.replies(before + count)
        await self.bot.settle()
        return message_id, [str((p.response or {})["id"]) for p in posts[before:]]

    def custom_id(self, message_id: str, action: Action) -> str:
        for button in self.bot.fake.buttons(message_id):
            if str(button["custom_id"]).split(":")[1] == action.value:
                return str(button["custom_id"])
        raise AssertionError(f"no {action} button on {message_id}")

    def actions(self, message_id: str) -> list[str]:
        return [str(b["custom_id"]).split(":")[1] for b in self.bot.fake.buttons(message_id)]

    async def press(
        self,
        message_id: str,
        action: Action,
        *,
        user: str = ANN,
        permissions: int = 1071698660929,
        custom_id: str | None = None,
    ) -> str:
        """Press a button on a message; returns the interaction's id."""
        interaction_id = str(next(self.ids))
        data = self.bot.fake.press(
            message_id,
            custom_id or self.custom_id(message_id, action),
            interaction_id,
            user=user,
            permissions=permissions,
        )
        await self.bot.fake.dispatch("INTERACTION_CREATE", data)
        return interaction_id

    async def answers(self, interaction_id: str, count: int = 1) -> list[Call]:
        """The interaction's callback (and what followed it)."""
        prefix = f"/interactions/{interaction_id}/"
        webhook = f"/webhooks/{BOT_ID}/token-{interaction_id}"
        return await self.bot.fake.wait_for(
            lambda c: c.path.startswith(prefix) or c.path.startswith(webhook), count
        )

    async def private_note(self, interaction_id: str) -> str:
        """What the presser alone was told, answered at once (type 4, ephemeral)."""
        (callback,) = await self.answers(interaction_id)
        body = callback.body or {}
        assert body["type"] == 4 and body["data"]["flags"] == EPHEMERAL
        return str(body["data"]["content"])


def assistant_turns(turns: list[Turn]) -> list[str]:
    return [t.content for t in turns if t.role == "assistant"]


async def test_a_reply_carries_stop_while_written_then_regenerate_and_votes(
    discord_bot: Factory,
) -> None:
    bot = await discord_bot(ScriptedModel("Paris. " * 400))  # 2,800 characters: 2 messages
    buttons = Buttons(bot)
    asked, (first, last) = await buttons.ask("capital of France?", count=2)
    posts = bot.fake.sent(GENERAL)
    # The first message was posted with Stop under it, the second without buttons.
    assert posts[0].body is not None and posts[1].body is not None
    (row,) = posts[0].body["components"]
    assert row["type"] == 1
    (stop,) = row["components"]
    assert stop["type"] == 2 and stop["style"] == 4 and stop["label"] == "Stop"
    assert stop["custom_id"] == f"chatbot:stop:{GENERAL}:-:{asked}"
    assert not posts[1].body.get("components")
    # Ended: Stop is gone, the last message carries Regenerate, 👍, 👎 naming the reply.
    assert buttons.actions(first) == []
    assert buttons.actions(last) == ["regen", "up", "down"]
    assert buttons.custom_id(last, Action.UP) == f"chatbot:up:{GENERAL}:-:{asked}:{first}"
    for call in bot.fake.patches():
        assert (call.body or {})["allowed_mentions"]["parse"] == []
    # The buttons are dynamic items: discord.py keeps no view per message (no leak).
    assert bot.adapter.client._connection._view_store._views == {}


async def test_stop_mid_stream_keeps_the_partial_text(
    discord_bot: Factory, redis_server: RedisServer
) -> None:
    whole = "word " * 200
    model = ScriptedModel(whole, chunk=5, delay=0.02)  # ~4 s if not stopped
    memory = RedisMemory(redis_server.url, 20, 3600)
    bot = await discord_bot(model, memory=memory, edit_interval=0.05)
    buttons = Buttons(bot)
    asked = await bot.say(f"<@{BOT_ID}> talk a lot")
    (post,) = await bot.replies()
    reply = str((post.response or {})["id"])
    pressed = await buttons.press(reply, Action.STOP)
    (ack,) = await buttons.answers(pressed)
    assert (ack.body or {})["type"] == 6  # acknowledged; the reply's edit says the rest
    await bot.settle()
    (shown,) = bot.fake.final_contents(GENERAL)
    assert shown.endswith(STOPPED_MARK.strip())
    partial = shown.removesuffix(STOPPED_MARK.strip()).strip()
    assert partial and len(partial) < len(whole.strip())
    history, _ = await memory.load(ConversationKey("discord", GENERAL))
    assert assistant_turns(history) == [partial]
    assert history[0].message_id == asked
    # Stopped, it can be written again or voted on.
    assert buttons.actions(reply) == ["regen", "up", "down"]
    # Stop pressed as the reply ended (the press and the edit crossed): too late.
    ended_row = bot.fake.messages[reply]["components"]
    bot.fake.messages[reply]["components"] = (post.body or {})["components"]
    again = await buttons.press(reply, Action.STOP)
    assert await buttons.private_note(again) == ENDED
    bot.fake.messages[reply]["components"] = ended_row


async def test_stop_by_someone_else_is_refused_unless_they_manage_messages(
    discord_bot: Factory,
) -> None:
    model = ScriptedModel("word " * 200, chunk=5, delay=0.02)
    bot = await discord_bot(model, edit_interval=0.05)
    buttons = Buttons(bot)
    await bot.say(f"<@{BOT_ID}> talk a lot")
    (post,) = await bot.replies()
    reply = str((post.response or {})["id"])
    refused = await buttons.press(reply, Action.STOP, user=BOB)
    assert await buttons.private_note(refused) == NOT_YOURS_TO_STOP
    moderator = await buttons.press(
        reply, Action.STOP, user=EVE, permissions=1071698660929 | MANAGE_MESSAGES
    )
    (ack,) = await buttons.answers(moderator)
    assert (ack.body or {})["type"] == 6
    await bot.settle()
    (shown,) = bot.fake.final_contents(GENERAL)
    assert shown.endswith(STOPPED_MARK.strip())


async def test_regenerate_edits_the_reply_and_memory_keeps_the_new_one(
    discord_bot: Factory, redis_server: RedisServer
) -> None:
    answers = iter(["The first answer.", "A second, better answer."])
    model = ScriptedModel(lambda _: next(answers))
    memory = RedisMemory(redis_server.url, 20, 3600)
    bot = await discord_bot(model, memory=memory)
    buttons = Buttons(bot)
    asked, (reply,) = await buttons.ask("explain")
    assert bot.fake.final_contents(GENERAL) == ["The first answer."]
    # Someone else may not have it written again; the text stays.
    other = await buttons.press(reply, Action.REGENERATE, user=BOB)
    (ack, note) = await buttons.answers(other, 2)
    assert (ack.body or {})["type"] == 6
    assert (note.body or {})["content"] == NOT_YOURS and (note.body or {})["flags"] == EPHEMERAL
    assert bot.fake.final_contents(GENERAL) == ["The first answer."]
    edits_before = len(bot.fake.patches())
    pressed = await buttons.press(reply, Action.REGENERATE)
    (ack,) = await buttons.answers(pressed)
    assert (ack.body or {})["type"] == 6  # deferred: the message's edits are the answer
    await bot.settle()
    # Edited in place, no new message; Stop showed while it was written again.
    assert len(bot.fake.sent(GENERAL)) == 1
    assert bot.fake.final_contents(GENERAL) == ["A second, better answer."]
    regenerating = bot.fake.patches()[edits_before]
    assert regenerating.path == f"/channels/{GENERAL}/messages/{reply}"
    (row,) = (regenerating.body or {})["components"]
    assert row["components"][0]["custom_id"] == f"chatbot:stop:{GENERAL}:-:{asked}"
    assert buttons.actions(reply) == ["regen", "up", "down"]
    history, _ = await memory.load(ConversationKey("discord", GENERAL))
    assert assistant_turns(history) == ["A second, better answer."]
    assert model.inputs == ["explain", "explain"]


async def test_regenerate_after_a_newer_message_is_refused(discord_bot: Factory) -> None:
    bot = await discord_bot(ScriptedModel(lambda text: f"re: {text}"))
    buttons = Buttons(bot)
    _, (older,) = await buttons.ask("one")
    await buttons.ask("two")
    pressed = await buttons.press(older, Action.REGENERATE)
    (_, note) = await buttons.answers(pressed, 2)
    assert note.path == f"/webhooks/{BOT_ID}/token-{pressed}"  # a private follow-up
    assert (note.body or {})["content"] == TOO_LATE and (note.body or {})["flags"] == EPHEMERAL
    assert bot.fake.final_contents(GENERAL) == ["re: one", "re: two"]


async def test_a_vote_counts_once_per_person_and_can_change(discord_bot: Factory) -> None:
    bot = await discord_bot(ScriptedModel("An answer."))
    buttons = Buttons(bot)
    _, (reply,) = await buttons.ask("question")

    async def vote(action: Action, user: str) -> str:
        pressed = await buttons.press(reply, action, user=user)
        ack, answer = await buttons.answers(pressed, 2)
        # Acknowledged at once and privately ("thinking"), then answered.
        assert (ack.body or {})["type"] == 5 and (ack.body or {})["data"]["flags"] == EPHEMERAL
        assert answer.method == "PATCH" and answer.path.endswith("/messages/@original")
        return str((answer.body or {})["content"])

    assert await vote(Action.UP, ANN) == THANKS
    assert await vote(Action.UP, ANN) == UNCHANGED
    assert await vote(Action.DOWN, ANN) == THANKS  # changed
    assert await vote(Action.UP, BOB) == THANKS
    key = ConversationKey("discord", GENERAL)
    votes = bot.engine.memory
    assert await votes.vote(key, reply, ANN, "down") == "down"  # her vote, as stored
    assert await votes.vote(key, reply, BOB, "up") == "up"


async def test_buttons_go_through_the_allow_lists(discord_bot: Factory) -> None:
    bot = await discord_bot(ScriptedModel("For Bob."), discord_allowed_users=BOB)
    buttons = Buttons(bot)
    _, (reply,) = await buttons.ask("hi", author=BOB)
    for action in (Action.UP, Action.REGENERATE):
        pressed = await buttons.press(reply, action, user=ANN)
        assert await buttons.private_note(pressed) == REFUSAL
    pressed = await buttons.press(reply, Action.UP, user=BOB)
    assert len(await buttons.answers(pressed, 2)) == 2
    assert bot.fake.final_contents(GENERAL) == ["For Bob."]


async def test_buttons_after_a_restart(discord_bot: Factory, redis_server: RedisServer) -> None:
    answers = iter(["Before the restart.", "After the restart."])
    model = ScriptedModel(lambda _: next(answers))
    bot = await discord_bot(model, memory=RedisMemory(redis_server.url, 20, 3600))
    asked, (reply,) = await Buttons(bot).ask("hello")
    stop_row = (bot.fake.sent(GENERAL)[0].body or {})["components"]
    bot.stop.set()
    await asyncio.wait_for(bot.task, 30)
    # A new process, with the same Redis and none of the old one's state.
    later = await discord_bot(
        model, memory=RedisMemory(redis_server.url, 20, 3600), first_id=6200000000000000001
    )
    buttons = Buttons(later, 7200000000000000001)
    # Stop left on a message (as by a process killed mid-reply): the reply has ended.
    ended_row = later.fake.messages[reply]["components"]
    later.fake.messages[reply]["components"] = stop_row
    pressed = await buttons.press(reply, Action.STOP)
    assert await buttons.private_note(pressed) == ENDED
    # Regenerate and the votes still work: everything they need is in the custom_id.
    later.fake.messages[reply]["components"] = ended_row
    pressed = await buttons.press(reply, Action.REGENERATE)
    await buttons.answers(pressed)
    await later.settle()
    assert later.fake.final_contents(GENERAL) == ["After the restart."]
    assert buttons.custom_id(reply, Action.UP) == f"chatbot:up:{GENERAL}:-:{asked}:{reply}"
    pressed = await buttons.press(reply, Action.UP)
    (_, answer) = await buttons.answers(pressed, 2)
    assert (answer.body or {})["content"] == THANKS


async def test_usage_and_silence_past_the_daily_limit(discord_bot: Factory) -> None:
    bot = await discord_bot(ScriptedModel("A fairly long answer, " * 5), daily_tokens=20)
    buttons = Buttons(bot)
    await buttons.ask("first")
    await bot.interact("usage")
    (ack,) = await bot.fake.wait_for(lambda c: c.path.startswith("/interactions/"))
    assert (ack.body or {})["type"] == 5 and (ack.body or {})["data"]["flags"] == EPHEMERAL
    (answer,) = await bot.fake.wait_for(lambda c: c.path.endswith("/messages/@original"))
    usage = await bot.engine.usage("discord", ANN)
    assert usage.used > 20
    assert (answer.body or {})["content"] == describe_usage(usage)
    # Past the limit: one note, then nothing at all (no message, no "is typing…").
    await buttons.ask("second")
    assert "allowance" in bot.fake.final_contents(GENERAL)[-1]
    posts, calls = len(bot.fake.sent()), len(bot.fake.calls)
    await bot.say(f"<@{BOT_ID}> third")
    await bot.settle()
    await asyncio.sleep(0.1)
    assert len(bot.fake.sent()) == posts
    assert not [c for c in bot.fake.calls[calls:] if c.path.endswith("/typing")]


async def test_buttons_in_a_thread_name_its_conversation(discord_bot: Factory) -> None:
    bot = await discord_bot(ScriptedModel("In the thread."))
    buttons = Buttons(bot)
    asked = await bot.say(f"<@{BOT_ID}> hi", channel=THREAD)
    (post,) = await bot.replies(channel=THREAD)
    await bot.settle()
    reply = str((post.response or {})["id"])
    assert buttons.custom_id(reply, Action.UP) == f"chatbot:up:{GENERAL}:{THREAD}:{asked}:{reply}"
    pressed = await buttons.press(reply, Action.UP)
    (_, answer) = await buttons.answers(pressed, 2)
    assert (answer.body or {})["content"] == THANKS


async def test_regenerate_after_a_restart_rewrites_every_message_of_the_reply(
    discord_bot: Factory, redis_server: RedisServer
) -> None:
    answers = iter(["Paris. " * 800, "Short now."])  # 5,600 characters: 3 messages
    model = ScriptedModel(lambda _: next(answers), chunk=400)
    bot = await discord_bot(model, memory=RedisMemory(redis_server.url, 20, 3600))
    _, (first, middle, last) = await Buttons(bot).ask("long one", count=3)
    bot.stop.set()
    await asyncio.wait_for(bot.task, 30)
    later = await discord_bot(
        model, memory=RedisMemory(redis_server.url, 20, 3600), first_id=6200000000000000001
    )
    buttons = Buttons(later, 7200000000000000001)
    pressed = await buttons.press(last, Action.REGENERATE)
    await buttons.answers(pressed)
    await later.settle()
    # The middle message was found in the channel's history; the new reply needs one.
    lookup = [c for c in later.fake.calls if c.method == "GET" and c.path.endswith("/messages")]
    assert lookup and lookup[0].query["after"] == first
    assert later.fake.deleted >= {middle, last}
    assert later.fake.final_contents(GENERAL) == ["Short now."]
    assert buttons.actions(first) == ["regen", "up", "down"]
