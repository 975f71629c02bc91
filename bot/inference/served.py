"""Replies from an OpenAI-compatible inference server (vLLM, TGI, Ollama, llama.cpp's
server, `transformers serve`): MODEL_BACKEND=openai.

The conversation goes to the server's `/v1/chat/completions`, streamed as server-sent
events; the server does its own batching. The rest of the bot (memory, adapters,
streaming to users) is unchanged.

What each failure means:

- The prompt is fitted to OPENAI_CONTEXT_TOKENS before it is sent: the oldest whole
  exchanges go first, as on the local path. Tokens are counted approximately, by
  characters (the served model's tokenizer is not here): CHARS_PER_TOKEN is on the
  safe side for English. A server that still says the prompt is too long (400, 413 or
  422 naming the context or length) gets a shorter prompt once; what it says about its
  window and the prompt's real size is kept for the next prompts, so one message
  teaches the estimate instead of breaking the conversation for good.
- Other 4xx: the request itself is wrong (a bad key, an unknown model); sending it
  again cannot help. Not retried; the server's words go to the log.
- Unreachable, 5xx, 429 and 408: retried (OPENAI_MAX_RETRIES, backoff) before any text
  went out; one log line per outage.
- Limits: OPENAI_CONNECT_TIMEOUT_SECONDS to connect, OPENAI_TIMEOUT_SECONDS for the first
  token (queueing and reading the prompt), OPENAI_STALL_TIMEOUT_SECONDS of silence
  between chunks; none on a reply that keeps streaming. A server that has not started
  a reply in time is busy or stuck: the request is not sent again (it would wait behind
  itself in the same queue), the user gets the apology.
- An error event (`data: {"error": …}`), a 200 that is not an event stream (a proxy's
  page) and a stream that ends without a finish reason are failures, never replies.

Every failure raises ServerError: the engine then apologises and stores nothing.

Images (OPENAI_VISION=true): the new message's images go with its text as OpenAI content
parts (`image_url` with a `data:` URL); history carries only their placeholders. A
server that refuses them (a 4xx naming images, vision or `image_url`; or a 5xx saying
images are not supported) gets the message again once, as text, and the person a note
(IMAGES_REFUSED); from then on this process sends it no images (`takes_images` is
False, so the adapters do not even download them).

OPENAI_VISION=auto (the default) asks the server once, in the background from the
start, whether its model takes images (`OpenAIBackend._what_server_says`: llama.cpp's
`/props`, Ollama's `/api/show`, LM Studio's `/api/v0/models`, the `/v1/models` entry).
Until it has said so, and for a server that does not say (vLLM), no images are sent,
as with false.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from bot.images import ImageInput
from bot.inference.backend import Backend, Note, Prompt, with_name
from bot.logs import redact
from bot.messages import Turn
from bot.settings import Settings, mask_url

log = logging.getLogger(__name__)

# Characters per token when counting approximately: BPE tokenizers give ~4 for English
# prose, less for code and other scripts; 3 leaves room, and the server's own count
# corrects it (OpenAIBackend._learn).
CHARS_PER_TOKEN = 3.0
# A turn's role markers in a chat template, and the generation prompt after the last.
TOKENS_PER_MESSAGE = 8
# The user's message is kept below this many characters whatever the window.
MAX_MESSAGE_CHARS = 32_000
# What the user should be told when even a trimmed prompt is too long.
CONTEXT_FULL = (
    "This conversation no longer fits in the model's memory, even without its oldest "
    "messages. Send a shorter message, or use /reset to start a new conversation."
)
# What a server's context-length error says (vLLM and OpenAI 400, llama.cpp 400,
# TGI 422, a proxy's 413).
_CONTEXT_WORDS = re.compile(
    r"context|length|too long|too large|maximum|exceed|must be <=|must have less than",
    re.IGNORECASE,
)
# What a server says when it takes no images (vLLM: "… is not a multimodal model",
# "image input is not supported", llama.cpp without its projector, OpenAI's
# "image_url is only supported by certain models").
_IMAGE_WORDS = re.compile(r"image|vision|multi-?modal", re.IGNORECASE)
_NOT_SUPPORTED = re.compile(r"not supported|unsupported|does not support|only supported", re.I)
IMAGES_REFUSED = "(This model doesn't take images, so I answered from your text only.)\n\n"
# An image's cost in a served model's window, estimated: a token per 28 x 28 pixels
# (Qwen2-VL's count, the highest of the common ones: LLaVA's 576 a picture and OpenAI's
# tiles are below it). Older exchanges make room for it.
IMAGE_PATCH_PIXELS = 28
# Real tokens per estimated token at most: a server's numbers past it are not believed.
MAX_SCALE = 8.0
_WINDOW = re.compile(
    r"maximum context length is (\d+)|must be <= (\d+)|\"n_ctx\"\s*:\s*(\d+)", re.IGNORECASE
)
# Asking whether the served model takes images (OPENAI_VISION=auto): each question's
# limit, the most of an answer read (llama.cpp's /props carries the chat template,
# Ollama's /api/show the license), and how long a server that could not be asked
# (down, still loading) waits before the next message asks again.
VISION_QUESTION_SECONDS = 5.0
VISION_ANSWER_BYTES = 2_000_000
VISION_ASK_AGAIN_SECONDS = 60.0
_PROMPT_TOKENS = re.compile(
    r"\((\d+) in the messages|request has (\d+) input tokens|messages resulted in (\d+) tokens"
    r"|Given: (\d+) `inputs` tokens|\"n_prompt_tokens\"\s*:\s*(\d+)",
    re.IGNORECASE,
)


class ServerError(RuntimeError):
    """The inference server could not be reached or answered with an error.

    `retriable`: sending the same request again may help (unreachable, 5xx).
    `user_message`: what the user should be told instead of the generic apology.
    """

    retriable = False
    user_message: str | None = None


class Unavailable(ServerError):
    """Unreachable, or an error on the server's side (5xx, 429, 408)."""

    retriable = True


