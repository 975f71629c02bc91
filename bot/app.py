"""Wiring: settings to a ready engine, and running adapters until asked to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from bot.engine import Engine
from bot.inference.generation import Generator
from bot.inference.loader import LoadedModel, load_model
from bot.inference.local import LocalBackend, ModelRunner
from bot.settings import ConfigError, Settings
from bot.store.memory import open_memory

log = logging.getLogger(__name__)


class Adapter(Protocol):
    """A platform connection: turns platform events into engine calls until `stop` is set."""

    name: str

    async def run(self, engine: Engine, stop: asyncio.Event) -> None: ...


async def _heartbeat(started: float, every: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every)
        log.info("Still loading the model (%.0f s)…", time.monotonic() - started)


async def build_engine(settings: Settings) -> Engine:
    """Memory first (a bad REDIS_URL fails fast), then the model, on a worker thread."""
    memory = await open_memory(settings)
    if settings.model_backend == "openai":
        from bot.inference.served import OpenAIBackend

        backend = OpenAIBackend(settings)
        log.info("Replies come from the inference server at %s", backend.masked_url)
        return Engine.from_settings(backend, memory, settings)
    started = time.monotonic()
    heartbeat = asyncio.create_task(_heartbeat(started))
    try:
        loaded = await asyncio.to_thread(load_model, settings)
    except BaseException:
        await memory.close()
        raise
    finally:
        heartbeat.cancel()
    return Engine.from_settings(
        LocalBackend.from_settings(runner(loaded, settings), settings), memory, settings
    )


def runner(loaded: LoadedModel, settings: Settings) -> ModelRunner:
    """The local model's runner: with its images for a vision model
    (bot.inference.vision), else the text models' Generator."""
    if loaded.takes_images:
        from bot.inference.vision import VisionGenerator

        if settings.dtype == "int8":  # int8 weights exist only in the text models' path
            raise ConfigError(
                "Invalid configuration: DTYPE: int8 is for text models; this MODEL takes "
                "images (use auto, bf16 or fp32)"
            )

        log.info("Images in messages reach the model (%s)", loaded.name)
        return VisionGenerator.from_settings(loaded, settings)
    return Generator.from_settings(loaded, settings)


async def serve(
    settings: Settings,
    adapters: Sequence[Adapter],
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Build the engine and run the adapters; SIGTERM or SIGINT stops them all.

    `on_ready` is called once the engine is built, before the adapters start."""
    engine = await build_engine(settings)
    if on_ready is not None:
        on_ready()
    ops = None
    if settings.metrics_port:
        from bot.metrics import serve_ops

        ops = await serve_ops(settings.metrics_port, engine.ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # From here SIGTERM is a graceful stop (exit 0); before, the default (killed).
    log.info("Running: %s", ", ".join(a.name for a in adapters))
    try:
        tasks = [asyncio.create_task(a.run(engine, stop), name=a.name) for a in adapters]
        # An adapter that ends (console at end of input) ends the bot.
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        stopper.cancel()
        # Adapters finish their replies in progress within the grace period; whatever
        # still runs after it is cut short (engine.close then stops its rows).
        _, late = await asyncio.wait(tasks, timeout=settings.shutdown_grace_seconds + 1)
        if late:
            log.warning("Stopping: %d adapter(s) cut short after the grace period", len(late))
        for task in late:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                raise outcome
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if ops is not None:
            await ops.cleanup()
        await engine.close()
