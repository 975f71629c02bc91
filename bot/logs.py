"""Logging set-up: one line per record on stderr, with secrets scrubbed."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable


class RedactingFormatter(logging.Formatter):
    """Replaces every configured secret in the formatted line, traceback included.

    Defence in depth: the code never logs a secret on purpose, but a library's
    exception message might carry one (a URL with a password, a token in a header).
    """

    def __init__(self, fmt: str, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self._secrets)


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
        entry = {k: redact(v, self._secrets) if isinstance(v, str) else v for k, v in entry.items()}
        return redact(json.dumps(entry, ensure_ascii=False), self._secrets)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by ***, the longest first (so a secret that
    contains another is replaced whole)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def setup_logging(level: str, secrets: Iterable[str] = (), json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(secrets)
        if json_lines
        else RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", secrets)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # transformers and httpx are chatty at INFO.
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
