"""MODEL_BACKEND=openai against a real OpenAI-compatible server on loopback:
`transformers serve` serving the bundled model."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.engine import APOLOGY, Engine
from bot.inference.loader import LoadedModel
from bot.inference.served import OpenAIBackend
from bot.messages import ConversationKey, Message
from bot.store.memory import InProcessMemory
from tests.conftest import bot_env, free_port, make_settings

pytestmark = pytest.mark.model


class Server:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        command = Path(sys.executable).parent / "transformers"
        self.process = subprocess.Popen(
            [str(command), "serve", str(self.model_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            env=bot_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        pytest.fail("transformers serve did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


def served_model(cache: Path) -> Path:
    """The bundled model's converted copy: a plain transformers model directory."""
    return next(p for p in cache.iterdir() if (p / "config.json").is_file())


@pytest.fixture(scope="module")
def server(bundled: LoadedModel, model_cache_dir: Path) -> Iterator[Server]:
    serving = Server(served_model(model_cache_dir))
    serving.start()
    yield serving
    serving.stop()


def backend_for(server: Server, **values: object) -> OpenAIBackend:
    settings = make_settings(
        model_backend="openai",
        openai_base_url=server.base_url,
        openai_model=str(server.model_dir),
        temperature=0,
        max_new_tokens=24,
        openai_timeout_seconds=60,
        **values,
    )
    return OpenAIBackend(settings)


def msg(text: str, channel: str = "c") -> Message:
    return Message(ConversationKey("test", channel), "u", "U", text)


async def test_streamed_reply_and_memory_through_the_server(server: Server) -> None:
    backend = backend_for(server)
    assert await backend.ready()
    engine = Engine(backend, InProcessMemory(20, 600))
    stream = engine.stream(msg("What is the capital of France?"))
    chunks = [chunk async for chunk in stream]
    assert stream.reply is not None and stream.reply.ok
    assert len(chunks) > 1 and "Paris" in stream.reply.text
    second = await engine.reply(msg("And of Italy?"))
    assert second.ok
    prompt = await backend.prepare(
        await engine.memory.history(ConversationKey("test", "c")), "next"
    )
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    await engine.close()


async def test_server_going_away_gets_an_apology_and_one_log_line(
    bundled: LoadedModel, model_cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    own = Server(served_model(model_cache_dir))
    own.start()
    backend = backend_for(own, openai_max_retries=1)
    engine = Engine(backend, InProcessMemory(20, 600))
    assert (await engine.reply(msg("Hello!"))).ok
    own.stop()
    caplog.set_level(logging.INFO)
    for _ in range(2):
        reply = await engine.reply(msg("Are you there?"))
        assert not reply.ok and reply.text == APOLOGY
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.inference.served"]
    assert len([m for m in lines if "unreachable" in m]) == 1, lines
    assert own.base_url.removesuffix("/v1") in lines[0]
    assert not await backend.ready()
    await engine.close()


def test_openai_backend_needs_its_url(tmp_path: Path) -> None:
    from tests.conftest import run_bot

    result = run_bot("console", env=bot_env(MODEL_BACKEND="openai"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "OPENAI_BASE_URL is needed with MODEL_BACKEND=openai" in result.stderr
