"""OPENAI_VISION=auto: the bot asks the server whether its model takes images, over
HTTP, against the fake OpenAI-compatible server with the endpoints llama.cpp, Ollama
and LM Studio answer it at. A server that says so gets images; one that does not say,
fails or answers nonsense gets none (as with false) and the message is still
answered; true and false never ask."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.engine import Engine
from bot.inference import served
from bot.inference.served import IMAGES_REFUSED, server_root
from bot.store.memory import InProcessMemory
from tests.conftest import bot_env, run_bot
from tests.fake_discord import BOT_ID, GENERAL
from tests.test_discord import Factory, _attachment
from tests.test_images import picture
from tests.test_reliability import until
from tests.test_served_images import asking, image_parts, screenshot
from tests.test_server_openai import FakeLLM, backend_for

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]
KEY = "sk-vision-test-key-0123456789"


def says(data: Any, status: int = 200) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(data, status=status)

    return answer


def raw(text: str, status: int = 200) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text=text, status=status, content_type="text/html")

    return answer


class SayingServer(FakeLLM):
    """The fake OpenAI server, plus whatever `answers` ("GET /props": handler) holds;
    every other path is a 404, as on a server without it. `asked`: the questions
    (everything but the chat completions), with their bodies."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Answer] = {}
        self.asked: list[tuple[str, Any]] = []

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_route("*", "/{path:.*}", self._other)  # after the real routes

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.asked.append(("GET /v1/models", None))
        answer = self.answers.get("GET /v1/models")
        return await (answer(request) if answer else super()._models(request))

    async def _other(self, request: web.Request) -> web.StreamResponse:
        question = f"{request.method} {request.path}"
        body = await request.json() if request.can_read_body else None
        self.asked.append((question, body))
        assert request.headers.get("Authorization") == f"Bearer {KEY}"  # the same server
        answer = self.answers.get(question)
        return await answer(request) if answer else web.json_response({}, status=404)

    def questions(self) -> list[str]:
        return sorted(question for question, _ in self.asked)


@pytest.fixture
async def server() -> AsyncIterator[SayingServer]:
    fake = SayingServer()
    await fake.start()
    yield fake
    await fake.stop()


def auto_backend(server: SayingServer, **values: Any) -> served.OpenAIBackend:
    return backend_for(server, openai_api_key=KEY, **values)


def vision_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bot.inference.served" and "takes" in r.getMessage()
    ]


ASKED_ALL = ["GET /api/v0/models", "GET /props", "GET /v1/models", "POST /api/show"]


@pytest.mark.parametrize(
    ("question", "answer", "source"),
    [
        # llama.cpp's server (builds with its multimodal support): /props.
        (
            "GET /props",
            {"chat_template": "{{ messages }}", "modalities": {"vision": True, "audio": False}},
            "llama.cpp /props",
        ),
        # Ollama: POST /api/show {"model": …}, at the root (the base URL ends in /v1).
        ("POST /api/show", {"capabilities": ["completion", "vision"]}, "Ollama /api/show"),
        # LM Studio's REST API: the model's entry says "vlm".
        (
            "GET /api/v0/models",
            {"data": [{"id": "other", "type": "llm"}, {"id": "fake", "type": "vlm"}]},
            "LM Studio /api/v0/models",
        ),
        # Newer llama.cpp builds and OpenRouter: the /v1/models entry's input modalities.
        (
            "GET /v1/models",
            {"data": [{"id": "fake", "architecture": {"input_modalities": ["text", "image"]}}]},
            "/v1/models",
        ),
    ],
)
async def test_a_server_that_says_its_model_takes_images_gets_them(
    server: SayingServer,
    caplog: pytest.LogCaptureFixture,
    question: str,
    answer: Any,
    source: str,
) -> None:
    caplog.set_level(logging.INFO)
    server.answers[question] = says(answer)
    backend = auto_backend(server)
    # Asked at start, in the background: no message needed for the adapters to know.
    await until(lambda: backend.takes_images, within=5)
    assert server.questions() == ASKED_ALL
    if question == "POST /api/show":
        assert ("POST /api/show", {"model": "fake"}) in server.asked
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(asking("what is this?", 1, screenshot()))
    assert reply.ok and reply.text == "Hello there, friend."
    (body,) = server.requests
    (part,) = image_parts(body)
    assert part["image_url"]["url"].startswith("data:image/png;base64,")
    # Asked once: later messages do not ask again.
    await engine.reply(asking("and this?", 2, screenshot()))
    assert len(server.asked) == len(ASKED_ALL)
    (line,) = vision_lines(caplog)
    assert source in line and "takes images" in line
    assert KEY not in caplog.text
    await engine.close()


