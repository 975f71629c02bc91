"""The seam between the engine and where replies are generated.

The engine talks to a `Backend` only: `bot.inference.local.LocalBackend` (a model run
here through transformers) or `bot.inference.served.OpenAIBackend` (an
OpenAI-compatible inference server). `bot.app` chooses one. A new backend implements
`Backend` and is chosen there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bot.images import ImageInput
from bot.messages import Turn


@dataclass(frozen=True)
class Prompt:
    """A prompt fitted to the budget."""

    input_ids: list[int]
    user_text: str  # the user's message as the model saw it (cut when too long)
    kept_turns: int  # history turns that fit
    truncated: bool  # True when the user's message itself had to be cut
    original_chars: int
    messages: tuple[dict[str, str], ...] = ()  # for servers that take chat messages
    conversation: str = ""  # whose model cache the prompt may continue ("": none)
    # Leading tokens that are the system prompt's (and the template's before the first
    # message): the same for every conversation with this system prompt or persona.
    shared: int = 0
    # Sampling temperature for this reply only (Regenerate); None: the configured one.
    temperature: float | None = None
    # The new message's images (a backend that `takes_images`): they go with the last
    # user message only; its text (and memory) carries their placeholders.
    images: tuple[ImageInput, ...] = ()


class Note(str):
    """A chunk of a reply's stream that is a note for the person (say, that the model
    refused the message's images), not the model's words: shown, never stored."""

    __slots__ = ()


def with_name(name: str, content: str) -> str:
    """A turn's text with its author's name before it, for models (and servers) whose
    template has no place for a name."""
    return f"{name}: {content}" if name else content


class Backend(ABC):
    """Where replies are generated: the local model, or an inference server."""

    @property
    def takes_images(self) -> bool:
        """Whether the model looks at images now (`Prompt.images`); adapters download
        and decode a message's images only then."""
        return False

    @abstractmethod
    async def prepare(
        self,
        history: list[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt:
        """The prompt for `user_text` after `history`, fitted to the model;
        `system_prompt` replaces the configured one (a channel's persona). With
        `speaker` (the new message's author), user turns carry their authors' names."""

    @abstractmethod
    def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        """The reply's text as it is generated; closing the iterator stops generation."""

    async def ready(self) -> bool:
        """Whether replies can be generated now (for readiness checks)."""
        return True

    async def count_tokens(self, text: str) -> int:
        """About how many tokens `text` is, for usage limits: a backend with a
        tokenizer counts exactly; this estimate is ~4 characters a token."""
        return max(1, (len(text) + 3) // 4) if text else 0

    def forget(self, conversation: str) -> None:  # noqa: B027 - optional for backends
        """Drop whatever the backend keeps of a conversation (a model cache)."""

    def warm(  # noqa: B027 - optional for backends
        self,
        conversation: str,
        history: list[Turn],
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> None:
        """Between turns: prepare whatever makes the conversation's next turn fast
        (a model cache of `history`, its next prompt's beginning), in the background,
        after anyone's live work. Returns at once; a failure changes nothing else."""

    @abstractmethod
    async def close(self) -> None:
        """Release threads and connections."""
