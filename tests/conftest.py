"""Shared fixtures: a real redis-server on a free port, and the real bundled model."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot.engine import Engine
from bot.inference.generation import Generator
from bot.inference.loader import LoadedModel, load_model
from bot.inference.local import LocalBackend
from bot.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real redis-server process on loopback, stopped by its PID.

    `stop()` then `start()` restarts it on the same port (without persistence, the
    data is gone, as after a crash of a cache-only Redis).
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: `make test` installs it (as root)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class RedisClusterNodes:
    """A real 3-master Redis Cluster on loopback (no replicas), made with redis-cli."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """Any node's address names the cluster; the second, so that the first is not
        special."""
        return f"redis://127.0.0.1:{self.ports[1]}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: `make test` installs it (as root)")
        # A node's cluster bus listens on its port + 10000: keep both free and < 65536.
        while len(self.ports) < 3:
            port = _free_low_port()
            if port not in self.ports:
                self.ports.append(port)
        for port in self.ports:
            node = self.directory / str(port)
            node.mkdir()
            options = {"port": port, "bind": "127.0.0.1", "cluster-enabled": "yes",
                       "cluster-config-file": node / "nodes.conf", "save": "",
                       "appendonly": "no", "dir": node, "loglevel": "warning"}  # fmt: skip
            command = [binary, *(part for k, v in options.items() for part in (f"--{k}", str(v)))]
            self.processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.ports:
            self._wait(port, b"PING\r\n", b"+PONG")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        for port in self.ports:
            self._wait(port, b"CLUSTER INFO\r\n", b"cluster_state:ok")

    def _wait(self, port: int, command: bytes, answer: bytes) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(command)
                    if answer in conn.recv(4096):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis cluster node {port} did not answer {command!r} with {answer!r}")

    def flush(self) -> None:
        for port in self.ports:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(b"FLUSHALL\r\n")
                conn.recv(16)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)
        self.processes.clear()


def _free_low_port() -> int:
    while True:
        port = free_port()
        if port < 55536:
            return port


@pytest.fixture(scope="session")
def redis_cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_nodes: RedisClusterNodes) -> RedisClusterNodes:
    """The session's Redis Cluster, emptied for one test."""
    redis_cluster_nodes.flush()
    return redis_cluster_nodes


@dataclass(frozen=True)
class RedisTarget:
    """Where a store test's Redis is: one server, or a cluster (any node's URL)."""

    url: str
    cluster: bool


@pytest.fixture(params=["server", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """One redis-server, then the real 3-node cluster: a store test runs on both."""
    if request.param == "server":
        return RedisTarget(request.getfixturevalue("redis_server").url, cluster=False)
    return RedisTarget(request.getfixturevalue("redis_cluster").url, cluster=True)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model's safetensors cache, made once per test session.

    A fresh directory each session, so every run goes through the real first-start
    conversion from the GGUF file once.
    """
    return tmp_path_factory.mktemp("model-cache")


class IsolatedSettings(Settings):
    """Settings from explicit values and defaults only: no `.env`, no environment."""

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls, settings_cls: type, init_settings: Any, **sources: Any
    ) -> tuple[Any, ...]:
        return (init_settings,)


def make_settings(**values: Any) -> Settings:
    return IsolatedSettings(**values)


@pytest.fixture(scope="session")
def bundled(model_cache_dir: Path) -> LoadedModel:
    """The real SmolLM2-135M-Instruct, loaded once through the bot's own loading code."""
    return load_model(make_settings(model_cache_dir=model_cache_dir))


def greedy(loaded: LoadedModel, max_new_tokens: int = 24, **settings: Any) -> Generator:
    """A Generator on `loaded` with greedy decoding (the same input gives the same reply)."""
    base = make_settings(temperature=0, max_new_tokens=max_new_tokens, **settings)
    return Generator.from_settings(loaded, base)


async def settle(engine: Engine) -> None:
    """Wait (bounded) until the model has nothing left to do: reading ahead, and the
    finished rows' caches copied into the store (off the worker thread)."""
    assert isinstance(engine.backend, LocalBackend)
    for _ in range(1200):
        if engine.backend.idle:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the scheduler never became idle")


def bot_env(**values: str) -> dict[str, str]:
    """An environment for `python -m bot` subprocesses: no inherited bot settings."""
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "LANG", "TMPDIR")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **values)
    return env


def run_bot(
    *args: str, env: dict[str, str], stdin: str = "", cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The platform harnesses, for every test module (the load tests drive them too).
from tests.test_discord import discord_bot  # noqa: E402, F401
from tests.test_slack import slack_bot  # noqa: E402, F401
