"""MODEL_BACKEND=openai against a local fake of an OpenAI-compatible server speaking
the real wire format: server-sent events, `[DONE]`, error events, context-length errors
as vLLM, llama.cpp and TGI send them, slow streams, stalls and pages that are not
event streams. Every failure is an apology with nothing stored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from bot.engine import Engine
from bot.inference.served import CONTEXT_FULL, ContextTooLong, OpenAIBackend, ServerError
from bot.messages import ConversationKey, Message, Turn
from bot.store.memory import InProcessMemory
from tests.conftest import make_settings
from tests.fake_server import FakeServer

CONV = ConversationKey("test", "c")

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def tokens_of(body: dict[str, Any]) -> int:
    """The fake's own tokenizer: 4 characters a token, 4 tokens a message."""
    return sum(len(m["content"]) // 4 + 4 for m in body["messages"])


def vllm_too_long(window: int, prompt: int, reply: int) -> tuple[int, dict[str, Any]]:
    return 400, {
        "object": "error",
        "message": f"This model's maximum context length is {window} tokens. However, you "
        f"requested {prompt + reply} tokens ({prompt} in the messages, {reply} in the "
        "completion). Please reduce the length of the messages or completion.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


def llamacpp_too_long(window: int, prompt: int, reply: int) -> tuple[int, dict[str, Any]]:
    return 400, {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": prompt,
            "n_ctx": window,
        }
    }


def tgi_too_long(window: int, prompt: int, reply: int) -> tuple[int, dict[str, Any]]:
    return 422, {
        "error": f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
        f"{window}. Given: {prompt} `inputs` tokens and {reply} `max_new_tokens`",
        "error_type": "validation",
    }


class FakeLLM(FakeServer[dict[str, Any]]):
    """An OpenAI-compatible /v1/chat/completions with a token window; `handler`
    replaces its behaviour (default: stream `reply` in a few chunks). `requests` are
    the bodies it was sent, `headers` their headers."""

    def __init__(self) -> None:
        super().__init__()
        self.window = 100_000
        self.reply = "Hello there, friend."
        self.too_long: Callable[[int, int, int], tuple[int, dict[str, Any]]] = vllm_too_long
        self.handler: Handler | None = None
        self.requests: list[dict[str, Any]] = self.calls
        self.headers: list[dict[str, str]] = []
        self.models_hang = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/v1/models", self._models)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        if self.models_hang:
            await asyncio.sleep(2)  # past the readiness limit
        return web.json_response({"object": "list", "data": [{"id": "fake"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.headers.append(dict(request.headers))
        await self.record(body)
        if self.handler is not None:
            return await self.handler(request, body)
        prompt = tokens_of(body)
        if prompt + body["max_tokens"] > self.window:
            status, error = self.too_long(self.window, prompt, body["max_tokens"])
            return web.json_response(error, status=status)
        words = self.reply.split(" ")
        return await sse(request, [w + " " for w in words[:-1]] + [words[-1]])


def chunk(text: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": text} if text is not None else {}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def sse(
    request: web.Request,
    texts: list[str],
    *,
    finish: str | None = "stop",
    done: bool = True,
    every: float = 0.0,
    first_after: float = 0.0,
    then: list[str] | None = None,
) -> web.StreamResponse:
    """A streamed completion: a role chunk, `texts` `every` seconds apart, the finish
    chunk, `[DONE]`; `then` replaces the ending with raw `data:` payloads."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)

    async def send(payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    first = chunk()
    first["choices"][0]["delta"] = {"role": "assistant"}
    await send(first)
    await asyncio.sleep(first_after)
    for i, text in enumerate(texts):
        if i:
            await asyncio.sleep(every)
        await send(chunk(text))
    if then is not None:
        for payload in then:
            await send(payload)
    else:
        if finish:
            await send(chunk(finish=finish))
        if done:
            await send("[DONE]")
    await response.write_eof()
    return response


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    await server.start()
    yield server
    await server.stop()


def backend_for(server: FakeLLM, **values: Any) -> OpenAIBackend:
    values = {"max_new_tokens": 64, **values}
    settings = make_settings(
        model_backend="openai", openai_base_url=server.url, openai_model="fake", **values
    )
    return OpenAIBackend(settings)


def msg(text: str, n: int = 0) -> Message:
    # A DM: these tests are about fitting, not names (tests/test_speakers.py).
    return Message(CONV, "u", "U", text, message_id=str(n), is_direct=True)


def server_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("bot.inference.served") and text in r.getMessage()
    ]


# --- 13.1: the prompt fits the window; context-length errors trim once ------------------


async def test_a_long_conversation_keeps_being_answered(llm: FakeLLM) -> None:
    llm.window = 1024
    llm.reply = " ".join(["word"] * 120)  # ~600 characters a reply
    engine = Engine(
        backend_for(llm, openai_context_tokens=1024, max_new_tokens=128),
        InProcessMemory(40, 600),
    )
    replies = [
        await engine.reply(msg(f"Message {i}: " + "tell me more " * 20, i)) for i in range(12)
    ]
    assert all(r.ok for r in replies), [r.text[:60] for r in replies]
    last = llm.requests[-1]["messages"]
    assert 3 < len(last) < 25  # older exchanges dropped, recent ones kept
    assert [m["role"] for m in last[:2]] == ["system", "user"]
    assert last[-1]["content"].startswith("Message 11")
    await engine.close()


@pytest.mark.parametrize("too_long", [vllm_too_long, llamacpp_too_long, tgi_too_long])
async def test_context_error_is_answered_by_trimming_once_and_learned(
    llm: FakeLLM, too_long: Callable[[int, int, int], tuple[int, dict[str, Any]]]
) -> None:
    # The bot thinks the window is 16k; the server's is 900 tokens.
    llm.window, llm.too_long = 900, too_long
    backend = backend_for(llm, openai_context_tokens=16_000, max_new_tokens=64)
    engine = Engine(backend, InProcessMemory(100, 600))
    history = []
    for i in range(12):
        history += [Turn("user", f"question {i} " + "x" * 300), Turn("assistant", "y" * 300)]
    await engine.memory.append(CONV, history)
    reply = await engine.reply(msg("And now?"))
    assert reply.ok, reply.text
    first, second = llm.requests
    assert len(second["messages"]) < len(first["messages"])
    assert second["messages"][1]["role"] == "user"
    assert second["messages"][-1]["content"] == "And now?"
    # What the server said is kept: the next prompt fits at the first try.
    assert (await engine.reply(msg("Again?"))).ok
    assert len(llm.requests) == 3
    await engine.close()


async def test_a_proxys_413_without_numbers_halves_the_prompt(llm: FakeLLM) -> None:
    async def proxy(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if len(json.dumps(body)) > 4000:
            page = "<html><body><h1>413 Request Entity Too Large</h1></body></html>"
            return web.Response(status=413, text=page, content_type="text/html")
        return await sse(request, ["fits"])

    llm.handler = proxy
    engine = Engine(backend_for(llm, openai_context_tokens=16_000), InProcessMemory(100, 600))
    await engine.memory.append(CONV, [Turn("user", "q" * 400), Turn("assistant", "a" * 400)] * 5)
    reply = await engine.reply(msg("hi"))
    assert reply.ok and reply.text == "fits"
    assert len(llm.requests) == 2
    await engine.close()


async def test_when_nothing_helps_the_user_is_told_what_to_do_and_nothing_is_stored(
    llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    async def always_too_long(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        # Whatever comes, the window is just below it.
        prompt = tokens_of(body)
        return web.json_response(vllm_too_long(prompt, prompt, 64)[1], status=400)

    llm.handler = always_too_long
    backend = backend_for(llm)
    old = [Turn("user", "old " * 100), Turn("assistant", "reply " * 100)]
    prompt = await backend.prepare(old, "new question " * 10)
    with pytest.raises(ContextTooLong) as caught:
        async for _ in backend.stream(prompt):
            pass
    assert caught.value.user_message == CONTEXT_FULL and "/reset" in CONTEXT_FULL
    assert len(llm.requests) == 2  # trimmed once, never the same request again
    assert len(llm.requests[1]["messages"]) < len(llm.requests[0]["messages"])
    await backend.close()
    engine = Engine(backend_for(llm), InProcessMemory(20, 600))
    await engine.memory.append(CONV, old)
    reply = await engine.reply(msg("hello"))
    assert not reply.ok and reply.text == CONTEXT_FULL  # what to do, not a bare apology
    assert await engine.memory.history(CONV) == old  # nothing added
    assert len(llm.requests) == 4
    assert server_lines(caplog, "maximum context length is")
    await engine.close()


async def test_other_4xx_is_not_retried_and_logged_without_secrets(
    llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    async def unauthorized(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        said = f"Invalid API key: {request.headers.get('Authorization')}"
        return web.json_response({"error": {"message": said, "code": 401}}, status=401)

    llm.handler = unauthorized
    engine = Engine(
        backend_for(llm, openai_api_key="sk-wrong-Key77", openai_max_retries=3),
        InProcessMemory(20, 600),
    )
    reply = await engine.reply(msg("hello"))
    assert not reply.ok
    assert len(llm.requests) == 1
    lines = server_lines(caplog, "Invalid API key")
    assert len(lines) == 1 and "401" in lines[0]
    assert "sk-wrong-Key77" not in caplog.text
    assert await engine.memory.history(CONV) == []
    await engine.close()


async def test_5xx_is_retried_before_any_text(llm: FakeLLM) -> None:
    async def flaky(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if len(llm.requests) < 3:
            return web.json_response({"error": "overloaded"}, status=503)
        return await sse(request, ["ok"])

    llm.handler = flaky
    engine = Engine(backend_for(llm, openai_max_retries=2), InProcessMemory(20, 600))
    assert (await engine.reply(msg("hello"))).text == "ok"
    assert len(llm.requests) == 3
    await engine.close()


# --- 13.3: error events, non-event-stream bodies, streams without a finish ---------------


def ends_with(**kwargs: Any) -> Handler:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await sse(request, ["Partial ", "answer"], **kwargs)

    return handler


VLLM_ERROR = json.dumps({"error": {"message": "CUDA out of memory", "code": 500}})
TGI_ERROR = json.dumps({"error": "Request failed during generation", "error_type": "generation"})


async def html_page(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.Response(text="<html>Welcome to the portal</html>", content_type="text/html")


@pytest.mark.parametrize(
    ("handler", "said"),
    [
        # vLLM / TGI: an error event mid-stream, then [DONE]
        (ends_with(then=[VLLM_ERROR, "[DONE]"]), "CUDA out of memory"),
        (ends_with(then=[TGI_ERROR]), "Request failed during generation"),
        (html_page, "Welcome to the portal"),
        (ends_with(finish=None), "without a finish reason"),
        (ends_with(finish=None, done=False), "without a finish reason"),
    ],
    ids=["error-event", "tgi-error-event", "html-200", "no-finish", "cut-off"],
)  # fmt: skip
async def test_broken_streams_are_failures_with_nothing_stored(
    llm: FakeLLM, handler: Handler, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    llm.handler = handler
    engine = Engine(backend_for(llm), InProcessMemory(20, 600))
    reply = await engine.reply(msg("hello"))
    assert not reply.ok
    assert await engine.memory.history(CONV) == []
    assert len(server_lines(caplog, said)) == 1
    await engine.close()


async def test_an_error_event_before_any_text_is_a_failure(llm: FakeLLM) -> None:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await sse(request, [], then=[json.dumps({"error": {"message": "boom"}})])

    llm.handler = handler
    backend = backend_for(llm)
    with pytest.raises(ServerError, match="boom"):
        async for _ in backend.stream(await backend.prepare([], "hi")):
            pass
    await backend.close()


# --- 13.4: limits on connecting, the first token and silence; none on a steady stream ---


async def test_a_slow_but_steady_reply_is_not_cut(llm: FakeLLM) -> None:
    async def steady(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await sse(request, [f"{i} " for i in range(16)], every=0.1)

    llm.handler = steady
    backend = backend_for(
        llm, openai_timeout_seconds=0.5, openai_stall_timeout_seconds=0.4
    )  # the whole reply takes ~1.5 s: longer than either limit
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(msg("count"))
    assert reply.ok and reply.text.split() == [str(i) for i in range(16)]
    await engine.close()


async def test_a_stream_that_goes_silent_fails_without_a_retry(
    llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    async def stalls(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await sse(request, ["Hello ", "world"], every=2.0)

    llm.handler = stalls
    backend = backend_for(llm, openai_stall_timeout_seconds=0.3, openai_max_retries=2)
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(msg("hi"))
    assert not reply.ok
    assert len(llm.requests) == 1
    assert server_lines(caplog, "stalled")
    assert await engine.memory.history(CONV) == []
    await engine.close()


async def test_no_first_token_in_time_is_not_sent_again(
    llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    async def queued(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await sse(request, ["late"], first_after=2.0)

    llm.handler = queued
    backend = backend_for(llm, openai_timeout_seconds=0.3, openai_max_retries=2)
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(msg("hi"))
    assert not reply.ok
    assert len(llm.requests) == 1
    assert server_lines(caplog, "first token")
    await engine.close()


async def test_headers_that_never_come_count_against_the_first_token(llm: FakeLLM) -> None:
    async def silent(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(2.0)
        return await sse(request, ["late"])

    llm.handler = silent
    backend = backend_for(llm, openai_timeout_seconds=0.3, openai_max_retries=2)
    with pytest.raises(ServerError, match="OPENAI_TIMEOUT_SECONDS"):
        async for _ in backend.stream(await backend.prepare([], "hi")):
            pass
    assert len(llm.requests) == 1
    await backend.close()


# --- 13.6: what reaches the server is whole exchanges, starting with a user turn --------


async def test_history_sent_is_whole_exchanges_starting_with_a_user_turn(llm: FakeLLM) -> None:
    backend = backend_for(llm)
    stored = [
        Turn("assistant", "a half exchange left by an odd cap"),
        Turn("user", "u1"),
        Turn("assistant", "a1"),
        Turn("user", "u2 without its reply"),
        Turn("user", "u3"),
        Turn("assistant", "a3"),
    ]
    prompt = await backend.prepare(stored, "now")
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in prompt.messages[1:]] == ["u1", "a1", "u3", "a3", "now"]
    assert prompt.kept_turns == 4
    await backend.close()


async def test_odd_memory_cap_never_sends_a_reply_first(llm: FakeLLM) -> None:
    engine = Engine(backend_for(llm), InProcessMemory(3, 600))
    for i in range(3):
        assert (await engine.reply(msg(f"m{i}", i))).ok
    roles = [m["role"] for m in llm.requests[-1]["messages"]]
    assert roles[:2] == ["system", "user"]
    await engine.close()


async def test_readiness_is_bounded_when_the_server_never_answers(llm: FakeLLM) -> None:
    backend = backend_for(llm, openai_timeout_seconds=0.5)
    assert await backend.ready()
    llm.models_hang = True
    assert not await asyncio.wait_for(backend.ready(), 5)
    await backend.close()
