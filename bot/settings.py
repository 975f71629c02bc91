"""The bot's configuration: the one place that reads the environment and `.env`.

Every variable is documented, with its default, in `config/.env.example`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, quote, unquote_plus, urlsplit, urlunsplit

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.networks import RedisDsn
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# SmolLM2-135M answers plainly with this prompt; longer personas made it ramble (tried).
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."

_redis_dsn = TypeAdapter(RedisDsn)
_flag = TypeAdapter(bool)

PositiveInt = Annotated[int, Field(gt=0)]


def _split_ids(value: object) -> object:
    """Comma- or space-separated ids ("123, 456") as a set of strings."""
    if isinstance(value, str):
        return frozenset(part for part in re.split(r"[\s,]+", value) if part)
    return value


# An allow-list of platform ids; empty means everyone.
IdList = Annotated[frozenset[str], NoDecode, BeforeValidator(_split_ids)]


class Settings(BaseSettings):
    """Validated configuration. Secrets are `SecretStr`: their repr is masked."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    # The model: run here ("local") or on an OpenAI-compatible server ("openai")
    model_backend: Literal["local", "openai"] = "local"
    # e.g. http://localhost:8000/v1; secret: it may carry a password or a key in its query
    openai_base_url: SecretStr | None = None
    openai_model: str = ""
    openai_api_key: SecretStr | None = None
    # The server's window (prompt + reply), in tokens counted approximately (bot.inference.served)
    openai_context_tokens: int = Field(default=4096, ge=256)
    openai_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    # Until the first token (queueing at the server and reading the prompt), then silence
    # between chunks at most; none on a reply that keeps streaming.
    openai_timeout_seconds: float = Field(default=60.0, gt=0)
    openai_stall_timeout_seconds: float = Field(default=30.0, gt=0)
    openai_max_retries: int = Field(default=2, ge=0, le=10)
    # The served model takes images (OpenAI `image_url` content parts); auto: as the
    # server says (llama.cpp, Ollama, LM Studio), none where it does not say
    openai_vision: bool | Literal["auto"] = "auto"
    model: str = Field(
        default="",
        description="Hugging Face hub id or local directory; empty: the bundled SmolLM2-135M.",
    )
    model_cache_dir: Path = Path.home() / ".cache" / "chatbot"
    # int8: bf16 activations with the decoder's matrix weights in int8 (lossy, opt-in;
    # CPU, Llama-family models through the lean forward: bot.inference.fastpath)
    dtype: Literal["auto", "bf16", "fp16", "fp32", "int8"] = "auto"
    device: str = "auto"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_new_tokens: PositiveInt = 256
    temperature: float = Field(default=0.3, ge=0.0, le=5.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.1, ge=1.0, le=5.0)
    context_tokens: PositiveInt | None = Field(
        default=None,
        description="Prompt + reply tokens; default 2,048 on a CPU, else the model's window",
    )
    batch_size: PositiveInt = 16  # conversations generated together at most
    prefill_chunk_tokens: int = Field(
        default=64, ge=16, le=1024
    )  # tokens per step, decoding included
    kv_cache_mb: int = Field(default=1024, ge=0)  # conversations' model caches kept between turns
    batch_wait_ms: float = Field(default=10.0, ge=0)  # longest wait for a batch to fill
    max_queue: PositiveInt = 256  # messages in the engine at most; past it: "busy"
    # Tokens (prompt read and reply written) per person per UTC day; 0: no limit.
    user_daily_tokens: int = Field(default=0, ge=0)
    # Regenerate samples (a greedy model would write the same words again).
    regenerate_temperature: float = Field(default=0.8, gt=0, le=2)
    torch_threads: PositiveInt | None = None
    # The step scheduler's lean forward (bot.inference.fastpath): the model's own logits,
    # bit for bit, in fewer calls; false runs the model's own forward.
    fast_decode: bool = True
    # Sampling (TEMPERATURE > 0): each reply seeded from SEED and its prompt, so the
    # same message in the same conversation gets the same reply (unset: at random)
    seed: int | None = None

    # Conversation memory
    redis_url: SecretStr | None = None
    # REDIS_URL names a node of a Redis Cluster; unset: asked at start-up (INFO cluster)
    redis_cluster: bool | None = None
    memory_max_turns: PositiveInt = 20
    memory_ttl_seconds: PositiveInt = 7 * 24 * 3600
    # In shared conversations (channels, threads), show the model who said each turn
    speaker_names: bool = True
    # Text files attached to a message: read up to this many bytes each (0: none read)
    attachment_max_bytes: int = Field(default=100_000, ge=0, le=10_000_000)
    attachment_timeout_seconds: float = Field(default=10.0, gt=0, le=300)  # per download
    # Images attached to a message (png, jpeg, webp, gif), for a model that takes them:
    # downloaded up to this many bytes each, at most this many a message, scaled down
    # to at most this many pixels a side
    image_max_bytes: int = Field(default=10_000_000, ge=0, le=50_000_000)
    image_max_count: int = Field(default=4, ge=0, le=16)
    image_max_side: int = Field(default=1536, ge=64, le=4096)

    # Shared by the platforms
    rate_limit_per_minute: int = Field(default=6, ge=0)  # per user; 0: no limit
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)

    # Discord
    discord_token: SecretStr | None = None
    discord_allowed_guilds: IdList = frozenset()
    discord_allowed_channels: IdList = frozenset()
    discord_allowed_roles: IdList = frozenset()
    discord_allowed_users: IdList = frozenset()
    discord_allow_dms: bool = True
    discord_allow_bots: bool = False
    discord_thread_followups: bool = True
    # Sharding (large bots): the total shard count, and the shard ids this process runs
    # (empty: all of them). Unset count: one connection, no sharding.
    discord_shard_count: PositiveInt | None = None
    discord_shard_ids: IdList = frozenset()

    # Slack
    slack_bot_token: SecretStr | None = None  # xoxb-…
    slack_app_token: SecretStr | None = None  # xapp-…: Socket Mode; unset: HTTP mode
    slack_signing_secret: SecretStr | None = None  # HTTP mode: verifies Slack's requests
    port: int = Field(default=3000, ge=1, le=65535)  # HTTP mode: POST /slack/events
    slack_allowed_channels: IdList = frozenset()
    slack_allowed_users: IdList = frozenset()
    # DMs with the bot and its assistant panel; unset: allowed unless SLACK_ALLOWED_CHANNELS is set
    slack_allow_dms: bool | None = None
    slack_admins: IdList = frozenset()  # user ids that may set a channel's /persona
    slack_thread_followups: bool = True
    slack_assistant: bool = True
    slack_native_streaming: bool = False

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # Also write the log (at LOG_LEVEL) to this file; unset: stderr only
    log_file: Path | None = None
    # The interactive console keeps the terminal for the conversation: only records at
    # this level or above reach it (the rest go to LOG_FILE when set)
    console_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # unset: no endpoint

    @field_validator(
        "discord_token",
        "discord_shard_count",
        "log_file",
        "metrics_port",
        "openai_api_key",
        "slack_bot_token",
        "slack_app_token",
        "slack_signing_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("slack_bot_token")
    @classmethod
    def _bot_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith("xoxb-"):
            raise ValueError("a Slack bot token starts with xoxb-")
        return value

    @field_validator("slack_app_token")
    @classmethod
    def _app_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith("xapp-"):
            raise ValueError("a Slack app-level token starts with xapp-")
        return value

    @field_validator("openai_base_url", mode="before")
    @classmethod
    def _http_url(cls, value: object) -> object:
        if value in (None, ""):
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if not text.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL, e.g. http://localhost:8000/v1")
        return value

    @field_validator("openai_vision", mode="before")
    @classmethod
    def _vision(cls, value: object) -> object:
        # One line for a bad value (a plain union would report each of its members).
        if isinstance(value, str):
            value = value.strip()
            if value.lower() == "auto":
                return "auto"
        try:
            return _flag.validate_python(value)
        except ValidationError:
            raise ValueError("expected true, false or auto") from None

    @model_validator(mode="after")
    def _shards(self) -> Settings:
        ids = {int(i) for i in self.discord_shard_ids if i.isdigit()}
        if len(ids) != len(self.discord_shard_ids):
            raise ValueError("DISCORD_SHARD_IDS: shard ids are numbers")
        if ids and not self.discord_shard_count:
            raise ValueError("DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT")
        if ids and max(ids) >= (self.discord_shard_count or 0):
            raise ValueError("DISCORD_SHARD_IDS must be below DISCORD_SHARD_COUNT")
        return self

    @model_validator(mode="after")
    def _backend(self) -> Settings:
        if self.model_backend == "openai" and not self.openai_base_url:
            raise ValueError("OPENAI_BASE_URL is needed with MODEL_BACKEND=openai")
        # Said before any model loads (minutes for a hub model): int8 weights exist only
        # in the local model's lean forward.
        if self.dtype == "int8" and not self.fast_decode:
            raise ValueError("DTYPE: int8 needs FAST_DECODE=true (the lean forward)")
        if self.dtype == "int8" and self.model_backend == "openai":
            raise ValueError("DTYPE: int8 is for the local model, not MODEL_BACKEND=openai")
        return self

    @model_validator(mode="after")
    def _slack_mode(self) -> Settings:
        if self.slack_bot_token and not (self.slack_app_token or self.slack_signing_secret):
            raise ValueError(
                "SLACK_SIGNING_SECRET is needed in HTTP mode "
                "(or set SLACK_APP_TOKEN for Socket Mode)"
            )
        return self

    @field_validator(
        "discord_allowed_guilds",
        "discord_allowed_channels",
        "discord_allowed_roles",
        "discord_allowed_users",
    )
    @classmethod
    def _snowflakes(cls, value: frozenset[str]) -> frozenset[str]:
        bad = sorted(v for v in value if not v.isdigit())
        if bad:
            raise ValueError(f"Discord ids are numbers; not: {', '.join(bad[:3])}")
        return value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _check_redis_url(cls, value: object) -> object:
        if value in (None, ""):
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        try:
            _redis_dsn.validate_python(text)
        except ValidationError as exc:
            # Name the problem, never the value: it may hold a password.
            reason = exc.errors()[0]["msg"]
            raise ValueError(f"not a redis:// or rediss:// URL ({reason})") from None
        return text

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda", "mps") or value.startswith("cuda:"):
            return value
        raise ValueError("expected auto, cpu, cuda, cuda:N or mps")

    @field_validator("log_file")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value else None  # LOG_FILE=~/chatbot.log

    @field_validator("log_level", "console_log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def secret_values(self) -> list[str]:
        """Every secret in the configuration, for scrubbing from log lines and printed
        errors. Of a URL setting only its secret parts (`url_secrets`): its host, port
        and path are what an operator needs to see which address failed."""
        values = [
            value.get_secret_value()
            for name, value in self.__dict__.items()
            if isinstance(value, SecretStr) and name not in URL_SETTINGS
        ]
        for url in (self.redis_url, self.openai_base_url):
            values += url_secrets(url.get_secret_value()) if url else []
        return [value for value in values if value]

    def redis_url_masked(self) -> str | None:
        """The Redis URL with any password replaced by ***, for logs and errors."""
        return mask_url(self.redis_url.get_secret_value()) if self.redis_url else None


# Secret because of what they may carry (a password, a key in the query), not whole.
URL_SETTINGS = frozenset({"redis_url", "openai_base_url"})

# Query parameters known to carry no secret (redis-py's connection options, Azure's
# api-version); every other parameter's value is masked, since any may be a credential
# (?password=, ?api_key=, ?token=, ?sig=, …).
PLAIN_QUERY_PARAMS = frozenset(
    {
        "db",
        "protocol",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "health_check_interval",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "decode_responses",
        "client_name",
        "max_connections",
        "timeout",
        "retry_on_error",
        "ssl",
        "encoding",
        "api-version",
    }
)


def _secret_query(name: str) -> bool:
    return name.lower() not in PLAIN_QUERY_PARAMS


def url_secrets(url: str) -> list[str]:
    """The secrets a URL carries: its password (or a lone username used as one) and
    the values of its query parameters that may be credentials."""
    parts = urlsplit(url)
    found = [parts.password or parts.username or ""]
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if _secret_query(k)]
    # Percent-encoded forms too: a library may print the URL as given.
    found += [quote(s, safe="") for s in found]
    return sorted({s for s in found if s})


def mask_url(url: str) -> str:
    """Hide the password (and a lone username used as one) and the value of every query
    parameter that may be a credential in a URL; the rest is kept as written."""
    parts = urlsplit(url)
    # From the text, not urlsplit's parsed host and port: those reject or rewrite what
    # they cannot parse (a bad port, an IPv6 address), and this must never fail.
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon and user else f":***@{host}"
    query = "&".join(_mask_query_item(item) for item in parts.query.split("&") if item)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_query_item(item: str) -> str:
    name, equals, _ = item.partition("=")
    if not _secret_query(unquote_plus(name)):
        return item
    return f"{name}=***" if equals else "***"


class ConfigError(Exception):
    """A configuration the bot cannot run with: the entry point prints it and exits 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad variable: its name and what is wrong, never its value."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        name = f"{str(error['loc'][0]).upper()}: " if error["loc"] else ""
        lines.append(f"Invalid configuration: {name}{message}")
    return "\n".join(lines)


def load_settings(env_file: str | Path | None = ".env") -> Settings:
    """Read the settings, or raise ConfigError (exit code 2) with a readable message."""
    try:
        return Settings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