class ImagesRefused(ServerError):
    """The server refused a request because of its images."""


class ContextTooLong(ServerError):
    """The server refused the prompt as longer than its window."""

    user_message = CONTEXT_FULL

    def __init__(self, message: str, body: str) -> None:
        super().__init__(message)
        self.body = body


@dataclass(frozen=True)
class Fitted:
    messages: list[dict[str, str]]
    user_text: str
    kept_turns: int


def estimate_tokens(messages: Sequence[dict[str, str]], scale: float = 1.0) -> int:
    """An approximate token count of a chat request (see CHARS_PER_TOKEN)."""
    chars = sum(len(m["content"]) for m in messages)
    return math.ceil(chars * scale / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * (len(messages) + 1)


def exchanges(history: Sequence[Turn]) -> list[tuple[Turn, Turn]]:
    """The history as whole exchanges (a message and its reply), oldest first: a server
    gets strictly alternating turns that start with a user turn whatever was stored
    (an odd cap, a reply whose message was trimmed, two messages in a row)."""
    pairs = []
    for earlier, later in itertools.pairwise(history):
        if earlier.role == "user" and later.role == "assistant":
            pairs.append((earlier, later))
    return pairs


def fit(
    system: str,
    history: Sequence[Turn],
    user_text: str,
    budget: int,
    scale: float = 1.0,
    speaker: str | None = None,
) -> Fitted:
    """The system prompt, the most recent whole exchanges and the user's message, within
    `budget` tokens; when the message alone is over budget, its end is cut. With
    `speaker`, user turns start with their authors' names (servers' templates differ in
    whether they show OpenAI's `name` field; text reaches every model)."""
    named = speaker is not None
    head = [{"role": "system", "content": system}] if system else []
    user = {"role": "user", "content": with_name(speaker or "", user_text)}
    kept: list[dict[str, str]] = []
    used = estimate_tokens([*head, user], scale)
    pairs = exchanges(history)
    for asked, answered in reversed(pairs):
        pair = [
            {
                "role": "user",
                "content": with_name(asked.author_name if named else "", asked.content),
            },
            {"role": "assistant", "content": answered.content},
        ]
        cost = estimate_tokens(pair, scale) - TOKENS_PER_MESSAGE  # no second end marker
        if used + cost > budget:
            break
        kept[:0] = pair
        used += cost
    if used > budget:  # the message alone is too long: keep its start
        empty = {"role": "user", "content": with_name(speaker or "", "")}
        room = budget - estimate_tokens([*head, empty], scale)
        user_text = user_text[: max(int(room * CHARS_PER_TOKEN / scale), 0)]
        user = {"role": "user", "content": with_name(speaker or "", user_text)}
    return Fitted([*head, *kept, user], user_text, len(kept))


class OpenAIBackend(Backend):
    def __init__(self, settings: Settings) -> None:
        assert settings.openai_base_url, "OPENAI_BASE_URL"
        base = settings.openai_base_url.get_secret_value()
        self.url = base.rstrip("/") + "/chat/completions"
        self.masked_url = mask_url(self.url)
        self.models_url = base.rstrip("/") + "/models"
        self.root = server_root(base)
        self.model = settings.openai_model
        self.system_prompt = settings.system_prompt
        self.retries = settings.openai_max_retries
        self.window = settings.openai_context_tokens
        self.max_tokens = settings.max_new_tokens
        # Real tokens per estimated token, learned from the server's errors (never below 1).
        self.scale = 1.0
        self.first_token_timeout = settings.openai_timeout_seconds
        self.stall_timeout = settings.openai_stall_timeout_seconds
        # No total: a reply that keeps streaming is never cut. `connect` includes the
        # wait for a pooled connection; the pool is unbounded (MAX_QUEUE bounds it).
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.openai_connect_timeout_seconds,
            sock_connect=settings.openai_connect_timeout_seconds,
        )
        self.secrets = settings.secret_values()
        key = settings.openai_api_key
        self.headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        self.body: dict[str, Any] = {
            "model": settings.openai_model,
            "stream": True,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
        }
        self._session: aiohttp.ClientSession | None = None
        self._down = False
        # OPENAI_VISION: True or False as set; None (auto) until the server has said.
        wanted = settings.openai_vision
        self.vision: bool | None = wanted if isinstance(wanted, bool) else None
        self._images_refused = False  # the server said it takes none: for the process
        self._asking: asyncio.Task[None] | None = None
        self._closed = False
        self._ask_again_at = 0.0  # loop time: a server not asked yet, or not answering
        self._asked_once = False
        self._ask_vision()  # at start, when there is a loop; else at the first message

    @property
    def takes_images(self) -> bool:
        """With OPENAI_VISION=auto: False until the server has said its model takes
        images (reading it starts the question in the background when one is due)."""
        if self.vision is None:
            self._ask_vision()
            return False
        return self.vision and not self._images_refused

    def _budget(self) -> tuple[int, int]:
        """Tokens for the prompt, and for the reply (never more than half the window)."""
        reply = min(self.max_tokens, self.window // 2)
        return self.window - reply, reply

    async def prepare(
        self,
        history: list[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt:
        cut = user_text[:MAX_MESSAGE_CHARS]
        system = self.system_prompt if system_prompt is None else system_prompt
        fitted = fit(system, history, cut, self._budget()[0], self.scale, speaker)
        return Prompt(
            [],
            fitted.user_text,
            fitted.kept_turns,
            fitted.user_text != user_text,
            len(user_text),
            tuple(fitted.messages),
        )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                headers=self.headers,
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session

    def _scrub(self, text: str) -> str:
        return redact(text.replace(self.url, self.masked_url), self.secrets)

    async def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        messages = list(prompt.messages)
        asking = self._ask_vision() if prompt.images else None
        if asking is not None:  # images came before the answer: wait for it (bounded)
            await asyncio.shield(asking)
        images = prompt.images if self.takes_images else ()
        if prompt.images and not images:  # refused meanwhile: say so, answer the text
            yield Note(IMAGES_REFUSED)
        if images:
            messages = self._room_for(messages, images)
        attempt = 0
        trimmed = False
        while True:
            sent_any = False
            try:
                async for text in self._request(messages, prompt.temperature, images):
                    sent_any = True
                    yield text
                self._up()
                return
            except ImagesRefused as exc:
                if sent_any or not images:
                    self._refused(exc)
                    raise
                self._no_images(exc)
                images = ()  # once: the same message again, as text
                yield Note(IMAGES_REFUSED)
            except ContextTooLong as exc:
                shorter = None if trimmed or sent_any else self._shorter(messages, exc.body)
                if shorter is None:
                    self._refused(exc)
                    raise
                log.info(
                    "The inference server found the prompt too long; trying once more with "
                    "%d of %d messages",
                    len(shorter),
                    len(messages),
                )
                messages, trimmed = shorter, True
            except ServerError as exc:
                # Retry only before any text went out: a user never sees a reply twice.
                if not exc.retriable or sent_any or attempt >= self.retries:
                    if exc.retriable:
                        self._failed(exc)  # one line per outage
                    else:
                        self._refused(exc)  # one line per refused request
                    raise
                attempt += 1
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))

    def _room_for(
        self, messages: list[dict[str, str]], images: Sequence[ImageInput]
    ) -> list[dict[str, str]]:
        """`messages` with the oldest exchanges left out until `images` fit in the
        prompt's budget too; the new message itself stays whole."""
        budget = self._budget()[0] - image_tokens(images)
        if estimate_tokens(messages, self.scale) <= budget:
            return messages
        fitted = self._refit(messages, budget)
        return [*fitted.messages[:-1], messages[-1]]

    def _refit(self, messages: list[dict[str, str]], budget: int) -> Fitted:
        """Chat messages already built, fitted again to a smaller `budget`."""
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        turns = [
            Turn("user" if m["role"] == "user" else "assistant", m["content"])
            for m in messages
            if m["role"] != "system"
        ]
        return fit(system, turns[:-1], turns[-1].content, budget, self.scale)

    def _shorter(self, messages: list[dict[str, str]], body: str) -> list[dict[str, str]] | None:
        """A shorter prompt after the server refused `messages` as too long, fitted to what
        the server said (kept for later prompts) or else to half its estimated size."""
        self._learn(messages, body)
        budget, _ = self._budget()
        size = estimate_tokens(messages, self.scale)
        if size <= budget:  # nothing learned: halve the prompt
            budget = size // 2
        fitted = self._refit(messages, budget)
        if estimate_tokens(fitted.messages, self.scale) >= size or not fitted.user_text:
            return None
        return fitted.messages

    def _learn(self, messages: list[dict[str, str]], body: str) -> None:
        window = _first_number(_WINDOW, body)
        if window and window > 2 * TOKENS_PER_MESSAGE:
            self.window = min(self.window, window)
        counted = _first_number(_PROMPT_TOKENS, body)
        estimated = estimate_tokens(messages, 1.0)
        if counted and estimated:
            self.scale = min(max(self.scale, counted / estimated), MAX_SCALE)

    def _no_images(self, exc: ServerError) -> None:
        self._images_refused = True
        log.warning(
            "Inference server at %s refuses images (%s); answering from the text, and "
            "sending it no more images until a restart (is OPENAI_VISION right?)",
            self.masked_url,
            exc,
        )

    async def _request(
        self,
        messages: list[dict[str, str]],
        temperature: float | None = None,
        images: Sequence[ImageInput] = (),
    ) -> AsyncIterator[str]:
        """One request, streamed; raises ServerError for each way it can fail."""
        _, reply_tokens = self._budget()
        body = {
            **self.body,
            "max_tokens": reply_tokens,
            "messages": with_images(messages, images),
        }
        if temperature is not None:
            body["temperature"] = temperature
        loop = asyncio.get_running_loop()
        first_token_by = loop.time() + self.first_token_timeout
        try:
            response = await asyncio.wait_for(
                self._client().post(self.url, json=body), self.first_token_timeout
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise Unavailable(f"no connection within the limit ({exc!r})") from exc
        except TimeoutError as exc:
            raise ServerError(
                f"no answer within OPENAI_TIMEOUT_SECONDS ({self.first_token_timeout:g} s)"
            ) from exc
        except aiohttp.ClientError as exc:
            raise Unavailable(self._scrub(repr(exc))) from exc
        try:
            await self._check_status(response, bool(images))
            async for text in self._events(response, first_token_by):
                yield text
        finally:
            # Back to the pool after a whole body; a stream left unread closes its
            # connection, which tells the server to stop generating.
            response.release()

    async def _check_status(self, response: aiohttp.ClientResponse, images: bool = False) -> None:
        status = response.status
        if status < 300:
            kind = response.headers.get("Content-Type", "")
            if not kind.startswith("text/event-stream"):
                detail = await _read_some(response)
                raise ServerError(f"HTTP {status} but not an event stream ({kind}): {detail}")
            return
        detail = self._scrub(await _read_some(response))
        message = f"HTTP {status}: {_server_message(detail)}"
        if images and _refuses_images(status, detail):
            raise ImagesRefused(message)
        if status in (400, 413, 422) and _CONTEXT_WORDS.search(detail):
            raise ContextTooLong(message, detail)
        if status >= 500 or status in (408, 429):
            raise Unavailable(message)
        raise ServerError(message)

    async def _events(
        self, response: aiohttp.ClientResponse, first_token_by: float
    ) -> AsyncIterator[str]:
        """The text deltas of a streamed chat completion (server-sent events), within the
        first-token deadline, then with at most OPENAI_STALL_TIMEOUT_SECONDS of silence
        between lines (a server's keep-alive comments count as life)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = first_token_by
        finished = False
        event = ""
        while True:
            limit = self.stall_timeout if deadline is None else deadline - loop.time()
            try:
                raw = await asyncio.wait_for(response.content.readline(), max(limit, 0))
            except TimeoutError as exc:
                if deadline is None:
                    raise ServerError(
                        "the stream stalled: nothing for OPENAI_STALL_TIMEOUT_SECONDS "
                        f"({self.stall_timeout:g} s)"
                    ) from exc
                raise ServerError(
                    f"no first token within OPENAI_TIMEOUT_SECONDS ({self.first_token_timeout:g} s)"
                ) from exc
            except (aiohttp.ClientError, ValueError) as exc:
                raise ServerError(f"the stream broke off: {self._scrub(repr(exc))}") from exc
            if not raw:  # end of the body
                break
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("event:"):
                event = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                chunk = {"error": data} if event == "error" else {}
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk or event == "error":
                said = self._scrub(_server_message(json.dumps(chunk.get("error", chunk))))
                if _CONTEXT_WORDS.search(said) and not finished:
                    raise ContextTooLong(f"error event: {said}", said)
                raise ServerError(f"error event: {said}")
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("finish_reason"):
                finished = True
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                deadline = None
                yield str(delta)
        if not finished:
            raise ServerError("the stream ended without a finish reason")

    def _failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.error(
                "Inference server at %s is unreachable or failing (%s); users get an apology",
                self.masked_url,
                exc,
            )

    def _refused(self, exc: ServerError) -> None:
        log.warning("Inference server at %s: %s", self.masked_url, exc)

    def _up(self) -> None:
        if self._down:
            self._down = False
            log.info("Inference server at %s answers again", self.masked_url)

    async def ready(self) -> bool:
        """Whether the server answers HTTP at all (for readiness checks). Any answer
        counts: servers differ in what their model list returns (`transformers serve`
        answers 500 without a hub cache)."""
        # A bound of its own: the session has no total limit (streams), and a server
        # that accepts connections but never answers is not ready.
        limit = aiohttp.ClientTimeout(total=min(10.0, self.first_token_timeout))
        try:
            async with self._client().get(self.models_url, timeout=limit):
                return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _ask_vision(self) -> asyncio.Task[None] | None:
        """The question whether the served model takes images (OPENAI_VISION=auto), in
        the background: started unless answered, under way (returned), asked within
        VISION_ASK_AGAIN_SECONDS, or there is no event loop yet."""
        if self.vision is not None or self._closed:
            return None
        if self._asking is not None and not self._asking.done():
            return self._asking
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if loop.time() < self._ask_again_at:
            return None
        self._asking = loop.create_task(self._learn_vision(), name="openai-vision")
        return self._asking

    async def _learn_vision(self) -> None:
        """Ask, and keep the answer: what the server says, else (it answered, but not
        this) no images for the process; a server that could not be asked is asked
        again with a message after VISION_ASK_AGAIN_SECONDS. Never raises."""
        where = mask_url(self.root)
        try:
            said, source, answered = await self._what_server_says()
        except Exception as exc:  # not knowing means no images, never a failed reply
            said, source, answered = None, "", True
            why = self._scrub(repr(exc))
            log.info("Asking %s whether its model takes images failed: %s", where, why)
        if said is not None:
            self.vision = said
            log.info(
                "Inference server at %s says (%s) its model takes %s (OPENAI_VISION=auto)",
                where,
                source,
                "images: sending them" if said else "no images: sending none",
            )
        elif answered:
            self.vision = False
            log.info(
                "Inference server at %s does not say whether its model takes images: "
                "sending none (OPENAI_VISION=true sends them)",
                where,
            )
        else:
            self._ask_again_at = asyncio.get_running_loop().time() + VISION_ASK_AGAIN_SECONDS
            log.log(
                logging.DEBUG if self._asked_once else logging.INFO,
                "Inference server at %s did not answer whether its model takes images; "
                "sending none, asking again with a message in %g s",
                where,
                VISION_ASK_AGAIN_SECONDS,
            )
            self._asked_once = True

    async def _what_server_says(self) -> tuple[bool | None, str, bool]:
        """Whether the model takes images as the server says it (None: it does not
        say), where it said so, and whether the server answered HTTP at all. The
        questions go together; a server answers the ones it knows, 404 to the rest."""
        questions: list[tuple[str, str, str, dict[str, Any] | None, _Reader]] = [
            ("llama.cpp /props", "GET", self.root + "/props", None, _vision_in_props),
            (
                "LM Studio /api/v0/models",
                "GET",
                self.root + "/api/v0/models",
                None,
                _vision_in_models,
            ),
            ("/v1/models", "GET", self.models_url, None, _vision_in_models),
        ]
        if self.model:  # Ollama's needs the model's name
            body = {"model": self.model}
            show = ("Ollama /api/show", "POST", self.root + "/api/show", body, _vision_in_show)
            questions.insert(1, show)
        answers = await asyncio.gather(*(self._ask(m, url, b) for _, m, url, b, _ in questions))
        for (source, *_, read), (data, _) in zip(questions, answers, strict=True):
            said = read(data, self.model) if data is not None else None
            if said is not None:
                return said, source, True
        # Only a server that answered every question and said nothing has no say: one
        # that timed out or failed on any of them (the one it knows, perhaps) is asked
        # again later.
        return None, "", all(answered for _, answered in answers)

    async def _ask(self, method: str, url: str, body: dict[str, Any] | None) -> tuple[Any, bool]:
        """The server's JSON answer at `url` (None: an error status, or not JSON), and
        whether it answered: a refused connection, a timeout, a 5xx or a 429 (a server
        or its proxy not ready yet, llama.cpp loading the model) are no answer."""
        limit = aiohttp.ClientTimeout(total=min(VISION_QUESTION_SECONDS, self.first_token_timeout))
        try:
            # No redirects: whatever another host says must not decide (nor be asked).
            async with self._client().request(
                method, url, json=body, timeout=limit, allow_redirects=False
            ) as response:
                if response.status >= 500 or response.status == 429:
                    return None, False  # not ready, overloaded, failing: ask again later
                if response.status >= 300:
                    return None, True
                data = bytearray()
                while len(data) < VISION_ANSWER_BYTES:
                    chunk = await response.content.read(VISION_ANSWER_BYTES - len(data))
                    if not chunk:
                        break
                    data += chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("No answer at %s: %s", mask_url(url), self._scrub(repr(exc)))
            return None, False
        try:
            return json.loads(data), True
        except ValueError:  # not JSON, or cut at the limit
            return None, True

    async def close(self) -> None:
        self._closed = True  # no question after this (it would open a new session)
        if self._asking is not None and not self._asking.done():
            self._asking.cancel()
            await asyncio.gather(self._asking, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


async def _read_some(response: aiohttp.ClientResponse, limit: int = 2000) -> str:
    try:
        data = await asyncio.wait_for(response.content.read(limit), 5)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    return data.decode("utf-8", "replace").strip()


def _server_message(body: str, limit: int = 300) -> str:
    """The message in an error body ({"error": {"message": …}}, {"error": "…"},
    {"message": …}, {"detail": …}), else the body's start, on one line."""
    text = body
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    while isinstance(data, dict):
        inner = next((data[k] for k in ("error", "message", "detail") if k in data), None)
        if isinstance(inner, str):
            text = inner
            break
        data = inner
    return " ".join(text.split())[:limit]


def server_root(base: str) -> str:
    """The server's own address from its OpenAI base URL, where llama.cpp's `/props`
    and Ollama's and LM Studio's `/api/…` are: without a last `/v1`
    (http://host:11434/v1 -> http://host:11434; a proxy's http://host/llm/v1 ->
    http://host/llm)."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/").removesuffix("/v1")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


# What one answer says of the model's images: True, False, or None (it does not say).
_Reader = Callable[[Any, str], bool | None]


def _vision_in_props(data: Any, model: str) -> bool | None:
    """llama.cpp's `GET /props`: `"modalities": {"vision": true}` (builds since its
    multimodal server, 2025; tools/server/README.md, "GET /props")."""
    modalities = data.get("modalities") if isinstance(data, dict) else None
    vision = modalities.get("vision") if isinstance(modalities, dict) else None
    return vision if isinstance(vision, bool) else None


def _vision_in_show(data: Any, model: str) -> bool | None:
    """Ollama's `POST /api/show`: `"capabilities": ["completion", "vision"]` (api/types.go
    ShowResponse; types/model/capability.go CapabilityVision; older versions leave the
    list out)."""
    capabilities = data.get("capabilities") if isinstance(data, dict) else None
    if not isinstance(capabilities, list) or not capabilities:
        return None
    return "vision" in capabilities


def _vision_in_models(data: Any, model: str) -> bool | None:
    """A model list's entry for `model` (or its only entry: llama.cpp answers any name):
    LM Studio's `GET /api/v0/models` has `"type": "vlm"` or `"llm"` (its docs, REST API
    v0); newer llama.cpp builds' and OpenRouter's `/v1/models` have
    `"architecture": {"input_modalities": ["text", "image"]}`. vLLM's says nothing."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    named = [e for e in entries if isinstance(e, dict) and e.get("id") == model]
    if not named and len(entries) == 1 and isinstance(entries[0], dict):
        named = entries
    if not named:
        return None
    entry = named[0]
    if entry.get("type") in ("vlm", "llm"):
        return bool(entry["type"] == "vlm")
    architecture = entry.get("architecture")
    inputs = architecture.get("input_modalities") if isinstance(architecture, dict) else None
    return "image" in inputs if isinstance(inputs, list) else None


