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
        self._top_p = top_p
        self._repetition_penalty = repetition_penalty
        self._processors = self._processors_for(temperature)
        self._own: dict[float, LogitsProcessorList] = {}  # replies' own temperatures

    def _processors_for(self, temperature: float) -> LogitsProcessorList:
        processors: list[Any] = []
        if self._repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self._repetition_penalty))
        if temperature > 0:
            processors.append(TemperatureLogitsWarper(temperature))
            if self._top_p < 1.0:
                processors.append(TopPLogitsWarper(self._top_p))
        return LogitsProcessorList(processors)

    def generator(
        self, prompt: list[int], device: torch.device, temperature: float | None = None
    ) -> torch.Generator | None:
        """A new reply's random stream (None when greedy); `temperature`: the reply's
        own (a Regenerate), else the configured one."""
        if self.greedy if temperature is None else temperature <= 0:
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
        temperatures: list[float | None] | None = None,
    ) -> list[int]:
        """The next token of each reply: `contexts[i]` its tokens so far (prompt and
        reply), `logits[i]` its scores, `temperatures[i]` its own temperature (None:
        the configured one). Replies are chosen together with those of their
        temperature (each row's choice is its own: grouping changes no token)."""
        groups: dict[float | None, list[int]] = {}
        for i, temperature in enumerate(temperatures or [None] * len(contexts)):
            groups.setdefault(temperature, []).append(i)
        chosen = [0] * len(contexts)
        for temperature, rows in groups.items():
            if temperature is None:
                greedy, processors = self.greedy, self._processors
            else:
                if temperature not in self._own:
                    self._own[temperature] = self._processors_for(temperature)
                greedy, processors = temperature <= 0, self._own[temperature]
            if len(rows) == len(contexts):  # the usual step: one group, no copy
                picked = self._choose(contexts, generators, logits, greedy, processors)
            else:
                picked = self._choose(
                    [contexts[i] for i in rows],
                    [generators[i] for i in rows],
                    logits[rows],
                    greedy,
                    processors,
                )
            for i, token in zip(rows, picked, strict=True):
                chosen[i] = token
        return chosen

    def _choose(
        self,
        contexts: list[list[int]],
        generators: list[torch.Generator | None],
        logits: torch.Tensor,
        greedy: bool,
        processors: LogitsProcessorList,
    ) -> list[int]:
        if not contexts:
            return []
        scores = logits
        if processors:
            # Shorter contexts padded with their own first token: the same set of tokens
            # (the repetition penalty looks only at which tokens were seen).
            width = max(len(tokens) for tokens in contexts)
            padded = [tokens + [tokens[0]] * (width - len(tokens)) for tokens in contexts]
            seen: Any = torch.tensor(padded, device=scores.device)
            scores = processors(seen, scores)
        if greedy:
            return [int(token) for token in scores.argmax(-1).tolist()]
        probabilities = torch.softmax(scores, dim=-1)
        return [
            int(torch.multinomial(p, 1, generator=g).item())
            for p, g in zip(probabilities, generators, strict=True)
        ]
