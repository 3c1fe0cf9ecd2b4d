"""Token selection at every node: argmax when greedy, otherwise a sample from the processed
distribution (temperature, top-k, top-p, min-p).

The same function picks the next token in plain decoding and the target token at every tree
node, which is what makes tree verification lossless (DESIGN.md rule 9): each node draws
its own independent sample, and the walk down the tree only ever uses the samples of the
nodes it visits.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def validate(self) -> None:
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}.")

    @property
    def greedy(self) -> bool:
        return self.temp == 0.0


def processed_logprobs(logits: mx.array, params: SamplingParams) -> mx.array:
    """``[T, V]`` logits -> ``[T, V]`` log-probabilities of the distribution sampled from."""
    logits = logits.astype(mx.float32) / params.temp
    neg_inf = mx.array(-float("inf"), dtype=mx.float32)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logits, axis=-1)[:, vocab - params.top_k][:, None]
        logits = mx.where(logits < kth, neg_inf, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if params.min_p > 0.0:
        cutoff = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(params.min_p))
        logprobs = mx.where(logprobs < cutoff, neg_inf, logprobs)
    if params.top_p < 1.0:
        order = mx.argsort(-logprobs, axis=-1)
        sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
        probs = mx.exp(sorted_lp)
        # keep a token if the mass strictly before it is below top_p (the top token always stays)
        before = mx.cumsum(probs, axis=-1) - probs
        keep_sorted = before < params.top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        logprobs = mx.where(keep, logprobs, neg_inf)
    return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)


def make_sampler(params: SamplingParams) -> Sampler:
    """A function ``[T, V]`` logits -> ``[T]`` int32 tokens."""
    params.validate()
    if params.greedy:
        return lambda logits: mx.argmax(logits, axis=-1).astype(mx.int32)

    def sample(logits: mx.array) -> mx.array:
        return mx.random.categorical(processed_logprobs(logits, params), axis=-1).astype(mx.int32)

    return sample
