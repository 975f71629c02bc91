"""Per-channel personas: stored in memory, used in place of the default system
prompt, set through the console, Discord and Slack (with their permission rules)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from adapters.console import CONVERSATION, ConsoleAdapter
from bot import personas
from bot.engine import PERSONA_MAX_CHARS, Engine
from bot.inference.loader import LoadedModel
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message
from bot.store.memory import InProcessMemory, RedisMemory
from tests.conftest import RedisServer, greedy
from tests.scripted import ScriptedModel

PIRATE = "You are a pirate. Answer every question like a pirate would."


def msg(text: str, channel: str, thread: str | None = None) -> Message:
    return Message(ConversationKey("test", channel, thread), "u", "U", text)


def test_parse() -> None:
    assert personas.parse(" set  Be brief. ") == ("set", "Be brief.")
    assert personas.parse("SHOW") == ("show", "")
    assert personas.parse("clear") == ("clear", "")
    assert personas.parse("set") is None and personas.parse("bogus") is None
    assert personas.parse("show me") is None


@pytest.mark.model
async def test_persona_replaces_the_system_prompt_in_its_channel(
    bundled: LoadedModel, redis_server: RedisServer
) -> None:
    model = greedy(bundled, max_new_tokens=4, system_prompt="DEFAULT-PROMPT")
    seen: list[str] = []

    class Spy:
        def prepare(
            self,
            history: Any,
            text: str,
            system_prompt: str | None = None,
            speaker: str | None = None,
        ) -> Any:
            prompt = model.prepare(history, text, system_prompt, speaker)
            seen.append(bundled.tokenizer.decode(prompt.input_ids))
            return prompt

        def generate_batch(self, *args: Any) -> list[str]:
            return model.generate_batch(*args)

    engine = Engine(LocalBackend(Spy()), RedisMemory(redis_server.url, 20, 600))
    await engine.set_persona(ConversationKey("test", "ship"), PIRATE)
    await engine.reply(msg("Hello", "ship"))
    await engine.reply(msg("Hello", "ship", thread="t1"))  # a thread of that channel
    await engine.reply(msg("Hello", "harbour"))
    assert PIRATE in seen[0] and "DEFAULT-PROMPT" not in seen[0]
    assert PIRATE in seen[1]
    assert "DEFAULT-PROMPT" in seen[2] and PIRATE not in seen[2]
    assert await engine.persona(ConversationKey("test", "ship", "t9")) == PIRATE
    await engine.set_persona(ConversationKey("test", "ship"), None)
    await engine.reply(msg("Hello", "ship"))
    assert "DEFAULT-PROMPT" in seen[3]
    with pytest.raises(ValueError, match="at most"):
        await engine.set_persona(ConversationKey("test", "ship"), "x" * (PERSONA_MAX_CHARS + 1))
    await engine.close()


async def test_console_persona_commands() -> None:
    model = ScriptedModel("ok")
    engine = Engine(LocalBackend(model), InProcessMemory(20, 600))
    out = io.StringIO()
    text = "/persona set Be brief.\n/persona show\nhi\n/persona bogus\n/persona clear\nhi\n"
    await ConsoleAdapter(io.StringIO(text), out, interactive=False).run(engine, asyncio.Event())
    lines = out.getvalue().splitlines()
    assert lines[0] == "Persona set for this channel."
    assert lines[1] == "This channel's persona: Be brief."
    assert lines[3] == personas.USAGE
    assert model.system_prompts == ["Be brief.", None]
    assert await engine.persona(CONVERSATION) is None
    await engine.close()


async def test_discord_persona_needs_manage_channels(discord_bot: Any) -> None:
    from tests.fake_discord import BOT_ID, GENERAL, THREAD, payload

    model = ScriptedModel("arr")
    bot = await discord_bot(model)
    option = [{"name": "set", "type": 1, "options": [{"name": "text", "type": 3, "value": PIRATE}]}]
    member = {**payload("interaction_create")["member"], "permissions": "0"}

    def answers() -> list[str]:
        """What the user saw: immediate answers, and deferred ones' edits."""
        out = []
        for call in bot.fake.calls:
            body = call.body or {}
            if call.path.startswith("/interactions/") and "content" in body.get("data", {}):
                out.append(body["data"]["content"])
            elif call.path.endswith("/messages/@original"):
                out.append(body["content"])
        return out

    await bot.interact("persona", option, member=member)  # no Manage Channels
    await bot.fake.wait_for(lambda c: c.path.startswith("/interactions/"))
    await bot.settle()
    assert answers() == [personas.NOT_ALLOWED]
    assert await bot.engine.persona(ConversationKey("discord", GENERAL)) is None
    manager = {**member, "permissions": str(1 << 4)}  # MANAGE_CHANNELS
    await bot.interact("persona", option, member=manager)
    acks = await bot.fake.wait_for(lambda c: c.path.startswith("/interactions/"), 2)
    assert (acks[1].body or {})["data"]["flags"] == 64  # private
    await bot.fake.wait_for(lambda c: c.path.endswith("/messages/@original"))
    assert answers()[-1] == "Persona set for this channel."
    await bot.say(f"<@{BOT_ID}> ahoy", channel=THREAD)  # a thread of #general
    await bot.replies(channel=THREAD)
    await bot.settle()
    assert model.system_prompts == [PIRATE]
    assert await bot.engine.persona(ConversationKey("discord", GENERAL)) == PIRATE


async def test_slack_persona_admins_only(slack_bot: Any) -> None:
    from tests.fake_slack import ANN, BOB, CHANNEL
    from tests.test_slack import SECRET

    model = ScriptedModel("arr")
    bot = await slack_bot(model, slack_admins=ANN)

    async def persona(text: str, user: str) -> str:
        fields = payload_command(bot, text, user)
        before = len(bot.fake.of("response_url"))
        await bot.post(fields, content_type="application/x-www-form-urlencoded")
        calls = await bot.fake.wait_for(lambda c: c.method == "response_url", before + 1)
        return str(calls[-1].args["text"])

    assert "SLACK_ADMINS" in await persona(f"set {PIRATE}", BOB)
    assert await persona(f"set {PIRATE}", ANN) == "Persona set for this channel."
    assert PIRATE in await persona("show", BOB)
    await bot.send("app_mention")
    await bot.posts()
    await bot.settle()
    assert model.system_prompts == [PIRATE]
    assert SECRET and CHANNEL


def payload_command(bot: Any, text: str, user: str) -> str:
    from urllib.parse import urlencode

    from tests.fake_slack import payload

    fields = payload("slash_command")
    fields.update(command="/persona", text=text, user_id=user, response_url=bot.fake.response_url)
    return urlencode(fields)
