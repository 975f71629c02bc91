"""Pure Slack translation, on recorded event payloads."""

from __future__ import annotations

import pytest

from adapters.slack.translate import (
    MESSAGE_LIMIT,
    Rules,
    command_place,
    command_text,
    conversation_key,
    escape,
    is_direct,
    is_person_writing,
    mentions,
    reply_parts,
    reply_thread,
    to_message,
    to_mrkdwn,
)
from bot.messages import ConversationKey
from tests.fake_slack import ANN, BOT_USER, CHANNEL, DM, payload


def test_who_is_answered() -> None:
    assert is_person_writing(payload("app_mention")["event"], BOT_USER)
    assert is_person_writing(payload("message")["event"], BOT_USER)
    assert not is_person_writing(payload("bot_message")["event"], BOT_USER)
    assert not is_person_writing(payload("message_changed")["event"], BOT_USER)
    own = {**payload("message")["event"], "user": BOT_USER}
    assert not is_person_writing(own, BOT_USER)
    for subtype in ("message_deleted", "channel_join", "channel_topic", "bot_message"):
        assert not is_person_writing({**own, "user": ANN, "subtype": subtype}, BOT_USER)
    assert is_person_writing({**own, "user": ANN, "subtype": "thread_broadcast"}, BOT_USER)
    assert mentions(payload("app_mention")["event"], BOT_USER)
    assert mentions({"text": f"hey <@{BOT_USER}|chatbot>"}, BOT_USER)
    assert not mentions({"text": "hey <@U0SOMEONE>"}, BOT_USER)


def test_conversations_and_threads() -> None:
    mention = payload("app_mention")["event"]
    assert conversation_key(mention) == ConversationKey("slack", CHANNEL, mention["ts"])
    assert reply_thread(mention) == mention["ts"]  # a top-level mention starts a thread
    in_thread = {**mention, "ts": "1732800999.000900", "thread_ts": mention["ts"]}
    assert conversation_key(in_thread) == conversation_key(mention)
    assert reply_thread(in_thread) == mention["ts"]
    dm = payload("message")["event"]
    assert conversation_key(dm) == ConversationKey("slack", DM)
    assert reply_thread(dm) is None


def test_message_text() -> None:
    message = to_message(payload("app_mention")["event"], BOT_USER)
    assert message.text == "What is the capital of France?"
    assert message.author_id == ANN and not message.is_direct
    assert message.timestamp.year == 2024
    plain = to_message({**payload("message")["event"], "text": "a &lt; b &amp;&amp; c &gt; d"}, "U")
    assert plain.text == "a < b && c > d" and plain.is_direct


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("**bold** and *italic* and __also bold__", "*bold* and _italic_ and *also bold*"),
        ("~~gone~~", "~gone~"),
        ("# Title\ntext", "*Title*\ntext"),
        ("[docs](https://example.com/a?b=1&c=2)", "<https://example.com/a?b=1&amp;c=2|docs>"),
        ("a < b & c > d", "a &lt; b &amp; c &gt; d"),
        (
            "<!channel> <!here> <@U123> <#C1>",
            "&lt;!channel&gt; &lt;!here&gt; &lt;@U123&gt; &lt;#C1&gt;",
        ),
        ("`**not bold** <x>`", "`**not bold** &lt;x&gt;`"),
        ("```python\nx = '**y**' < 2\n```", "```\nx = '**y**' &lt; 2\n```"),
        ("[evil](javascript:alert(1))", "[evil](javascript:alert(1))"),
        ("[x](https://a.com|<!channel>)", "[x](https://a.com|&lt;!channel&gt;)"),
        ("2 * 3 * 4", "2 * 3 * 4"),
    ],
)
def test_markdown_to_mrkdwn(markdown: str, mrkdwn: str) -> None:
    assert to_mrkdwn(markdown) == mrkdwn


def test_no_mention_can_be_formed() -> None:
    nasty = "<<!channel>> <!subteam^S1> <@U1|x> \x00<!here>\x01 [<!here>](https://a.b)"
    text = to_mrkdwn(nasty)
    assert "<!" not in text and "<@" not in text
    assert escape("<&>") == "&lt;&amp;&gt;"


def test_reply_parts_are_under_the_limit() -> None:
    parts = reply_parts("para " * 3000)
    assert len(parts) > 1 and all(len(p) <= MESSAGE_LIMIT for p in parts)
    assert reply_parts("") == ["…"]


def test_allow_lists() -> None:
    rules = Rules(channels=frozenset({"C1"}), users=frozenset({"U1"}))
    assert rules.allows(user="U1", channel="C1", is_direct=False)
    assert not rules.allows(user="U1", channel="C2", is_direct=False)
    assert rules.allows(user="U1", channel="D9", is_direct=True)
    assert not rules.allows(user="U2", channel="C1", is_direct=False)
    assert Rules().allows(user="U2", channel="C2", is_direct=False)


def test_rules_cover_dms_by_their_own_switch() -> None:
    from tests.conftest import make_settings

    open_rules = Rules()
    assert open_rules.allows(user=ANN, channel=DM, is_direct=True)
    # A channel list alone closes DMs (and the assistant panel) too...
    closed = Rules.from_settings(make_settings(slack_allowed_channels="C0SUPPORT"))
    assert not closed.allows(user=ANN, channel=DM, is_direct=True)
    assert closed.allows(user=ANN, channel="C0SUPPORT", is_direct=False)
    assert not closed.allows(user=ANN, channel=CHANNEL, is_direct=False)
    # ...unless SLACK_ALLOW_DMS says otherwise; and it closes DMs on its own.
    reopened = make_settings(slack_allowed_channels="C0SUPPORT", slack_allow_dms=True)
    assert Rules.from_settings(reopened).allows(user=ANN, channel=DM, is_direct=True)
    no_dms = Rules.from_settings(make_settings(slack_allow_dms=False))
    assert not no_dms.allows(user=ANN, channel=DM, is_direct=True)
    assert no_dms.allows(user=ANN, channel=CHANNEL, is_direct=False)
    users = Rules.from_settings(make_settings(slack_allowed_users="U0BOB00001"))
    assert not users.allows(user=ANN, channel=DM, is_direct=True)


def test_whose_dm_and_which_place() -> None:
    dm = payload("message")["event"]
    assert is_direct(dm)
    # A D… id is not enough: only Slack's channel_type says it is a DM with the bot.
    assert not is_direct({**dm, "channel_type": "mpim", "channel": "G0GROUPDM1"})
    assert not is_direct({"channel": "D0THEIRS01", "ts": "1.0"})
    command = payload("slash_command")
    assert command_place(command) == "channel"
    assert command_place({**command, "channel_name": "directmessage"}) == "dm"
    assert command_place({**command, "channel_name": "mpdm-ann--bob--cy-1"}) == "group_dm"
    assert command_text({"text": " is a &lt; b &amp;&amp; c &gt; d? "}) == "is a < b && c > d?"
