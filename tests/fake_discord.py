"""A local fake of Discord's gateway (websocket) and REST API, on 127.0.0.1.

discord.py connects to it unmodified but for `Route.BASE`: it logs in over REST,
opens the gateway, identifies, gets READY and GUILD_CREATE, and then the tests
dispatch recorded gateway events (MESSAGE_CREATE, INTERACTION_CREATE) to it. Every
REST call the bot makes is recorded with its JSON body, so tests inspect what went
over the wire (content, allowed_mentions, message_reference, components). The fake
keeps each message the bot posted as it stands after its edits, so that a button
press (a component interaction, type 3) carries the message as Discord sends it. It
also stands in for Discord's CDN: attachments a test hosts are served at their `url`
(or fail, or hang), and each download is recorded too.

Discord's real formats: payloads under tests/payloads/discord/ follow the API docs.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from tests.fake_server import FakeServer

PAYLOADS = Path(__file__).parent / "payloads" / "discord"
BOT_ID = "1000000000000000001"
GUILD_ID = "2000000000000000001"
GENERAL = "3000000000000000001"
RANDOM = "3000000000000000002"
THREAD = "3000000000000000010"
DM = "3000000000000000099"
BOT_ROLE = "4000000000000000002"
VIP_ROLE = "4000000000000000003"
ANN = "5000000000000000001"
BOB = "5000000000000000002"
OTHER_BOT = "5000000000000000003"
EVE = "5000000000000000004"
# Display names (global_name) of the people above, as their messages carry them.
NAMES = {ANN: "Ann", BOB: "Bob", EVE: "Eve"}


def payload(name: str) -> dict[str, Any]:
    """A recorded payload, as a fresh copy the test may change."""
    data: dict[str, Any] = json.loads((PAYLOADS / f"{name}.json").read_text())
    return data


@dataclass
class Call:
    method: str
    path: str
    body: dict[str, Any] | None
    query: dict[str, str] = field(default_factory=dict)
    response: dict[str, Any] | None = None
    at: float = field(default_factory=time.monotonic)  # when it arrived


# What Discord answers to a reply whose message is gone (fail_if_not_exists left true).
UNKNOWN_REFERENCE = {
    "message": "Invalid Form Body",
    "code": 50035,
    "errors": {
        "message_reference": {
            "_errors": [{"code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "message": "Unknown message"}]
        }
    },
}


def json_response(data: Any, status: int = 200) -> web.Response:
    # discord.py parses JSON only for exactly "application/json" (no charset).
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


class FakeDiscord(FakeServer[Call]):
    def __init__(self) -> None:
        super().__init__()
        self.identified = asyncio.Event()
        self.identifies: list[dict[str, Any]] = []  # IDENTIFY payloads, one per shard
        # channel id -> HTTP statuses to answer its next message sends with, in turn
        self.fail: dict[str, list[int]] = {}
        # message ids gone from Discord: deleted by the bot, or by their author
        self.deleted: set[str] = set()
        # CDN path -> (HTTP status, body, hang) of an attachment the fake serves
        self.files: dict[str, tuple[int, bytes, bool]] = {}
        self.redirects: dict[str, str] = {}  # CDN path -> where a 302 sends the download
        self._release = asyncio.Event()  # ends hanging downloads when the fake stops
        # message id -> the message as it stands (posted by the bot, then edited)
        self.messages: dict[str, dict[str, Any]] = {}
        self.interaction_types: dict[str, int] = {}  # interaction id -> its type
        self._ids = itertools.count(9000000000000000001)
        self._seq = itertools.count(1)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        app.router.add_get("/attachments/{tail:.*}", self._cdn)

    async def stop(self) -> None:
        self._release.set()
        await super().stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    # --- gateway -------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if data["op"] == 1:  # heartbeat
                await ws.send_str(json.dumps({"op": 11}))
            elif data["op"] == 2:  # identify
                self.identifies.append(data["d"])
                ready = payload("ready")
                ready["shard"] = data["d"].get("shard", [0, 1])
                ready["resume_gateway_url"] = f"ws://127.0.0.1:{self.port}/gateway"
                await self._send(ws, "READY", ready)
                await self._send(ws, "GUILD_CREATE", payload("guild_create"))
                self.identified.set()
        self.sockets.remove(ws)
        return ws

    async def _send(self, ws: web.WebSocketResponse, event: str, data: dict[str, Any]) -> None:
        await ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a gateway event to every connected client."""
        for ws in self.sockets:
            await self._send(ws, event, data)

    # --- REST ----------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body = await request.json() if request.can_read_body else None
        call = Call(request.method, path, body, dict(request.query))
        await self.record(call)
        parts = path.strip("/").split("/")
        if path == "/oauth2/applications/@me":
            return json_response(payload("application"))
        if path == "/users/@me":
            return json_response(payload("ready")["user"])
        if path == "/gateway/bot":
            return json_response(
                {
                    "url": f"ws://127.0.0.1:{self.port}/gateway",
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 999,
                        "reset_after": 0,
                        "max_concurrency": 16,
                    },
                }
            )
        if parts[0] == "applications" and parts[-1] == "commands":
            return json_response(
                [
                    {**c, "id": str(next(self._ids)), "application_id": BOT_ID, "version": "1"}
                    for c in body or []
                ]
            )
        if parts[0] == "channels" and parts[-1] == "typing":
            return web.Response(status=204)
        if parts[0] == "channels" and parts[2:3] == ["messages"]:
            channel = parts[1]
            if self.fail.get(channel):
                status = self.fail[channel].pop(0)
                error = {"message": "Missing Permissions", "code": 50013}
                if status >= 500:
                    error = {"message": "Internal Server Error", "code": 0}
                return json_response(error, status)
            if request.method == "GET" and len(parts) == 3:
                return json_response(self.history(channel, request.query))
            message_id = parts[3] if len(parts) > 3 else str(next(self._ids))
            if request.method == "DELETE":
                self.deleted.add(message_id)
                return web.Response(status=204)
            reference = (body or {}).get("message_reference") or {}
            gone = str(reference.get("message_id")) in self.deleted
            if gone and reference.get("fail_if_not_exists", True):
                return json_response(UNKNOWN_REFERENCE, 400)  # else: posted as a plain message
            if request.method == "PATCH" and message_id in self.messages:
                # An edit changes the fields it names (content, components) only.
                current = self.messages[message_id]
                for name in ("content", "components"):
                    if name in (body or {}):
                        current[name] = (body or {})[name]
                call.response = copy.deepcopy(current)
            else:
                call.response = self.message(channel, message_id, body or {})
                if request.method == "POST":
                    self.messages[message_id] = copy.deepcopy(call.response)
            return json_response(call.response)
        if parts[0] == "interactions":
            kind = (body or {}).get("type")
            data = (body or {}).get("data") or {}
            resource: dict[str, Any] = {"type": kind}
            if kind == 4:
                resource["message"] = self.message("0", str(next(self._ids)), data)
            interaction = {"id": parts[1], "type": self.interaction_types.get(parts[1], 2)}
            return json_response({"interaction": interaction, "resource": resource})
        if parts[0] == "webhooks":
            message_id = parts[-1] if parts[-2:-1] == ["messages"] else str(next(self._ids))
            if message_id == "@original":
                message_id = str(next(self._ids))
            return json_response(self.message(GENERAL, message_id, body or {}))
        return json_response({"message": "404: Not Found", "code": 0}, 404)

    def history(self, channel: str, query: Mapping[str, str]) -> list[dict[str, Any]]:
        """GET /channels/{id}/messages?after=…&limit=…: the channel's messages that
        the fake keeps (the bot's) after that id, the oldest `limit` of them, newest
        first as Discord lists them."""
        after = int(query.get("after", "0"))
        found = sorted(
            (m for m in self.messages.values() if m["channel_id"] == channel),
            key=lambda m: int(m["id"]),
        )
        found = [m for m in found if int(m["id"]) > after and m["id"] not in self.deleted]
        return [copy.deepcopy(m) for m in reversed(found[: int(query.get("limit", "50"))])]

    # --- the CDN ----------------------------------------------------------------------

    def host(
        self,
        attachment: dict[str, Any],
        body: bytes,
        *,
        status: int = 200,
        hang: bool = False,
        size: int | None = None,
        redirect: str | None = None,
    ) -> dict[str, Any]:
        """Serve `body` for a recorded attachment object (or a 302 to `redirect`);
        returns the object pointed at this fake (`url`, `proxy_url`), with `size` as
        declared (default: the body's)."""
        served = copy.deepcopy(attachment)
        for name in ("url", "proxy_url"):
            parts = urlsplit(served[name])
            served[name] = f"http://127.0.0.1:{self.port}{parts.path}?{parts.query}"
        served["size"] = len(body) if size is None else size
        self.files[urlsplit(served["url"]).path] = (status, body, hang)
        if redirect is not None:
            self.redirects[urlsplit(served["url"]).path] = redirect
        return served

    def downloads(self) -> list[str]:
        """Paths of the attachments the bot downloaded (or tried to), in order."""
        return [c.path for c in self.calls if c.path.startswith("/attachments/")]

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        await self.record(Call(request.method, request.path, None, dict(request.query)))
        if request.path in self.redirects:
            return web.Response(status=302, headers={"Location": self.redirects[request.path]})
        status, body, hang = self.files.get(request.path, (404, b"", False))
        if hang:
            await self._release.wait()
        return web.Response(body=body, status=status, content_type="application/octet-stream")

    def message(self, channel: str, message_id: str, body: dict[str, Any]) -> dict[str, Any]:
        data = copy.deepcopy(payload("message_create"))
        data.update(
            id=message_id,
            channel_id=channel,
            content=body.get("content", ""),
            author=payload("ready")["user"],
            components=body.get("components", []),
        )
        data.pop("member", None)
        data["mentions"] = []
        return data

    # --- what the bot did ----------------------------------------------------------

    def sent(self, channel: str | None = None) -> list[Call]:
        """Messages posted (POST /channels/{id}/messages), in order."""
        return [
            c
            for c in self.calls
            if c.method == "POST"
            and c.path.endswith("/messages")
            and (channel is None or c.path == f"/channels/{channel}/messages")
        ]

    def final_contents(self, channel: str) -> list[str]:
        """What each message the bot posted in `channel` says now, after its edits."""
        finals: list[str] = []
        for post in self.sent(channel):
            if post.response is None or post.response["id"] in self.deleted:
                continue  # refused (fail injection), or deleted since
            content = str((post.body or {}).get("content", ""))
            for edit in self.edits():
                if edit.path == f"/channels/{channel}/messages/{post.response['id']}":
                    content = str((edit.body or {})["content"])
            finals.append(content)
        return finals

    def edits(self) -> list[Call]:
        """Edits of a message's text (PATCH /channels/{id}/messages/{id} with content)."""
        return [c for c in self.patches() if "content" in (c.body or {})]

    def patches(self) -> list[Call]:
        """Every message edit: of its text, its buttons, or both."""
        return [c for c in self.calls if c.method == "PATCH" and "/messages/" in c.path]

    # --- buttons --------------------------------------------------------------------

    def buttons(self, message_id: str) -> list[dict[str, Any]]:
        """The buttons a message carries now (its action rows' components)."""
        rows = self.messages[message_id].get("components") or []
        return [button for row in rows for button in row.get("components", [])]

    def press(
        self,
        message_id: str,
        custom_id: str,
        interaction_id: str,
        *,
        user: str = ANN,
        permissions: int = 1071698660929,
    ) -> dict[str, Any]:
        """The INTERACTION_CREATE that Discord sends when `user` presses a button
        (component_type 2) on a message: type 3, `data.custom_id`, the message as it
        stands, and the presser's permissions in the channel."""
        message = copy.deepcopy(self.messages[message_id])
        data = payload("interaction_create")
        channel = dict(data["channel"], id=message["channel_id"])
        if message["channel_id"] == THREAD:
            channel.update(type=11, parent_id=GENERAL, name="a thread")
        data.update(
            id=interaction_id,
            type=3,
            token=f"token-{interaction_id}",
            channel_id=message["channel_id"],
            channel=channel,
            message=message,
            data={"custom_id": custom_id, "component_type": 2},
        )
        data["member"]["user"] = {
            **data["member"]["user"],
            "id": user,
            "username": f"user{user[-2:]}",
            "global_name": NAMES.get(user, "Someone"),
        }
        data["member"]["permissions"] = str(permissions)
        self.interaction_types[interaction_id] = 3
        return data

    def callbacks(self, interaction_id: str) -> list[Call]:
        """The answers to one interaction: its callback, follow-ups and their edits."""
        return [
            c
            for c in self.calls
            if c.path.startswith(f"/interactions/{interaction_id}/")
            or c.path.startswith(f"/webhooks/{BOT_ID}/token-{interaction_id}")
        ]
