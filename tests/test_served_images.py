"""Images to a served vision model (MODEL_BACKEND=openai, OPENAI_VISION=true), against
the fake OpenAI-compatible server: content parts in the last user message only, a
server that refuses images answered again as text once and remembered."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from bot.engine import Engine
from bot.images import ImageInput, decode_image
from bot.inference.served import IMAGES_REFUSED, _refuses_images, image_tokens
from bot.messages import Message, Turn
from bot.store.memory import InProcessMemory
from tests.test_images import picture
from tests.test_server_openai import CONV, FakeLLM, backend_for, sse


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    await server.start()
    yield server
    await server.stop()


def screenshot() -> ImageInput:
    return decode_image("screenshot.png", picture("PNG", size=(64, 48)))


def asking(text: str, n: int, *images: ImageInput) -> Message:
    return Message(
        CONV, "u", "U", text, message_id=str(n), is_direct=True, images=images,
        image_names=tuple(i.name for i in images),
    )  # fmt: skip


def image_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        part
        for message in body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


async def test_images_go_as_content_parts_of_the_last_message(llm: FakeLLM) -> None:
    llm.reply = "A stack trace."
    backend = backend_for(llm, openai_vision=True)
    assert backend.takes_images
    engine = Engine(backend, InProcessMemory(20, 600))
    await engine.memory.append(
        CONV, [Turn("user", "[image: old.png]\n\nhi"), Turn("assistant", "hello")]
    )
    reply = await engine.reply(asking("what is this?", 1, screenshot()))
    assert reply.text == "A stack trace."
    (body,) = llm.requests
    *earlier, last = body["messages"]
    assert all(isinstance(m["content"], str) for m in earlier)  # history: text only
    assert earlier[-2]["content"] == "[image: old.png]\n\nhi"
    text, image = last["content"]
    assert text == {"type": "text", "text": "[image: screenshot.png]\n\nwhat is this?"}
    url = image["image_url"]["url"]
    assert image["type"] == "image_url" and url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (64, 48) and sent.mode == "RGB"
    stored = await engine.memory.history(CONV)
    assert stored[-2].content == "[image: screenshot.png]\n\nwhat is this?"
    assert "base64" not in repr(stored)
    # The next message has no image: none is sent again.
    await engine.reply(asking("and then?", 2))
    assert image_parts(llm.requests[1]) == []
    await engine.close()


async def test_a_server_refusing_images_gets_the_text_once_and_is_remembered(
    llm: FakeLLM,
) -> None:
    async def text_only(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if image_parts(body):
            error = {"object": "error", "message": "Qwen2 is not a multimodal model", "code": 400}
            return web.json_response(error, status=400)
        return await sse(request, ["From ", "the text."])

    llm.handler = text_only
    backend = backend_for(llm, openai_vision=True)
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(asking("what is this?", 1, screenshot()))
    assert reply.ok and reply.text == IMAGES_REFUSED + "From the text."
    first, second = llm.requests
    assert len(image_parts(first)) == 1 and image_parts(second) == []
    assert second["messages"][-1]["content"] == "[image: screenshot.png]\n\nwhat is this?"
    # Remembered for the process: no more images, so the adapters download none.
    assert not backend.takes_images and not engine.takes_images
    # The note is shown, never stored as the model's words.
    stored = await engine.memory.history(CONV)
    assert [t.content for t in stored] == [
        "[image: screenshot.png]\n\nwhat is this?",
        "From the text.",
    ]
    # An image that was on its way meanwhile: answered from the text at once, with the note.
    again = await engine.reply(asking("and this one?", 2, screenshot()))
    assert again.text == IMAGES_REFUSED + "From the text."
    assert len(llm.requests) == 3 and image_parts(llm.requests[2]) == []
    await engine.close()


async def test_other_errors_with_images_are_not_taken_for_a_refusal(llm: FakeLLM) -> None:
    async def unknown_model(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"error": {"message": "model 'fake' not found"}}, status=404)

    llm.handler = unknown_model
    backend = backend_for(llm, openai_vision=True)
    engine = Engine(backend, InProcessMemory(20, 600))
    reply = await engine.reply(asking("what is this?", 1, screenshot()))
    assert not reply.ok and len(llm.requests) == 1
    assert backend.takes_images
    await engine.close()


async def test_an_images_tokens_make_room_in_the_window(llm: FakeLLM) -> None:
    backend = backend_for(llm, openai_vision=True, openai_context_tokens=2048, max_new_tokens=64)
    engine = Engine(backend, InProcessMemory(100, 600))
    history = []
    for i in range(10):
        history += [Turn("user", f"question {i} " + "x" * 300), Turn("assistant", "y" * 300)]
    big = decode_image("big.png", picture("PNG", size=(1400, 900)))  # 50 x 33 patches
    assert image_tokens([big]) == 1650
    for n, images in enumerate([(), (screenshot(),), (big,)]):  # 64 x 48: 6 tokens
        await engine.reset(CONV)
        await engine.memory.append(CONV, history)
        await engine.reply(asking("and this?", n, *images))
    plain, small, large = (len(r["messages"]) for r in llm.requests)
    assert plain == small > large >= 2
    assert llm.requests[2]["messages"][-1]["content"][0]["text"] == "[image: big.png]\n\nand this?"
    await engine.close()


def test_what_counts_as_refusing_images() -> None:
    assert _refuses_images(400, '{"message": "image input is not supported"}')
    assert _refuses_images(
        400, "Invalid content type. image_url is only supported by certain models"
    )
    assert _refuses_images(422, "vision is not enabled for this model")
    assert _refuses_images(500, "image input is not supported - hint: you may need the mmproj")
    assert not _refuses_images(500, "an image decoder crashed")  # a server's fault: retried
    assert not _refuses_images(404, "model not found")
    assert not _refuses_images(429, "too many image requests")
    assert not _refuses_images(
        400,
        "This model's maximum context length is 4096 tokens (5000 in the messages, image included)",
    )


async def test_without_openai_vision_no_image_reaches_the_server(llm: FakeLLM) -> None:
    backend = backend_for(llm)
    assert not backend.takes_images
    engine = Engine(backend, InProcessMemory(20, 600))
    await engine.reply(asking("what is this?", 1, screenshot()))
    (body,) = llm.requests
    assert image_parts(body) == []
    assert body["messages"][-1]["content"] == "[image: screenshot.png]\n\nwhat is this?"
    await engine.close()
