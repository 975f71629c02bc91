"""Files shared with a Slack message: found in the event (or through files.info for
Slack Connect), downloaded with the bot token from Slack's hosts only (redirects
included), and read through `bot.attachments`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from adapters.downloads import DownloadError, download
from adapters.slack.context import SlackContext
from adapters.slack.translate import (
    file_ref,
    is_slack_file_url,
    shared_files,
    unavailable_note,
)
from bot.attachments import FileRef, ImageLimits, ReadFiles, read_files

log = logging.getLogger(__name__)


class SharedFiles(SlackContext):
    """Reading the files of a message."""

    _api_base: str
    _downloads: aiohttp.ClientSession | None
    _warned_sign_in: bool

    async def _read_files(self, event: Mapping[str, Any], channel: str) -> ReadFiles:
        """The text files shared with the message (and its images, for a model that
        takes them), and notes about the others."""
        shared = shared_files(event)
        refs = list(shared.refs)
        unavailable = shared.unavailable
        for found in await asyncio.gather(*map(self._file_info, shared.to_look_up)):
            if found is None:
                unavailable += 1
            else:
                refs.append(found)
        read = await read_files(
            refs,
            self._fetch,
            max_bytes=self.settings.attachment_max_bytes,
            seconds_each=self.settings.attachment_timeout_seconds,
            where=f"Slack channel {channel}",
            images=ImageLimits.of(self.settings) if self.engine.takes_images else None,
        )
        if not unavailable:
            return read
        return dataclasses.replace(read, notes=(*read.notes, unavailable_note(unavailable)))

    async def _file_info(self, file_id: str) -> FileRef | None:
        """A file's details from files.info (Slack Connect leaves them out of events)."""
        try:
            response = await asyncio.wait_for(
                self.app.client.files_info(file=file_id),
                self.settings.attachment_timeout_seconds,
            )
        except Exception as exc:  # refused, timed out, the network: noted, not fatal
            log.warning("Slack files.info failed for a shared file: %s", type(exc).__name__)
            return None
        file = response.get("file")
        return file_ref(file) if isinstance(file, Mapping) else None

    async def _fetch(self, ref: FileRef, limit: int) -> bytes:
        """Download a file with the bot token: at most `limit` + 1 bytes. A redirect is
        followed only to Slack's own hosts (Enterprise Grid serves files from another
        slack.com host), never elsewhere with the token."""
        if not self._slack_file_url(ref.url):
            # The token goes to Slack only, whatever URL an event names.
            raise DownloadError("not a Slack file URL")
        if self._downloads is None:
            self._downloads = aiohttp.ClientSession()
        token = self.app.client.token or ""
        headers = {"Authorization": f"Bearer {token}"}
        got = await download(
            self._downloads, ref.url, limit, headers=headers, may_follow=self._slack_file_url
        )
        if got.content_type == "text/html" and not _is_html(ref):
            # Slack's answer without files:read: its sign-in page, with a 200.
            if not self._warned_sign_in:
                self._warned_sign_in = True
                log.warning(
                    "Slack answered a file download with a web page: the app needs "
                    "the files:read scope (add it, then reinstall the app)"
                )
            raise DownloadError("a web page instead of the file")
        return got.data

    def _slack_file_url(self, url: str) -> bool:
        return is_slack_file_url(url, self._api_base)


def _is_html(ref: FileRef) -> bool:
    return ref.content_type.startswith("text/html") or ref.name.lower().endswith((".html", ".htm"))
