"""Dynamic batching: generation requests from different conversations that arrive
while the model is busy are run together in the next batch.

On a CPU the model's throughput rises several-fold with the batch size (a decode
step reads every weight once, for the whole batch), so a busy server answers many
people in about the time it takes to answer one. Per-conversation order is the
engine's business: it sends at most one request per conversation at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from bot import metrics
from bot.inference.backend import Prompt

log = logging.getLogger(__name__)


class BatchRunner(Protocol):
    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        sinks: Sequence[Callable[[str], None]],
        stops: Sequence[threading.Event],
    ) -> list[str]: ...


@dataclass
class _Request:
    prompt: Prompt
    sink: Callable[[str], None]
    stop: threading.Event
    done: asyncio.Future[str] = field(repr=False)
    delivered: int = 0  # characters already handed to `sink`
    _seen: int = 0

    def restart(self) -> None:
        """Before running again: text up to `delivered` is not handed out twice."""
        self._seen = 0

    def emit(self, text: str) -> None:
        start, self._seen = self._seen, self._seen + len(text)
        fresh = text[max(0, self.delivered - start) :]
        if fresh:
            self.delivered += len(fresh)
            self.sink(fresh)


class Batcher:
    """Collects requests and runs them in batches of up to `max_batch` on `executor`.

    A batch starts as soon as the model is free; it waits at most `max_wait`
    seconds for more requests to join when fewer than `max_batch` are queued.
    """

    def __init__(
        self, runner: BatchRunner, executor: Executor, max_batch: int, max_wait: float
    ) -> None:
        self.runner = runner
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and the bench
        self._running: list[_Request] = []

    async def generate(
        self, prompt: Prompt, sink: Callable[[str], None], stop: threading.Event
    ) -> str:
        """The generated text; `sink` gets it piece by piece, from the worker thread."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="batcher")
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(prompt, sink, stop, done))
        return await done

    async def _collect(self) -> list[_Request]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        # A reader that went away before its batch started needs no tokens.
        for request in batch:
            if request.stop.is_set() and not request.done.done():
                request.done.set_result("")
        return [r for r in batch if not r.done.done()]

    async def _generate(self, batch: list[_Request]) -> list[str]:
        for request in batch:
            request.restart()
        self._running = batch
        return await asyncio.get_running_loop().run_in_executor(
            self.executor,
            self.runner.generate_batch,
            [r.prompt for r in batch],
            [r.emit for r in batch],
            [r.stop for r in batch],
        )

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
            metrics.BATCH.observe(len(batch))
            try:
                results = list(zip(batch, await self._generate(batch), strict=True))
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].done.set_exception(exc)
                    continue
                # One bad request must not fail the others: run each alone, so only
                # the culprit gets the error. Text already streamed is not repeated.
                log.warning("A batch of %d failed (%s); retrying each alone", len(batch), exc)
                await self._one_by_one(batch)
                continue
            for request, text in results:
                if not request.done.done():
                    request.done.set_result(text)

    async def _one_by_one(self, batch: list[_Request]) -> None:
        for request in batch:
            try:
                (text,) = await self._generate([request])
            except Exception as exc:
                if not request.done.done():
                    request.done.set_exception(exc)
            else:
                if not request.done.done():
                    request.done.set_result(text)

    async def close(self) -> None:
        """Stop every row, queued or running (their readers get what was written)."""
        for request in [*self._running, *self._queue._queue]:  # type: ignore[attr-defined]
            request.stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
