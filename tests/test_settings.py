"""Configuration: defaults, `.env`, and bad values reported as one line with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.settings import format_validation_error, load_settings, mask_url
from tests.conftest import bot_env, free_port, make_settings, run_bot


def test_defaults_are_documented_in_env_example() -> None:
    example = (Path(__file__).parent.parent / "config" / ".env.example").read_text()
    documented = {
        line.lstrip("# ").split("=", 1)[0]
        for line in example.splitlines()
        if "=" in line and line.lstrip("# ").split("=", 1)[0].isupper()
    }
    fields = {name.upper() for name in make_settings().model_dump()}
    assert fields <= documented, f"undocumented: {sorted(fields - documented)}"


def test_env_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_NEW_TOKENS=77\nTEMPERATURE=0\nlog_level=debug\n")
    for name in ("MAX_NEW_TOKENS", "TEMPERATURE", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(env_file)
    assert (settings.max_new_tokens, settings.temperature, settings.log_level) == (77, 0, "DEBUG")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MAX_NEW_TOKENS", "abc", "valid integer"),
        ("MAX_NEW_TOKENS", "0", "greater than 0"),
        ("TEMPERATURE", "-1", "greater than or equal to 0"),
        ("REDIS_URL", "localhost:6379", "not a redis:// or rediss:// URL"),
        ("REDIS_URL", "http://user:s3cretpass@example.com", "not a redis:// or rediss:// URL"),
        ("DTYPE", "bf17", "'auto', 'bf16', 'fp16', 'fp32' or 'int8'"),
        ("DEVICE", "gpu", "expected auto, cpu"),
        ("MEMORY_MAX_TURNS", "many", "valid integer"),
        ("SLACK_BOT_TOKEN", "not-a-token", "starts with xoxb-"),
        ("SLACK_APP_TOKEN", "xoxb-wrong-kind", "starts with xapp-"),
        ("DISCORD_ALLOWED_USERS", "123,ann", "Discord ids are numbers"),
        ("PORT", "99999", "less than or equal to 65535"),
    ],
)
def test_bad_value_names_variable_and_exits_2(
    name: str, value: str, expected: str, tmp_path: Path
) -> None:
    result = run_bot("console", env=bot_env(**{name: value}), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Invalid configuration: {name}: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert "s3cretpass" not in result.stderr + result.stdout


def test_slack_http_mode_needs_the_signing_secret(tmp_path: Path) -> None:
    env = bot_env(SLACK_BOT_TOKEN="xoxb-1-2-secretpart")
    result = run_bot(env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "Invalid configuration: SLACK_SIGNING_SECRET is needed in HTTP mode "
        "(or set SLACK_APP_TOKEN for Socket Mode)"
    )


def test_unreachable_redis_at_start_exits_2_with_masked_url(tmp_path: Path) -> None:
    url = f"redis://:hunter2pass@127.0.0.1:{free_port()}/0"
    result = run_bot("console", env=bot_env(REDIS_URL=url), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "hunter2pass" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert "Cannot reach Redis at redis://:***@127.0.0.1:" in last
    assert "REDIS_URL" in last


def test_no_platform_configured_points_to_console(tmp_path: Path) -> None:
    result = run_bot(env=bot_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "python -m bot console" in result.stderr
    assert "Traceback" not in result.stderr


def test_secrets_stay_out_of_repr_and_errors() -> None:
    settings = make_settings(redis_url="redis://admin:opensesame@db.internal:6380/2")
    assert "opensesame" not in repr(settings)
    assert "opensesame" not in str(settings.model_dump())
    assert settings.redis_url_masked() == "redis://admin:***@db.internal:6380/2"
    assert "opensesame" in settings.secret_values()
    with pytest.raises(ValidationError) as caught:
        make_settings(redis_url="nope://admin:opensesame@x")
    # pydantic's own message quotes the input; the one the bot prints must not.
    message = format_validation_error(caught.value)
    assert message.startswith("Invalid configuration: REDIS_URL:")
    assert "opensesame" not in message


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:pw@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("rediss://user:pw@host/1", "rediss://user:***@host/1"),
        ("redis://onlytoken@host:1", "redis://:***@host:1"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://127.0.0.1:1/0?password=s3cretpw", "redis://127.0.0.1:1/0?password=***"),
        ("redis://h/0?db=2&username=u&password=p", "redis://h/0?db=2&username=***&password=***"),
        ("http://k:pw@h:8000/v1?api_key=abc&api-version=1", "http://k:***@h:8000/v1?api_key=***&api-version=1"),
    ],
)  # fmt: skip
def test_mask_url_masks_query_credentials(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_every_secret_a_url_setting_carries_is_known_and_kept_out_of_repr() -> None:
    settings = make_settings(
        redis_url="redis://127.0.0.1:1/0?password=redis-q-Pw11",
        model_backend="openai",
        openai_base_url="https://bob:openai-Pw22@llm.internal/v1?token=openai-Tk33&api-version=2",
    )
    secrets = settings.secret_values()
    assert {"redis-q-Pw11", "openai-Pw22", "openai-Tk33"} <= set(secrets)
    assert "2" not in secrets  # a plain option is not a secret
    text = repr(settings) + str(settings) + str(settings.model_dump())
    assert not any(s in text for s in ("redis-q-Pw11", "openai-Pw22", "openai-Tk33"))


def test_json_log_lines_scrub_secrets_that_json_would_escape() -> None:
    import json
    import logging

    from bot.logs import JsonFormatter

    secret = 'pa"ss\\word-9'
    record = logging.LogRecord("x", logging.ERROR, "", 0, "login with %s", (secret,), None)
    line = JsonFormatter([secret]).format(record)
    assert json.dumps(secret)[1:-1] not in line and secret not in line, line
    assert json.loads(line)["message"] == "login with ***"


def test_printed_start_up_error_masks_a_password_in_the_query(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?password=s3cretpw"
    result = run_bot("console", env=bot_env(REDIS_URL=url), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "s3cretpw" not in result.stderr + result.stdout
    assert "Cannot reach Redis at" in result.stderr and "password=***" in result.stderr


def test_inference_server_url_secrets_never_printed(tmp_path: Path) -> None:
    """The console against an unreachable server: start-up lines, the failure, the
    apology; not one of the URL's or the key's secrets on the terminal."""
    port = free_port()
    env = bot_env(
        MODEL_BACKEND="openai",
        OPENAI_BASE_URL=f"http://bob:url-Pw44@127.0.0.1:{port}/v1?api_key=url-Key55",
        OPENAI_API_KEY="sk-header-Key66",
        OPENAI_MAX_RETRIES="0",
        LOG_LEVEL="DEBUG",
    )
    result = run_bot("console", env=env, stdin="hello\n", cwd=tmp_path, timeout=60)
    output = result.stderr + result.stdout
    assert "Sorry" in output  # the failure happened and was reported
    assert f"127.0.0.1:{port}" in output
    for secret in ("url-Pw44", "url-Key55", "sk-header-Key66"):
        assert secret not in output, secret


def test_log_file_home_is_expanded() -> None:
    assert make_settings(log_file="~/chatbot.log").log_file == Path.home() / "chatbot.log"
    assert make_settings(log_file="").log_file is None


# --- a URL shows its address, never its password (issue 19, finding 8) ---------------


def _logged(settings_secrets: list[str], message: str, *args: object) -> list[str]:
    """`message` as the text and the JSON log formats write it."""
    import json
    import logging

    from bot.logs import TEXT_FORMAT, JsonFormatter, RedactingFormatter

    record = logging.LogRecord("bot", logging.ERROR, "", 0, message, args, None)
    text = RedactingFormatter(TEXT_FORMAT, settings_secrets).format(record)
    return [text, json.loads(JsonFormatter(settings_secrets).format(record))["message"]]


def test_log_lines_show_a_url_and_hide_only_its_secret_parts() -> None:
    plain = make_settings(
        redis_url="redis://db.internal:6380/2",
        model_backend="openai",
        openai_base_url="http://inference:8000/v1",
    )
    for line in _logged(plain.secret_values(), "Redis at %s", plain.redis_url_masked()):
        assert line.endswith("Redis at redis://db.internal:6380/2"), line
    served = "Replies come from the inference server at %s"
    for line in _logged(plain.secret_values(), served, "http://inference:8000/v1/chat/completions"):
        assert line.endswith("server at http://inference:8000/v1/chat/completions"), line

    secret = make_settings(
        redis_url="redis://:hunter2pass@db.internal:6380/2",
        model_backend="openai",
        openai_base_url="http://bob:url-Pw44@inference:8000/v1?api_key=url-Key55&api-version=2",
    )
    # A library's error quoting the URL as given: the password goes, the address stays.
    raw = secret.redis_url.get_secret_value() if secret.redis_url else ""
    for line in _logged(secret.secret_values(), "Error connecting to %s.", raw):
        assert line.endswith("Error connecting to redis://:***@db.internal:6380/2."), line
    url = secret.openai_base_url.get_secret_value() if secret.openai_base_url else ""
    for line in _logged(secret.secret_values(), "POST %s/chat/completions failed", url):
        assert "http://bob:***@inference:8000/v1" in line and "api-version=2" in line, line
        assert "url-Pw44" not in line and "url-Key55" not in line, line
    # A password too short to scrub by value is still hidden inside a URL.
    for line in _logged([], "Error connecting to %s", "redis://:pw@db.internal:6380/2"):
        assert line.endswith("redis://:***@db.internal:6380/2"), line


@pytest.mark.parametrize("password", ["", "hunter2pass"])
def test_printed_start_up_error_shows_the_address_and_hides_the_password(
    tmp_path: Path, password: str
) -> None:
    port = free_port()
    userinfo = f":{password}@" if password else ""
    url = f"redis://{userinfo}127.0.0.1:{port}/0"
    env = bot_env(REDIS_URL=url)
    result = run_bot("forget", "--platform", "discord", "--user", "1", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    shown = f"redis://:***@127.0.0.1:{port}/0" if password else url
    assert f"Cannot reach Redis at {shown} (REDIS_URL)" in result.stderr, result.stderr
    assert "hunter2pass" not in result.stderr + result.stdout
