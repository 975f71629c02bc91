"""Attached files downloaded over HTTP, for the adapters' `bot.attachments.Fetch`:
bounded in size, and never led off the platform's hosts by a redirect.

Redirects are not followed by aiohttp: a request (with a token, for Slack) must not be
re-sent wherever a server points, and a file must come from the platform. Each hop is
checked with `may_follow`; by default none is followed, and a redirect is a failed
download like any other (the person gets the same note).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import yarl

MAX_REDIRECTS = 3


class DownloadError(Exception):
    """A download the server refused, redirected off its hosts, or answered with
    something else; `status`: the HTTP status (read_files logs it)."""

    def __init__(self, why: str, status: int | None = None) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Downloaded:
    content_type: str
    data: bytes  # at most the limit + 1 bytes


def _nowhere(url: str) -> bool:
    return False


async def download(
    session: aiohttp.ClientSession,
    url: str,
    limit: int,
    *,
    headers: Mapping[str, str] | None = None,
    may_follow: Callable[[str], bool] = _nowhere,
) -> Downloaded:
    """GET `url`: at most `limit` + 1 bytes of its body (so an oversized file is seen
    to be one). A redirect is followed only to a URL `may_follow` accepts (with the
    same `headers`), at most MAX_REDIRECTS times; else DownloadError."""
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(url, headers=headers, allow_redirects=False) as response:
            if 300 <= response.status < 400:
                location = response.headers.get("Location", "")
                target = str(response.url.join(yarl.URL(location))) if location else ""
                if not target or not may_follow(target):
                    raise DownloadError("redirected off the platform's hosts", response.status)
                url = target
                continue
            if not 200 <= response.status < 300:
                raise DownloadError("refused", response.status)
            data = bytearray()
            while len(data) <= limit:
                chunk = await response.content.read(limit + 1 - len(data))
                if not chunk:
                    break
                data += chunk
            return Downloaded(response.content_type, bytes(data))
    raise DownloadError("too many redirects")
