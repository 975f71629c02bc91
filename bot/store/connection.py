"""The bot's Redis connections: one way to open them, one way to report outages."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot import metrics
from bot.settings import mask_url

log = logging.getLogger(__name__)

# What an unreachable server raises; anything else is a bug or bad data.
OUTAGE_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    # A cluster with a node down or failing over.
    ClusterDownError,
    TryAgainError,
    MasterDownError,
)
# What a Redis call may raise at all.
REDIS_ERRORS = (RedisError, OSError)


# A single server or a Redis Cluster: the commands the bot sends are the same, and each
# touches one hash slot, so either client runs them.
Client = aioredis.Redis | RedisCluster


def connect(
    url: str,
    timeout: float = 2.0,
    connection_class: type[aioredis.Connection] | None = None,
    *,
    cluster: bool = False,
) -> Client:
    """A client with short timeouts and one quick retry on a broken connection: a pooled
    connection to a restarted server fails once, then reconnects. `cluster`: `url` names
    a node of a Redis Cluster (see `is_cluster`), and the client follows its redirects.

    Never a retry on a timeout: a command that timed out may still be applied by a
    stalled server, and sending it again would apply it twice (a dedupe claim then finds
    itself and reports the event as already answered; an append stores turns twice).
    A broken connection can also come after the server applied a command, so the
    writes that are not idempotent by nature carry a token (bot.store.dedupe, bot.store.memory)."""
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if cluster:
        # No retry at all: RedisCluster retries timeouts whatever its Retry's errors
        # say (redirects are followed apart from it).
        return RedisCluster.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
    extra = {"connection_class": connection_class} if connection_class else {}
    return aioredis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=retry,
        decode_responses=True,
        **extra,
    )


async def is_cluster(
    url: str,
    timeout: float = 2.0,  # noqa: ASYNC109 - the sockets' timeouts
    configured: bool | None = None,
) -> bool:
    """Whether `url` names a node of a Redis Cluster: `configured` (REDIS_CLUSTER) if
    set, else its INFO's cluster_enabled, asked once, so REDIS_URL may name any node.
    Raises when unreachable."""
    if configured is not None:
        return configured
    probe = connect(url, timeout)
    try:
        info = await probe.info("cluster")
    except ResponseError:  # INFO refused (an ACL without @dangerous, a proxy): one server
        log.info("Redis refused INFO: taken as one server (REDIS_CLUSTER=true if not)")
        return False
    finally:
        await probe.aclose()
    return bool(info.get("cluster_enabled"))


async def is_replica(client: Client) -> bool:
    """Whether the server is a read-only replica (nothing could be stored there);
    False when INFO is refused."""
    if isinstance(client, RedisCluster):
        return False  # a cluster client writes to each slot's primary: nothing to ask
    try:
        info = await client.info("replication")
    except ResponseError:
        return False
    return info.get("role") == "slave"


class Outages:
    """Logs one warning per outage (not one per call) and one line when it ends."""

    def __init__(self, url: str, consequence: str) -> None:
        self.masked_url = mask_url(url)
        self.consequence = consequence
        self.down = False

    def failed(self, action: str, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.inc()
        if not isinstance(exc, OUTAGE_ERRORS):
            log.error("Redis error while trying to %s; %s", action, self.consequence, exc_info=exc)
        elif not self.down:
            self.down = True
            log.warning(
                "Redis at %s is unreachable (%s); %s until it is back",
                self.masked_url,
                type(exc).__name__,
                self.consequence,
            )

    def succeeded(self) -> None:
        if self.down:
            self.down = False
            log.info("Redis at %s is reachable again", self.masked_url)