async def test_a_server_that_says_no_gets_no_images(server: SayingServer) -> None:
    server.answers["GET /props"] = says({"modalities": {"vision": False}})
    server.answers["GET /v1/models"] = says(  # the first that says is believed
        {"data": [{"id": "fake", "architecture": {"input_modalities": ["text", "image"]}}]}
    )
    backend = auto_backend(server)
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(asking("what is this?", 1, screenshot()))
    assert reply.text == IMAGES_REFUSED + "Hello there, friend."
    assert image_parts(server.requests[0]) == []
    assert not backend.takes_images
    await engine.close()


async def test_a_server_that_does_not_say_gets_no_images_and_the_text_is_answered(
    server: SayingServer, discord_bot: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # vLLM's way: 404 for the others' endpoints, a model list without modalities.
    caplog.set_level(logging.INFO)
    server.reply = "From the text."
    backend = auto_backend(server)
    bot = await discord_bot(backend=backend)
    await until(lambda: len(server.asked) == len(ASKED_ALL), within=5)
    await until(lambda: backend.vision is not None, within=5)
    assert not bot.engine.takes_images
    image = bot.fake.host(_attachment(1), picture("PNG", size=(80, 60)))
    await bot.say(f"<@{BOT_ID}> what went wrong here?", attachments=[image])
    await bot.replies()
    await bot.settle()
    # Today's text-only behaviour: the adapter's note, no download, the text answered.
    note = "(I read text files only, so I skipped “screenshot.png”.)"
    assert bot.fake.final_contents(GENERAL) == [f"{note}\n\nFrom the text."]
    assert bot.fake.downloads() == []
    (body,) = server.requests
    assert image_parts(body) == []
    assert body["messages"][-1]["content"] == "[image: screenshot.png]\n\nwhat went wrong here?"
    (line,) = vision_lines(caplog)
    assert "does not say" in line and "OPENAI_VISION=true" in line
    assert len(server.asked) == len(ASKED_ALL)  # asked once


async def _hangs(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(1)  # past VISION_QUESTION_SECONDS (0.2 here)
    return web.json_response({"modalities": {"vision": True}})


@pytest.mark.parametrize(
    "failure",
    ["500", "garbage", "timeout"],
)
async def test_a_failing_question_means_no_images_and_no_crash(
    server: SayingServer, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    monkeypatch.setattr(served, "VISION_QUESTION_SECONDS", 0.2)
    if failure == "500":
        for question in ASKED_ALL:
            server.answers[question] = raw("Internal Server Error", status=500)
    elif failure == "garbage":
        server.answers["GET /props"] = raw("<html>a proxy's page</html>")
        server.answers["POST /api/show"] = says({"capabilities": "vision"})
        server.answers["GET /api/v0/models"] = says(["not", "a", "list", "of", "models"])
        server.answers["GET /v1/models"] = raw('{"data": [{"id": "fake", "architec')
    else:
        for question in ASKED_ALL:
            server.answers[question] = _hangs
    backend = auto_backend(server)
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(asking("what is this?", 1, screenshot()))
    assert reply.ok and reply.text == IMAGES_REFUSED + "Hello there, friend."
    (body,) = server.requests
    assert image_parts(body) == []
    assert not backend.takes_images
    await engine.close()


@pytest.mark.parametrize("failure", ["503", "500", "429", "one times out"])
async def test_a_server_not_answering_yet_is_asked_again_later(
    server: SayingServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    # Started before its server (llama.cpp answers 503 while it loads the model), or
    # while it fails or is overloaded, or slow on the one question it knows.
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(served, "VISION_QUESTION_SECONDS", 0.2)
    for question in ASKED_ALL:
        if failure == "one times out":
            if question == "GET /props":
                server.answers[question] = _hangs
        else:
            error = {"error": {"message": "Loading model"}}
            server.answers[question] = says(error, status=int(failure))
    backend = auto_backend(server)
    await until(lambda: len(server.asked) == len(ASKED_ALL), within=5)
    await until(lambda: backend._asking is not None and backend._asking.done(), within=5)
    assert not backend.takes_images and backend.vision is None
    assert len(server.asked) == len(ASKED_ALL)  # not again at once
    # Loaded; the next message after VISION_ASK_AGAIN_SECONDS asks, and gets its answer.
    server.answers.clear()
    server.answers["GET /props"] = says({"modalities": {"vision": True}})
    monkeypatch.setattr(backend, "_ask_again_at", 0.0)
    engine = Engine(backend, InProcessMemory(20, 600))
    await engine.reply(asking("what is this?", 1, screenshot()))
    assert len(image_parts(server.requests[0])) == 1
    assert backend.takes_images
    lines = vision_lines(caplog)
    assert len(lines) == 2 and "did not answer" in lines[0] and "takes images" in lines[1]
    await engine.close()


async def test_a_redirect_is_not_followed_nor_believed(server: SayingServer) -> None:
    """The configured server decides alone: a question it redirects elsewhere (where
    another server would say yes) is no answer from it, and the other is never asked."""
    elsewhere = SayingServer()
    elsewhere.answers["GET /props"] = says({"modalities": {"vision": True}})
    await elsewhere.start()
    try:

        async def away(request: web.Request) -> web.StreamResponse:
            raise web.HTTPTemporaryRedirect(f"{server_root(elsewhere.url)}/props")

        server.answers["GET /props"] = away
        backend = auto_backend(server)
        await until(lambda: backend._asking is not None and backend._asking.done(), within=5)
        assert backend.vision is False and not backend.takes_images
        assert elsewhere.asked == []
        await backend.close()
    finally:
        await elsewhere.stop()


async def test_a_server_that_cannot_be_reached_is_no_crash(
    server: SayingServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await server.stop()  # the port is closed: connections are refused
    backend = auto_backend(server, openai_max_retries=0)
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(asking("what is this?", 1, screenshot()))
    assert not reply.ok  # the chat cannot be reached either: today's apology
    assert not backend.takes_images
    assert KEY not in caplog.text
    await engine.close()


@pytest.mark.parametrize("vision", [True, False])
async def test_true_and_false_never_ask(server: SayingServer, vision: bool) -> None:
    server.answers["GET /props"] = says({"modalities": {"vision": not vision}})
    backend = auto_backend(server, openai_vision=vision)
    assert backend.takes_images is vision
    engine = Engine(backend, InProcessMemory(20, 600))
    await engine.reply(asking("what is this?", 1, screenshot()))
    assert len(image_parts(server.requests[0])) == (1 if vision else 0)
    assert backend.takes_images is vision
    assert server.asked == []
    await engine.close()


@pytest.mark.parametrize(
    ("base", "root"),
    [
        ("http://127.0.0.1:11434/v1", "http://127.0.0.1:11434"),
        ("http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://proxy.example/llm/v1", "https://proxy.example/llm"),
        ("https://proxy.example/v1beta", "https://proxy.example/v1beta"),
    ],
)
def test_the_server_root_is_the_base_url_without_its_v1(base: str, root: str) -> None:
    assert server_root(base) == root


def test_a_bad_value_names_openai_vision_and_exits_2(tmp_path: Path) -> None:
    result = run_bot("console", env=bot_env(OPENAI_VISION="sometimes"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "Invalid configuration: OPENAI_VISION: expected true, false or auto"
    )
