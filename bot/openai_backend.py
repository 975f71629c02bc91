"""Replies from an OpenAI-compatible inference server (vLLM, TGI, Ollama, llama.cpp's
server, `transformers serve`): MODEL_BACKEND=openai.

The conversation goes to the server's `/v1/chat/completions`, streamed as server-sent
events, with a timeout and bounded retries; the server does its own batching. The
rest of the bot (memory, adapters, streaming to users) is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from bot.engine import Backend
from bot.messages import Turn
from bot.prompt import Prompt
from bot.settings import Settings, mask_url

log = logging.getLogger(__name__)

# The server counts tokens; the bot only keeps a message below this many characters
# (about 8,000 tokens of English), saying so when it cuts.
MAX_MESSAGE_CHARS = 32_000


class ServerError(RuntimeError):
    """The inference server could not be reached or answered with an error."""


class OpenAIBackend(Backend):
    def __init__(self, settings: Settings) -> None:
        assert settings.openai_base_url, "OPENAI_BASE_URL"
        self.url = settings.openai_base_url.rstrip("/") + "/chat/completions"
        self.masked_url = mask_url(self.url)
        self.model = settings.openai_model
        self.system_prompt = settings.system_prompt
        self.retries = settings.openai_max_retries
        self.timeout = aiohttp.ClientTimeout(
            total=settings.openai_timeout_seconds,
            sock_connect=min(10.0, settings.openai_timeout_seconds),
        )
        key = settings.openai_api_key
        self.headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        self.body: dict[str, Any] = {
            "model": settings.openai_model,
            "stream": True,
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
        }
        self._session: aiohttp.ClientSession | None = None
        self._down = False

    async def prepare(
        self, history: list[Turn], user_text: str, system_prompt: str | None = None
    ) -> Prompt:
        cut = user_text[:MAX_MESSAGE_CHARS]
        system = self.system_prompt if system_prompt is None else system_prompt
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": t.role, "content": t.content} for t in history]
        messages.append({"role": "user", "content": cut})
        return Prompt([], cut, len(history), cut != user_text, len(user_text), tuple(messages))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout, headers=self.headers)
        return self._session

    async def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        body = {**self.body, "messages": list(prompt.messages)}
        for attempt in range(self.retries + 1):
            sent_any = False
            try:
                async with self._client().post(self.url, json=body) as response:
                    if response.status >= 500 or response.status == 429:
                        raise ServerError(f"HTTP {response.status}")
                    if response.status >= 400:
                        detail = (await response.text())[:200]
                        raise ServerError(f"HTTP {response.status}: {detail}")
                    async for text in _events(response):
                        sent_any = True
                        yield text
                self._up()
                return
            except (aiohttp.ClientError, TimeoutError, ServerError) as exc:
                # Retry only before any text went out: a user never sees a reply twice.
                if sent_any or attempt == self.retries:
                    self._failed(exc)
                    raise ServerError(f"inference server at {self.masked_url}: {exc!r}") from exc
                await asyncio.sleep(0.5 * 2**attempt)

    def _failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.error(
                "Inference server at %s is unreachable or failing (%s); users get an apology",
                self.masked_url,
                type(exc).__name__,
            )

    def _up(self) -> None:
        if self._down:
            self._down = False
            log.info("Inference server at %s answers again", self.masked_url)

    async def ready(self) -> bool:
        """Whether the server answers HTTP at all (for readiness checks). Any answer
        counts: servers differ in what their model list returns (`transformers serve`
        answers 500 without a hub cache)."""
        try:
            async with self._client().get(self.url.rsplit("/chat/", 1)[0] + "/models"):
                return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The text deltas of a streamed chat completion (server-sent events)."""
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            choices = json.loads(data).get("choices") or [{}]
        except ValueError:
            continue
        delta = (choices[0].get("delta") or {}).get("content")
        if delta:
            yield str(delta)
