"""Step-level continuous batching for decoder-only models, on one worker thread.

Every step is one forward pass over the running rows: each decoding row brings its
last token, and rows still reading their prompt bring a chunk of it, within a
per-step token budget. Prompts are read shortest first, with aging: each step a
prompt waits counts as a budget's worth of tokens read, so a long prompt goes ahead
of every later arrival after at most (its length / the budget) steps, and no stream
of short messages can starve it. A long prompt is read in pieces between everyone
else's tokens, a row leaves the moment it ends or its reader goes away (before the
next arrivals take their places), and no row is padded to another's length. Each
conversation's cache is kept between turns (`bot.inference.kvcache.PrefixStore`), so
a turn reads only its new tokens.

Greedy decoding gives, token for token, what `model.generate` gives on the same
prompt in fp32 (tests/test_scheduler.py), whatever rows join or leave meanwhile.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import threading
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from bot import metrics
from bot.inference.detokenize import TextStream
from bot.inference.kvcache import (
    ModelShape,
    Prefix,
    PrefixStore,
    RaggedStep,
    SlotPool,
    common_prefix,
)
from bot.inference.sampling import Sampler

log = logging.getLogger(__name__)

# (flat token ids, the step, the positions whose logits to keep) -> [kept, vocab]
Forward = Callable[[torch.Tensor, RaggedStep, torch.Tensor], torch.Tensor]


# The longest system prompt (or persona) whose cache is shared across conversations.
SHARED_MAX_TOKENS = 1024
# Conversations waiting to be read ahead at most (the oldest dropped past it).
AHEAD_MAX = 64
# The cache store's key of a shared opening (no conversation key starts so).
OPENING = "\x00opening:"


def _ignore_text(_text: str) -> None:
    """Reading ahead writes no text."""


def _ignore_end(_text: str | None, _error: BaseException | None) -> None:
    """Reading ahead has no reader to tell."""


class ShutdownError(RuntimeError):
    """A reply cut short because the bot is stopping."""


@dataclass
class Row:
    """One reply being generated."""

    prompt: list[int]
    key: str  # the conversation, for its cached prefix; "" = no reuse
    sink: Callable[[str], None]  # text as it is decoded (called on the worker thread)
    stop: threading.Event
    finish: Callable[[str | None, BaseException | None], None]  # once, at the end
    generator: torch.Generator | None = None  # sampling: this row's own random stream
    tokens: list[int] = field(default_factory=list)  # prompt + generated so far
    filled: int = 0  # leading tokens whose keys/values are in the slot
    generated: int = 0
    slot: int = -1
    admitted: int = 0  # the step it joined at (prompt aging)
    background: bool = False  # reads its tokens into the cache only, after live work
    shared: int = 0  # leading tokens that other conversations' prompts share (the system's)
    share: bool = False  # to keep its shared tokens' cache for others when it ends
    temperature: float | None = None  # its own sampling temperature (Regenerate)
    text: TextStream | None = None
    ended: bool = False


@dataclass
class _Saving:
    """A finished row's cache being copied out of its slot, off the worker thread: the
    slot is not free, and the conversation's next turn waits for it, until it lands."""

    slot: int
    key: str
    copied: Future[list[tuple[str, Prefix]]]


