"""Prompt lookup decoding: draft the continuation of the latest n-gram's previous occurrence.

A drafter that needs no model at all, verified by the same tree verifier as the streams
(a chain tree). It is the model-free baseline `specstream bench` compares against.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass
class PromptLookup:
    """Propose up to ``num_draft`` tokens by matching the last ``max_ngram..min_ngram`` tokens."""

    num_draft: int = 4
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if self.num_draft < 1 or not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("PromptLookup needs num_draft >= 1 and 1 <= min_ngram <= max_ngram.")

    def propose(self, history: Sequence[int]) -> list[int]:
        """Tokens that followed the most recent earlier occurrence of the longest matching n-gram."""
        n_hist = len(history)
        for n in range(min(self.max_ngram, n_hist - 1), self.min_ngram - 1, -1):
            tail = list(history[n_hist - n :])
            # search backwards, excluding the tail itself
            for start in range(n_hist - n - 1, -1, -1):
                if list(history[start : start + n]) == tail:
                    follow = list(history[start + n : start + n + self.num_draft])
                    if follow:
                        return follow
        return []
