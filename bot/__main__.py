"""Command line: `python -m bot` (every configured platform), `python -m bot console`
(chat in this terminal) or `python -m bot forget --platform P --user ID` (delete what
a person wrote, from the store; no model is loaded)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from typing import TYPE_CHECKING

from bot.logs import Terminal, redact, setup_logging, status
from bot.settings import ConfigError, load_settings

if TYPE_CHECKING:
    from bot.app import Adapter

log = logging.getLogger("bot")

NOTHING_CONFIGURED = (
    "No chat platform is configured: set the Discord or Slack credentials "
    "(see config/.env.example).\n"
    "To chat in this terminal instead: python -m bot console"
)


def _collect_and_freeze() -> None:
    """Once the bot is ready: one collection, the survivors frozen, the collector on."""
    gc.collect()
    gc.freeze()  # left out of later collections, and of the ones at exit
    gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    commands = parser.add_subparsers(
        dest="command", title="commands", description="without one: run the configured platforms"
    )
    commands.add_parser("console", help="chat in this terminal")
    forget = commands.add_parser(
        "forget", help="delete everything a person wrote (and the replies) from the store"
    )
    forget.add_argument("--platform", required=True, choices=["discord", "slack", "console"])
    forget.add_argument("--user", required=True, help="the person's user id on that platform")
    args = parser.parse_args(argv)
    # Known once the settings are read: what is printed outside the log scrubber is
    # scrubbed here (a ConfigError may quote a URL).
    secrets: list[str] = []
    collector_off = False
    try:
        settings = load_settings()
        secrets = settings.secret_values()
        # The interactive console keeps the terminal for the conversation (bot.logs).
        terminal = (
            Terminal(sys.stdout) if args.command == "console" and sys.stdin.isatty() else None
        )
        setup_logging(
            settings.log_level,
            secrets,
            json_lines=settings.log_format == "json",
            log_file=settings.log_file,
            terminal=terminal,
            terminal_level=settings.console_log_level,
        )
        if args.command == "forget":
            from bot.forgetting import forget_cli  # the store only: no torch, no model

            return forget_cli(settings, args.platform, args.user)
        if terminal is not None:
            # Importing torch and transformers takes seconds: say something meanwhile.
            log.info("Starting", extra=status("Starting…"))
        # A start makes ~1.5 M objects that live as long as the process (torch,
        # transformers, the model): the cyclic garbage collector would go through them
        # again and again while they arrive (~0.5-1 s of a warm start). It is off until
        # the bot is ready (unless whoever runs us turned it off: theirs to turn on).
        collector_off = gc.isenabled()
        gc.disable()
        # Imported only now: torch and transformers take seconds, and a bad setting
        # should be reported at once.
        from bot.app import serve

        adapters: list[Adapter]
        if args.command == "console":
            from adapters.console import ConsoleAdapter

            adapters = [ConsoleAdapter(terminal=terminal)]
        else:
            from adapters import configured

            adapters = configured(settings)
            if not adapters:
                print(NOTHING_CONFIGURED, file=sys.stderr)  # noqa: T201 - user-facing
                return 2
        ready = _collect_and_freeze if collector_off else None
        asyncio.run(serve(settings, adapters, on_ready=ready))
    except ConfigError as error:
        message = redact(error.message, secrets)
        print(message, file=sys.stderr)  # noqa: T201 - user-facing, no traceback
        return 2
    except ConnectionError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:
        # Through the log scrubber, not Python's own traceback printer: a library's
        # exception may quote a URL or a header with a secret in it.
        log.exception("The bot stopped on an unexpected error")
        return 1
    finally:
        if collector_off:
            gc.enable()  # as it was, when the start failed (a no-op once ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