class Scheduler:
    """Runs rows in steps on its own thread; `submit` is safe from any thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        capacity: int,
        eos: set[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        max_rows: int = 16,
        step_tokens: int = 64,
        cache_bytes: int = 1 << 30,
        cache_idle_seconds: float | None = None,
        seed: int | None = None,
        fast: Callable[[], Forward | None] | None = None,
    ) -> None:
        self.model = model
        # The model's logits for a step without its own forward (bot.inference.fastpath),
        # made by `fast` on the worker thread before its first step (~0.1-0.2 s, off
        # the start-up path); None: the model's own forward.
        self.forward: Forward | None = None
        self._fast = fast
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.capacity = capacity
        self.eos = eos
        self.max_rows = max_rows
        self.step_tokens = max(step_tokens, max_rows)
        self.shape = ModelShape.of(model)
        self.store = PrefixStore(cache_bytes, cache_idle_seconds)
        # Allocated now, so a pool too big for the device fails at start-up. On a CPU
        # pages are committed as positions are written, not here.
        self._pool = SlotPool(self.shape, max_rows, capacity)
        self._rows: list[Row] = []
        self._free = list(range(max_rows))  # a heap of the slots no row holds
        # Finished rows' caches being copied into the store (a 2,048-token row is
        # ~47 MB in bf16): on a thread of their own, so no step waits for a copy.
        self._saving: list[_Saving] = []
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-save")
        self._inbox: deque[Row] = deque()
        self._ahead: dict[str, list[int]] = {}  # conversations' next prompts to read ahead
        self.forgets = 0  # `forget` calls so far
        self._forget: deque[str] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.sampler = Sampler(temperature, top_p, repetition_penalty, seed)
        self.steps = 0  # for tests and the bench
        self.max_running = 0
        self.reused_tokens = 0  # prompt tokens read from conversations' caches
        self.read_tokens = 0  # prompt tokens live rows read with the model
        self.read_ahead_tokens = 0  # tokens read ahead between turns

    # -- from any thread ---------------------------------------------------------

    def submit(self, row: Row) -> None:
        if not 0 < len(row.prompt) < self.capacity:
            raise ValueError(f"a prompt of {len(row.prompt)} tokens (capacity {self.capacity})")
        with self._wake:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            self._inbox.append(row)
            self._ahead.pop(row.key, None)  # its own prompt replaces the read-ahead
            self._start()
            self._wake.notify()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
            self._thread.start()

    def forget(self, key: str) -> None:
        """Drop a conversation's cached prefix (done between steps, on the worker)."""
        with self._wake:
            self._ahead.pop(key, None)
            self._forget.append(key)
            self.forgets += 1
            self._wake.notify()

    def prefetch(self, key: str, ids: list[int], forgets: int) -> None:
        """Between turns: read `ids` (the beginning of the conversation's next prompt)
        into its cache, where the cache does not hold them yet. Done only with a free
        place and no message waiting, with what a step's budget leaves; a message
        that arrives takes the place (and the part read so far) at once. `forgets`:
        the count of `forget` calls when `ids` were made: after another one, they may
        hold what was to be forgotten, and are dropped."""
        if not key or not 1 < len(ids) < self.capacity:
            return
        with self._wake:
            if self._closing or forgets != self.forgets:
                return
            self._ahead.pop(key, None)
            self._ahead[key] = ids  # the newest last
            while len(self._ahead) > AHEAD_MAX:
                self._ahead.pop(next(iter(self._ahead)))
            self._start()
            self._wake.notify()

    def close(self, timeout: float) -> bool:
        """Stop every row (their readers get what was written) and the thread.
        Blocking: call it off the event loop. False if the thread outlived `timeout`."""
        with self._wake:
            self._closing = True
            self._ahead.clear()
            for row in [*self._rows, *self._inbox]:
                row.stop.set()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def running(self) -> int:
        """Rows answering someone (not reading ahead)."""
        return sum(not row.background for row in self._rows)

    @property
    def idle(self) -> bool:
        """Nothing running, queued or left to read ahead."""
        with self._wake:
            return not (self._rows or self._inbox or self._ahead or self._saving)

    @property
    def alive(self) -> bool:
        """False once the worker thread has died (for readiness checks)."""
        return self._thread is None or self._thread.is_alive() or self._closing

    # -- the worker thread -------------------------------------------------------

    def _run(self) -> None:
        if self._fast is not None:
            try:
                self.forward = self._fast()
            except Exception:  # the model's own forward serves instead
                log.exception("The lean decoding path could not be set up")
        while True:
            arrivals: list[Row] = []
            try:
                with self._wake:
                    while not (
                        self._inbox
                        or self._rows
                        or self._forget
                        or self._closing
                        or self._ahead
                        or self._saving  # to land in the store (waited for below)
                    ):
                        # Idle: wake when the next cache is due to expire.
                        due = self.store.expire()
                        metrics.KV_CACHE_BYTES.set(self.store.nbytes)
                        self._wake.wait(due)
                    done = self._closing and not self._rows and not self._inbox
                    wanted = {row.key for row in self._inbox}
                    crowded = len(self._inbox) + len(self._rows) > self.max_rows
                if done:
                    self._settle(wait=True)
                    self._saver.shutdown(wait=False)
                    return
                # Retire first: the places (and the caches) of rows whose readers went
                # away are free for this step's arrivals, a conversation's next
                # message among them. Reading ahead gives way to any message.
                self._retire(
                    [
                        r
                        for r in self._rows
                        if r.stop.is_set()
                        or self._closing
                        or (r.background and (crowded or r.key in wanted))
                    ]
                )
                # Copies done land in the store; with no row to step, nothing is
                # held up by waiting for the rest.
                self._settle(wait=not self._rows)
                with self._wake:
                    # After the retirements: a stopped row's cache must not come back.
                    forgotten = set(self._forget)
                    self._forget.clear()
                for key in forgotten:
                    self._settle(key=key)  # a copy still on its way goes too
                    self.store.forget(key)
                self.store.expire()
                for row in [r for r in self._rows if r.key in forgotten]:
                    if row.background:
                        self._end(row, None, LookupError("forgotten"))  # its cache goes too
                    else:  # answering still (its reader gone): its cache is not kept
                        row.key = ""
                with self._wake:
                    metrics.KV_CACHE_BYTES.set(self.store.nbytes)
                    held = len(self._rows) + len(self._saving)
                    while self._inbox and held + len(arrivals) < self.max_rows:
                        arrivals.append(self._inbox.popleft())
                    ahead = self._next_ahead(len(arrivals))
                for row in arrivals:
                    if self._closing:  # queued at shutdown: never written, not a reply
                        self._end(row, None, ShutdownError("stopped: the bot is shutting down"))
                    elif row.stop.is_set():  # its reader went away while it queued
                        self._end(row, "", None)
                    else:
                        self._admit(row)
                arrivals = []
                if ahead is not None:
                    self._admit(ahead)
                if self._rows:
                    self._advance_all()
            except Exception as exc:
                # Whatever broke, the thread lives on: the rows it held get the error.
                log.exception("The generation loop failed; %d row(s) end", len(self._rows))
                for row in [*self._rows, *arrivals]:
                    self._end(row, None, exc)

    def _advance_all(self) -> None:
        plan = self._plan()
        try:
            self._step(plan)
        except Exception as exc:
            if len(plan) == 1:
                self._end(plan[0][0], None, exc)
                return
            # The forward pass failed before any row moved on: each row runs its part
            # alone, so only the culprit gets the error.
            log.warning("A step of %d rows failed (%s); running each alone", len(plan), exc)
            for row, count in plan:
                if row.text is None:  # ended meanwhile
                    continue
                try:
                    self._step([(row, count)])
                except Exception as error:
                    self._end(row, None, error)

    def _next_ahead(self, arriving: int) -> Row | None:
        """A conversation's next prompt to read ahead, when nothing live waits and a
        place is free (one at a time); with the lock held."""
        if self._closing or self._inbox or arriving:
            return None
        if len(self._rows) + len(self._saving) >= self.max_rows:
            return None
        if any(row.background for row in self._rows):
            return None
        running = {row.key for row in self._rows}
        # A conversation whose last turn's cache is still being copied comes next time.
        copying = {saving.key for saving in self._saving}
        for key in [key for key in self._ahead if key not in copying]:
            ids = self._ahead.pop(key)
            if key in running:  # a new message of it is being answered: out of date
                continue
            cached = self.store.peek(key)
            if cached is not None and common_prefix(cached.ids, ids) >= len(ids) - 1:
                continue  # its cache already holds it
            return Row(ids, key, _ignore_text, threading.Event(), _ignore_end, background=True)
        return None

    def _admit(self, row: Row) -> None:
        if row.key:
            self._settle(key=row.key)  # its previous turn's cache, if still being copied
        if not self._free:
            self._settle(wait=True)  # every free place is still being copied from
        row.slot = heapq.heappop(self._free)  # the lowest free slot: attention stays narrow
        row.admitted = self.steps
        row.tokens = list(row.prompt)
        row.text = TextStream(self.tokenizer, row.sink)
        self._rows.append(row)
        cached = self.store.take(row.key) if row.key else None
        reuse = 0
        if cached is not None:
            # At least the prompt's last token is read again: its logits start the reply.
            reuse = min(common_prefix(cached.ids, row.prompt), len(row.prompt) - 1)
            if reuse > 0:
                self._pool.load(row.slot, cached.kv, reuse)
        if reuse < row.shared <= min(len(row.prompt) - 1, SHARED_MAX_TOKENS):
            # A new conversation: its system prompt's cache, shared by all that use it.
            opening = self.store.get(_opening_key(row.prompt[: row.shared]))
            if opening is None or opening.ids != row.prompt[: row.shared]:
                row.share = True  # read here: kept for the others when this row ends
            else:
                reuse = row.shared
                self._pool.load(row.slot, opening.kv, reuse)
        row.filled = reuse
        self.reused_tokens += reuse
        # Whatever an earlier row left past this one's cache is not to be trusted.
        self._pool.occupy(row.slot, reuse)
        if row.background:
            self.read_ahead_tokens += len(row.prompt) - reuse
        else:
            self.read_tokens += len(row.prompt) - reuse
        if row.generator is None and not row.background:
            device = self._pool.keys.device
            row.generator = self.sampler.generator(row.prompt, device, row.temperature)
        self.max_running = max(self.max_running, len(self._rows))

    def _plan(self) -> list[tuple[Row, int]]:
        """How many tokens each row reads this step: 1 when decoding, a chunk of its
        prompt otherwise, within `step_tokens` for the whole step. Prompts go
        shortest remaining first, less a budget's worth for each step waited, so
        the wait of any prompt is bounded whatever arrives after it."""
        live = [r for r in self._rows if not r.background]
        decoding = [r for r in live if len(r.tokens) - r.filled == 1]
        # Prompts always get a share: decoding rows alone never fill a step.
        budget = max(self.step_tokens - len(decoding), self.step_tokens // 4)
        plan = [(r, 1) for r in decoding]
        reading = sorted(
            (r for r in live if len(r.tokens) - r.filled > 1),
            key=lambda r: (
                len(r.tokens) - r.filled - (self.steps - r.admitted) * budget,
                r.admitted,
            ),
        )
        starting = False  # a prompt ends this step: a reply's first token is due
        for row in reading:
            if budget <= 0:
                break
            left = len(row.tokens) - row.filled
            if starting and left > budget:
                # A step that starts someone's reply takes no part of a prompt ranked
                # after it (that one's first token is further off): the reply starts
                # as soon as it would alone. The ranking still ages, so a long prompt
                # comes first within a bounded number of steps.
                continue
            count = min(left, budget)
            plan.append((row, count))
            budget -= count
            starting = starting or count == left
        for row in self._rows:
            if row.background and budget > 0 and not starting:
                # Reading ahead takes what is left, and little of it while others write.
                share = min(budget, self.step_tokens // 4) if live else budget
                count = min(len(row.tokens) - row.filled, share)
                plan.append((row, count))
                budget -= count
        return sorted(plan, key=lambda item: item[0].slot)

    def _step(self, plan: list[tuple[Row, int]]) -> None:
        """One forward pass; if it raises, no row has moved on (safe to run again)."""
        ids: list[int] = []
        spans, sampling, last = [], [], 0
        for row, count in plan:
            ids += row.tokens[row.filled : row.filled + count]
            spans.append((row.slot, row.filled, count))
            last += count
            if row.filled + count == len(row.tokens) and not row.background:
                sampling.append((row, last - 1))
        step = RaggedStep(self._pool, spans)
        device = self._pool.keys.device
        keep = torch.tensor([i for _, i in sampling], dtype=torch.long, device=device)
        with torch.inference_mode():
            if self.forward is not None:
                logits = self.forward(torch.tensor(ids, device=device), step, keep).float()
            else:
                logits = self._model_logits(ids, step, keep)
        self.steps += 1
        answering = sum(not row.background for row, _ in plan)
        if answering:
            metrics.BATCH.observe(answering)
        for row, count in plan:
            self._pool.written(row.slot, row.filled + count)
            row.filled += count
        rows = [row for row, _ in sampling]
        try:
            chosen: list[int] | None = self.sampler.choose(
                [row.tokens for row in rows],
                [row.generator for row in rows],
                logits,
                [row.temperature for row in rows],
            )
        except Exception:  # one row's sampling: find it by sampling each alone
            chosen = None
        for index, row in enumerate(rows):
            try:
                if chosen is None:
                    one = logits[index : index + 1]
                    token = self.sampler.choose(
                        [row.tokens], [row.generator], one, [row.temperature]
                    )[0]
                else:
                    token = chosen[index]
                self._advance(row, token)
            except Exception as exc:  # this row's sampling or text, not the others'
                self._end(row, None, exc)
        for row, _ in plan:
            if row.background and row.filled == len(row.tokens):
                self._end(row, "", None)  # read: its cache is kept for the next turn

    def _model_logits(self, ids: list[int], step: RaggedStep, keep: torch.Tensor) -> torch.Tensor:
        """The step through the model's own forward."""
        device = self._pool.keys.device
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=step.position_ids,
            # A 4D mask is taken as given: no mask is built for the flat sequence;
            # the ragged attention knows each row's extent.
            attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
            use_cache=False,
            logits_to_keep=keep,
            ragged=step,
        )
        logits: torch.Tensor = out.logits[0].float()
        return logits

    def _advance(self, row: Row, token: int) -> None:
        assert row.text is not None
        row.generated += 1
        metrics.TOKENS.inc()
        ended = token in self.eos
        if not ended:
            row.tokens.append(token)
            row.text.add(token)
        if ended or row.generated >= self.max_new_tokens or len(row.tokens) >= self.capacity:
            self._end(row, row.text.close(), None)

    def _retire(self, rows: list[Row]) -> None:
        """Rows whose reader went away leave now, with what they have."""
        for row in rows:
            if row.text is None:
                continue
            if self._closing:
                # Cut short by shutdown, not finished: not a reply to store.
                self._end(row, None, ShutdownError("stopped: the bot is shutting down"))
            else:
                self._end(row, row.text.close(), None)

    def _end(self, row: Row, text: str | None, error: Exception | None) -> None:
        """Free the row's slot (keeping its cache unless it failed) and tell its
        reader, once, whatever happens to the cache."""
        if row.ended:
            return
        row.ended = True
        row.text = None
        try:
            if row in self._rows:
                self._release(row, keep=error is None or isinstance(error, ShutdownError))
        finally:
            try:
                row.finish(text, error)
            except Exception:  # the reader's side (e.g. its event loop has closed)
                log.exception("Could not hand a reply over")

    def _release(self, row: Row, keep: bool) -> None:
        """Free the row's slot, once its cache is copied out for its conversation's
        next turn (on the saver thread: `_settle` puts it in the store)."""
        # The others stay where they are (moving one into the gap copied its whole
        # cache, on this thread, at every row's end).
        kept = self._kept(row) if keep and self.store.budget > 0 else []
        if kept:
            copied = self._saver.submit(self._copy, row.slot, kept)
            # Listed before the row leaves, so `idle` (read from other threads) never
            # finds the row in neither list.
            self._saving.append(_Saving(row.slot, row.key, copied))
        else:
            heapq.heappush(self._free, row.slot)
        self._rows.remove(row)

    def _kept(self, row: Row) -> list[tuple[str, list[int]]]:
        """What of the row's cache the store keeps (both within KV_CACHE_MB): its
        conversation's, and its system prompt's opening for every new conversation."""
        kept = []
        if row.share and row.filled >= row.shared:
            opening = row.tokens[: row.shared]
            kept.append((_opening_key(opening), opening))
        if row.key and row.filled > 0:
            kept.append((row.key, row.tokens[: row.filled]))
        return kept

    def _copy(self, slot: int, kept: list[tuple[str, list[int]]]) -> list[tuple[str, Prefix]]:
        """On the saver thread: the slot's positions for each kept prefix, copied (the
        worker meanwhile steps the other slots, and no row takes this one)."""
        return [(key, Prefix(ids, self._pool.save(slot, len(ids)))) for key, ids in kept]

    def _settle(self, wait: bool = False, key: str | None = None) -> None:
        """Put the caches copied out into the store and free their slots: those done,
        all of them (`wait`), or `key`'s waited for (a turn about to use it, a forget)."""
        for saving in list(self._saving):
            if not (wait or saving.key == key or saving.copied.done()):
                continue
            try:
                for entry_key, prefix in saving.copied.result():
                    self.store.put(entry_key, prefix)
            except Exception:  # e.g. out of memory for the copy: the cache just goes
                log.exception("Could not keep a conversation's model cache")
            heapq.heappush(self._free, saving.slot)
            self._saving.remove(saving)  # only now: `idle` waits for the cache to land


def _opening_key(ids: list[int]) -> str:
    return OPENING + hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).hexdigest()
