"""The local backend: a model run in this process, on one worker thread.

Decoder-only models go through the step scheduler (bot.inference.scheduler), others
are dynamically batched through `generate` (bot.inference.batching); prompts are
fitted on a thread of their own (bot.inference.generation.Generator.prepare). A model
that takes images (bot.inference.vision) runs one reply per `generate` call on the
worker thread, with the message's images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, cast

from bot.inference.backend import Backend, Prompt
from bot.inference.batching import Batcher, BatchRunner
from bot.messages import Turn
from bot.settings import Settings

if TYPE_CHECKING:  # torch is imported only with a local model
    from bot.inference.scheduler import Scheduler

log = logging.getLogger(__name__)


class ModelRunner(BatchRunner, Protocol):
    """A local model: blocking methods, run on worker threads
    (bot.inference.generation.Generator)."""

    def prepare(
        self,
        history: list[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt: ...


class VisionRunner(ModelRunner, Protocol):
    """A local model that takes images (bot.inference.vision.VisionGenerator): each
    reply one blocking call, its notes (images left out) apart from its text."""

    takes_images: bool

    def generate(
        self,
        prompt: Prompt,
        on_text: Callable[[str], None],
        stop: threading.Event,
        on_note: Callable[[str], None],
    ) -> str: ...


class LocalBackend(Backend):
    """A local model on one worker thread: decoder-only models in the step scheduler
    (bot.inference.scheduler), others dynamically batched through `generate`
    (bot.inference.batching), a model that takes images one reply per `generate` call
    (bot.inference.vision)."""

    def __init__(
        self,
        runner: ModelRunner,
        max_batch: int = 16,
        max_wait: float = 0.01,
        close_timeout: float = 5.0,
    ) -> None:
        self.runner = runner
        self.scheduler: Scheduler | None = getattr(runner, "scheduler", None)
        self.vision = cast(VisionRunner, runner) if getattr(runner, "takes_images", False) else None
        self._seeing: set[threading.Event] = set()  # replies with images running or queued
        self.close_timeout = close_timeout
        # Prompt fitting on its own thread, so it never waits behind generation.
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._generate_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        # Next turns prepared on a thread of their own: never ahead of a live prompt.
        self._warm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        self.batcher = Batcher(runner, self._generate_pool, max_batch, max_wait)
        self._warming: set[Future[None]] = set()  # next turns being prepared

    @property
    def takes_images(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_settings(cls, runner: ModelRunner, settings: Settings) -> LocalBackend:
        """A backend with the configured batching."""
        return cls(runner, settings.batch_size, settings.batch_wait_ms / 1000)

    async def prepare(
        self,
        history: list[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._prepare_pool, self.runner.prepare, history, user_text, system_prompt, speaker
        )

    async def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        """Generate, yielding text as the worker thread decodes it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | _End] = asyncio.Queue()
        stop = threading.Event()

        def hand_over(item: str | _End) -> None:
            # RuntimeError: the loop closed under the worker thread (the bot is exiting).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        if self.scheduler is not None:
            from bot.inference.scheduler import Row  # loaded already, with the model

            self.scheduler.submit(
                Row(
                    prompt.input_ids,
                    prompt.conversation,
                    hand_over,
                    stop,
                    lambda _text, error: hand_over(_End(error)),
                    shared=prompt.shared,
                    temperature=prompt.temperature,
                )
            )
        elif self.vision is not None:
            # One reply per call on the worker thread (fitting the images in, reading
            # them, generating); its text and notes reach the loop before its end does.
            self._seeing.add(stop)
            job = loop.run_in_executor(
                self._generate_pool, self.vision.generate, prompt, hand_over, stop, hand_over
            )

            def ended(f: asyncio.Future[str]) -> None:
                self._seeing.discard(stop)
                queue.put_nowait(_End(None if f.cancelled() else f.exception() or None))

            job.add_done_callback(ended)
        else:
            # The worker's text reaches the loop before the batch's result does, so the
            # end marker queued on completion comes after the last piece of text.
            result = asyncio.ensure_future(self.batcher.generate(prompt, hand_over, stop))
            result.add_done_callback(
                lambda f: queue.put_nowait(_End(None if f.cancelled() else f.exception() or None))
            )
        try:
            while not isinstance(item := await queue.get(), _End):
                yield item
            if item.error is not None:
                raise item.error
        finally:
            # The reader went away (closed, cancelled): stop this row at the next step.
            stop.set()

    async def count_tokens(self, text: str) -> int:
        count = getattr(self.runner, "count_tokens", None)
        if not callable(count) or not text:
            return await super().count_tokens(text)
        loop = asyncio.get_running_loop()
        return int(await loop.run_in_executor(self._prepare_pool, count, text))

    def forget(self, conversation: str) -> None:
        if self.scheduler is not None:
            self.scheduler.forget(conversation)

    def warm(
        self,
        conversation: str,
        history: list[Turn],
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> None:
        """Have the scheduler read, at low priority, the beginning that the next turn's
        prompt will have: the same however the next message reads, so the prompts for
        two different messages agree on it."""
        scheduler = self.scheduler
        if scheduler is None:
            return

        from bot.inference.kvcache import opening  # loaded already, with the model

        forgets = scheduler.forgets  # a forget from now on makes this out of date

        def read_ahead() -> None:
            ids = opening(
                lambda text: self.runner.prepare(history, text, system_prompt, speaker).input_ids
            )
            scheduler.prefetch(conversation, ids, forgets)

        def done(future: Future[None]) -> None:
            self._warming.discard(future)
            if not future.cancelled() and future.exception() is not None:
                log.warning(
                    "Could not prepare the next turn of a conversation: %r", future.exception()
                )

        with contextlib.suppress(RuntimeError):  # the pool is shut down: the bot is stopping
            future = self._warm_pool.submit(read_ahead)
            self._warming.add(future)
            future.add_done_callback(done)

    @property
    def idle(self) -> bool:
        """Nothing generating, queued, or being prepared between turns (for tests and
        the bench)."""
        return (
            not self._warming
            and not self._seeing
            and (self.scheduler is None or self.scheduler.idle)
        )

    async def ready(self) -> bool:
        return self.scheduler is None or self.scheduler.alive

    async def close(self) -> None:
        """Stop the running rows and the worker, waiting off the loop, bounded."""
        await self.batcher.close()
        for stop in self._seeing:
            stop.set()
        scheduler = self.scheduler
        if scheduler and not await asyncio.to_thread(scheduler.close, self.close_timeout):
            log.warning("The model was still busy %.0f s after stopping", self.close_timeout)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._warm_pool.shutdown(wait=False, cancel_futures=True)
        self._generate_pool.shutdown(wait=False, cancel_futures=True)


class _End:
    """The end of a stream of text, with the generation's error if it failed."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
