"""Shared test helpers: tiny models whose streams agree with the main stream.

A random model's streams rarely guess the main stream's next tokens, so only the reject
path runs. ``markov_model`` trains a tiny model in MLX, with the Speculative Streaming loss,
on a deterministic Markov chain (x_{t+1} = perm[x_t]): afterwards stream j predicts
perm^{j+1}[x_t] and most drafts are accepted, so the accept path and cache compaction run.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_specstream.config import PruningConfig, SpecStreamConfig
from mlx_specstream.generate import generate_step
from mlx_specstream.sampling import SamplingParams
from mlx_specstream.testing import random_model, tiny_config

CHAIN_TOKENS = 16  # the chain walks over token ids 0..15


def chain(perm: np.ndarray, start: int, length: int) -> list[int]:
    out = [start]
    for _ in range(length - 1):
        out.append(int(perm[out[-1]]))
    return out


def ss_loss(model, tokens: mx.array) -> mx.array:
    """DESIGN.md rule 10 over whole sequences: main CE + 0.1 * per-stream CE (+ pruning CE)."""
    main, streams, prune = model.all_logits(tokens)
    t = tokens.shape[1]
    loss = nn.losses.cross_entropy(main[:, :-1], tokens[:, 1:]).mean()
    for j in range(1, model.num_streams + 1):
        if t - 1 - j > 0:
            loss = loss + 0.1 * nn.losses.cross_entropy(streams[:, : t - 1 - j, j - 1], tokens[:, 1 + j :]).mean()
    if prune is not None:
        loss = loss + 0.1 * nn.losses.cross_entropy(prune[:, :-1], tokens[:, 1:]).mean()
    return loss


@functools.lru_cache(maxsize=None)
def markov_model(family: str, num_streams: int = 3, msa_layers: int = 2, pruning: bool = False, steps: int = 100):
    """(model, perm): a tiny model trained until its streams predict the chain."""
    spec = SpecStreamConfig(
        num_streams=num_streams,
        num_msa_layers=msa_layers,
        pruning=PruningConfig(rank=4, threshold=0.05) if pruning else None,
    )
    config = tiny_config(family, vocab_size=32, hidden_size=64, num_hidden_layers=3)
    model = random_model(config, spec, seed=1)
    rng = np.random.default_rng(0)
    perm = rng.permutation(CHAIN_TOKENS)
    opt = optim.Adam(learning_rate=1e-2)
    loss_and_grad = nn.value_and_grad(model, ss_loss)
    for _ in range(steps):
        batch = mx.array([chain(perm, int(s), 16) for s in rng.integers(0, CHAIN_TOKENS, 8)])
        loss, grads = loss_and_grad(model, batch)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    model.eval()
    return model, perm


def run_tokens(model, prompt: list[int], max_tokens: int, **kwargs) -> tuple[list[int], list]:
    """All generated ids and the steps of one generation (no tokenizer, no EOS)."""
    steps = list(
        generate_step(model, mx.array(prompt, dtype=mx.int32), max_tokens=max_tokens, **kwargs)
    )
    ids = [t for s in steps for t in s.tokens][:max_tokens]
    return ids, steps


GREEDY = SamplingParams()
