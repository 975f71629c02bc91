"""Logging set-up: one line per record on stderr (and in LOG_FILE), with secrets scrubbed.

In the interactive console the terminal belongs to the conversation: records below
CONSOLE_LOG_LEVEL stay off it, those that reach it start on a line of their own
(never glued to a reply), and a short status (`extra=status(...)`) stands in for the
start-up records a newcomer should see.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TextIO

from bot.settings import ConfigError, mask_url

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Shorter "secrets" are left alone: replacing every "pw" would garble the line, and a
# short password in a URL is still masked by the URL pass.
MIN_SECRET_CHARS = 4
# Up to a space, a quote or a backslash (in JSON text, the start of an escape).
# The scheme bounded (RFC 3986 schemes are short): unbounded, a long run of word
# characters without "://" is rescanned from every boundary (quadratic; seconds a line).
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s'\"<>\\]+")


class RedactingFormatter(logging.Formatter):
    """Replaces every configured secret in the formatted line, traceback included.

    Defence in depth: the code never logs a secret on purpose, but a library's
    exception message might carry one (a URL with a password, a token in a header).
    """

    def __init__(self, fmt: str, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self._secrets = _ordered(secrets)  # once, not at every line

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))

    def redact(self, text: str) -> str:
        return _redact(text, self._secrets)


class JsonFormatter(RedactingFormatter):
    """One JSON object per line, with the conversation and latency of replies."""

    EXTRA = ("conversation", "latency_s")

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__("%(message)s", secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in self.EXTRA if hasattr(record, k)})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        # Each field before encoding too: JSON escapes a secret with a quote, a backslash
        # or a control character into text that no longer matches it.
        entry = {k: self.redact(v) if isinstance(v, str) else v for k, v in entry.items()}
        return self.redact(json.dumps(entry, ensure_ascii=False))


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every URL's secret parts masked (`mask_url`: its password, credential
    query values; host, port and path stay readable) and every secret replaced by ***,
    the longest first (so a secret that contains another is replaced whole)."""
    return _redact(text, _ordered(secrets))


def _ordered(secrets: Iterable[str]) -> list[str]:
    """The secrets long enough to mask, longest first."""
    return sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)


def _redact(text: str, ordered: list[str]) -> str:
    text = _URL.sub(_mask_url_in_text, text)
    for secret in ordered:
        text = text.replace(secret, "***")
    return text


def _mask_url_in_text(match: re.Match[str]) -> str:
    url = match[0]
    if "@" not in url and "?" not in url:
        return url  # nothing to hide: left exactly as written
    try:
        return mask_url(url)
    except ValueError:  # not parseable as a URL (a broken IPv6 host): hide it all
        return "***"


def status(text: str) -> dict[str, str]:
    """`extra=` for a record whose short `text` the interactive console shows on its
    own, whatever the record's level (the log still gets the whole record)."""
    return {"status": text}


class Terminal:
    """The interactive console's screen, shared by the conversation (written to `out`)
    and log records (on stderr): a record is never written inside a line of the
    conversation, and a prompt it interrupts is shown again after it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._lock = threading.RLock()  # log records come from any thread
        self._open = ""  # what the current line holds so far ("" at a line's start)
        self._prompt = False  # whether that is a prompt, to show again after a record

    def write(self, text: str, *, prompt: bool = False) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()
            _, newline, after = text.rpartition("\n")
            self._open = after if newline else self._open + after
            self._prompt = prompt

    def entered(self) -> None:
        """The user ended the line with Enter (the terminal echoed it, not `out`)."""
        with self._lock:
            self._open = ""
            self._prompt = False

    def end_line(self) -> None:
        """Finish the current line, if anything is on it."""
        with self._lock:
            if self._open:
                self.write("\n")

    @contextmanager
    def interruption(self) -> Iterator[None]:
        """Around a write to the terminal from elsewhere: it starts on a fresh line."""
        with self._lock:
            prompt = self._open if self._prompt else ""
            self.end_line()
            yield
            if prompt:
                self.write(prompt, prompt=True)


class TerminalHandler(logging.StreamHandler[TextIO]):
    """Records on stderr that never break into a progress bar or a line of the console.

    Progress bars (tqdm) are cleared, the record written, and the bars drawn again.
    With a `terminal` (the interactive console), a record below `level` that carries
    a status shows that status alone; other records below it are left out.
    """

    def __init__(self, stream: TextIO, level: int, terminal: Terminal | None = None) -> None:
        super().__init__(stream)
        self.terminal = terminal
        self.threshold = level
        # Statuses are logged at INFO: logging's own level check must let them in.
        self.setLevel(min(level, logging.INFO) if terminal else level)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.threshold and not hasattr(record, "status"):
            return False
        return bool(super().filter(record))

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= self.threshold:
            return super().format(record)
        text = str(getattr(record, "status", ""))
        formatter = self.formatter
        return formatter.redact(text) if isinstance(formatter, RedactingFormatter) else text

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            with self.terminal.interruption() if self.terminal else nullcontext():
                _write_clear_of_bars(line, self.stream)
        except Exception:
            self.handleError(record)


def _write_clear_of_bars(line: str, stream: TextIO) -> None:
    # No bar can be on screen if tqdm was never imported (and importing it would cost
    # every start, the torch-free `forget` command included).
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        stream.write(line + "\n")
    else:
        tqdm.tqdm.write(line, file=stream)
    stream.flush()


def setup_logging(
    level: str,
    secrets: Iterable[str] = (),
    json_lines: bool = False,
    *,
    log_file: Path | None = None,
    terminal: Terminal | None = None,
    terminal_level: str = "WARNING",
) -> None:
    """Records at `level` to stderr and to `log_file`; with a `terminal` (the interactive
    console), stderr only gets those at `terminal_level` or above (and statuses).

    Raises ConfigError when `log_file` cannot be opened.
    """
    secrets = list(secrets)

    def formatter() -> logging.Formatter:
        return JsonFormatter(secrets) if json_lines else RedactingFormatter(TEXT_FORMAT, secrets)

    numeric = logging.getLevelName(level)
    # The console's terminal shows the records that pass both levels.
    on_stderr = max(numeric, logging.getLevelName(terminal_level)) if terminal else numeric
    handlers: list[logging.Handler] = [TerminalHandler(sys.stderr, on_stderr, terminal)]
    if log_file is not None:
        try:
            file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as error:
            raise ConfigError(
                f"Invalid configuration: LOG_FILE: cannot write to {log_file}: {error.strerror}"
            ) from None
        file.setLevel(numeric)
        handlers.append(file)
    for handler in handlers:
        handler.setFormatter(formatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()
    root.handlers[:] = handlers
    root.setLevel(min(h.level for h in handlers))
    # Python's warnings (a library's deprecation notice) go through the handlers too:
    # scrubbed, in the file, and on a line of their own in the console.
    logging.captureWarnings(True)
    # transformers and httpx are chatty at INFO.
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