def image_tokens(images: Sequence[ImageInput]) -> int:
    """About how many tokens `images` take in a served model's window."""
    patch = IMAGE_PATCH_PIXELS
    return sum(math.ceil(i.width / patch) * math.ceil(i.height / patch) for i in images)


def with_images(
    messages: Sequence[dict[str, str]], images: Sequence[ImageInput]
) -> list[dict[str, Any]]:
    """The chat messages with `images` as OpenAI content parts of the last one (the new
    message): its text first, then an `image_url` part per image, as a `data:` URL."""
    sent: list[dict[str, Any]] = list(messages)
    if not images or not sent:
        return sent
    last = sent[-1]
    parts: list[dict[str, Any]] = [{"type": "text", "text": last["content"]}]
    parts += [{"type": "image_url", "image_url": {"url": i.data_url()}} for i in images]
    sent[-1] = {**last, "content": parts}
    return sent


def _refuses_images(status: int, body: str) -> bool:
    """Whether an error answer to a request with images says the images are the
    trouble: a 4xx naming them (not a context-length error), or a 5xx saying that
    images are not supported."""
    if not _IMAGE_WORDS.search(body) or _WINDOW.search(body) or _PROMPT_TOKENS.search(body):
        return False
    if 400 <= status < 500 and status not in (408, 429):
        return True
    return status >= 500 and bool(_NOT_SUPPORTED.search(body))


def _first_number(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.search(text)
    if match is None:
        return None
    return int(next(g for g in match.groups() if g))
