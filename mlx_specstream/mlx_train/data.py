"""Training data for the MLX trainer, without PyTorch: tokenization, bucketing, padding and
stream targets, as the PyTorch trainer does them (``mlx_specstream.train.data`` and
``.layout``), so both trainers see the same token sequences in the same order.

Each :class:`~mlx_specstream.datasets.Example` becomes ``input_ids`` plus ``labels`` (the
token id at completion tokens, :data:`IGNORE_INDEX` at prompt tokens); the prompt is
tokenized with the tokenizer's special tokens (BOS) as inference tokenizes it and the
completion ends with EOS. Batches group examples of similar length (bucketing).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional, Sequence

import numpy as np

from mlx_specstream.datasets import Example

IGNORE_INDEX = -100


@dataclasses.dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # == input_ids at completion tokens, IGNORE_INDEX elsewhere


def _prompt_and_completion_ids(tokenizer: Any, ex: Example) -> tuple[list[int], list[int]]:
    if ex.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("Chat ('messages') data needs a tokenizer with a chat template; "
                             "use {'prompt', 'completion'} lines instead.")
        msgs = [dict(m) for m in ex.messages]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt):
            raise ValueError("The chat template does not render the conversation without its last reply as a "
                             "prefix of the whole; train on {'prompt', 'completion'} lines instead.")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        return p_ids, c_ids
    p_ids = tokenizer(ex.prompt)["input_ids"]
    full_ids = tokenizer(ex.prompt + ex.completion)["input_ids"]
    if full_ids[: len(p_ids)] == p_ids:  # the usual case: tokens do not merge across the boundary
        return p_ids, full_ids[len(p_ids):]
    return p_ids, tokenizer(ex.completion, add_special_tokens=False)["input_ids"]


def tokenize_example(tokenizer: Any, ex: Example, max_length: int) -> Optional[TokenizedExample]:
    """Tokenize one example, truncated to ``max_length``; None if no completion token survives."""
    p_ids, c_ids = _prompt_and_completion_ids(tokenizer, ex)
    eos = tokenizer.eos_token_id
    if eos is not None and (not c_ids or c_ids[-1] != eos):
        c_ids = c_ids + [eos]
    ids = (p_ids + c_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + c_ids)[:max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):  # the first token is never a target
        return None
    return TokenizedExample(ids, labels)


def tokenize_all(tokenizer: Any, examples: Sequence[Example], max_length: int) -> tuple[list[TokenizedExample], int]:
    """Tokenize every example; returns the kept ones and how many were dropped (prompt too long)."""
    kept = [t for t in (tokenize_example(tokenizer, ex, max_length) for ex in examples) if t is not None]
    return kept, len(examples) - len(kept)


def bucketed_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                     bucket_factor: int = 32) -> list[list[int]]:
    """One epoch's batches of example indices, deterministic in ``(seed, epoch)``: the PyTorch
    trainer's order (one process). Shuffle, sort each window of ``batch_size * bucket_factor``
    examples by length, cut it into batches, shuffle the batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_factor
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def token_batches(lengths: Sequence[int], max_tokens: int, *, seed: int, epoch: int,
                  window: int = 4096) -> list[list[int]]:
    """One epoch's batches of example indices holding at most ``max_tokens`` padded tokens each
    (the PyTorch trainer's ``--batch-tokens`` order): shuffle, sort each window by length, cut it
    greedily so ``count x longest`` stays within the budget, shuffle the batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        current: list[int] = []
        for i in sorted(order[start: start + window], key=lambda i: lengths[i]):
            if current and (len(current) + 1) * lengths[i] > max_tokens:  # sorted: lengths[i] is the longest
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def epoch_steps(lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, accumulation: int = 1,
                batch_tokens: int = 0) -> list[list[list[int]]]:
    """One epoch as optimizer steps, each a list of ``accumulation`` micro-batches (example
    indices), as the PyTorch trainer plans them (one process): with ``batch_tokens``, budgeted
    micro-batches taken ``accumulation`` at a time; otherwise one bucketed batch of
    ``batch_size x accumulation`` per step, cut (length-sorted) into micro-batches of
    ``batch_size``, so a step holds the same examples as a run with the larger batch."""
    if batch_tokens:
        micro = token_batches(lengths, batch_tokens, seed=seed, epoch=epoch)
        micro = micro[: len(micro) // accumulation * accumulation]
        return [micro[i: i + accumulation] for i in range(0, len(micro), accumulation)]
    out = []
    for b in bucketed_batches(lengths, batch_size * accumulation, seed=seed, epoch=epoch):
        b = sorted(b, key=lambda i: lengths[i]) if accumulation > 1 else b
        out.append([b[i: i + batch_size] for i in range(0, len(b), batch_size)])
    return out


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest: ``input_ids`` and ``labels``, each ``[B, T]`` int32 numpy.

    Right padding needs no padding mask: a valid token never attends to a later one, and
    padded positions have no target."""
    t = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), t), pad_id, dtype=np.int32)
    labels = np.full((len(examples), t), IGNORE_INDEX, dtype=np.int32)
    for b, e in enumerate(examples):
        ids[b, : len(e.input_ids)] = e.input_ids
        labels[b, : len(e.labels)] = e.labels
    return ids, labels


def stream_targets(labels: np.ndarray, num_streams: int) -> np.ndarray:
    """Targets ``[B, T, 1 + γ]``: entry ``[b, t, j] = labels[b, t + 1 + j]`` (j = 0: main stream).

    Example, labels ``[-100, -100, 7, 8, 9]`` and γ = 1: position 1 targets (7, 8),
    position 3 targets (9, ignore), position 4 targets (ignore, ignore).
    """
    b, t = labels.shape
    shifted = np.concatenate([labels, np.full((b, num_streams + 1), IGNORE_INDEX, labels.dtype)], axis=1)
    return np.stack([shifted[:, 1 + j: 1 + j + t] for j in range(num_streams + 1)], axis=-1)
