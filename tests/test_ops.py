"""Operations: /healthz, /readyz and /metrics on METRICS_PORT, and JSON log lines,
on a real `python -m bot console` process with the bundled model and real Redis."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bot.inference.loader import LoadedModel
from tests.conftest import REPO, RedisServer, bot_env, free_port

pytestmark = pytest.mark.model


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_health_readiness_metrics_and_json_logs(
    bundled: LoadedModel, model_cache_dir: Path, redis_server: RedisServer
) -> None:
    port = free_port()
    secret = "signing-secret-never-logged-9931"
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "console"],
        env=bot_env(
            MODEL_CACHE_DIR=str(model_cache_dir),
            METRICS_PORT=str(port),
            LOG_FORMAT="json",
            REDIS_URL=redis_server.url,
            SLACK_SIGNING_SECRET=secret,
            TEMPERATURE="0",
            MAX_NEW_TOKENS="12",
        ),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin and process.stdout and process.stderr
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if get(f"{base}/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert get(f"{base}/healthz") == (200, "ok\n")
        process.stdin.write("What is the capital of France?\n")
        process.stdin.flush()
        assert "Paris" in process.stdout.readline()
        status, text = get(f"{base}/metrics")
        assert status == 200
        assert 'chatbot_messages_received_total{platform="console"} 1.0' in text
        assert 'chatbot_messages_answered_total{platform="console"} 1.0' in text
        assert 'chatbot_reply_latency_seconds_count{platform="console"} 1.0' in text
        steps = re.search(r"^chatbot_batch_size_count ([0-9.]+)$", text, re.M)
        assert steps and float(steps.group(1)) > 1  # one per step of the model
        assert "chatbot_kv_cache_bytes " in text
        assert "chatbot_tokens_generated_total" in text and "chatbot_queue_depth 0.0" in text
        redis_server.stop()  # Redis gone: not ready, still alive
        assert get(f"{base}/readyz")[0] == 503
        assert get(f"{base}/healthz")[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        _, stderr = process.communicate()
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    replied = [e for e in lines if e["message"].startswith("Replied in")]
    assert replied and replied[0]["conversation"] == "console:terminal"
    assert replied[0]["latency_s"] > 0
    assert secret not in stderr
