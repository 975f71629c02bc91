"""Choosing each reply's next token from its logits: greedy, or sampled with the
configured temperature, top-p and repetition penalty, each reply with its own random
stream (seeded from SEED and its prompt when SEED is set)."""

from __future__ import annotations

import hashlib
from array import array
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)


def row_seed(seed: int, prompt: list[int]) -> int:
    """A reply's seed: SEED and its prompt, not its place among other replies."""
    key = (seed % (1 << 64)).to_bytes(8, "little")
    digest = hashlib.blake2b(array("q", prompt).tobytes(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Sampler:
    """Next tokens for several replies at once, each reply's own numbers: the logits
    processors work row by row, so a reply's token does not depend on its neighbours."""

    def __init__(
        self,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.greedy = temperature <= 0
        self.seed = seed
        processors: list[Any] = []
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if not self.greedy:
            processors.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        self._processors = LogitsProcessorList(processors)

    def generator(self, prompt: list[int], device: torch.device) -> torch.Generator | None:
        """A new reply's random stream (None when greedy)."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:  # the same message in the same context samples the same reply
            generator.manual_seed(row_seed(self.seed, prompt))
        return generator

    def choose(
        self,
        contexts: list[list[int]],
        generators: list[torch.Generator | None],
        logits: torch.Tensor,
    ) -> list[int]:
        """The next token of each reply: `contexts[i]` its tokens so far (prompt and
        reply), `logits[i]` its scores."""
        if not contexts:
            return []
        scores = logits
        if self._processors:
            # Shorter contexts padded with their own first token: the same set of tokens
            # (the repetition penalty looks only at which tokens were seen).
            width = max(len(tokens) for tokens in contexts)
            padded = [tokens + [tokens[0]] * (width - len(tokens)) for tokens in contexts]
            seen: Any = torch.tensor(padded, device=scores.device)
            scores = self._processors(seen, scores)
        if self.greedy:
            return [int(token) for token in scores.argmax(-1).tolist()]
        probabilities = torch.softmax(scores, dim=-1)
        return [
            int(torch.multinomial(p, 1, generator=g).item())
            for p, g in zip(probabilities, generators, strict=True)
        ]
